//! What one call tells its agent and the business: who is on the line, the call's variables,
//! the context the business returns at call start, and the bodies of the requests made to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::phone::E164;
use crate::twilio::call::Direction;

/// Variables that fill `{{name}}` placeholders; ordered so request bodies are deterministic.
pub type Variables = BTreeMap<String, String>;

/// Whether the call is a WhatsApp call or a phone call, as the business sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    #[default]
    Whatsapp,
    Phone,
}

/// Which way the call goes, as the business sees it (Twilio's three directions folded to two).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallDirection {
    #[default]
    Inbound,
    Outbound,
}

/// The two ends of a call: the customer's number and ours, whichever way the call goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parties {
    /// The customer, E.164 (as Twilio sent it when it is not a number).
    pub caller: String,
    /// The business number, E.164.
    pub business: String,
    pub channel: Channel,
    pub direction: CallDirection,
}

impl Parties {
    /// From the stream's `from`, `to` and `direction` parameters (Twilio's `From`/`To`, which
    /// swap roles on outbound calls).
    pub fn from_stream(from: &str, to: &str, direction: Option<Direction>) -> Self {
        let direction = match direction {
            Some(Direction::OutboundApi | Direction::OutboundDial) => CallDirection::Outbound,
            Some(Direction::Inbound) | None => CallDirection::Inbound,
        };
        let (caller, business) = match direction {
            CallDirection::Inbound => (from, to),
            CallDirection::Outbound => (to, from),
        };
        let channel = if from.starts_with("whatsapp:") || to.starts_with("whatsapp:") {
            Channel::Whatsapp
        } else {
            Channel::Phone
        };
        Self {
            caller: plain_number(caller),
            business: plain_number(business),
            channel,
            direction,
        }
    }
}

fn plain_number(address: &str) -> String {
    E164::from_address(address).map_or_else(
        |_| {
            address
                .strip_prefix("whatsapp:")
                .unwrap_or(address)
                .to_owned()
        },
        |number| number.as_str().to_owned(),
    )
}

/// Replaces every `{{name}}` with its variable; an unknown name becomes empty, so a prompt
/// never reads a raw placeholder aloud.
pub fn fill_placeholders(text: &str, variables: &Variables) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(length) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = rest[start + 2..start + 2 + length].trim();
        if let Some(value) = variables.get(name) {
            out.push_str(value);
        }
        rest = &rest[start + 2 + length + 2..];
    }
    out.push_str(rest);
    out
}

/// What the business's context endpoint may answer; every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ContextAnswer {
    /// Appended to the agent's instructions after a blank line.
    #[serde(default)]
    pub instructions: Option<String>,
    /// A system message before the first response.
    #[serde(default)]
    pub context: Option<String>,
    /// Replaces the agent's greeting; `""` means the agent does not speak first.
    #[serde(default)]
    pub greeting: Option<String>,
    /// Override the variables of `POST /calls`.
    #[serde(default)]
    pub variables: Variables,
}

impl ContextAnswer {
    /// A 2xx answer's body; anything but a JSON object of the right shape is refused. The
    /// object is checked first because serde also reads a struct from an array, field by
    /// field, so `["…"]` would otherwise pass as `instructions`.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let object: Map<String, Value> = serde_json::from_slice(body)
            .map_err(|error| format!("the answer is not a JSON object ({error})"))?;
        serde_json::from_value(Value::Object(object))
            .map_err(|error| format!("the answer is not usable JSON ({error})"))
    }
}

/// What the agent is told before the call's first response.
#[derive(Debug, PartialEq, Eq)]
pub struct Brief {
    pub instructions: String,
    /// System messages, in order, before anything can make the agent speak.
    pub system_messages: Vec<String>,
    /// The greeting instruction, if the agent speaks first.
    pub greeting: Option<String>,
}

