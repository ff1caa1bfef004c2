//! Reading `AGENTS_FILE` (TOML) into an [`Agents`](super::Agents) directory.
//!
//! The file is parsed with `toml` into a spanned document first, then each `[[agent]]` table is
//! deserialized on its own (serde, `deny_unknown_fields`), so one broken agent does not hide the
//! problems of the others. When a key of an agent cannot be deserialized, the problem is recorded
//! and the key taken out, and the agent is read again: an operator sees every bad key of the file
//! at once, each with its line, instead of fixing them one start at a time. Values are then
//! checked (names, numbers, URLs, ranges), and the agents against each other (duplicate names,
//! numbers claimed twice, two defaults).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::{
    AgentProfile, Agents, BUILTIN_NAMES, Builtin, DEFAULT_CONTEXT_TIMEOUT, DEFAULT_TOOL_TIMEOUT,
    McpServer, NoiseReduction, SilencePolicy, ToolSpec, TransferTarget,
};
use crate::domain::phone::{E164, Masked};

/// What an agent gets when the file does not say: the server's `OPENAI_VOICE` and
/// `OPENAI_REALTIME_MODEL`.
#[derive(Clone, Debug)]
pub struct AgentDefaults {
    pub voice: String,
    pub model: String,
}

/// Unanswered check-ins before hanging up, when the file sets `silence_reprompt_secs` alone.
/// Two: one check-in may go unheard (the caller was talking to someone else), a second rarely.
pub const DEFAULT_SILENCE_HANGUP_AFTER: u32 = 2;
/// The longest `context_timeout_ms`: the caller hears nothing while the context is awaited.
pub const MAX_CONTEXT_TIMEOUT_MS: i64 = 5000;
/// The longest tool `timeout_ms`: past it a caller would long have hung up.
pub const MAX_TOOL_TIMEOUT_MS: i64 = 30_000;
/// The longest tool `description`, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;
/// The schema of a tool that declares no `parameters`: it takes no arguments.
const NO_PARAMETERS: &str = r#"{"type":"object","properties":{}}"#;

/// One problem of the agents file, located by line where it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentFileError {
    /// The file as `AGENTS_FILE` names it.
    pub file: String,
    /// 1-based; `None` for a problem of the whole file (unreadable, no agent).
    pub line: Option<usize>,
    /// The offending key (`voice`, or `url` of a tool), when there is one.
    pub key: Option<String>,
    /// What is wrong, naming the agent, the tool and the key.
    pub message: String,
}

impl fmt::Display for AgentFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for AgentFileError {}

/// Every problem found in the agents file, in file order; never empty.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct AgentFileErrors(pub Vec<AgentFileError>);

impl fmt::Display for AgentFileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl AgentFileErrors {
    /// One problem of the whole file.
    pub fn whole_file(path: &Path, message: String) -> Self {
        Self(vec![AgentFileError {
            file: path.display().to_string(),
            line: None,
            key: None,
            message,
        }])
    }
}

/// Reads and checks the agents file at `path`. `env` answers the variables `authorization_env`
/// names (the process environment in production, a map in tests).
pub fn load(
    path: &Path,
    defaults: &AgentDefaults,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Agents, AgentFileErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AgentFileErrors::whole_file(path, format!("cannot be read ({e})")))?;
    parse(path, &text, defaults, env, &|file| {
        std::fs::read_to_string(file)
    })
}

