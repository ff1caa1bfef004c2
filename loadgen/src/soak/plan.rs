//! What each soak call does, decided before the first one starts: its scenario (how it ends and
//! what goes wrong on the way), how long it talks, and when the fake Realtime server breaks it.
//! Drawn from a seeded generator, so a run can be repeated call for call.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

/// How a call goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Talks, then Twilio's `stop`.
    Stop,
    /// Twilio goes away without `stop`: the harness closes or resets its TCP socket, at any
    /// moment from right after the upgrade to the middle of the call.
    TwilioDrop,
    /// The fake resets the call's first OpenAI socket mid-call; callbridge dials a new session
    /// and the call goes on to its `stop`.
    OpenaiDrop,
    /// As `OpenaiDrop`, but the fake refuses every new session for the call: callbridge gives
    /// up and ends the call with the apology (and a REST hang-up after it).
    Refused,
    /// The fake sends `session_expired` on the first session; callbridge moves the call to a
    /// new session and closes the old one.
    Expired,
    /// Longer than `SESSION_ROLLOVER_SECS`: callbridge moves the call to a fresh session by
    /// itself, at a quiet moment.
    Rollover,
    /// The first OpenAI socket is reset and the new session's handshake is slow; Twilio goes
    /// away (or sends `stop`) while callbridge is still dialling.
    DropMidReconnect,
}

impl Scenario {
    pub const ALL: [Self; 7] = [
        Self::Stop,
        Self::TwilioDrop,
        Self::OpenaiDrop,
        Self::Refused,
        Self::Expired,
        Self::Rollover,
        Self::DropMidReconnect,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::TwilioDrop => "twilio-drop",
            Self::OpenaiDrop => "openai-drop",
            Self::Refused => "refused",
            Self::Expired => "expired",
            Self::Rollover => "rollover",
            Self::DropMidReconnect => "drop-mid-reconnect",
        }
    }

    /// Whether the fake breaks the call's first session (by resetting it, or with
    /// `session_expired`).
    pub fn breaks_first_session(self) -> bool {
        matches!(
            self,
            Self::OpenaiDrop | Self::Refused | Self::Expired | Self::DropMidReconnect
        )
    }

    /// Whether the call must outlive a lost session: a new one takes over and the caller's
    /// audio flows through it until the end.
    pub fn survives_a_new_session(self) -> bool {
        matches!(self, Self::OpenaiDrop | Self::Expired | Self::Rollover)
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// How the harness ends a call (or whether callbridge does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ending {
    /// `stop`, then callbridge closes the stream.
    Stop,
    /// The socket closed without a WebSocket close (a FIN), right after the upgrade, before
    /// `start`.
    DropBeforeStart,
    /// A FIN without `stop`.
    DropFin,
    /// A TCP reset without `stop`.
    DropReset,
    /// Nothing: the harness talks until callbridge ends the call.
    ByServer,
}

impl Ending {
    pub fn label(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::DropBeforeStart => "drop before start",
            Self::DropFin => "drop (FIN)",
            Self::DropReset => "drop (RST)",
            Self::ByServer => "ended by callbridge",
        }
    }
}

/// One call's plan.
#[derive(Clone, Debug)]
pub struct CallPlan {
    pub index: usize,
    pub scenario: Scenario,
    pub ending: Ending,
    /// Audio before the harness ends the call; for `DropMidReconnect`, after the fault.
    pub talk: Duration,
    /// How long after the first session opened the fake breaks it.
    pub fault_after: Duration,
}

/// The share of each scenario, from `stop=30,twilio-drop=20,…`: weights, not necessarily
/// summing to 100. A scenario left out does not run.
#[derive(Clone, Debug, PartialEq)]
pub struct Mix(Vec<(Scenario, u32)>);

impl Default for Mix {
    fn default() -> Self {
        Self(vec![
            (Scenario::Stop, 30),
            (Scenario::TwilioDrop, 20),
            (Scenario::OpenaiDrop, 14),
            (Scenario::Refused, 8),
            (Scenario::Expired, 12),
            (Scenario::Rollover, 10),
            (Scenario::DropMidReconnect, 6),
        ])
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(s, w)| format!("{s}={w}")).collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for Mix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut weights = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not NAME=WEIGHT"))?;
            let scenario = Scenario::ALL
                .into_iter()
                .find(|s| s.label() == name.trim())
                .ok_or_else(|| {
                    let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.label()).collect();
                    format!("unknown scenario {name:?} (known: {})", names.join(", "))
                })?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: the weight is not a whole number"))?;
            if weights.iter().any(|(s, _)| *s == scenario) {
                return Err(format!("{name} is given twice"));
            }
            if weight > 0 {
                weights.push((scenario, weight));
            }
        }
        if weights.is_empty() {
            return Err("the mix has no scenario with a weight above 0".into());
        }
        Ok(Self(weights))
    }
}

