//! Typed configuration, read once at startup from the environment (README "Configuration").
//!
//! Parsing is a pure function over a lookup closure so tests can build a `Config` without ever
//! touching the process environment (which is `unsafe` to mutate once threads exist).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use crate::agents::file::{self as agents_file, AgentDefaults};
use crate::agents::{AgentProfile, Agents};
use crate::call::core::CallSettings;
use crate::domain::phone::E164;
use crate::events::EventSettings;
use crate::store::machines::MachineId;
use crate::twilio::ids::{AccountSid, ContentSid};
use crate::webhooks::WebhookSecret;

pub const DEFAULT_TWILIO_API_BASE_URL: &str = "https://api.twilio.com";
pub const DEFAULT_OPENAI_REALTIME_URL: &str = "wss://api.openai.com/v1/realtime";
pub const DEFAULT_OPENAI_REALTIME_MODEL: &str = "gpt-realtime-1.5";
pub const DEFAULT_OPENAI_VOICE: &str = "marin";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://callbridge.db?mode=rwc";
pub const DEFAULT_AGENT_INSTRUCTIONS: &str = "You are a friendly, concise phone assistant. \
Speak naturally in short sentences, as people do on the phone. If you did not understand the caller, \
politely ask them to repeat. Never read out long lists or links.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The whole runtime configuration. Secrets are `SecretString` so a stray `{:?}` cannot leak them.
#[derive(Clone, Debug)]
pub struct Config {
    pub twilio_account_sid: AccountSid,
    pub twilio_auth_token: SecretString,
    pub openai_api_key: SecretString,
    pub public_base_url: PublicBaseUrl,
    /// `HOST`: the address to listen on. Loopback by default, so a server started on a laptop
    /// is reachable through its tunnel only; containers set `0.0.0.0`.
    pub host: IpAddr,
    pub port: u16,
    pub twilio_whatsapp_number: Option<E164>,
    pub twilio_call_permission_content_sid: Option<ContentSid>,
    pub api_token: Option<SecretString>,
    pub twilio_api_base_url: String,
    pub openai_realtime_url: String,
    pub openai_realtime_model: String,
    pub openai_voice: String,
    /// The `default` agent's prompt when there is no `AGENTS_FILE`.
    pub agent_instructions: String,
    pub agent_greeting: Option<String>,
    /// The agents as configured at startup: the file's, or the one `default` agent of the
    /// `AGENT_*` variables. The directory calls read is `AppState::agents`, which a reload
    /// replaces; this stays as it was read.
    pub agents: Arc<Agents>,
    /// `AGENTS_FILE`, read again on `SIGHUP`.
    pub agents_file: Option<PathBuf>,
    /// `CALLBRIDGE_WEBHOOK_SECRET`: signs the requests made to the business.
    pub webhook_secret: Option<WebhookSecret>,
    /// `CALLBRIDGE_EVENTS_URL`: where call and permission events are delivered. When set,
    /// events are written to the outbox and a delivery worker runs (the secret is then set too).
    pub events_url: Option<String>,
    /// How events are delivered; not environment variables (tests shorten them).
    pub events: EventSettings,
    pub database_url: String,
    pub outbound_calls_per_day: u32,
    pub max_concurrent_calls: usize,
    pub drain_timeout: Duration,
    /// How long after its head a request's body may take to arrive (`limits`).
    pub request_timeout: Duration,
    pub log_format: LogFormat,
    /// How long a Twilio REST request may take; not an environment variable (tests shorten it).
    pub twilio_request_timeout: Duration,
    /// Each call's heartbeat, timeouts and ending grace; not environment variables (tests
    /// shorten them).
    pub call: CallSettings,
    /// `FLY_MACHINE_ID`: a name that survives restarts, so a restarted machine records the
    /// calls it was cut off from at once. Without it each process start gets a random one.
    pub machine_id: Option<MachineId>,
    /// The variables that still hold the fake value `.env.example` gives them: the server
    /// starts with them, but Twilio and OpenAI refuse them, so startup warns about each.
    pub placeholders: Vec<&'static str>,
}

/// `.env.example`, whose fake values the server recognises (`Config::placeholders`).
const ENV_EXAMPLE: &str = include_str!("../.env.example");

/// The variables whose example value is a stand-in for the operator's own (an account, a key,
/// a number, a URL), as opposed to a default that is fine to keep.
const PLACEHOLDER_VARIABLES: [&str; 9] = [
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "OPENAI_API_KEY",
    "PUBLIC_BASE_URL",
    "TWILIO_WHATSAPP_NUMBER",
    "TWILIO_CALL_PERMISSION_CONTENT_SID",
    "CALLBRIDGE_API_TOKEN",
    "CALLBRIDGE_WEBHOOK_SECRET",
    "CALLBRIDGE_EVENTS_URL",
];

/// The value `.env.example` shows for `name`, set or commented out (`# NAME=value`), without
/// the quotes a `.env` reader would strip.
fn example_value(name: &str) -> Option<&'static str> {
    ENV_EXAMPLE.lines().find_map(|line| {
        let line = line.trim_start_matches('#').trim_start();
        let value = line.strip_prefix(name)?.strip_prefix('=')?.trim();
        Some(value.trim_matches('"'))
    })
}

/// `PUBLIC_BASE_URL` without a trailing slash. Every URL we sign-check or hand to Twilio is built
/// from it, never from the `Host` header, because proxies (ngrok, Fly) rewrite scheme and host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicBaseUrl(String);