/// Checks the text of an agents file that `path` names, as [`load`] does once it has read it.
/// `read` reads the files `instructions_file` names (relative ones joined to `path`'s
/// directory first). Public, with the reading passed in, so that arbitrary text can be checked
/// without touching the file system: the fuzz target and the seed regression test run the whole
/// loader this way.
pub fn parse(
    path: &Path,
    text: &str,
    defaults: &AgentDefaults,
    env: &dyn Fn(&str) -> Option<String>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Agents, AgentFileErrors> {
    let mut loader = Loader {
        file: path.display().to_string(),
        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        text,
        defaults,
        env,
        read,
        problems: Vec::new(),
        names: HashMap::new(),
        numbers: HashMap::new(),
        default_agent: None,
    };
    let profiles = loader.run();
    if loader.problems.is_empty() {
        Ok(Agents::new(profiles))
    } else {
        loader.problems.sort_by_key(|problem| problem.line);
        Err(AgentFileErrors(loader.problems))
    }
}

/// The message asking for `CALLBRIDGE_WEBHOOK_SECRET`, naming every agent (and what in it) that
/// makes requests to the business; `None` when no agent makes any. Those requests are signed
/// with the secret, so the business can tell them from anyone else's.
pub fn missing_webhook_secret(agents: &Agents) -> Option<String> {
    missing_webhook_secret_for(&business_callers(agents))
}

/// Every agent that makes requests to the business, with what in it does (`agent "support"
/// (context_url, tool "lookup_order")`).
pub fn business_callers(agents: &Agents) -> Vec<String> {
    agents
        .profiles()
        .iter()
        .filter(|agent| agent.calls_the_business())
        .map(|agent| {
            let mut what: Vec<String> = Vec::new();
            if agent.context_url.is_some() {
                what.push("context_url".to_owned());
            }
            what.extend(
                agent
                    .tools
                    .iter()
                    .map(|tool| format!("tool {:?}", tool.name)),
            );
            format!("agent {:?} ({})", agent.name, what.join(", "))
        })
        .collect()
}

/// The message asking for `CALLBRIDGE_WEBHOOK_SECRET` on behalf of `callers` (whatever makes
/// signed requests: agents, the events URL); `None` when there are none.
pub fn missing_webhook_secret_for(callers: &[String]) -> Option<String> {
    (!callers.is_empty()).then(|| {
        format!(
            "CALLBRIDGE_WEBHOOK_SECRET is missing: it signs the requests callbridge makes to the \
             business, and {} {} them; set it to whsec_ and a base64 key \
             (whsec_$(openssl rand -base64 32))",
            callers.join(", "),
            if callers.len() == 1 { "makes" } else { "make" }
        )
    })
}

// The file's shapes. Every value is `Spanned` so a problem found after deserializing still has
// its line, and optional so a missing key is reported at the table's header with its name.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Option<Spanned<String>>,
    numbers: Option<Vec<Spanned<String>>>,
    default: Option<Spanned<bool>>,
    instructions: Option<Spanned<String>>,
    instructions_file: Option<Spanned<String>>,
    greeting: Option<Spanned<String>>,
    voice: Option<Spanned<String>>,
    model: Option<Spanned<String>>,
    transcription_language: Option<Spanned<String>>,
    turn_detection: Option<Spanned<toml::Table>>,
    builtin_tools: Option<Spanned<Vec<Spanned<String>>>>,
    transfer_to: Option<Spanned<String>>,
    max_call_seconds: Option<Spanned<i64>>,
    context_url: Option<Spanned<String>>,
    context_timeout_ms: Option<Spanned<i64>>,
    noise_reduction: Option<Spanned<String>>,
    silence_reprompt_secs: Option<Spanned<i64>>,
    silence_hangup_after: Option<Spanned<i64>>,
    tools: Option<Vec<Spanned<RawTool>>>,
    mcp: Option<Vec<Spanned<RawMcp>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTool {
    name: Option<Spanned<String>>,
    description: Option<Spanned<String>>,
    parameters: Option<Spanned<toml::Table>>,
    url: Option<Spanned<String>>,
    timeout_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMcp {
    server_label: Option<Spanned<String>>,
    server_url: Option<Spanned<String>>,
    allowed_tools: Option<Vec<Spanned<String>>>,
    authorization_env: Option<Spanned<String>>,
}

/// A step of the way from an agent's table down to a value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// An agent's table as deserialized, with where it starts and the keys taken out because they
/// could not be read (already reported; not to be reported again as missing).
struct ReadAgent {
    raw: RawAgent,
    header: Range<usize>,
    label: String,
    removed: HashSet<String>,
}

struct Loader<'a> {
    file: String,
    /// Where relative `instructions_file` paths start.
    dir: PathBuf,
    text: &'a str,
    defaults: &'a AgentDefaults,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Reads an `instructions_file`.
    read: &'a dyn Fn(&Path) -> std::io::Result<String>,
    problems: Vec<AgentFileError>,
    /// Agent names seen so far, with their line.
    names: HashMap<String, usize>,
    /// Numbers claimed so far: by which agent, on which line.
    numbers: HashMap<E164, (String, usize)>,
    /// The agent marked `default = true`, and its line.
    default_agent: Option<(String, usize)>,
}

impl Loader<'_> {
    fn run(&mut self) -> Vec<AgentProfile> {
        let root = match DeTable::parse(self.text) {
            Ok(root) => root,
            Err(error) => {
                // Only the first syntax error: past it the parser guesses, and its later
                // complaints are mostly echoes of the first.
                let line = error.span().map(|span| self.line(span.start));
                let message = format!("not valid TOML: {}", error.message().trim_end());
                self.problems.push(AgentFileError {
                    file: self.file.clone(),
                    line,
                    key: None,
                    message,
                });
                return Vec::new();
            }
        };
        let mut entries = Vec::new();
        for (key, value) in root.into_inner() {
            if key.get_ref() == "agent" {
                let span = value.span();
                match value.into_inner() {
                    DeValue::Array(array) => entries.extend(array),
                    _ => self.at(
                        span,
                        "agent",
                        "key `agent` must hold agent tables: write each one as [[agent]]".into(),
                    ),
                }
            } else {
                let message = format!(
                    "key `{}` is unknown: the file holds [[agent]] tables only",
                    key.get_ref()
                );
                self.at(key.span(), key.get_ref(), message);
            }
        }
        if entries.is_empty() && self.problems.is_empty() {
            self.problems.push(AgentFileError {
                file: self.file.clone(),
                line: None,
                key: None,
                message:
                    "defines no agent: add at least one [[agent]] table (see agents.example.toml)"
                        .into(),
            });
        }
        let mut profiles = Vec::new();
        for (ordinal, entry) in entries.into_iter().enumerate() {
            if let Some(read) = self.read_agent(ordinal + 1, entry)
                && let Some(profile) = self.agent(read)
            {
                profiles.push(profile);
            }
        }
        profiles
    }

    /// 1-based line of byte offset `at`.
    fn line(&self, at: usize) -> usize {
        let end = at.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn at(&mut self, span: Range<usize>, key: &str, message: String) {
        let line = self.line(span.start);
        self.problems.push(AgentFileError {
            file: self.file.clone(),
            line: Some(line),
            key: Some(key.to_owned()),
            message,
        });
    }

    /// `{context}: key `{key}` {problem}` at the line of `span`.
    fn bad(&mut self, context: &str, key: &str, span: Range<usize>, problem: &str) {
        self.at(span, key, format!("{context}: key `{key}` {problem}"));
    }

    /// Deserializes one `[[agent]]`, recording and removing each key that cannot be read.
    fn read_agent(&mut self, ordinal: usize, mut entry: Spanned<DeValue<'_>>) -> Option<ReadAgent> {
        let header = entry.span();
        let label = match entry.get_ref() {
            DeValue::Table(table) => label_of(table, "name", "agent", ordinal),
            _ => {
                self.at(
                    header,
                    "agent",
                    format!("agent #{ordinal}: key `agent` holds a value that is not a table: write each agent as [[agent]]"),
                );
                return None;
            }
        };
        let mut removed = HashSet::new();
        loop {
            let error = match RawAgent::deserialize(ValueDeserializer::from(entry.clone())) {
                Ok(raw) => {
                    return Some(ReadAgent {
                        raw,
                        header,
                        label,
                        removed,
                    });
                }
                Err(error) => error,
            };
            let DeValue::Table(table) = entry.get_mut() else {
                return None;
            };
            let path = error
                .span()
                .map(|span| locate(table, span.start))
                .unwrap_or_default();
            let Some((context, key)) = describe(table, &label, &path) else {
                // Nothing to point at: report at the header and skip the agent.
                let message = format!("{label}: {}", error.message().trim_end());
                self.at(header, "agent", message);
                return None;
            };
            let span = error.span().unwrap_or_else(|| header.clone());
            let message = serde_problem(error.message(), &key);
            self.at(span, &key, format!("{context}: {message}"));
            // A whole tool or MCP entry that is not a table: the agent is given up.
            let target = removal_target(&path)?;
            removed.insert(removed_name(&target));
            // Each round takes a key out, so the rounds end; should nothing come out, the
            // next round would meet the same error: give the agent up instead.
            if !remove(table, &target) {
                return None;
            }
        }
    }

    fn agent(&mut self, read: ReadAgent) -> Option<AgentProfile> {
        let ReadAgent {
            raw,
            header,
            label,
            removed,
        } = read;
        let before = self.problems.len();
        let name = self.agent_name(&label, raw.name, &header, &removed);
        let numbers = self.numbers(&label, raw.numbers.unwrap_or_default());
        let is_default = self.default_flag(&label, raw.default);
        let instructions = self.instructions(
            &label,
            raw.instructions,
            raw.instructions_file,
            &header,
            &removed,
        );
        let defaults = self.defaults;
        let voice = self.text_or(&label, "voice", raw.voice, &defaults.voice);
        let model = self.text_or(&label, "model", raw.model, &defaults.model);
        let transcription_language =
            self.optional_text(&label, "transcription_language", raw.transcription_language);
        let turn_detection = raw
            .turn_detection
            .and_then(|table| self.turn_detection(&label, table));
        let noise_reduction = self.noise_reduction(&label, raw.noise_reduction);
        let (builtins, transfer_to) =
            self.builtins(&label, raw.builtin_tools, raw.transfer_to, &removed);
        let max_call_duration = raw
            .max_call_seconds
            .and_then(|secs| self.positive_seconds(&label, "max_call_seconds", secs));
        let context_url = raw
            .context_url
            .and_then(|url| self.business_url(&label, "context_url", url));
        let context_timeout = self.millis(
            &label,
            "context_timeout_ms",
            raw.context_timeout_ms,
            MAX_CONTEXT_TIMEOUT_MS,
            DEFAULT_CONTEXT_TIMEOUT,
        );
        let silence = self.silence(&label, raw.silence_reprompt_secs, raw.silence_hangup_after);
        let tools = self.tools(&label, raw.tools.unwrap_or_default(), &removed);
        let mcp = self.mcp_servers(&label, raw.mcp.unwrap_or_default(), &removed);
        if self.problems.len() > before {
            return None;
        }
        Some(AgentProfile {
            name: name?,
            numbers,
            is_default,
            instructions: instructions?,
            greeting: raw
                .greeting
                .map(|greeting| greeting.into_inner().trim().to_owned())
                .filter(|greeting| !greeting.is_empty()),
            voice,
            model,
            transcription_language,
            turn_detection,
            noise_reduction,
            builtins,
            transfer_to,
            max_call_duration,
            context_url,
            context_timeout,
            silence,
            tools,
            mcp,
        })
    }

    fn agent_name(
        &mut self,
        label: &str,
        name: Option<Spanned<String>>,
        header: &Range<usize>,
        removed: &HashSet<String>,
    ) -> Option<String> {
        let Some(name) = name else {
            if !removed.contains("name") {
                self.bad(label, "name", header.clone(), "is missing");
            }
            return None;
        };
        let span = name.span();
        let name = name.into_inner();
        if !valid_name(&name) {
            self.bad(label, "name", span, NAME_RULE);
            return None;
        }
        let line = self.line(span.start);
        if let Some(first) = self.names.get(&name) {
            let problem = format!("{name:?} is already the name of the agent on line {first}");
            self.bad(label, "name", span, &problem);
            return None;
        }
        self.names.insert(name.clone(), line);
        Some(name)
    }

    fn numbers(&mut self, label: &str, raw: Vec<Spanned<String>>) -> Vec<E164> {
        let mut numbers: Vec<E164> = Vec::new();
        for entry in raw {
            let span = entry.span();
            let Ok(number) = E164::from_address(entry.get_ref().trim()) else {
                let problem = format!(
                    "holds {:?}, which is not an E.164 number (+ and 8 to 15 digits, optionally after whatsapp:)",
                    Masked(entry.get_ref())
                );
                self.bad(label, "numbers", span, &problem);
                continue;
            };
            let line = self.line(span.start);
            if let Some((owner, first)) = self.numbers.get(&number) {
                let problem = if owner == label {
                    format!(
                        "lists {} twice (first on line {first})",
                        Masked(number.as_str())
                    )
                } else {
                    format!(
                        "claims {}, which {owner} already claims on line {first}",
                        Masked(number.as_str())
                    )
                };
                self.bad(label, "numbers", span, &problem);
                continue;
            }
            self.numbers
                .insert(number.clone(), (label.to_owned(), line));
            numbers.push(number);
        }
        numbers
    }

    fn default_flag(&mut self, label: &str, flag: Option<Spanned<bool>>) -> bool {
        let Some(flag) = flag else { return false };
        if !*flag.get_ref() {
            return false;
        }
        let span = flag.span();
        if let Some((other, line)) = &self.default_agent {
            let problem = format!(
                "is true, but {other} on line {line} is already the default; only one agent may be"
            );
            self.bad(label, "default", span, &problem);
            return false;
        }
        self.default_agent = Some((label.to_owned(), self.line(span.start)));
        true
    }

    /// Exactly one of `instructions` and `instructions_file`; a file's text, trimmed.
    fn instructions(
        &mut self,
        label: &str,
        inline: Option<Spanned<String>>,
        file: Option<Spanned<String>>,
        header: &Range<usize>,
        removed: &HashSet<String>,
    ) -> Option<String> {
        match (inline, file) {
            (Some(inline), Some(file)) => {
                let (key, span) = if file.span().start > inline.span().start {
                    ("instructions_file", file.span())
                } else {
                    ("instructions", inline.span())
                };
                let problem = "cannot be used together with the other of instructions and instructions_file; keep one";
                self.bad(label, key, span, problem);
                None
            }
            (Some(inline), None) => {
                let text = inline.get_ref().trim();
                if text.is_empty() {
                    self.bad(label, "instructions", inline.span(), "must not be empty");
                    return None;
                }
                Some(text.to_owned())
            }
            (None, Some(file)) => self.instructions_file(label, &file),
            (None, None) => {
                if !removed.contains("instructions") && !removed.contains("instructions_file") {
                    let problem = "is missing (give the prompt as instructions, or instructions_file to read it from a file)";
                    self.bad(label, "instructions", header.clone(), problem);
                }
                None
            }
        }
    }

    fn instructions_file(&mut self, label: &str, file: &Spanned<String>) -> Option<String> {
        let path = self.dir.join(file.get_ref());
        match (self.read)(&path) {
            Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
            Ok(_) => {
                let problem = format!("names {}, which is empty", path.display());
                self.bad(label, "instructions_file", file.span(), &problem);
                None
            }
            Err(error) => {
                let problem = format!("names {}, which cannot be read ({error})", path.display());
                self.bad(label, "instructions_file", file.span(), &problem);
                None
            }
        }
    }

    /// A non-empty string, else `default` when the key is absent.
    fn text_or(
        &mut self,
        label: &str,
        key: &str,
        value: Option<Spanned<String>>,
        default: &str,
    ) -> String {
        self.optional_text(label, key, value)
            .unwrap_or_else(|| default.to_owned())
    }

    fn optional_text(
        &mut self,
        label: &str,
        key: &str,
        value: Option<Spanned<String>>,
    ) -> Option<String> {
        let value = value?;
        let text = value.get_ref().trim();
        if text.is_empty() {
            self.bad(
                label,
                key,
                value.span(),
                "must not be empty (leave it out for the default)",
            );
            return None;
        }
        Some(text.to_owned())
    }

    fn turn_detection(&mut self, label: &str, table: Spanned<toml::Table>) -> Option<Value> {
        let span = table.span();
        let kind = table.get_ref().get("type").and_then(toml::Value::as_str);
        if !matches!(kind, Some("server_vad" | "semantic_vad")) {
            let problem = "must have type = \"server_vad\" or type = \"semantic_vad\"";
            self.bad(label, "turn_detection", span, problem);
            return None;
        }
        match table_to_json(table.get_ref()) {
            Ok(value) => Some(value),
            Err(why) => {
                self.bad(label, "turn_detection", span, &why);
                None
            }
        }
    }

    fn noise_reduction(&mut self, label: &str, value: Option<Spanned<String>>) -> NoiseReduction {
        let Some(value) = value else {
            return NoiseReduction::NearField;
        };
        match value.get_ref().as_str() {
            "near_field" => NoiseReduction::NearField,
            "far_field" => NoiseReduction::FarField,
            other => {
                let problem = format!("must be \"near_field\" or \"far_field\", got {other:?}");
                self.bad(label, "noise_reduction", value.span(), &problem);
                NoiseReduction::NearField
            }
        }
    }

    /// `builtin_tools` (default `["end_call"]`) and the `transfer_to` that `transfer_call` needs.
    fn builtins(
        &mut self,
        label: &str,
        list: Option<Spanned<Vec<Spanned<String>>>>,
        transfer_to: Option<Spanned<String>>,
        removed: &HashSet<String>,
    ) -> (Vec<Builtin>, Option<TransferTarget>) {
        let mut builtins = Vec::new();
        let mut transfer_entry = None;
        match list {
            None => builtins.push(Builtin::EndCall),
            Some(list) => {
                for entry in list.into_inner() {
                    let span = entry.span();
                    let Some(builtin) = Builtin::from_name(entry.get_ref()) else {
                        let problem = format!(
                            "holds {:?}, which is not a built-in tool ({})",
                            entry.get_ref(),
                            BUILTIN_NAMES.join(", ")
                        );
                        self.bad(label, "builtin_tools", span, &problem);
                        continue;
                    };
                    if builtins.contains(&builtin) {
                        let problem = format!("lists {:?} twice", builtin.name());
                        self.bad(label, "builtin_tools", span, &problem);
                        continue;
                    }
                    if builtin == Builtin::TransferCall {
                        transfer_entry = Some(span);
                    }
                    builtins.push(builtin);
                }
            }
        }
        // Given but bad (or unreadable) is reported as such, not as missing.
        let given = transfer_to.is_some() || removed.contains("transfer_to");
        let target = transfer_to.and_then(|raw| self.transfer_target(label, &raw));
        if let Some(span) = transfer_entry
            && !given
        {
            let problem =
                "is missing: transfer_call needs it (\"+E164\", \"sip:…\" or \"client:…\")";
            self.bad(label, "transfer_to", span, problem);
        }
        (builtins, target)
    }

    fn transfer_target(&mut self, label: &str, raw: &Spanned<String>) -> Option<TransferTarget> {
        let value = raw.get_ref().trim();
        let target = if value.starts_with('+') {
            E164::parse(value).ok().map(TransferTarget::Number)
        } else if let Some(rest) = value.strip_prefix("sip:") {
            valid_address(rest).then(|| TransferTarget::Sip(value.to_owned()))
        } else if let Some(identity) = value.strip_prefix("client:") {
            valid_address(identity).then(|| TransferTarget::Client(identity.to_owned()))
        } else {
            None
        };
        if target.is_none() {
            let problem = format!(
                "must be \"+E164\", \"sip:…\" or \"client:…\", got {:?}",
                Masked(value)
            );
            self.bad(label, "transfer_to", raw.span(), &problem);
        }
        target
    }

    fn positive_seconds(&mut self, label: &str, key: &str, secs: Spanned<i64>) -> Option<Duration> {
        match u64::try_from(*secs.get_ref()) {
            Ok(n) if n > 0 => Some(Duration::from_secs(n)),
            _ => {
                let problem = format!(
                    "must be a positive number of seconds, got {}",
                    secs.get_ref()
                );
                self.bad(label, key, secs.span(), &problem);
                None
            }
        }
    }

    /// Milliseconds in `1..=max`, else `default` when the key is absent.
    fn millis(
        &mut self,
        label: &str,
        key: &str,
        value: Option<Spanned<i64>>,
        max: i64,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        match u64::try_from(*value.get_ref()) {
            Ok(ms) if (1..=max).contains(value.get_ref()) => Duration::from_millis(ms),
            _ => {
                let problem = format!(
                    "must be between 1 and {max} (milliseconds), got {}",
                    value.get_ref()
                );
                self.bad(label, key, value.span(), &problem);
                default
            }
        }
    }

    fn silence(
        &mut self,
        label: &str,
        reprompt: Option<Spanned<i64>>,
        hang_up: Option<Spanned<i64>>,
    ) -> Option<SilencePolicy> {
        let hang_up_after = match &hang_up {
            None => Some(DEFAULT_SILENCE_HANGUP_AFTER),
            Some(count) => match u32::try_from(*count.get_ref()) {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    let problem = format!("must be 1 or more, got {}", count.get_ref());
                    self.bad(label, "silence_hangup_after", count.span(), &problem);
                    None
                }
            },
        };
        let Some(reprompt) = reprompt else {
            if let Some(count) = hang_up {
                let problem = "needs silence_reprompt_secs: it counts the check-ins made after that long a silence";
                self.bad(label, "silence_hangup_after", count.span(), problem);
            }
            return None;
        };
        let reprompt_after = self.positive_seconds(label, "silence_reprompt_secs", reprompt)?;
        Some(SilencePolicy {
            reprompt_after,
            hang_up_after: hang_up_after?,
        })
    }

    /// An https URL, or http to this machine (a business backend beside callbridge).
    fn business_url(&mut self, label: &str, key: &str, raw: Spanned<String>) -> Option<String> {
        let value = raw.get_ref().trim();
        match check_business_url(value) {
            Ok(()) => Some(value.to_owned()),
            Err(why) => {
                self.bad(label, key, raw.span(), &why);
                None
            }
        }
    }

    /// An MCP server is reached by OpenAI, not by callbridge: only a public https URL can work.
    fn mcp_url(&mut self, label: &str, raw: Spanned<String>) -> Option<String> {
        let value = raw.get_ref().trim();
        match url::Url::parse(value) {
            Ok(url) if url.scheme() == "https" && url.host().is_some() => Some(value.to_owned()),
            _ => {
                self.bad(
                    label,
                    "server_url",
                    raw.span(),
                    "must be an https:// URL that OpenAI can reach (OpenAI calls MCP servers, not callbridge)",
                );
                None
            }
        }
    }

    fn tools(
        &mut self,
        agent: &str,
        raw: Vec<Spanned<RawTool>>,
        removed: &HashSet<String>,
    ) -> Vec<ToolSpec> {
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut tools = Vec::new();
        for (index, tool) in raw.into_iter().enumerate() {
            let header = tool.span();
            let tool = tool.into_inner();
            let label = match &tool.name {
                Some(name) => format!("{agent}: tool {:?}", name.get_ref()),
                None => format!("{agent}: tool #{}", index + 1),
            };
            let was_removed = |key: &str| removed.contains(&format!("tools.{index}.{key}"));
            let name = self.tool_name(&label, tool.name, &header, was_removed("name"), &mut names);
            let description = self.description(
                &label,
                tool.description,
                &header,
                was_removed("description"),
            );
            let parameters = self.parameters(&label, tool.parameters);
            let url = match tool.url {
                Some(url) => self.business_url(&label, "url", url),
                None => {
                    if !was_removed("url") {
                        self.bad(&label, "url", header.clone(), "is missing");
                    }
                    None
                }
            };
            let timeout = self.millis(
                &label,
                "timeout_ms",
                tool.timeout_ms,
                MAX_TOOL_TIMEOUT_MS,
                DEFAULT_TOOL_TIMEOUT,
            );
            if let (Some(name), Some(description), Some(parameters), Some(url)) =
                (name, description, parameters, url)
            {
                tools.push(ToolSpec {
                    name,
                    description,
                    parameters,
                    url,
                    timeout,
                });
            }
        }
        tools
    }

    fn tool_name(
        &mut self,
        label: &str,
        name: Option<Spanned<String>>,
        header: &Range<usize>,
        was_removed: bool,
        seen: &mut HashMap<String, usize>,
    ) -> Option<String> {
        let names = UniqueName {
            key: "name",
            taken: "the name of this agent's tool",
            reserved: &BUILTIN_NAMES,
        };
        self.unique_name(label, &names, name, header, was_removed, seen)
    }

    /// A name (a tool's, an MCP server's label) that follows the name rule, is not reserved
    /// and is used once in its agent; every problem is reported at the offending line.
    fn unique_name(
        &mut self,
        label: &str,
        names: &UniqueName<'_>,
        name: Option<Spanned<String>>,
        header: &Range<usize>,
        was_removed: bool,
        seen: &mut HashMap<String, usize>,
    ) -> Option<String> {
        let key = names.key;
        let Some(name) = name else {
            if !was_removed {
                self.bad(label, key, header.clone(), "is missing");
            }
            return None;
        };
        let span = name.span();
        let name = name.into_inner();
        if !valid_name(&name) {
            self.bad(label, key, span, NAME_RULE);
            return None;
        }
        if names.reserved.contains(&name.as_str()) {
            let problem = "is the name of a built-in tool; list built-ins in builtin_tools, and name this tool otherwise";
            self.bad(label, key, span, problem);
            return None;
        }
        let line = self.line(span.start);
        if let Some(first) = seen.get(&name) {
            let problem = format!("{name:?} is already {} on line {first}", names.taken);
            self.bad(label, key, span, &problem);
            return None;
        }
        seen.insert(name.clone(), line);
        Some(name)
    }

    fn description(
        &mut self,
        label: &str,
        description: Option<Spanned<String>>,
        header: &Range<usize>,
        was_removed: bool,
    ) -> Option<String> {
        let Some(description) = description else {
            if !was_removed {
                let problem = "is missing: the agent decides from it when to use the tool";
                self.bad(label, "description", header.clone(), problem);
            }
            return None;
        };
        let text = description.get_ref().trim();
        let chars = text.chars().count();
        if text.is_empty() || chars > MAX_DESCRIPTION_CHARS {
            let problem = format!("must be 1 to {MAX_DESCRIPTION_CHARS} characters, got {chars}");
            self.bad(label, "description", description.span(), &problem);
            return None;
        }
        Some(text.to_owned())
    }

    /// The tool's JSON Schema: an object schema, as OpenAI requires of function parameters.
    fn parameters(
        &mut self,
        label: &str,
        parameters: Option<Spanned<toml::Table>>,
    ) -> Option<Value> {
        let Some(parameters) = parameters else {
            return serde_json::from_str(NO_PARAMETERS).ok();
        };
        let span = parameters.span();
        if parameters
            .get_ref()
            .get("type")
            .and_then(toml::Value::as_str)
            != Some("object")
        {
            let problem =
                "must be a JSON Schema of an object: type = \"object\", with its properties";
            self.bad(label, "parameters", span, problem);
            return None;
        }
        match table_to_json(parameters.get_ref()) {
            Ok(value) => Some(value),
            Err(why) => {
                self.bad(label, "parameters", span, &why);
                None
            }
        }
    }

    fn mcp_servers(
        &mut self,
        agent: &str,
        raw: Vec<Spanned<RawMcp>>,
        removed: &HashSet<String>,
    ) -> Vec<McpServer> {
        let mut labels: HashMap<String, usize> = HashMap::new();
        let mut servers = Vec::new();
        for (index, server) in raw.into_iter().enumerate() {
            let header = server.span();
            let server = server.into_inner();
            let label = match &server.server_label {
                Some(name) => format!("{agent}: MCP server {:?}", name.get_ref()),
                None => format!("{agent}: MCP server #{}", index + 1),
            };
            let was_removed = |key: &str| removed.contains(&format!("mcp.{index}.{key}"));
            let server_label = self.server_label(
                &label,
                server.server_label,
                &header,
                was_removed("server_label"),
                &mut labels,
            );
            let server_url = match server.server_url {
                Some(url) => self.mcp_url(&label, url),
                None => {
                    if !was_removed("server_url") {
                        self.bad(&label, "server_url", header.clone(), "is missing");
                    }
                    None
                }
            };
            // `Some(None)`: not given; `None`: given but bad (reported).
            let allowed_tools = match server.allowed_tools {
                None => Some(None),
                Some(tools) => self.allowed_tools(&label, tools).map(Some),
            };
            let authorization = match server.authorization_env {
                None => Some(None),
                Some(variable) => self.authorization(&label, &variable).map(Some),
            };
            if let (
                Some(server_label),
                Some(server_url),
                Some(allowed_tools),
                Some(authorization),
            ) = (server_label, server_url, allowed_tools, authorization)
            {
                servers.push(McpServer {
                    server_label,
                    server_url,
                    allowed_tools,
                    authorization,
                });
            }
        }
        servers
    }

    fn server_label(
        &mut self,
        label: &str,
        server_label: Option<Spanned<String>>,
        header: &Range<usize>,
        was_removed: bool,
        seen: &mut HashMap<String, usize>,
    ) -> Option<String> {
        let names = UniqueName {
            key: "server_label",
            taken: "the label of this agent's MCP server",
            reserved: &[],
        };
        self.unique_name(label, &names, server_label, header, was_removed, seen)
    }

    fn allowed_tools(&mut self, label: &str, tools: Vec<Spanned<String>>) -> Option<Vec<String>> {
        let mut names = Vec::new();
        let mut ok = true;
        for tool in tools {
            let name = tool.get_ref().trim();
            if name.is_empty() {
                self.bad(
                    label,
                    "allowed_tools",
                    tool.span(),
                    "holds an empty tool name",
                );
                ok = false;
            } else {
                names.push(name.to_owned());
            }
        }
        ok.then_some(names)
    }

    /// The value of the variable `authorization_env` names. Only the variable's name is ever
    /// reported: its value is a credential.
    fn authorization(&mut self, label: &str, variable: &Spanned<String>) -> Option<SecretString> {
        let name = variable.get_ref().trim();
        if name.is_empty() {
            self.bad(
                label,
                "authorization_env",
                variable.span(),
                "must name an environment variable",
            );
            return None;
        }
        match (self.env)(name).filter(|value| !value.trim().is_empty()) {
            Some(value) => Some(SecretString::from(value.trim().to_owned())),
            None => {
                let problem = format!("names the variable {name}, which is not set");
                self.bad(label, "authorization_env", variable.span(), &problem);
                None
            }
        }
    }
}

