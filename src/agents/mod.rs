//! Agent profiles: who answers a call, with what prompt, voice, model and tools.
//!
//! Without `AGENTS_FILE` there is one agent, `default`, built from the `AGENT_*` variables.
//! With it, the file's profiles are routed by the business number a call reaches (or by name,
//! from `POST /calls`). A call takes a snapshot of the directory when its socket opens, so a
//! reload (`SIGHUP`) changes the calls that start afterwards and never a live one.

pub mod file;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;

use crate::domain::phone::E164;

/// The names the built-in tools are declared to OpenAI with; no agent tool may take them.
pub const BUILTIN_NAMES: [&str; 2] = ["end_call", "transfer_call"];

/// A tool callbridge carries out itself instead of calling the business.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// Ends the call once the caller heard what was already said.
    EndCall,
    /// Redirects the call to `transfer_to` once the caller heard what was already said.
    TransferCall,
}

impl Builtin {
    pub fn name(self) -> &'static str {
        match self {
            Self::EndCall => "end_call",
            Self::TransferCall => "transfer_call",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "end_call" => Some(Self::EndCall),
            "transfer_call" => Some(Self::TransferCall),
            _ => None,
        }
    }
}

/// Where `transfer_call` sends the caller, as TwiML's `<Dial>` nouns name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferTarget {
    Number(E164),
    /// `sip:…`, kept whole.
    Sip(String),
    /// `client:name`: the identity after the prefix.
    Client(String),
}

/// `audio.input.noise_reduction.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseReduction {
    NearField,
    FarField,
}

impl NoiseReduction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NearField => "near_field",
            Self::FarField => "far_field",
        }
    }
}

/// When nobody has spoken for a while: check in, and after enough unanswered check-ins, hang up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SilencePolicy {
    /// Quiet this long (nobody speaking, nothing playing) → the agent checks in.
    pub reprompt_after: Duration,
    /// Check-ins left unanswered before the agent says goodbye and hangs up.
    pub hang_up_after: u32,
}

/// A function the agent may call, answered by the business's endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments, passed to OpenAI as it is.
    pub parameters: Value,
    /// https, or http to a loopback host.
    pub url: String,
    pub timeout: Duration,
}

/// A remote MCP server, handed to OpenAI as an `mcp` tool; OpenAI calls it, not callbridge.
#[derive(Clone, Debug)]
pub struct McpServer {
    pub server_label: String,
    pub server_url: String,
    pub allowed_tools: Option<Vec<String>>,
    /// Read from the variable `authorization_env` names when the file is loaded; sent to
    /// OpenAI in the session's configuration only, never logged or stored.
    pub authorization: Option<SecretString>,
}

/// One agent, as a call uses it.
#[derive(Clone, Debug)]
pub struct AgentProfile {
    /// `[A-Za-z0-9_-]{1,64}`.
    pub name: String,
    /// Business numbers (the call's `To`, E.164) this agent answers.
    pub numbers: Vec<E164>,
    pub is_default: bool,
    /// May hold `{{variable}}` placeholders, filled per call.
    pub instructions: String,
    /// When set, the agent speaks first, following this instruction.
    pub greeting: Option<String>,
    pub voice: String,
    pub model: String,
    pub transcription_language: Option<String>,
    /// `audio.input.turn_detection` as the file gives it; server VAD when `None`.
    pub turn_detection: Option<Value>,
    pub noise_reduction: NoiseReduction,
    pub builtins: Vec<Builtin>,
    /// Required when `builtins` holds `TransferCall`.
    pub transfer_to: Option<TransferTarget>,
    pub max_call_duration: Option<Duration>,
    pub context_url: Option<String>,
    pub context_timeout: Duration,
    pub silence: Option<SilencePolicy>,
    pub tools: Vec<ToolSpec>,
    pub mcp: Vec<McpServer>,
}

/// `context_timeout_ms` when the file does not say.
pub const DEFAULT_CONTEXT_TIMEOUT: Duration = Duration::from_millis(1500);
/// A tool's `timeout_ms` when the file does not say.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_millis(5000);

