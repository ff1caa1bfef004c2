//! What the agent does besides talking: function calls answered by the business, the built-in
//! `end_call` and `transfer_call`, keypresses, the call's time limit and the silence policy.
//!
//! None of it waits: a tool request, a transfer and a context lookup are side tasks whose
//! results come back as inputs, and every condition ("the caller has heard everything", "the
//! farewell was said") is looked at again after each input, so audio keeps flowing both ways
//! however long the business takes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use askama::Template;
use serde_json::{Map, Value, json};

use super::{Action, BusinessOutcome, CallCore, SideTask, TaskId};
use crate::agents::Builtin;
use crate::call::agent;
use crate::call::leg::MediaLeg;
use crate::call::link::{AgentLink, MediaLink};
use crate::call::tools::HOLDING_INSTRUCTIONS;
use crate::metrics::{EndReason, ToolOutcome};
use crate::openai::events;
use crate::twilio::twiml;

/// A tool's answer longer than this is cut before it reaches the agent.
const MAX_TOOL_OUTPUT: usize = 16 * 1024;
const CUT_NOTICE: &str = " [cut: answer longer than 16 KiB]";
/// Arguments and outputs kept in the call's history, each.
const MAX_RECORDED: usize = 2048;
/// Keypresses closer together than this are one entry.
const KEYPRESS_GAP: Duration = Duration::from_secs(1);

const CHECK_IN_INSTRUCTIONS: &str = "The caller has been silent for a while. Ask, in one short \
sentence, whether they are still there.";
const TIME_LIMIT_FAREWELL: &str = "The call has reached its time limit. Tell the caller, in one \
or two short sentences, that you have to end the call now, and say goodbye.";
const SILENCE_FAREWELL: &str = "The caller has not answered for a while. Say a short goodbye; \
the call ends now.";

/// A function call waiting for the business's answer.
#[derive(Debug)]
pub(super) struct ToolRequest {
    call_id: String,
    tool: String,
    arguments: String,
    asked_at: Instant,
    timeout: Duration,
}

/// The call is on its way out: once the caller has heard what was said (and, for a time limit
/// or silence, the goodbye), it ends or is transferred.
#[derive(Debug)]
pub(super) struct WrapUp {
    reason: EndReason,
    then: Then,
    /// It happens at this time at the latest, heard or not.
    deadline: Instant,
    farewell: Farewell,
}

#[derive(Debug)]
enum Then {
    HangUp,
    Transfer { call_id: String, arguments: String },
}

#[derive(Debug, PartialEq, Eq)]
enum Farewell {
    /// The agent already said goodbye (it called `end_call`).
    NotNeeded,
    /// To be asked for as soon as no response is running.
    Due,
    Requested,
    Speaking(String),
    Said,
}

/// `transfer_call`'s progress with Twilio.
#[derive(Debug)]
pub(super) enum Transfer {
    None,
    Asked {
        task: TaskId,
        call_id: String,
        arguments: String,
        asked_at: Instant,
    },
    /// Twilio took the call to the `<Dial>`; the stream ends any moment.
    Moved {
        linger_until: Instant,
    },
}

#[derive(Debug, Default)]
pub(super) struct Silence {
    /// Since when nobody has spoken and nothing has played.
    quiet_since: Option<Instant>,
    check_ins: u32,
}

impl Silence {
    pub(super) fn caller_spoke(&mut self) {
        self.quiet_since = None;
        self.check_ins = 0;
    }
}

/// Keypresses waiting to be told to the agent as one entry.
#[derive(Debug, Default)]
pub(super) struct Keypad {
    digits: Vec<char>,
    tell_at: Option<Instant>,
}

impl<L: MediaLeg> CallCore<L> {
    /// The end reason when the media leg goes away.
    pub(super) fn media_end_reason(&self) -> EndReason {
        match self.transfer {
            Transfer::Moved { .. } => EndReason::Transferred,
            Transfer::None | Transfer::Asked { .. } => EndReason::CallerHungUp,
        }
    }