const NAME_RULE: &str = "must be 1 to 64 letters, digits, '_' or '-'";

/// `[A-Za-z0-9_-]{1,64}`: names that go into URLs, logs and OpenAI tool declarations unchanged.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The part after `sip:` or `client:`: something, and no whitespace (it goes into TwiML).
fn valid_address(rest: &str) -> bool {
    !rest.is_empty() && !rest.chars().any(char::is_whitespace)
}

/// What makes a name in an agent valid besides the name rule: its key, what a second use
/// would collide with, and names it may not take.
struct UniqueName<'a> {
    key: &'static str,
    taken: &'static str,
    reserved: &'a [&'a str],
}

/// https anywhere; http only to a loopback host, where nothing on the network can read or change
/// the request on its way.
pub(crate) fn check_business_url(value: &str) -> Result<(), String> {
    let url = url::Url::parse(value).map_err(|e| format!("is not a valid URL ({e})"))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("has no host".into()),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(
            "must start with https:// (http:// only to a loopback host: 127.0.0.1, [::1] or localhost)"
                .into(),
        ),
    }
}

/// A TOML table as the JSON object OpenAI is sent. Written out because TOML's datetimes have no
/// JSON form (serde would turn them into a private marker object): they become their text, and
/// the floats JSON cannot hold (nan, inf) are refused.
fn table_to_json(table: &toml::Table) -> Result<Value, String> {
    table
        .iter()
        .map(|(key, value)| Ok((key.clone(), toml_to_json(value)?)))
        .collect::<Result<serde_json::Map<String, Value>, String>>()
        .map(Value::Object)
}