/// The timings every plan is drawn within, from the server's `SESSION_ROLLOVER_SECS`: calls
/// that must not roll over end well before it, `rollover` calls well after it.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    pub rollover: Duration,
}

/// The earliest the fake breaks a first session, and the latest.
const FAULT_AFTER_MS: (u64, u64) = (600, 900);
/// Audio after the fault, for calls that go on to their `stop`: enough for the new session to
/// carry audio for a while.
const AFTER_FAULT_MS: (u64, u64) = (1200, 1500);
/// A `rollover` call talks this much longer than `SESSION_ROLLOVER_SECS`.
const PAST_ROLLOVER_MS: (u64, u64) = (1000, 2500);
/// Calls that must not roll over end at least this long before it.
const ROLLOVER_MARGIN_MS: u64 = 400;
/// `drop-mid-reconnect`: the caller leaves this long after the fault.
const MID_RECONNECT_MS: (u64, u64) = (50, 400);
/// The least `SESSION_ROLLOVER_SECS` these timings fit: a broken call's fault and the audio
/// after it must end before its new session is due for rollover.
pub const MIN_ROLLOVER_SECS: u64 = 3;

impl Timings {
    /// The plans of calls `range`, from a generator seeded with `seed` (the same range and
    /// seed give the same plans).
    pub fn plans(&self, mix: &Mix, seed: u64, range: std::ops::Range<usize>) -> Vec<CallPlan> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let total: u32 = mix.0.iter().map(|(_, w)| w).sum();
        // Calls before `range` are drawn too (and dropped), so that a warm-up and the soak
        // after it continue one sequence.
        (0..range.end)
            .map(|index| self.plan(index, pick(mix, total, &mut rng), &mut rng))
            .skip(range.start)
            .collect()
    }

    fn plan(&self, index: usize, scenario: Scenario, rng: &mut fastrand::Rng) -> CallPlan {
        let ms = |rng: &mut fastrand::Rng, (low, high): (u64, u64)| {
            Duration::from_millis(rng.u64(low..=high))
        };
        let before_rollover = self.rollover.saturating_sub(ms_(ROLLOVER_MARGIN_MS));
        let fault_after = ms(rng, FAULT_AFTER_MS);
        let (ending, talk) = match scenario {
            Scenario::Stop => (Ending::Stop, between(rng, ms_(800), before_rollover)),
            Scenario::TwilioDrop => match rng.u8(0..20) {
                0 => (Ending::DropBeforeStart, Duration::ZERO),
                // Right after `start`, while callbridge is still opening the session.
                1 => (Ending::DropFin, Duration::ZERO),
                n => (
                    if n % 2 == 0 {
                        Ending::DropFin
                    } else {
                        Ending::DropReset
                    },
                    between(rng, ms_(200), before_rollover),
                ),
            },
            Scenario::OpenaiDrop | Scenario::Expired => {
                let talk = (fault_after + ms(rng, AFTER_FAULT_MS)).min(before_rollover);
                (Ending::Stop, talk)
            }
            Scenario::Refused => (Ending::ByServer, Duration::ZERO),
            Scenario::Rollover => (Ending::Stop, self.rollover + ms(rng, PAST_ROLLOVER_MS)),
            Scenario::DropMidReconnect => (
                if rng.bool() {
                    Ending::Stop
                } else {
                    Ending::DropReset
                },
                ms(rng, MID_RECONNECT_MS),
            ),
        };
        CallPlan {
            index,
            scenario,
            ending,
            talk,
            fault_after,
        }
    }
}

fn ms_(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn between(rng: &mut fastrand::Rng, low: Duration, high: Duration) -> Duration {
    let to_ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let (low, high) = (to_ms(low), to_ms(high).max(to_ms(low)));
    Duration::from_millis(rng.u64(low..=high))
}

fn pick(mix: &Mix, total: u32, rng: &mut fastrand::Rng) -> Scenario {
    let mut ticket = rng.u32(0..total);
    for (scenario, weight) in &mix.0 {
        if ticket < *weight {
            return *scenario;
        }
        ticket -= weight;
    }
    unreachable!("the ticket is below the sum of the weights")
}

/// Each call runs on a lane: an agent of its own in callbridge's agents file, answering one
/// business number with its own model name. The model is the one thing of the call that reaches
/// the OpenAI handshake (`?model=`), so the fake can tell which call a new session is for before
/// it answers the upgrade, and refuse or delay it.
pub const LANE_MODEL_PREFIX: &str = "soak-lane-";

pub fn lane_number(lane: usize) -> String {
    format!("+1555{:07}", lane)
}

pub fn lane_model(lane: usize) -> String {
    format!("{LANE_MODEL_PREFIX}{lane}")
}

/// The lane a Realtime upgrade's request target names (`/v1/realtime?model=soak-lane-7`).
pub fn lane_of_target(target: &str) -> Option<usize> {
    let query = target.split_once('?')?.1;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "model")?
        .1
        .strip_prefix(LANE_MODEL_PREFIX)?
        .parse()
        .ok()
}