impl PublicBaseUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let trimmed = raw.trim().trim_end_matches('/');
        let parsed = url::Url::parse(trimmed).map_err(|e| format!("is not a valid URL ({e})"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("must start with https:// (or http:// for local tests)".into());
        }
        if parsed.host_str().is_none() {
            return Err("has no host".into());
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err("must not contain a query string or fragment".into());
        }
        // Twilio is given `{PUBLIC_BASE_URL}/voice` and the routes are at `/voice`: a path here
        // would make every signature check and every URL handed to Twilio wrong.
        if parsed.path() != "/" {
            return Err(format!(
                "must be the server's origin only, with no path (got path {:?}); e.g. https://abc.ngrok.app",
                parsed.path()
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The absolute URL Twilio uses for `path_and_query` on this server.
    pub fn join(&self, path_and_query: &str) -> String {
        format!("{}{}", self.0, path_and_query)
    }

    /// The Media Streams URL: Twilio requires `wss` for `https` deployments (`ws` only for local
    /// plain-HTTP setups), and signs the upgrade over exactly this string.
    pub fn websocket_url(&self, path: &str) -> String {
        let rest = self
            .0
            .strip_prefix("https")
            .map(|rest| format!("wss{rest}"))
            .or_else(|| self.0.strip_prefix("http").map(|rest| format!("ws{rest}")))
            .unwrap_or_else(|| self.0.clone());
        format!("{rest}{path}")
    }
}

/// Every problem found in the environment, so the operator fixes them all in one go.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in &self.0 {
            writeln!(f, "configuration error: {problem} (see .env.example)")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects problems while reading variables, instead of stopping at the first.
struct Reader<'a, F: Fn(&str) -> Option<String>> {
    lookup: &'a F,
    problems: Vec<String>,
}

impl<F: Fn(&str) -> Option<String>> Reader<'_, F> {
    /// The value, with empty strings treated as unset (a blank line in `.env` means "not set").
    fn optional(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn required(&mut self, name: &str) -> Option<String> {
        let value = self.optional(name);
        if value.is_none() {
            self.problems.push(format!("{name} is missing"));
        }
        value
    }

    fn parsed<T>(
        &mut self,
        name: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        match self.optional(name) {
            None => default,
            Some(raw) => parse(&raw).unwrap_or_else(|why| {
                self.problems.push(format!("{name} {why}"));
                default
            }),
        }
    }
}

fn positive_number<T: std::str::FromStr + PartialOrd + Default>(raw: &str) -> Result<T, String> {
    match raw.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err(format!("must be a positive whole number, got {raw:?}")),
    }
}

fn websocket_url(raw: &str) -> Result<String, String> {
    let parsed = url::Url::parse(raw).map_err(|e| format!("is not a valid URL ({e})"))?;
    if !matches!(parsed.scheme(), "ws" | "wss") {
        return Err("must start with wss:// (or ws:// for a local fake)".into());
    }
    if parsed.query().is_some() {
        return Err("must not contain a query string (?model= is appended)".into());
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

fn http_url(raw: &str) -> Result<String, String> {
    let parsed = url::Url::parse(raw).map_err(|e| format!("is not a valid URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("must start with https:// (or http:// for a local fake)".into());
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

/// The API token is all that stands between the internet and placing calls, so a short one that
/// could be guessed is refused. 32 characters is what `openssl rand -hex 16` prints.
pub const MIN_API_TOKEN_CHARS: usize = 32;

fn long_enough_token(raw: &str) -> Result<(), String> {
    let chars = raw.chars().count();
    if chars >= MIN_API_TOKEN_CHARS {
        Ok(())
    } else {
        // The length only: the value itself is a secret, even when it is a bad one.
        Err(format!(
            "must be at least {MIN_API_TOKEN_CHARS} characters, got {chars}; generate one with `openssl rand -hex 32`"
        ))
    }
}

/// `AGENT_INSTRUCTIONS`, or the contents of `AGENT_INSTRUCTIONS_FILE`, or the default.
fn agent_instructions<F: Fn(&str) -> Option<String>>(r: &mut Reader<'_, F>) -> String {
    match (
        r.optional("AGENT_INSTRUCTIONS"),
        r.optional("AGENT_INSTRUCTIONS_FILE"),
    ) {
        (Some(_), Some(_)) => {
            r.problems.push(
                "AGENT_INSTRUCTIONS and AGENT_INSTRUCTIONS_FILE are both set; keep one".into(),
            );
            String::new()
        }
        (Some(text), None) => text,
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => text.trim().to_owned(),
            Ok(_) => {
                r.problems
                    .push(format!("AGENT_INSTRUCTIONS_FILE {path:?} is empty"));
                String::new()
            }
            Err(e) => {
                r.problems.push(format!(
                    "AGENT_INSTRUCTIONS_FILE {path:?} cannot be read ({e})"
                ));
                String::new()
            }
        },
        (None, None) => DEFAULT_AGENT_INSTRUCTIONS.to_owned(),
    }
}

/// What the configuration says about agents: the file, or the `AGENT_*` variables.
struct AgentSetup {
    /// `OPENAI_REALTIME_MODEL` and `OPENAI_VOICE`: every agent's unless it names its own.
    model: String,
    voice: String,
    instructions: String,
    greeting: Option<String>,
    /// `None` when the agents file has problems (they are in the reader's list).
    agents: Option<Agents>,
    agents_file: Option<PathBuf>,
    webhook_secret: Option<WebhookSecret>,
}

/// Reads `AGENTS_FILE` (or the `AGENT_*` variables) and `CALLBRIDGE_WEBHOOK_SECRET`, which the
/// agents need when they make requests to the business.
fn agent_setup<F: Fn(&str) -> Option<String>>(r: &mut Reader<'_, F>) -> AgentSetup {
    let model = r
        .optional("OPENAI_REALTIME_MODEL")
        .unwrap_or_else(|| DEFAULT_OPENAI_REALTIME_MODEL.to_owned());
    let voice = r
        .optional("OPENAI_VOICE")
        .unwrap_or_else(|| DEFAULT_OPENAI_VOICE.to_owned());
    let agents_file = r.optional("AGENTS_FILE").map(PathBuf::from);
    let webhook_secret = r.parsed("CALLBRIDGE_WEBHOOK_SECRET", None, |raw| {
        WebhookSecret::parse(raw).map(Some)
    });
    let (instructions, greeting) = if agents_file.is_some() {
        agent_variables_unset(r);
        (DEFAULT_AGENT_INSTRUCTIONS.to_owned(), None)
    } else {
        (agent_instructions(r), r.optional("AGENT_GREETING"))
    };
    let agents = match &agents_file {
        None => Some(Agents::single(AgentProfile::from_environment(
            instructions.clone(),
            greeting.clone(),
            voice.clone(),
            model.clone(),
        ))),
        Some(path) => {
            let defaults = AgentDefaults {
                voice: voice.clone(),
                model: model.clone(),
            };
            // `authorization_env` names variables of the same environment.
            let lookup: &dyn Fn(&str) -> Option<String> = r.lookup;
            match agents_file::load(path, &defaults, lookup) {
                Ok(agents) => Some(agents),
                Err(errors) => {
                    r.problems.extend(errors.0.iter().map(ToString::to_string));
                    None
                }
            }
        }
    };
    AgentSetup {
        model,
        voice,
        instructions,
        greeting,
        agents,
        agents_file,
        webhook_secret,
    }
}

/// `CALLBRIDGE_EVENTS_URL`: where events go. The same rule as a tool's URL: https, or http to a
/// loopback host only, where nothing on the network can read or change the events.
fn events_url(raw: &str) -> Result<Option<String>, String> {
    agents_file::check_business_url(raw).map(|()| Some(raw.to_owned()))
}

/// Everything that sends signed requests to the business needs `CALLBRIDGE_WEBHOOK_SECRET`:
/// one problem naming all of them (the agents that call it, the events URL) if it is unset.
fn webhook_secret_needed<F: Fn(&str) -> Option<String>>(
    r: &mut Reader<'_, F>,
    agent: &AgentSetup,
    events_url: Option<&str>,
) {
    if agent.webhook_secret.is_some() {
        return;
    }
    let mut callers = agent
        .agents
        .as_ref()
        .map(agents_file::business_callers)
        .unwrap_or_default();
    if events_url.is_some() {
        callers.push("CALLBRIDGE_EVENTS_URL (call and permission events)".to_owned());
    }
    if let Some(problem) = agents_file::missing_webhook_secret_for(&callers) {
        r.problems.push(problem);
    }
}

/// With `AGENTS_FILE`, every agent's prompt and greeting are in the file: an `AGENT_*` variable
/// beside it would be silently ignored, so it is an error instead.
fn agent_variables_unset<F: Fn(&str) -> Option<String>>(r: &mut Reader<'_, F>) {
    for name in [
        "AGENT_INSTRUCTIONS",
        "AGENT_INSTRUCTIONS_FILE",
        "AGENT_GREETING",
    ] {
        if r.optional(name).is_some() {
            r.problems.push(format!(
                "{name} cannot be used with AGENTS_FILE: each agent's instructions and greeting are in the agents file; unset {name}"
            ));
        }
    }
}

/// `TWILIO_WHATSAPP_NUMBER` and `TWILIO_CALL_PERMISSION_CONTENT_SID`, which come together.
fn outbound_sender<F: Fn(&str) -> Option<String>>(
    r: &mut Reader<'_, F>,
) -> (Option<E164>, Option<ContentSid>) {
    let whatsapp_number = r.parsed("TWILIO_WHATSAPP_NUMBER", None, whatsapp_sender);
    let content_sid = r.parsed("TWILIO_CALL_PERMISSION_CONTENT_SID", None, |raw| {
        ContentSid::parse(raw)
            .map(Some)
            .map_err(|why| format!("is {why}"))
    });
    outbound_pair(r);
    (whatsapp_number, content_sid)
}

/// The names among `PLACEHOLDER_VARIABLES` whose value is still the one `.env.example` shows.
fn placeholders<F: Fn(&str) -> Option<String>>(r: &Reader<'_, F>) -> Vec<&'static str> {
    PLACEHOLDER_VARIABLES
        .into_iter()
        .filter(|name| {
            r.optional(name)
                .is_some_and(|v| Some(v.as_str()) == example_value(name))
        })
        .collect()
}

/// Outbound calling needs both the sender and the permission template: one without the other is
/// a half-finished setup that would only show up as 503s from the API, so it is refused here.
fn outbound_pair<F: Fn(&str) -> Option<String>>(r: &mut Reader<'_, F>) {
    const PAIR: [&str; 2] = [
        "TWILIO_WHATSAPP_NUMBER",
        "TWILIO_CALL_PERMISSION_CONTENT_SID",
    ];
    let (set, unset) = match PAIR.map(|name| r.optional(name).is_some()) {
        [true, false] => (PAIR[0], PAIR[1]),
        [false, true] => (PAIR[1], PAIR[0]),
        _ => return,
    };
    r.problems.push(format!(
        "{unset} is missing: outbound calling needs it as well as {set} (set both, or neither)"
    ));
}

/// Each call's settings: the defaults, but for what the environment may set.
fn call_settings<F: Fn(&str) -> Option<String>>(r: &mut Reader<'_, F>) -> CallSettings {
    let defaults = CallSettings::default();
    CallSettings {
        session_rollover: r.parsed("SESSION_ROLLOVER_SECS", defaults.session_rollover, |raw| {
            positive_number::<u64>(raw).map(Duration::from_secs)
        }),
        ..defaults
    }
}

fn database_url(raw: &str) -> Result<String, String> {
    if raw.starts_with("sqlite:")
        || raw.starts_with("postgres://")
        || raw.starts_with("postgresql://")
    {
        Ok(raw.to_owned())
    } else {
        Err("must start with sqlite:// or postgres://".into())
    }
}

fn listen_address(raw: &str) -> Result<IpAddr, String> {
    raw.parse()
        .map_err(|_| format!("must be an IP address such as 127.0.0.1, 0.0.0.0 or ::, got {raw:?}"))
}

fn port_number(raw: &str) -> Result<u16, String> {
    raw.parse()
        .map_err(|_| format!("must be a port number (0-65535), got {raw:?}"))
}

fn whatsapp_sender(raw: &str) -> Result<Option<E164>, String> {
    E164::parse(raw)
        .map(Some)
        .map_err(|_| format!("must be an E.164 number like +15551234567, got {raw:?}"))
}

fn machine_id(raw: &str) -> Result<Option<MachineId>, String> {
    MachineId::parse(raw).map(Some)
}

fn seconds(raw: &str) -> Result<Duration, String> {
    raw.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("must be a whole number of seconds, got {raw:?}"))
}

fn log_format(raw: &str) -> Result<LogFormat, String> {
    match raw.to_ascii_lowercase().as_str() {
        "pretty" => Ok(LogFormat::Pretty),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("must be \"pretty\" or \"json\", got {raw:?}")),
    }
}

/// The prefixes of callbridge's variables: a name with one of them that nothing reads is most
/// likely a typo (`OPENAI_VOCE`), which would otherwise be ignored without a word.
const OUR_PREFIXES: [&str; 4] = ["TWILIO_", "OPENAI_", "AGENT_", "CALLBRIDGE_"];

/// Names with our prefixes that other programs read, so an operator's shell may well export
/// them: Twilio's and OpenAI's own SDKs and CLIs, and this project's test suite.
const OTHER_PROGRAMS_VARIABLES: [&str; 11] = [
    "TWILIO_API_KEY",
    "TWILIO_API_SECRET",
    "TWILIO_REGION",
    "TWILIO_EDGE",
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_ORGANIZATION",
    "OPENAI_PROJECT_ID",
    "CALLBRIDGE_TEST_POSTGRES_URL",
    "CALLBRIDGE_REQUIRE_POSTGRES",
    "CALLBRIDGE_REQUIRE_CHROMIUM",
];

/// One problem per name in `names` that has one of our prefixes but is not among `read` (the
/// names the configuration asked for), with the closest of those as a suggestion.
fn unknown_variables<'a>(
    names: impl IntoIterator<Item = &'a str>,
    read: &BTreeSet<String>,
) -> Vec<String> {
    let mut unknown: Vec<&str> = names
        .into_iter()
        .filter(|name| OUR_PREFIXES.iter().any(|prefix| name.starts_with(prefix)))
        .filter(|name| !read.contains(*name) && !OTHER_PROGRAMS_VARIABLES.contains(name))
        .collect();
    unknown.sort_unstable();
    unknown
        .into_iter()
        .map(|name| {
            let closest = read
                .iter()
                .map(|known| (strsim::levenshtein(name, known), known))
                .min();
            match closest {
                Some((distance, known)) if distance <= 3 => {
                    format!("{name} is not a callbridge variable: did you mean {known}?")
                }
                _ => format!(
                    "{name} is not a callbridge variable; unset it (`callbridge --help` lists them)"
                ),
            }
        })
        .collect()
}

/// Loads `.env` from the working directory into the process environment, if it exists (a
/// variable already set wins). Must run before any thread exists. A line that cannot be parsed
/// is reported by file line and variable name, never with its value, which may be a secret.
pub fn load_dotenv() -> Result<(), String> {
    let path = std::path::Path::new(".env");
    match dotenvy::from_path(path) {
        Ok(()) => Ok(()),
        Err(error) if error.not_found() => Ok(()),
        Err(dotenvy::Error::LineParse(line, index)) => {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            Err(dotenv_line_error(&text, &line, index))
        }
        Err(error) => Err(format!(".env cannot be read: {error}")),
    }
}

/// `.env:LINE: …` for the line dotenvy could not parse at `index` of `value` (the text it
/// quotes: the value, or the whole line), naming the variable it tried to set.
fn dotenv_line_error(file: &str, value: &str, index: usize) -> String {
    let value = value.lines().next().unwrap_or(value).trim_end();
    let found = file.lines().enumerate().find_map(|(at, line)| {
        let (name, _) = line.split_once('=')?;
        // dotenvy quotes the value, or for some errors the whole line.
        let start = line.find(value)?;
        Some({
            let name = name.trim().trim_start_matches("export ").trim();
            let column = start + index + 1;
            (at + 1, name, column)
        })
    });
    match found {
        Some((number, name, column)) => format!(
            ".env:{number}: cannot parse the value of {name} near column {column}; a value with \
             spaces, `#` or quotes must be wrapped in single or double quotes"
        ),
        None => ".env: a line cannot be parsed; a value with spaces, `#` or quotes must be \
                 wrapped in single or double quotes"
            .to_owned(),
    }
}

/// Calls one core carries by default. The benchmark held 200 calls per core with every frame
/// on time (plain WebSockets on loopback, the harness on the other core); TLS on both legs,
/// tools and the database cost more in production, so the default keeps half of that.
pub const CALLS_PER_CORE: usize = 100;

/// `MAX_CONCURRENT_CALLS` when unset: `CALLS_PER_CORE` for each core this process may use
/// (which counts a container's CPU quota).
pub fn default_max_concurrent_calls() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) * CALLS_PER_CORE
}

/// Where Twilio's REST API and OpenAI's Realtime API are (tests point them at fakes).
fn remote_urls<F: Fn(&str) -> Option<String>>(r: &mut Reader<'_, F>) -> (String, String) {
    let twilio = r.parsed(
        "TWILIO_API_BASE_URL",
        DEFAULT_TWILIO_API_BASE_URL.to_owned(),
        http_url,
    );
    let openai = r.parsed(
        "OPENAI_REALTIME_URL",
        DEFAULT_OPENAI_REALTIME_URL.to_owned(),
        websocket_url,
    );
    (twilio, openai)
}

impl Config {
    /// Reads the real process environment (after `.env` has been loaded by `main`). A variable
    /// whose name or value is not UTF-8 counts as unset, as `std::env::var` would have it.
    pub fn from_env() -> Result<Self, ConfigErrors> {
        Self::from_vars(std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        }))
    }

    /// As `from_lookup` over these variables; besides, a name with one of our prefixes that
    /// nothing in the configuration reads is a problem. "Reads" is what was asked for, so the
    /// variables an agents file names (`authorization_env`) count as known.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        let vars: HashMap<String, String> = vars.into_iter().collect();
        let read = RefCell::new(BTreeSet::new());
        let config = Self::from_lookup(|name| {
            read.borrow_mut().insert(name.to_owned());
            vars.get(name).cloned()
        });
        let unknown = unknown_variables(vars.keys().map(String::as_str), &read.into_inner());
        match config {
            Ok(_) if !unknown.is_empty() => Err(ConfigErrors(unknown)),
            Err(mut errors) => {
                errors.0.extend(unknown);
                Err(errors)
            }
            ok => ok,
        }
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        let mut r = Reader {
            lookup: &lookup,
            problems: Vec::new(),
        };

        let account_sid = r.required("TWILIO_ACCOUNT_SID").and_then(|raw| {
            AccountSid::parse(&raw)
                .map_err(|why| r.problems.push(format!("TWILIO_ACCOUNT_SID is {why}")))
                .ok()
        });
        let auth_token = r.required("TWILIO_AUTH_TOKEN");
        let openai_api_key = r.required("OPENAI_API_KEY");
        let public_base_url = r.required("PUBLIC_BASE_URL").and_then(|raw| {
            PublicBaseUrl::parse(&raw)
                .map_err(|why| r.problems.push(format!("PUBLIC_BASE_URL {why}")))
                .ok()
        });

        let host = r.parsed("HOST", IpAddr::V4(Ipv4Addr::LOCALHOST), listen_address);
        let port = r.parsed("PORT", 8080u16, port_number);
        let (whatsapp_number, content_sid) = outbound_sender(&mut r);
        let api_token = r.parsed("CALLBRIDGE_API_TOKEN", None, |raw| {
            long_enough_token(raw).map(|()| Some(SecretString::from(raw)))
        });
        let (twilio_api_base_url, openai_realtime_url) = remote_urls(&mut r);
        let agent = agent_setup(&mut r);
        let events_url = r.parsed("CALLBRIDGE_EVENTS_URL", None, events_url);
        webhook_secret_needed(&mut r, &agent, events_url.as_deref());
        let database_url = r.parsed(
            "DATABASE_URL",
            DEFAULT_DATABASE_URL.to_owned(),
            database_url,
        );
        let outbound_calls_per_day = r.parsed("OUTBOUND_CALLS_PER_DAY", 5u32, positive_number);
        let max_concurrent_calls = r.parsed(
            "MAX_CONCURRENT_CALLS",
            default_max_concurrent_calls(),
            positive_number,
        );
        let drain_timeout = r.parsed("DRAIN_TIMEOUT_SECS", Duration::from_secs(300), seconds);
        let request_timeout = r.parsed("REQUEST_TIMEOUT_SECS", Duration::from_secs(10), |raw| {
            positive_number::<u64>(raw).map(Duration::from_secs)
        });
        let log_format = r.parsed("LOG_FORMAT", LogFormat::Pretty, log_format);
        let call = call_settings(&mut r);

        let machine_id = r.parsed("FLY_MACHINE_ID", None, machine_id);
        let placeholders = placeholders(&r);

        let (
            Some(twilio_account_sid),
            Some(auth_token),
            Some(openai_api_key),
            Some(public_base_url),
            Some(agents),
            true,
        ) = (
            account_sid,
            auth_token,
            openai_api_key,
            public_base_url,
            agent.agents,
            r.problems.is_empty(),
        )
        else {
            return Err(ConfigErrors(r.problems));
        };

        Ok(Self {
            twilio_account_sid,
            twilio_auth_token: SecretString::from(auth_token),
            openai_api_key: SecretString::from(openai_api_key),
            public_base_url,
            host,
            port,
            twilio_whatsapp_number: whatsapp_number,
            twilio_call_permission_content_sid: content_sid,
            api_token,
            twilio_api_base_url,
            openai_realtime_url,
            openai_realtime_model: agent.model,
            openai_voice: agent.voice,
            agent_instructions: agent.instructions,
            agent_greeting: agent.greeting,
            agents: Arc::new(agents),
            agents_file: agent.agents_file,
            webhook_secret: agent.webhook_secret,
            events_url,
            events: EventSettings::default(),
            database_url,
            outbound_calls_per_day,
            max_concurrent_calls,
            drain_timeout,
            request_timeout,
            log_format,
            twilio_request_timeout: crate::twilio::rest::DEFAULT_REQUEST_TIMEOUT,
            call,
            machine_id,
            placeholders,
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_unparsable_env_line_is_named_by_line_and_variable_without_its_value() {
        let file = "PORT=8080\n# comment\nOPENAI_API_KEY=sk-secret value\n";
        let error = match dotenvy::from_read_iter(file.as_bytes()).find_map(Result::err) {
            Some(dotenvy::Error::LineParse(line, index)) => dotenv_line_error(file, &line, index),
            other => panic!("not a parse error: {other:?}"),
        };
        assert!(
            error.starts_with(".env:3: cannot parse the value of OPENAI_API_KEY near column 26;"),
            "{error}"
        );
        assert!(!error.contains("sk-secret"), "{error}");
    }

    use super::*;
    use callbridge_testkit::scratch::Scratch;
    use secrecy::ExposeSecret;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const MINIMAL: &[(&str, &str)] = &[
        ("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef"),
        ("TWILIO_AUTH_TOKEN", "secret-token"),
        ("OPENAI_API_KEY", "sk-test"),
        ("PUBLIC_BASE_URL", "https://abc.ngrok.app/"),
    ];

    #[test]
    fn empty_environment_names_every_required_variable() {
        let errors = Config::from_lookup(env(&[])).unwrap_err();
        assert_eq!(
            errors.0,
            vec![
                "TWILIO_ACCOUNT_SID is missing",
                "TWILIO_AUTH_TOKEN is missing",
                "OPENAI_API_KEY is missing",
                "PUBLIC_BASE_URL is missing",
            ]
        );
        assert!(errors.to_string().contains("see .env.example"));
    }

    #[test]
    fn minimal_environment_gets_spec_defaults() {
        let config = Config::from_lookup(env(MINIMAL)).unwrap();
        assert_eq!(config.public_base_url.as_str(), "https://abc.ngrok.app");
        assert_eq!(config.host, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(config.port, 8080);
        assert_eq!(config.twilio_api_base_url, "https://api.twilio.com");
        assert_eq!(
            config.openai_realtime_url,
            "wss://api.openai.com/v1/realtime"
        );
        assert_eq!(config.openai_realtime_model, "gpt-realtime-1.5");
        assert_eq!(config.openai_voice, "marin");
        assert_eq!(config.database_url, "sqlite://callbridge.db?mode=rwc");
        assert_eq!(config.outbound_calls_per_day, 5);
        assert_eq!(config.max_concurrent_calls, default_max_concurrent_calls());
        assert!(config.max_concurrent_calls >= CALLS_PER_CORE);
        assert_eq!(config.max_concurrent_calls % CALLS_PER_CORE, 0);
        assert_eq!(config.drain_timeout, Duration::from_secs(300));
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.log_format, LogFormat::Pretty);
        assert_eq!(config.agent_instructions, DEFAULT_AGENT_INSTRUCTIONS);
        assert!(config.agent_greeting.is_none());
        assert!(config.api_token.is_none());
        assert!(config.machine_id.is_none());
        assert_eq!(config.twilio_auth_token.expose_secret(), "secret-token");
    }

    #[test]
    fn malformed_values_are_each_reported() {
        let mut pairs = MINIMAL.to_vec();
        pairs[0] = ("TWILIO_ACCOUNT_SID", "XX123");
        pairs.extend([
            ("PORT", "eighty"),
            ("HOST", "localhost:8080"),
            ("MAX_CONCURRENT_CALLS", "0"),
            ("LOG_FORMAT", "xml"),
            ("OPENAI_REALTIME_URL", "https://api.openai.com/v1/realtime"),
            ("TWILIO_WHATSAPP_NUMBER", "5551234"),
            (
                "TWILIO_CALL_PERMISSION_CONTENT_SID",
                "HX0123456789abcdef0123456789abcdef",
            ),
            ("DATABASE_URL", "mysql://x"),
            ("FLY_MACHINE_ID", "not a machine"),
            ("REQUEST_TIMEOUT_SECS", "0"),
        ]);
        let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
        for variable in [
            "TWILIO_ACCOUNT_SID",
            "PORT",
            "HOST",
            "MAX_CONCURRENT_CALLS",
            "LOG_FORMAT",
            "OPENAI_REALTIME_URL",
            "TWILIO_WHATSAPP_NUMBER",
            "DATABASE_URL",
            "FLY_MACHINE_ID",
            "REQUEST_TIMEOUT_SECS",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(variable)),
                "{variable} not reported in {errors:?}"
            );
        }
        assert_eq!(errors.len(), 10);
    }

    #[test]
    fn host_takes_any_ip_address() {
        for (raw, expected) in [
            ("0.0.0.0", IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            ("::", IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
            ("::1", IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
        ] {
            let mut pairs = MINIMAL.to_vec();
            pairs.push(("HOST", raw));
            assert_eq!(Config::from_lookup(env(&pairs)).unwrap().host, expected);
        }
    }

    #[test]
    fn every_placeholder_variable_has_an_example_value() {
        for name in PLACEHOLDER_VARIABLES {
            assert!(example_value(name).is_some(), "{name} not in .env.example");
        }
        assert_eq!(
            example_value("OPENAI_API_KEY"),
            Some("sk-replace-with-your-openai-api-key")
        );
    }

    #[test]
    fn the_example_values_are_recognised_as_placeholders() {
        let config = Config::from_lookup(env(MINIMAL)).unwrap();
        assert!(config.placeholders.is_empty(), "{:?}", config.placeholders);

        let example: Vec<(&str, &str)> = [
            "TWILIO_ACCOUNT_SID",
            "OPENAI_API_KEY",
            "CALLBRIDGE_API_TOKEN",
        ]
        .into_iter()
        .map(|name| (name, example_value(name).unwrap()))
        .collect();
        let mut pairs = MINIMAL.to_vec();
        pairs.retain(|(name, _)| !example.iter().any(|(n, _)| n == name));
        pairs.extend(example);
        let config = Config::from_lookup(env(&pairs)).unwrap();
        assert_eq!(
            config.placeholders,
            [
                "TWILIO_ACCOUNT_SID",
                "OPENAI_API_KEY",
                "CALLBRIDGE_API_TOKEN"
            ]
        );
    }

    #[test]
    fn outbound_needs_both_its_variables() {
        for (set, value, missing) in [
            (
                "TWILIO_WHATSAPP_NUMBER",
                "+15550001111",
                "TWILIO_CALL_PERMISSION_CONTENT_SID",
            ),
            (
                "TWILIO_CALL_PERMISSION_CONTENT_SID",
                "HX0123456789abcdef0123456789abcdef",
                "TWILIO_WHATSAPP_NUMBER",
            ),
        ] {
            let mut pairs = MINIMAL.to_vec();
            pairs.push((set, value));
            let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].starts_with(&format!("{missing} is missing")),
                "{errors:?}"
            );
            assert!(errors[0].contains(set), "{errors:?}");
        }
    }

    #[test]
    fn a_public_base_url_with_a_path_is_refused() {
        for bad in ["https://abc.ngrok.app/voice", "https://abc.ngrok.app/app/"] {
            let mut pairs = MINIMAL.to_vec();
            pairs[3] = ("PUBLIC_BASE_URL", bad);
            let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(errors[0].starts_with("PUBLIC_BASE_URL must be the server's origin only"));
        }
        let mut pairs = MINIMAL.to_vec();
        pairs[3] = ("PUBLIC_BASE_URL", "https://abc.ngrok.app:8443");
        assert!(Config::from_lookup(env(&pairs)).is_ok());
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn an_unknown_variable_with_our_prefix_is_an_error_with_a_suggestion() {
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([
            ("OPENAI_VOCE", "ash"),
            ("CALLBRIDGE_API_TOKN", "x"),
            ("AGENT_WHATEVER_ELSE_ENTIRELY", "x"),
            // Not ours, or other programs' own: left alone.
            ("HOME", "/root"),
            ("OPENAI_BASE_URL", "https://api.openai.com/v1"),
            ("TWILIO_API_KEY", "SK123"),
        ]);
        let errors = Config::from_vars(vars(&pairs)).unwrap_err().0;
        assert_eq!(
            errors,
            [
                "AGENT_WHATEVER_ELSE_ENTIRELY is not a callbridge variable; unset it (`callbridge --help` lists them)",
                "CALLBRIDGE_API_TOKN is not a callbridge variable: did you mean CALLBRIDGE_API_TOKEN?",
                "OPENAI_VOCE is not a callbridge variable: did you mean OPENAI_VOICE?",
            ]
        );
        // Joined to the other problems.
        let errors = Config::from_vars(vars(&[("OPENAI_VOCE", "ash")]))
            .unwrap_err()
            .0;
        assert!(errors.contains(&"TWILIO_ACCOUNT_SID is missing".to_owned()));
        assert!(errors.last().unwrap().starts_with("OPENAI_VOCE "));

        assert!(Config::from_vars(vars(MINIMAL)).is_ok());
    }

    #[test]
    fn the_test_suites_variables_are_not_taken_for_typos() {
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([
            (
                "CALLBRIDGE_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            ("CALLBRIDGE_REQUIRE_POSTGRES", "1"),
            ("CALLBRIDGE_REQUIRE_CHROMIUM", "1"),
        ]);
        let config = Config::from_vars(vars(&pairs));
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn a_variable_an_agents_file_names_is_known() {
        let scratch = Scratch::new();
        let file = scratch.write(
            "agents.toml",
            "[[agent]]\nname = \"a\"\ninstructions = \"Help.\"\n\n[[agent.mcp]]\nserver_label = \"crm\"\n\
             server_url = \"https://mcp.example.com/sse\"\nauthorization_env = \"OPENAI_CRM_TOKEN\"\n",
        )
        .display()
        .to_string();
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([("AGENTS_FILE", file.as_str()), ("OPENAI_CRM_TOKEN", "t")]);
        let config = Config::from_vars(vars(&pairs));
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn a_short_api_token_is_refused_without_being_echoed() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("CALLBRIDGE_API_TOKEN", "guessable-31-characters-token!!"));
        let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("CALLBRIDGE_API_TOKEN must be at least 32 characters"));
        assert!(!errors[0].contains("guessable"));

        let token = "a".repeat(MIN_API_TOKEN_CHARS);
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("CALLBRIDGE_API_TOKEN", &token));
        let config = Config::from_lookup(env(&pairs)).unwrap();
        assert_eq!(config.api_token.unwrap().expose_secret(), token);
    }

    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let config = Config::from_lookup(env(MINIMAL)).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("secret-token"));
        assert!(!debug.contains("sk-test"));
    }

    #[test]
    fn websocket_url_follows_the_public_scheme() {
        let https = PublicBaseUrl::parse("https://abc.ngrok.app").unwrap();
        assert_eq!(https.websocket_url("/stream"), "wss://abc.ngrok.app/stream");
        let http = PublicBaseUrl::parse("http://localhost:8080").unwrap();
        assert_eq!(http.websocket_url("/stream"), "ws://localhost:8080/stream");
        assert!(PublicBaseUrl::parse("ftp://x").is_err());
        assert!(PublicBaseUrl::parse("https://x/?a=1").is_err());
    }

    /// 24 bytes of key (the least accepted), base64: a well-formed Standard Webhooks secret.
    const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn without_an_agents_file_there_is_one_default_agent_from_the_variables() {
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([
            ("AGENT_INSTRUCTIONS", "Be brief."),
            ("AGENT_GREETING", "Say hi."),
            ("OPENAI_VOICE", "cedar"),
        ]);
        let config = Config::from_lookup(env(&pairs)).unwrap();
        assert!(config.agents_file.is_none());
        assert!(config.webhook_secret.is_none());
        let [agent] = config.agents.profiles() else {
            panic!("one agent expected");
        };
        assert_eq!(agent.name, "default");
        assert_eq!(agent.instructions, "Be brief.");
        assert_eq!(agent.greeting.as_deref(), Some("Say hi."));
        assert_eq!(agent.voice, "cedar");
        assert_eq!(agent.model, DEFAULT_OPENAI_REALTIME_MODEL);
        assert_eq!(agent.builtins, vec![crate::agents::Builtin::EndCall]);
    }

    #[test]
    fn the_example_agents_file_loads_with_a_webhook_secret() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/agents.example.toml");
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([
            ("AGENTS_FILE", example),
            ("CALLBRIDGE_WEBHOOK_SECRET", WEBHOOK_SECRET),
            ("OPENAI_VOICE", "ash"),
        ]);
        let config = Config::from_lookup(env(&pairs)).unwrap();
        assert_eq!(
            config.agents_file.as_deref(),
            Some(std::path::Path::new(example))
        );
        assert!(config.webhook_secret.is_some());
        let names: Vec<&str> = config
            .agents
            .profiles()
            .iter()
            .map(|agent| agent.name.as_str())
            .collect();
        assert_eq!(names, ["support", "sales"]);
        // OPENAI_VOICE is the default of agents that name no voice.
        assert_eq!(config.agents.default_agent().voice, "ash");
        assert_eq!(config.agents.by_name("sales").unwrap().voice, "cedar");
        assert!(!format!("{config:?}").contains("MfKQ9r8G"));
    }

    #[test]
    fn agents_that_call_the_business_need_the_webhook_secret() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/agents.example.toml");
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("AGENTS_FILE", example));
        let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("CALLBRIDGE_WEBHOOK_SECRET is missing"),
            "{errors:?}"
        );
        assert!(
            errors[0].contains("agent \"support\" (tool \"lookup_order\")"),
            "{errors:?}"
        );
        assert!(!errors[0].contains("sales"), "{errors:?}");

        // Agents that make no requests to the business need none.
        let scratch = Scratch::new();
        let file = scratch
            .write(
                "agents.toml",
                "[[agent]]\nname = \"a\"\ninstructions = \"Help.\"\n",
            )
            .display()
            .to_string();
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("AGENTS_FILE", &file));
        assert!(Config::from_lookup(env(&pairs)).is_ok());
    }

    #[test]
    fn a_malformed_webhook_secret_is_refused_without_being_echoed() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_not*base64*at*all",
            "whsec_c2hvcnQ=",
        ] {
            let mut pairs = MINIMAL.to_vec();
            pairs.push(("CALLBRIDGE_WEBHOOK_SECRET", bad));
            let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].starts_with("CALLBRIDGE_WEBHOOK_SECRET "),
                "{errors:?}"
            );
            let encoded = bad.trim_start_matches("whsec_");
            assert!(!errors[0].contains(encoded), "{errors:?}");
        }
    }

    #[test]
    fn the_events_url_is_https_or_loopback_http_and_needs_the_webhook_secret() {
        let config = Config::from_lookup(env(MINIMAL)).unwrap();
        assert_eq!(config.events_url, None);
        assert_eq!(config.events, EventSettings::default());

        for url in [
            "https://backend.example.com/callbridge/events",
            "http://127.0.0.1:8000/events",
            "http://localhost:8000/events",
            "http://[::1]:8000/events",
        ] {
            let mut pairs = MINIMAL.to_vec();
            pairs.extend([
                ("CALLBRIDGE_EVENTS_URL", url),
                ("CALLBRIDGE_WEBHOOK_SECRET", WEBHOOK_SECRET),
            ]);
            let config = Config::from_lookup(env(&pairs)).unwrap();
            assert_eq!(config.events_url.as_deref(), Some(url));
        }

        for bad in [
            "http://backend.example.com/events",
            "ftp://127.0.0.1/events",
            "not a url",
        ] {
            let mut pairs = MINIMAL.to_vec();
            pairs.extend([
                ("CALLBRIDGE_EVENTS_URL", bad),
                ("CALLBRIDGE_WEBHOOK_SECRET", WEBHOOK_SECRET),
            ]);
            let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].starts_with("CALLBRIDGE_EVENTS_URL "),
                "{errors:?}"
            );
        }

        let mut pairs = MINIMAL.to_vec();
        pairs.push((
            "CALLBRIDGE_EVENTS_URL",
            "https://backend.example.com/events",
        ));
        let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("CALLBRIDGE_WEBHOOK_SECRET is missing"),
            "{errors:?}"
        );
        assert!(errors[0].contains("CALLBRIDGE_EVENTS_URL"), "{errors:?}");
    }

    #[test]
    fn one_problem_names_everything_that_needs_the_webhook_secret() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/agents.example.toml");
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([
            ("AGENTS_FILE", example),
            (
                "CALLBRIDGE_EVENTS_URL",
                "https://backend.example.com/events",
            ),
        ]);
        let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("agent \"support\" (tool \"lookup_order\")"),
            "{errors:?}"
        );
        assert!(errors[0].contains("CALLBRIDGE_EVENTS_URL"), "{errors:?}");
    }

    #[test]
    fn an_agents_file_excludes_the_agent_variables() {
        let scratch = Scratch::new();
        let file = scratch
            .write(
                "agents.toml",
                "[[agent]]\nname = \"a\"\ninstructions = \"Help.\"\n",
            )
            .display()
            .to_string();
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([
            ("AGENTS_FILE", file.as_str()),
            ("AGENT_INSTRUCTIONS", "Be brief."),
            ("AGENT_INSTRUCTIONS_FILE", "/nonexistent/prompt.txt"),
            ("AGENT_GREETING", "Say hi."),
        ]);
        let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
        assert_eq!(errors.len(), 3, "{errors:?}");
        for (error, variable) in errors.iter().zip([
            "AGENT_INSTRUCTIONS",
            "AGENT_INSTRUCTIONS_FILE",
            "AGENT_GREETING",
        ]) {
            assert!(
                error.starts_with(&format!("{variable} cannot be used with AGENTS_FILE")),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn agent_file_problems_join_the_other_configuration_errors() {
        let scratch = Scratch::new();
        let file = scratch.write(
            "agents.toml",
            "[[agent]]\nname = \"a\"\ninstructions = \"Help.\"\nvoice = \"\"\ncolour = \"red\"\n",
        )
        .display()
        .to_string();
        let pairs = [("AGENTS_FILE", file.as_str()), ("PORT", "eighty")];
        let errors = Config::from_lookup(env(&pairs)).unwrap_err();
        let lines = &errors.0;
        assert!(lines.contains(&"TWILIO_ACCOUNT_SID is missing".to_owned()));
        assert!(lines.iter().any(|e| e.starts_with("PORT ")));
        assert!(
            lines.contains(&format!(
                "{file}:4: agent \"a\": key `voice` must not be empty (leave it out for the default)"
            )),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|e| e.starts_with(&format!("{file}:5: agent \"a\": key `colour` is unknown"))),
            "{lines:?}"
        );
        // One line per problem when printed.
        assert_eq!(errors.to_string().lines().count(), lines.len());

        let missing = scratch
            .path()
            .join("missing.toml")
            .to_string_lossy()
            .into_owned();
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("AGENTS_FILE", &missing));
        let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with(&format!("{missing}: cannot be read")));
    }

    #[test]
    fn instructions_can_come_from_a_file() {
        let scratch = Scratch::new();
        let file = scratch.write("instructions.txt", "Be a pirate.\n");
        let mut pairs = MINIMAL.to_vec();
        let path = file.to_string_lossy().to_string();
        pairs.push(("AGENT_INSTRUCTIONS_FILE", &path));
        let config = Config::from_lookup(env(&pairs)).unwrap();
        assert_eq!(config.agent_instructions, "Be a pirate.");

        let missing = scratch
            .path()
            .join("nope.txt")
            .to_string_lossy()
            .to_string();
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("AGENT_INSTRUCTIONS_FILE", &missing));
        let errors = Config::from_lookup(env(&pairs)).unwrap_err().0;
        assert!(errors[0].starts_with("AGENT_INSTRUCTIONS_FILE"));
    }
}