fn toml_to_json(value: &toml::Value) -> Result<Value, String> {
    Ok(match value {
        toml::Value::String(text) => Value::String(text.clone()),
        toml::Value::Integer(n) => Value::from(*n),
        toml::Value::Float(x) => serde_json::Number::from_f64(*x)
            .map(Value::Number)
            .ok_or_else(|| format!("holds {x}, which JSON cannot represent"))?,
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(datetime) => Value::String(datetime.to_string()),
        toml::Value::Array(items) => Value::Array(
            items
                .iter()
                .map(toml_to_json)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        toml::Value::Table(table) => table_to_json(table)?,
    })
}

/// How a table is named in messages: by its `name_key` when that is a string, else by position.
fn label_of(table: &DeTable<'_>, name_key: &str, kind: &str, ordinal: usize) -> String {
    match table.get(name_key).map(Spanned::get_ref) {
        Some(DeValue::String(name)) => format!("{kind} {:?}", name.as_ref()),
        _ => format!("{kind} #{ordinal}"),
    }
}

/// The way from `table` down to the innermost key or array element whose key or value holds
/// byte offset `at` (where a deserialization error points).
fn locate(table: &DeTable<'_>, at: usize) -> Vec<Seg> {
    for (key, value) in table {
        let mut path = vec![Seg::Key(key.get_ref().to_string())];
        if covers(&key.span(), at) {
            return path;
        }
        if let Some(rest) = locate_in(value, at) {
            path.extend(rest);
            return path;
        }
    }
    Vec::new()
}

fn locate_in(value: &Spanned<DeValue<'_>>, at: usize) -> Option<Vec<Seg>> {
    // Containers first: a table's span from an `[[…]]` header covers the header only, not
    // the keys below it, so the children are searched whatever the container's span says.
    match value.get_ref() {
        DeValue::Table(table) => {
            let inner = locate(table, at);
            if !inner.is_empty() {
                return Some(inner);
            }
        }
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                if let Some(rest) = locate_in(item, at) {
                    let mut path = vec![Seg::Index(index)];
                    path.extend(rest);
                    return Some(path);
                }
            }
        }
        _ => {}
    }
    covers(&value.span(), at).then(Vec::new)
}

