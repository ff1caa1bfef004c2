//! `callbridge simulate`'s command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::domain::phone::E164;

/// The caller's number when `--from` is not given.
pub const DEFAULT_FROM: &str = "+15550000001";
/// The number called when `--to` is not given and no agent claims a number.
pub const DEFAULT_TO: &str = "+15550000002";

/// Calls a running callbridge exactly as Twilio would and plays the agent back like a phone.
///
/// It reads the same .env and environment as the server (PUBLIC_BASE_URL, TWILIO_AUTH_TOKEN,
/// TWILIO_ACCOUNT_SID): a signed POST /voice, the signed upgrade to the TwiML's stream URL,
/// `start` with the TwiML's parameters, the WAV in real time in 20 ms µ-law frames, silence until
/// --seconds, then `stop`. Agent audio is played at real-time pace: marks are echoed once the
/// audio before them has played, and `clear` drops what is still queued. With
/// CALLBRIDGE_API_TOKEN set, the stored transcript is printed at the end.
#[derive(Debug, Parser)]
#[command(name = "callbridge simulate", version)]
pub struct Options {
    /// The caller's audio: a WAV of PCM at 8 to 48 kHz, mono or stereo, or 8 kHz µ-law.
    #[arg(long, value_name = "WAV")]
    pub audio: PathBuf,

    /// Write what the caller heard here: 16-bit PCM, mono, 8 kHz, covering the whole call.
    #[arg(long, value_name = "WAV")]
    pub out: Option<PathBuf>,

    /// The caller's number.
    #[arg(long, value_name = "+E164", default_value = DEFAULT_FROM, value_parser = phone_number)]
    pub from: E164,

    /// The number called [default: the first agent's first number, else +15550000002].
    #[arg(long, value_name = "+E164", value_parser = phone_number)]
    pub to: Option<E164>,

    /// What kind of call Twilio reports: WhatsApp (numbers as `whatsapp:+…`) or phone.
    #[arg(long, value_enum, default_value_t = Channel::Whatsapp)]
    pub channel: Channel,

    /// How long the call lasts, in seconds [default: the WAV's length + 10].
    #[arg(long, value_name = "N", value_parser = seconds)]
    pub seconds: Option<Duration>,

    /// Press keys at a moment of the call (seconds from the stream's start), e.g. `12#@3.5`
    /// presses 1, 2 and # at 3.5 s; repeatable.
    #[arg(long, value_name = "DIGITS@SECS", value_parser = dtmf)]
    pub dtmf: Vec<Keypress>,

    /// Print only JSON lines on stdout, one object per event, each with `t_ms` and `type`.
    #[arg(long)]
    pub json: bool,

    /// Where callbridge listens [default: http://HOST:PORT from the configuration]; give your
    /// tunnel's https URL to go the way Twilio does.
    #[arg(long, value_name = "URL", value_parser = server_url)]
    pub server: Option<url::Url>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Channel {
    Whatsapp,
    Phone,
}

impl Channel {
    /// A number as Twilio writes it in this kind of call's webhooks.
    pub fn address(self, number: &E164) -> String {
        match self {
            Self::Whatsapp => number.whatsapp_address(),
            Self::Phone => number.to_string(),
        }
    }
}

/// `--dtmf DIGITS@SECS`: keys pressed at a moment of the call (from the stream's start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keypress {
    pub keys: Vec<char>,
    pub at: Duration,
}

fn phone_number(raw: &str) -> Result<E164, String> {
    E164::parse(raw).map_err(|error| format!("{error} (e.g. +15551234567)"))
}

fn seconds(raw: &str) -> Result<Duration, String> {
    let value: f64 = raw
        .parse()
        .map_err(|_| format!("{raw:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| format!("{raw} is not a positive number of seconds"))
}

fn dtmf(raw: &str) -> Result<Keypress, String> {
    let (keys, at) = raw
        .rsplit_once('@')
        .ok_or_else(|| format!("{raw:?} is not DIGITS@SECONDS (e.g. 12#@3.5)"))?;
    if keys.is_empty() {
        return Err(format!("{raw:?} names no keys (e.g. 12#@3.5)"));
    }
    if let Some(bad) = keys
        .chars()
        .find(|key| !(key.is_ascii_digit() || *key == '*' || *key == '#'))
    {
        return Err(format!(
            "{bad:?} is not a phone key: use 0-9, * and # (e.g. 12#@3.5)"
        ));
    }
    let at = at
        .parse::<f64>()
        .ok()
        .and_then(|value| Duration::try_from_secs_f64(value).ok())
        .ok_or_else(|| format!("{at:?} is not a moment in seconds (e.g. 12#@3.5)"))?;
    Ok(Keypress {
        keys: keys.chars().collect(),
        at,
    })
}

fn server_url(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|error| format!("{raw:?} is not a URL ({error})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{raw:?} is not an http:// or https:// URL"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        Options::try_parse_from(["callbridge simulate"].iter().chain(args))
    }

    #[test]
    fn dtmf_is_keys_at_a_moment() {
        assert_eq!(
            dtmf("12#@3.5"),
            Ok(Keypress {
                keys: vec!['1', '2', '#'],
                at: Duration::from_millis(3500)
            })
        );
        assert_eq!(
            dtmf("*0@0"),
            Ok(Keypress {
                keys: vec!['*', '0'],
                at: Duration::ZERO
            })
        );
        for (bad, says) in [
            ("12#", "DIGITS@SECONDS"),
            ("@3", "names no keys"),
            ("1a@3", "'a' is not a phone key"),
            ("1@soon", "\"soon\" is not a moment"),
            ("1@-2", "\"-2\" is not a moment"),
            ("1@", "\"\" is not a moment"),
        ] {
            let error = dtmf(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn defaults_and_repeated_options() {
        let options =
            parse(&["--audio", "caller.wav", "--dtmf", "1@1", "--dtmf", "#@2.25"]).unwrap();
        assert_eq!(options.from.as_str(), DEFAULT_FROM);
        assert_eq!(options.to, None);
        assert_eq!(options.channel, Channel::Whatsapp);
        assert_eq!(options.seconds, None);
        assert!(!options.json);
        assert_eq!(
            options.dtmf.iter().map(|k| k.at).collect::<Vec<_>>(),
            [Duration::from_secs(1), Duration::from_millis(2250)]
        );

        let options = parse(&[
            "--audio",
            "a.wav",
            "--to",
            "+15557654321",
            "--channel",
            "phone",
            "--seconds",
            "2.5",
            "--json",
            "--server",
            "https://abc.ngrok.app",
        ])
        .unwrap();
        assert_eq!(options.channel.address(&options.from), DEFAULT_FROM);
        assert_eq!(options.seconds, Some(Duration::from_millis(2500)));
        assert!(options.json);
        assert_eq!(options.server.unwrap().as_str(), "https://abc.ngrok.app/");
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["--from", "+15550000001"][..],
            &["--audio", "a.wav", "--from", "15550000001"],
            &["--audio", "a.wav", "--seconds", "0"],
            &["--audio", "a.wav", "--seconds", "ten"],
            &["--audio", "a.wav", "--channel", "sms"],
            &["--audio", "a.wav", "--server", "ftp://x"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn a_whatsapp_call_names_both_ends_as_whatsapp_addresses() {
        let number = E164::parse("+15550000001").unwrap();
        assert_eq!(Channel::Whatsapp.address(&number), "whatsapp:+15550000001");
        assert_eq!(Channel::Phone.address(&number), "+15550000001");
    }
}