impl AgentProfile {
    /// The one agent the environment describes (`AGENT_*`, `OPENAI_VOICE`, the model), for a
    /// server without `AGENTS_FILE`; the configuration builds it before the `Config` exists.
    pub fn from_environment(
        instructions: String,
        greeting: Option<String>,
        voice: String,
        model: String,
    ) -> Self {
        Self {
            greeting,
            ..Self::new("default", &instructions, &voice, &model)
        }
    }

    /// An agent that only talks: the file's defaults for everything but these.
    pub fn new(name: &str, instructions: &str, voice: &str, model: &str) -> Self {
        Self {
            name: name.to_owned(),
            numbers: Vec::new(),
            is_default: true,
            instructions: instructions.to_owned(),
            greeting: None,
            voice: voice.to_owned(),
            model: model.to_owned(),
            transcription_language: None,
            turn_detection: None,
            noise_reduction: NoiseReduction::NearField,
            builtins: vec![Builtin::EndCall],
            transfer_to: None,
            max_call_duration: None,
            context_url: None,
            context_timeout: DEFAULT_CONTEXT_TIMEOUT,
            silence: None,
            tools: Vec::new(),
            mcp: Vec::new(),
        }
    }

    pub fn tool(&self, name: &str) -> Option<&ToolSpec> {
        self.tools.iter().find(|tool| tool.name == name)
    }

    pub fn builtin(&self, name: &str) -> Option<Builtin> {
        Builtin::from_name(name).filter(|builtin| self.builtins.contains(builtin))
    }

    /// Whether this agent makes requests to the business (and so needs the webhook secret).
    pub fn calls_the_business(&self) -> bool {
        self.context_url.is_some() || !self.tools.is_empty()
    }
}

/// Every agent of this server, in file order. Never empty.
#[derive(Clone, Debug)]
pub struct Agents {
    profiles: Vec<Arc<AgentProfile>>,
}

impl Agents {
    /// `profiles` must not be empty; the file loader guarantees it.
    pub fn new(profiles: Vec<AgentProfile>) -> Self {
        assert!(
            !profiles.is_empty(),
            "an agent directory holds at least one agent"
        );
        Self {
            profiles: profiles.into_iter().map(Arc::new).collect(),
        }
    }

    /// The single `default` agent of a server without `AGENTS_FILE`.
    pub fn single(profile: AgentProfile) -> Self {
        Self::new(vec![profile])
    }

    pub fn profiles(&self) -> &[Arc<AgentProfile>] {
        &self.profiles
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<AgentProfile>> {
        self.profiles.iter().find(|agent| agent.name == name)
    }

    /// The agent marked `default`, else the first.
    pub fn default_agent(&self) -> &Arc<AgentProfile> {
        self.profiles
            .iter()
            .find(|agent| agent.is_default)
            .unwrap_or(&self.profiles[0])
    }

    /// The agent answering calls to `to` (`+E164` or `whatsapp:+E164`): the one that claims
    /// the number, else the default.
    pub fn for_number(&self, to: &str) -> &Arc<AgentProfile> {
        let Ok(number) = E164::from_address(to) else {
            return self.default_agent();
        };
        self.profiles
            .iter()
            .find(|agent| agent.numbers.contains(&number))
            .unwrap_or_else(|| self.default_agent())
    }

    /// Whether any agent makes requests to the business.
    pub fn call_the_business(&self) -> bool {
        self.profiles.iter().any(|agent| agent.calls_the_business())
    }
}

/// The live directory: read by every new call, replaced whole by a reload.
#[derive(Debug)]
pub struct AgentsHandle(RwLock<Arc<Agents>>);

impl AgentsHandle {
    pub fn new(agents: Agents) -> Self {
        Self(RwLock::new(Arc::new(agents)))
    }

    /// The directory as it is now; a later reload does not change the snapshot.
    pub fn current(&self) -> Arc<Agents> {
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    pub fn replace(&self, agents: Agents) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(agents);
    }
}