fn covers(span: &Range<usize>, at: usize) -> bool {
    span.start <= at && at < span.end.max(span.start + 1)
}

/// The context (agent, and tool or MCP server) and the key a located error is about.
fn describe(table: &DeTable<'_>, agent: &str, path: &[Seg]) -> Option<(String, String)> {
    let Seg::Key(top) = path.first()? else {
        return None;
    };
    let kind = match top.as_str() {
        "tools" => "tool",
        "mcp" => "MCP server",
        _ => return Some((agent.to_owned(), top.clone())),
    };
    match (path.get(1), path.get(2)) {
        (Some(Seg::Index(index)), Some(Seg::Key(key))) => {
            let entry = match table.get(top.as_str()).map(Spanned::get_ref) {
                Some(DeValue::Array(items)) => items.get(*index),
                _ => None,
            };
            let name_key = if top == "tools" {
                "name"
            } else {
                "server_label"
            };
            let label = match entry.map(Spanned::get_ref) {
                Some(DeValue::Table(entry)) => label_of(entry, name_key, kind, index + 1),
                _ => format!("{kind} #{}", index + 1),
            };
            Some((format!("{agent}: {label}"), key.clone()))
        }
        _ => Some((agent.to_owned(), top.clone())),
    }
}

/// What to take out of the agent's table so the next read gets past this error: the key inside
/// a tool or MCP entry, else the agent's own key. `None` when it would be a whole tool or MCP
/// entry (it is not a table at all): taking it out would renumber the others, so the agent is
/// given up instead.
fn removal_target(path: &[Seg]) -> Option<Vec<Seg>> {
    let Seg::Key(top) = path.first()? else {
        return None;
    };
    if matches!(top.as_str(), "tools" | "mcp") && path.len() > 1 {
        return match (path.get(1), path.get(2)) {
            (Some(index @ Seg::Index(_)), Some(key @ Seg::Key(_))) => {
                Some(vec![path[0].clone(), index.clone(), key.clone()])
            }
            _ => None,
        };
    }
    Some(vec![path[0].clone()])
}