/// Merges the agent's own settings with what `POST /calls` stored and what the context
/// endpoint answered (the answer wins over both).
pub fn brief(
    instructions: &str,
    greeting: Option<&str>,
    outbound: Option<&OutboundBrief>,
    answer: Option<&ContextAnswer>,
) -> Brief {
    let mut variables = outbound.map(|o| o.variables.clone()).unwrap_or_default();
    if let Some(answer) = answer {
        variables.extend(answer.variables.clone());
    }
    let mut filled = fill_placeholders(instructions, &variables);
    if let Some(extra) = answer.and_then(|a| a.instructions.as_deref()) {
        let extra = extra.trim();
        if !extra.is_empty() {
            filled.push_str("\n\n");
            filled.push_str(extra);
        }
    }
    let mut system_messages = Vec::new();
    if let Some(outbound) = outbound {
        system_messages.push(outbound_brief(outbound.context.as_deref()));
    }
    if let Some(context) = answer.and_then(|a| a.context.as_deref())
        && !context.trim().is_empty()
    {
        system_messages.push(context.trim().to_owned());
    }
    let greeting = match answer.and_then(|a| a.greeting.as_deref()) {
        Some(replacement) => Some(replacement),
        None => greeting,
    }
    .map(|text| fill_placeholders(text, &variables))
    .filter(|text| !text.trim().is_empty());
    Brief {
        instructions: filled,
        system_messages,
        greeting,
    }
}

/// What `POST /calls` stored for an outbound call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboundBrief {
    pub context: Option<String>,
    pub variables: Variables,
}

/// The system message that briefs the agent on an outbound call it is placing.
pub fn outbound_brief(context: Option<&str>) -> String {
    let mut brief = String::from(
        "This is an outbound call: you are calling the user on behalf of the business.",
    );
    if let Some(context) = context {
        brief.push_str("\nContext for this call:\n");
        brief.push_str(context);
    }
    brief
}

/// The fields every request to the business carries about the call.
#[derive(Serialize)]
struct CallFields<'a> {
    call_sid: &'a str,
    agent: &'a str,
    caller: &'a str,
    business: &'a str,
    channel: Channel,
    direction: CallDirection,
}

/// The body of the `call.context` request.
pub fn context_request(
    call_sid: &str,
    agent: &str,
    parties: &Parties,
    variables: &Variables,
) -> String {
    #[derive(Serialize)]
    struct Body<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(flatten)]
        call: CallFields<'a>,
        variables: &'a Variables,
    }
    to_json(&Body {
        kind: "call.context",
        call: call_fields(call_sid, agent, parties),
        variables,
    })
}

/// The body of a `tool.call` request.
pub fn tool_request(
    call_sid: &str,
    agent: &str,
    parties: &Parties,
    tool: &str,
    call_id: &str,
    arguments: &Map<String, Value>,
) -> String {
    #[derive(Serialize)]
    struct Body<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(flatten)]
        call: CallFields<'a>,
        tool: &'a str,
        call_id: &'a str,
        arguments: &'a Map<String, Value>,
    }
    to_json(&Body {
        kind: "tool.call",
        call: call_fields(call_sid, agent, parties),
        tool,
        call_id,
        arguments,
    })
}