    /// The earliest time one of the agent's timers acts.
    pub(super) fn acting_deadline(&self) -> Option<Instant> {
        let ready = matches!(self.link, AgentLink::Ready);
        let linger = match self.transfer {
            Transfer::Moved { linger_until } => Some(linger_until),
            Transfer::None | Transfer::Asked { .. } => None,
        };
        let silence = self
            .agent
            .silence
            .zip(self.silence.quiet_since)
            .map(|(policy, since)| since + policy.reprompt_after);
        [
            self.may_hold()
                .then(|| self.tools.holding_due_at())
                .flatten(),
            ready.then_some(self.keypad.tell_at).flatten(),
            self.wrap_up.as_ref().map(|wrap_up| wrap_up.deadline),
            self.max_duration_at.filter(|_| !self.is_ending()),
            linger,
            silence,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A holding sentence fills a tool's silence in a conversation that goes on. Once the call
    /// is on its way out (`end_call`, a transfer, a goodbye) nothing more is to be said: a
    /// pending `transfer_call` has no result until Twilio moved the call, and "I am checking"
    /// would play over the transfer or after the goodbye.
    fn may_hold(&self) -> bool {
        matches!(self.link, AgentLink::Ready)
            && self.wrap_up.is_none()
            && matches!(self.transfer, Transfer::None)
    }

    /// Asks the agent for one response following `extra`, with no tool calls. A response's
    /// `instructions` replace the session's for that response, so the call's own instructions
    /// (persona, language, the business's additions) come first.
    fn say(&mut self, extra: &str) {
        let instructions = format!("{}\n\n{extra}", self.instructions);
        self.actions
            .push_back(Action::ToAgent(events::response_create_with(
                &instructions,
                true,
            )));
        self.tools.note_response_requested();
    }

    /// Whether the call is already on its way out (a goodbye, `end_call`, a transfer).
    pub(super) fn is_ending(&self) -> bool {
        self.wrap_up.is_some() || !matches!(self.transfer, Transfer::None)
    }

    pub(super) fn acting_timer(&mut self, now: Instant) {
        // While another ending is under way the limit waits: if a transfer fails, it applies.
        if !self.is_ending() && self.max_duration_at.is_some_and(|at| now >= at) {
            self.max_duration_at = None;
            tracing::info!("the call reached its time limit: the agent says goodbye");
            self.start_farewell(EndReason::MaxDuration, now);
        }
        if matches!(self.transfer, Transfer::Moved { linger_until } if now >= linger_until) {
            tracing::warn!("Twilio accepted the transfer but kept the stream open: closing it");
            self.end(EndReason::Transferred, now);
            return;
        }
        if !matches!(self.link, AgentLink::Ready) {
            return;
        }
        if self.keypad.tell_at.is_some_and(|at| now >= at) {
            self.tell_keypresses(now);
        }
        if self.may_hold() && self.tools.take_holding_due(now) {
            tracing::debug!("a tool is slow: the agent says a holding sentence");
            self.say(HOLDING_INSTRUCTIONS);
        }
        self.check_silence(now);
    }

    /// Looks again at everything that waits for a condition rather than a time.
    pub(super) fn after_input(&mut self, now: Instant) {
        // Once the call is ending, answers still reach the agent, but nothing new is said.
        let may_respond = !self.is_ending();
        while let Some(release) = self.tools.release(may_respond) {
            for (call_id, output) in &release.outputs {
                self.actions
                    .push_back(Action::ToAgent(events::function_call_output(
                        call_id, output,
                    )));
            }
            if release.respond {
                self.actions
                    .push_back(Action::ToAgent(events::response_create()));
            }
        }
        self.advance_wrap_up(now);
        if self.ended.is_none() {
            self.track_quiet(now);
            self.roll_over_when_quiet(now);
        }
    }

    // --- Function calls.

    pub(super) fn on_function_call(
        &mut self,
        response_id: &str,
        call_id: String,
        name: &str,
        arguments: &str,
        now: Instant,
    ) {
        if !self.tools.add_call(response_id, &call_id, now) {
            tracing::debug!(call_id, "a function call reported again; it runs once");
            return;
        }
        tracing::info!(tool = name, call_id, "the agent called a tool");
        if let Some(builtin) = self.agent.builtin(name) {
            self.on_builtin(builtin, call_id, arguments, now);
            return;
        }
        let agent = Arc::clone(&self.agent);
        let Some(tool) = agent.tool(name) else {
            let output = error_output(&format!("there is no tool named {name:?}"));
            self.finish_tool_call(
                &call_id,
                name,
                arguments,
                ToolOutcome::UnknownTool,
                output,
                now,
                now,
            );
            return;
        };
        let (url, timeout) = (tool.url.clone(), tool.timeout);
        let Ok(parsed) = serde_json::from_str::<Map<String, Value>>(arguments) else {
            let output = error_output("the arguments are not a JSON object");
            self.finish_tool_call(
                &call_id,
                name,
                arguments,
                ToolOutcome::InvalidArguments,
                output,
                now,
                now,
            );
            return;
        };
        let Some(call_sid) = self.call_sid() else {
            return;
        };
        let body = agent::tool_request(
            call_sid,
            &self.agent.name,
            &self.parties,
            name,
            &call_id,
            &parsed,
        );
        let task = self.spawn(SideTask::AskBusiness { url, body, timeout });
        self.tool_requests.insert(
            task,
            ToolRequest {
                call_id,
                tool: name.to_owned(),
                arguments: arguments.to_owned(),
                asked_at: now,
                timeout,
            },
        );
    }

    pub(super) fn on_tool_answer(
        &mut self,
        request: ToolRequest,
        outcome: BusinessOutcome,
        now: Instant,
    ) {
        let (outcome, output) = match outcome {
            BusinessOutcome::Answered { status, body } if (200..300).contains(&status) => {
                (ToolOutcome::Ok, tool_output(&body))
            }
            BusinessOutcome::Answered { status, .. } => (
                ToolOutcome::Refused,
                error_output(&format!("the tool answered HTTP {status}")),
            ),
            BusinessOutcome::TimedOut => (
                ToolOutcome::Timeout,
                error_output(&format!(
                    "the tool did not answer within {} ms",
                    request.timeout.as_millis()
                )),
            ),
            BusinessOutcome::Unreachable(error) => {
                tracing::warn!(tool = request.tool, %error, "cannot reach the tool's endpoint");
                (
                    ToolOutcome::Unreachable,
                    error_output("the tool could not be reached"),
                )
            }
        };
        self.finish_tool_call(
            &request.call_id,
            &request.tool,
            &request.arguments,
            outcome,
            output,
            request.asked_at,
            now,
        );
    }

    /// Hands a call's result to the ledger (it goes out when the ordering rules allow), counts
    /// it and records it in the call's history.
    #[allow(clippy::too_many_arguments)]
    fn finish_tool_call(
        &mut self,
        call_id: &str,
        tool: &str,
        arguments: &str,
        outcome: ToolOutcome,
        output: String,
        asked_at: Instant,
        now: Instant,
    ) {
        let wants_response = !matches!(self.agent.builtin(tool), Some(Builtin::EndCall));
        self.record_tool_call(
            call_id,
            tool,
            arguments,
            outcome,
            Some(&output),
            asked_at,
            now,
        );
        self.tools.set_output(call_id, output, wants_response);
    }

    #[allow(clippy::too_many_arguments)]
    fn record_tool_call(
        &mut self,
        call_id: &str,
        tool: &str,
        arguments: &str,
        outcome: ToolOutcome,
        output: Option<&str>,
        asked_at: Instant,
        now: Instant,
    ) {
        let took = now.saturating_duration_since(asked_at);
        let label = if outcome == ToolOutcome::UnknownTool {
            "unknown"
        } else {
            tool
        };
        self.metrics.tool_called(label, outcome, took);
        tracing::info!(
            tool,
            call_id,
            outcome = outcome.label(),
            latency_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "tool call finished"
        );
        let data = json!({
            "tool": tool,
            "call_id": call_id,
            "outcome": outcome.label(),
            "latency_ms": u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "arguments": cut_at(arguments, MAX_RECORDED),
            "output": output.map(|output| cut_at(output, MAX_RECORDED)),
        });
        self.record_event_with(
            "tool_call",
            tool,
            Some(outcome.label().to_owned()),
            Some(data),
            now,
        );
    }

    fn on_builtin(&mut self, builtin: Builtin, call_id: String, arguments: &str, now: Instant) {
        if self.is_ending() {
            let output = error_output("the call is already ending");
            self.finish_tool_call(
                &call_id,
                builtin.name(),
                arguments,
                ToolOutcome::Refused,
                output,
                now,
                now,
            );
            return;
        }
        match builtin {
            Builtin::EndCall => {
                self.finish_tool_call(
                    &call_id,
                    builtin.name(),
                    arguments,
                    ToolOutcome::Ok,
                    r#"{"ok":true}"#.to_owned(),
                    now,
                    now,
                );
                self.wrap_up(
                    EndReason::AgentEnded,
                    Then::HangUp,
                    Farewell::NotNeeded,
                    now,
                );
            }
            Builtin::TransferCall => {
                let then = Then::Transfer {
                    call_id,
                    arguments: arguments.to_owned(),
                };
                self.wrap_up(EndReason::Transferred, then, Farewell::NotNeeded, now);
            }
        }
    }

    fn wrap_up(&mut self, reason: EndReason, then: Then, farewell: Farewell, now: Instant) {
        if self.wrap_up.is_some() || !matches!(self.transfer, Transfer::None) {
            return;
        }
        let wait = match farewell {
            Farewell::NotNeeded => self.settings.playback_wait,
            _ => self.settings.farewell_limit,
        };
        self.wrap_up = Some(WrapUp {
            reason,
            then,
            deadline: now + wait,
            farewell,
        });
    }

    /// The agent is told to say goodbye; the call ends once it has been heard.
    fn start_farewell(&mut self, reason: EndReason, now: Instant) {
        self.wrap_up(reason, Then::HangUp, Farewell::Due, now);
    }

    pub(super) fn farewell_started(&mut self, response_id: &str) {
        if let Some(wrap_up) = &mut self.wrap_up
            && wrap_up.farewell == Farewell::Requested
        {
            wrap_up.farewell = Farewell::Speaking(response_id.to_owned());
        }
    }

    pub(super) fn farewell_done(&mut self, response_id: &str) {
        if let Some(wrap_up) = &mut self.wrap_up
            && matches!(&wrap_up.farewell, Farewell::Speaking(id) if id == response_id)
        {
            wrap_up.farewell = Farewell::Said;
        }
    }

    fn advance_wrap_up(&mut self, now: Instant) {
        let Some(wrap_up) = &mut self.wrap_up else {
            return;
        };
        if wrap_up.farewell == Farewell::Due && !self.tools.is_response_active() {
            wrap_up.farewell = Farewell::Requested;
            let goodbye = match wrap_up.reason {
                EndReason::Silence => SILENCE_FAREWELL,
                _ => TIME_LIMIT_FAREWELL,
            };
            self.say(goodbye);
        }
        let Some(wrap_up) = &self.wrap_up else {
            return;
        };
        let heard = matches!(wrap_up.farewell, Farewell::NotNeeded | Farewell::Said)
            && !self.playback.has_unplayed_audio();
        if !heard && now < wrap_up.deadline {
            return;
        }
        let Some(wrap_up) = self.wrap_up.take() else {
            return;
        };
        match wrap_up.then {
            Then::HangUp => {
                tracing::info!(reason = wrap_up.reason.label(), "the agent ends the call");
                self.end(wrap_up.reason, now);
            }
            Then::Transfer { call_id, arguments } => self.ask_transfer(call_id, arguments, now),
        }
    }

    fn ask_transfer(&mut self, call_id: String, arguments: String, now: Instant) {
        let (Some(target), Some(call_sid)) =
            (self.agent.transfer_to.clone(), self.streaming_call_sid())
        else {
            let output = error_output("no transfer target is configured for this agent");
            self.finish_tool_call(
                &call_id,
                Builtin::TransferCall.name(),
                &arguments,
                ToolOutcome::Refused,
                output,
                now,
                now,
            );
            return;
        };
        let twiml = twiml::Transfer::to(&target)
            .render()
            .expect("the transfer template renders");
        let task = self.spawn(SideTask::Redirect { call_sid, twiml });
        self.transfer = Transfer::Asked {
            task,
            call_id,
            arguments,
            asked_at: now,
        };
    }

    pub(super) fn on_redirected(&mut self, id: TaskId, result: Result<(), String>, now: Instant) {
        let Transfer::Asked {
            task,
            ref call_id,
            ref arguments,
            asked_at,
        } = self.transfer
        else {
            return;
        };
        if task != id {
            return;
        }
        let (call_id, arguments) = (call_id.clone(), arguments.clone());
        let tool = Builtin::TransferCall.name();
        match result {
            Ok(()) => {
                tracing::info!("Twilio is transferring the call");
                self.record_tool_call(
                    &call_id,
                    tool,
                    &arguments,
                    ToolOutcome::Ok,
                    None,
                    asked_at,
                    now,
                );
                self.tools.withdraw(&call_id);
                self.transfer = Transfer::Moved {
                    linger_until: now + self.settings.transfer_linger,
                };
            }
            Err(error) => {
                tracing::warn!(%error, "Twilio refused the transfer; the call goes on");
                self.transfer = Transfer::None;
                let output = error_output("the transfer failed; the caller is still on the line");
                self.finish_tool_call(
                    &call_id,
                    tool,
                    &arguments,
                    ToolOutcome::Refused,
                    output,
                    asked_at,
                    now,
                );
            }
        }
    }

    /// The call is over: tool requests still out are recorded as such, since their answers
    /// have nowhere to go.
    pub(super) fn abandon_tool_requests(&mut self, now: Instant) {
        let requests: Vec<ToolRequest> = self.tool_requests.drain().map(|(_, r)| r).collect();
        for request in requests {
            self.record_tool_call(
                &request.call_id,
                &request.tool,
                &request.arguments,
                ToolOutcome::CallEnded,
                None,
                request.asked_at,
                now,
            );
        }
    }

    // --- Keypresses.

    pub(super) fn on_keypress(&mut self, digit: &str, now: Instant) {
        if !matches!(self.media, MediaLink::Streaming { .. }) {
            self.malformed_from_media("dtmf before start");
            return;
        }
        let mut chars = digit.chars();
        let (Some(key), None) = (chars.next(), chars.next()) else {
            self.malformed_from_media("a dtmf event that is not one key");
            return;
        };
        if !(key.is_ascii_digit() || key == '*' || key == '#') {
            self.malformed_from_media("a dtmf event that is not a phone key");
            return;
        }
        self.metrics.dtmf_digits.inc();
        self.keypad.digits.push(key);
        self.keypad.tell_at = Some(now + KEYPRESS_GAP);
    }

    fn tell_keypresses(&mut self, now: Instant) {
        self.keypad.tell_at = None;
        let keys: Vec<String> = self.keypad.digits.drain(..).map(String::from).collect();
        if keys.is_empty() {
            return;
        }
        let pressed = keys.join(" ");
        // Keys are often a PIN or a card number: the log says how many, not which.
        tracing::info!(keys = keys.len(), "the caller pressed keys");
        self.actions
            .push_back(Action::ToAgent(events::user_text(&format!(
                "The caller pressed: {pressed}"
            ))));
        if !self.tools.is_response_active() && !self.is_ending() {
            self.actions
                .push_back(Action::ToAgent(events::response_create()));
            self.tools.note_response_requested();
        }
        self.record_event_with(
            "dtmf",
            &keys.concat(),
            None,
            Some(json!({ "digits": keys.concat() })),
            now,
        );
    }

    // --- Silence.

    /// The session is ready and idle: no response running or asked for, the caller not
    /// speaking, no tool pending, no agent audio unplayed. What silence and rollover wait for.
    pub(super) fn nothing_going_on(&self) -> bool {
        matches!(self.link, AgentLink::Ready)
            && !self.tools.is_response_active()
            && !self.tools.is_caller_speaking()
            && !self.tools.has_pending()
            && !self.playback.has_unplayed_audio()
    }

    /// Silence counts only while nobody speaks, nothing plays and nothing is pending.
    fn track_quiet(&mut self, now: Instant) {
        let quiet = self.agent.silence.is_some()
            && self.nothing_going_on()
            && self.wrap_up.is_none()
            && matches!(self.transfer, Transfer::None)
            && self.keypad.digits.is_empty();
        match (quiet, self.silence.quiet_since) {
            (false, _) => self.silence.quiet_since = None,
            (true, None) => self.silence.quiet_since = Some(now),
            (true, Some(_)) => {}
        }
    }

    fn check_silence(&mut self, now: Instant) {
        let (Some(policy), Some(since)) = (self.agent.silence, self.silence.quiet_since) else {
            return;
        };
        if now < since + policy.reprompt_after {
            return;
        }
        self.silence.quiet_since = None;
        if self.silence.check_ins < policy.hang_up_after {
            self.silence.check_ins += 1;
            tracing::info!(
                check_in = self.silence.check_ins,
                "the caller is silent: the agent checks in"
            );
            self.say(CHECK_IN_INSTRUCTIONS);
            self.record_event("silence", "check_in", None, now);
        } else {
            tracing::info!("the caller stayed silent: the agent says goodbye");
            self.start_farewell(EndReason::Silence, now);
        }
    }
}

/// `{"error":"…"}`: what the agent gets instead of a result, so it can tell the caller.
fn error_output(reason: &str) -> String {
    json!({ "error": reason }).to_string()
}

/// A 2xx answer as the agent gets it: the body's text, cut to 16 KiB.
fn tool_output(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.len() <= MAX_TOOL_OUTPUT {
        return text.into_owned();
    }
    let mut cut = cut_at(&text, MAX_TOOL_OUTPUT).to_owned();
    cut.push_str(CUT_NOTICE);
    cut
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn cut_at(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_answers_are_cut_on_a_character_boundary_with_a_notice() {
        let short = tool_output(b"{\"status\":\"shipped\"}");
        assert_eq!(short, "{\"status\":\"shipped\"}");
        let long = "é".repeat(MAX_TOOL_OUTPUT); // two bytes each
        let cut = tool_output(long.as_bytes());
        assert!(cut.ends_with(CUT_NOTICE));
        let kept = cut.strip_suffix(CUT_NOTICE).unwrap();
        assert_eq!(kept.len(), MAX_TOOL_OUTPUT);
        assert!(kept.chars().all(|c| c == 'é'));
        assert_eq!(cut_at("aé", 2), "a");
    }

    #[test]
    fn errors_are_json_objects() {
        let output: Value = serde_json::from_str(&error_output("said \"no\"")).unwrap();
        assert_eq!(output, json!({"error": "said \"no\""}));
    }
}
