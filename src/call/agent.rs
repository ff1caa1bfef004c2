//! What the agent of one call is: chosen when the call starts, never read from global
//! configuration afterwards, so each call can run a different agent (model, voice, prompt).

use crate::config::Config;

/// The agent settings a call's OpenAI session is opened and configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSettings {
    /// The profile's name, for the call's record and logs.
    pub name: String,
    /// The Realtime model, sent as the `model` query parameter of this call's session.
    pub model: String,
    pub voice: String,
    pub instructions: String,
    /// When set, the agent speaks first, following this instruction.
    pub greeting: Option<String>,
}

impl AgentSettings {
    /// The one agent the environment describes (`AGENT_*`, `OPENAI_VOICE`, the model).
    pub fn from_config(config: &Config) -> Self {
        Self {
            name: "default".to_owned(),
            model: config.openai_realtime_model.clone(),
            voice: config.openai_voice.clone(),
            instructions: config.agent_instructions.clone(),
            greeting: config.agent_greeting.clone(),
        }
    }
}

/// The system message that briefs the agent on an outbound call it is placing.
pub fn outbound_brief(agent: Option<&str>, context: Option<&str>) -> String {
    let mut brief = String::from(
        "This is an outbound call: you are calling the user on behalf of the business.",
    );
    if let Some(agent) = agent {
        brief.push_str(&format!(" Act as the agent \"{agent}\"."));
    }
    if let Some(context) = context {
        brief.push_str("\nContext for this call:\n");
        brief.push_str(context);
    }
    brief
}