/// `name` or `tools.1.url`: how `ReadAgent::removed` remembers a taken-out key.
fn removed_name(target: &[Seg]) -> String {
    target
        .iter()
        .map(|seg| match seg {
            Seg::Key(key) => key.clone(),
            Seg::Index(index) => index.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Takes `target` out of the agent's table; whether there was one.
fn remove(table: &mut DeTable<'_>, target: &[Seg]) -> bool {
    match target {
        [Seg::Key(key)] => table.remove(key.as_str()).is_some(),
        [Seg::Key(top), Seg::Index(index), Seg::Key(key)] => {
            if let Some(value) = table.get_mut(top.as_str())
                && let DeValue::Array(items) = value.get_mut()
                && let Some(entry) = items.get_mut(*index)
                && let DeValue::Table(entry) = entry.get_mut()
            {
                entry.remove(key.as_str()).is_some()
            } else {
                false
            }
        }
        _ => false,
    }
}

/// A serde message in the file's words: serde says "field" where TOML says "key", and names
/// Rust's integer type where the file has a whole number.
fn serde_problem(message: &str, key: &str) -> String {
    let message = message
        .trim_end()
        .replace("expected i64", "expected a whole number");
    match message.strip_prefix(&format!("unknown field `{key}`")) {
        Some(rest) => format!("key `{key}` is unknown{rest}"),
        None => format!("key `{key}`: {message}"),
    }
}

#[cfg(test)]
mod tests;