fn call_fields<'a>(call_sid: &'a str, agent: &'a str, parties: &'a Parties) -> CallFields<'a> {
    CallFields {
        call_sid,
        agent,
        caller: &parties.caller,
        business: &parties.business,
        channel: parties.channel,
        direction: parties.direction,
    }
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("plain structs of strings serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Variables {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn placeholders_are_filled_and_unknown_ones_emptied() {
        let variables = vars(&[("name", "Ada"), ("order", "42")]);
        assert_eq!(
            fill_placeholders("Hi {{name}}, order {{ order }}{{missing}}.", &variables),
            "Hi Ada, order 42."
        );
        assert_eq!(fill_placeholders("no {{end", &variables), "no {{end");
        assert_eq!(fill_placeholders("", &variables), "");
    }

    #[test]
    fn parties_are_the_customer_and_us_whichever_way_the_call_goes() {
        let inbound = Parties::from_stream(
            "whatsapp:+15550001111",
            "whatsapp:+15552223333",
            Some(Direction::Inbound),
        );
        assert_eq!(inbound.caller, "+15550001111");
        assert_eq!(inbound.business, "+15552223333");
        assert_eq!(inbound.channel, Channel::Whatsapp);
        let outbound =
            Parties::from_stream("+15552223333", "+15550001111", Some(Direction::OutboundApi));
        assert_eq!(outbound.caller, "+15550001111");
        assert_eq!(outbound.business, "+15552223333");
        assert_eq!(outbound.channel, Channel::Phone);
        assert_eq!(outbound.direction, CallDirection::Outbound);
    }

    #[test]
    fn the_answer_extends_instructions_and_replaces_the_greeting() {
        let outbound = OutboundBrief {
            context: Some("Ask about the delivery.".into()),
            variables: vars(&[("name", "Ada"), ("tier", "gold")]),
        };
        let answer = ContextAnswer {
            instructions: Some("Be brief.".into()),
            context: Some("Ada ordered a lamp.".into()),
            greeting: Some("Greet {{name}} ({{tier}}).".into()),
            variables: vars(&[("tier", "platinum")]),
        };
        let brief = brief(
            "You help {{name}}.",
            Some("Say hello."),
            Some(&outbound),
            Some(&answer),
        );
        assert_eq!(brief.instructions, "You help Ada.\n\nBe brief.");
        assert_eq!(brief.greeting.as_deref(), Some("Greet Ada (platinum)."));
        assert_eq!(brief.system_messages.len(), 2);
        assert!(brief.system_messages[0].contains("Ask about the delivery."));
        assert_eq!(brief.system_messages[1], "Ada ordered a lamp.");
    }

    #[test]
    fn only_an_object_is_an_answer() {
        assert_eq!(
            ContextAnswer::parse(br#"{"instructions":"Be kind.","extra":1}"#)
                .unwrap()
                .instructions
                .as_deref(),
            Some("Be kind.")
        );
        for body in [
            &br#"["Be rude."]"#[..],
            b"[]",
            b"\"x\"",
            b"null",
            b"{\"greeting\":5}",
        ] {
            assert!(ContextAnswer::parse(body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn an_empty_greeting_in_the_answer_means_the_agent_waits() {
        let answer = ContextAnswer {
            greeting: Some(String::new()),
            ..ContextAnswer::default()
        };
        let brief = brief("x", Some("Say hello."), None, Some(&answer));
        assert_eq!(brief.greeting, None);
        assert!(brief.system_messages.is_empty());
    }

    /// The business gets the number the model wrote, as the nearest double: serde_json's
    /// default float parsing can miss it by one unit in the last place (this one was found by
    /// fuzzing), so the body carried another number, which a second reading changed again.
    #[test]
    fn a_tool_gets_the_numbers_of_the_models_arguments() {
        let written = "555555555555555955595545E55";
        let arguments: Map<String, Value> =
            serde_json::from_str(&format!(r#"{{"n":{written}}}"#)).unwrap();
        let parties = Parties::from_stream("+15550001111", "+15552223333", None);
        let body = tool_request(
            "CA1",
            "support",
            &parties,
            "lookup_order",
            "call_9",
            &arguments,
        );
        // Read with the standard library, whose parsing is exact.
        let sent = body
            .split_once(r#""arguments":{"n":"#)
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(number, _)| number)
            .unwrap();
        assert_eq!(sent.parse::<f64>(), written.parse::<f64>(), "sent {sent}");
        let read: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(read["arguments"], Value::Object(arguments));
    }

    #[test]
    fn request_bodies_follow_the_contract() {
        let parties = Parties::from_stream("whatsapp:+15550001111", "whatsapp:+15552223333", None);
        let body: Value = serde_json::from_str(&context_request(
            "CA1",
            "support",
            &parties,
            &vars(&[("k", "v")]),
        ))
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"type":"call.context","call_sid":"CA1","agent":"support",
                "caller":"+15550001111","business":"+15552223333","channel":"whatsapp",
                "direction":"inbound","variables":{"k":"v"}})
        );
        let arguments = serde_json::json!({"order_id":"42"});
        let body: Value = serde_json::from_str(&tool_request(
            "CA1",
            "support",
            &parties,
            "lookup_order",
            "call_9",
            arguments.as_object().unwrap(),
        ))
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"type":"tool.call","call_sid":"CA1","agent":"support",
                "tool":"lookup_order","call_id":"call_9","arguments":{"order_id":"42"},
                "caller":"+15550001111","business":"+15552223333","channel":"whatsapp",
                "direction":"inbound"})
        );
    }
}