/// callbridge's agents file for `lanes` lanes: one agent per lane, the first the default.
pub fn agents_file(lanes: usize) -> String {
    let mut out = String::from(
        "# Written by `loadgen soak-agents`: one agent per soak lane, so that the fake Realtime\n\
         # server can tell the calls' sessions apart by their model name.\n",
    );
    for lane in 0..lanes {
        out += &format!(
            "\n[[agent]]\nname = \"lane-{lane}\"\nnumbers = [\"{}\"]\n{}model = \"{}\"\n\
             instructions = \"You are a soak-test agent.\"\n",
            lane_number(lane),
            if lane == 0 { "default = true\n" } else { "" },
            lane_model(lane),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_parses_and_prints_back() {
        let mix: Mix = "stop=3, refused=1,expired=0".parse().unwrap();
        assert_eq!(mix, Mix(vec![(Scenario::Stop, 3), (Scenario::Refused, 1)]));
        assert_eq!(mix.to_string(), "stop=3,refused=1");
        assert_eq!(
            Mix::default().to_string().parse::<Mix>(),
            Ok(Mix::default())
        );
        for (bad, error) in [
            ("stop", "not NAME=WEIGHT"),
            ("stp=1", "unknown scenario \"stp\""),
            ("stop=x", "not a whole number"),
            ("stop=1,stop=2", "given twice"),
            ("stop=0", "no scenario"),
        ] {
            let message = bad.parse::<Mix>().unwrap_err();
            assert!(message.contains(error), "{bad}: {message}");
        }
    }

    #[test]
    fn plans_follow_the_mix_and_the_rollover() {
        let timings = Timings {
            rollover: Duration::from_secs(3),
        };
        let plans = timings.plans(&Mix::default(), 7, 0..4000);
        assert_eq!(plans.len(), 4000);
        let share =
            |scenario| plans.iter().filter(|p| p.scenario == scenario).count() as f64 / 4000.0;
        assert!((share(Scenario::Stop) - 0.30).abs() < 0.03);
        assert!((share(Scenario::Refused) - 0.08).abs() < 0.02);
        for plan in &plans {
            assert!(plan.fault_after >= Duration::from_millis(FAULT_AFTER_MS.0));
            match plan.scenario {
                Scenario::Rollover => assert!(plan.talk >= Duration::from_secs(4)),
                Scenario::Refused => assert_eq!(plan.ending, Ending::ByServer),
                Scenario::DropMidReconnect => assert!(plan.talk <= Duration::from_millis(400)),
                _ => assert!(plan.talk <= Duration::from_millis(2600), "{plan:?}"),
            }
        }
        assert!(plans.iter().any(|p| p.ending == Ending::DropBeforeStart));
        assert!(plans.iter().any(|p| p.ending == Ending::DropReset));
        // A warm-up and the soak after it are one sequence, drawn the same way again.
        let tail = timings.plans(&Mix::default(), 7, 3990..4000);
        assert_eq!(tail[3].index, 3993);
        assert_eq!(
            (tail[3].scenario, tail[3].talk),
            (plans[3993].scenario, plans[3993].talk)
        );
    }

    #[test]
    fn a_lane_is_found_from_its_model_in_the_upgrade_target() {
        assert_eq!(lane_of_target("/v1/realtime?model=soak-lane-42"), Some(42));
        assert_eq!(
            lane_of_target(&format!("/x?a=1&model={}", lane_model(7))),
            Some(7)
        );
        assert_eq!(lane_of_target("/v1/realtime?model=gpt-realtime"), None);
        assert_eq!(lane_of_target("/v1/realtime"), None);
        assert_eq!(lane_number(7), "+15550000007");
    }

    #[test]
    fn callbridge_routes_each_lane_number_to_its_lane_model() {
        use callbridge::agents::file::{AgentDefaults, load};
        let path = std::env::temp_dir().join(format!(
            "loadgen-soak-agents-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, agents_file(3)).unwrap();
        let defaults = AgentDefaults {
            voice: "marin".into(),
            model: "gpt-realtime".into(),
        };
        let loaded = load(&path, &defaults, &|_| None);
        std::fs::remove_file(&path).unwrap();
        let agents = loaded.unwrap_or_else(|e| panic!("{e:?}"));
        for lane in 0..3 {
            let to = format!("whatsapp:{}", lane_number(lane));
            let agent = agents.for_number(&to);
            assert_eq!(agent.model, lane_model(lane));
            assert_eq!(
                lane_of_target(&format!("/v1/realtime?model={}", agent.model)),
                Some(lane)
            );
        }
        assert_eq!(agents.default_agent().model, lane_model(0));
    }
}
