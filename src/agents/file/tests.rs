use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use secrecy::ExposeSecret;
use serde_json::json;

use super::*;

/// A directory of its own under the temp dir, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("callbridge-agents-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn defaults() -> AgentDefaults {
    AgentDefaults {
        voice: "marin".into(),
        model: "gpt-realtime-1.5".into(),
    }
}

fn load_with(text: &str, env: &[(&str, &str)]) -> Result<Agents, AgentFileErrors> {
    let scratch = Scratch::new();
    let path = scratch.write("agents.toml", text);
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    load(&path, &defaults(), &|name| env.get(name).cloned())
}

fn load_text(text: &str) -> Result<Agents, AgentFileErrors> {
    load_with(text, &[])
}

fn ok(text: &str) -> Agents {
    match load_text(text) {
        Ok(agents) => agents,
        Err(errors) => panic!("expected a valid file, got:\n{errors}"),
    }
}

fn errors(text: &str) -> Vec<AgentFileError> {
    match load_text(text) {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(errors) => errors.0,
    }
}

/// There is a problem on `line` about `key` whose text holds `fragment`; its display names the
/// file (`…/agents.toml:LINE: `).
#[track_caller]
fn assert_problem(problems: &[AgentFileError], line: usize, key: &str, fragment: &str) {
    let found = problems.iter().any(|p| {
        p.line == Some(line)
            && p.key.as_deref() == Some(key)
            && p.message.contains(fragment)
            && p.message.contains(&format!("`{key}`"))
            && p.to_string().contains(&format!("agents.toml:{line}: "))
    });
    assert!(
        found,
        "no problem on line {line} with key `{key}` containing {fragment:?} in:\n{}",
        AgentFileErrors(problems.to_vec())
    );
}

const MINIMAL: &str = "[[agent]]\nname = \"a\"\ninstructions = \"Help.\"\n";

/// Two agents using every key between them; `CRM_MCP_TOKEN` is set to `Bearer crm-secret`.
const FULL: &str = r#"
[[agent]]
name = "support"
numbers = ["+15551234567", "whatsapp:+15551234568"]
default = true
instructions = "  You help {{customer}}.  "
greeting = "Greet the caller."
voice = "cedar"
model = "gpt-realtime-mini"
transcription_language = "en"
turn_detection = { type = "semantic_vad", eagerness = "auto" }
builtin_tools = ["end_call", "transfer_call"]
transfer_to = "+15557654321"
max_call_seconds = 1800
context_url = "https://backend.example.com/context"
context_timeout_ms = 2500
noise_reduction = "far_field"
silence_reprompt_secs = 8
silence_hangup_after = 3

[[agent.tools]]
name = "lookup_order"
description = "Look up an order."
parameters = { type = "object", properties = { order_id = { type = "string" } }, required = ["order_id"] }
url = "https://backend.example.com/tools/lookup_order"
timeout_ms = 8000

[[agent.mcp]]
server_label = "crm"
server_url = "https://mcp.example.com/sse"
allowed_tools = ["find_customer"]
authorization_env = "CRM_MCP_TOKEN"

[[agent]]
name = "sales"
numbers = ["+15550001111"]
instructions_file = "prompts/sales.md"
"#;

fn load_full() -> Agents {
    let scratch = Scratch::new();
    scratch.write("prompts/sales.md", "\n  Sell politely.  \n");
    let path = scratch.write("agents.toml", FULL);
    let env = |name: &str| (name == "CRM_MCP_TOKEN").then(|| "Bearer crm-secret".to_owned());
    load(&path, &defaults(), &env).unwrap()
}

#[test]
fn a_full_agent_is_read_with_every_key() {
    let agents = load_full();
    let support = agents.by_name("support").unwrap();
    assert_eq!(
        support.numbers,
        vec![
            E164::parse("+15551234567").unwrap(),
            E164::parse("+15551234568").unwrap()
        ]
    );
    assert!(support.is_default);
    assert_eq!(support.instructions, "You help {{customer}}.");
    assert_eq!(support.greeting.as_deref(), Some("Greet the caller."));
    assert_eq!(support.voice, "cedar");
    assert_eq!(support.model, "gpt-realtime-mini");
    assert_eq!(support.transcription_language.as_deref(), Some("en"));
    assert_eq!(
        support.turn_detection,
        Some(json!({"type": "semantic_vad", "eagerness": "auto"}))
    );
    assert_eq!(
        support.builtins,
        vec![Builtin::EndCall, Builtin::TransferCall]
    );
    assert_eq!(
        support.transfer_to,
        Some(TransferTarget::Number(E164::parse("+15557654321").unwrap()))
    );
    assert_eq!(support.max_call_duration, Some(Duration::from_secs(1800)));
    assert_eq!(
        support.context_url.as_deref(),
        Some("https://backend.example.com/context")
    );
    assert_eq!(support.context_timeout, Duration::from_millis(2500));
    assert_eq!(support.noise_reduction, NoiseReduction::FarField);
    assert_eq!(
        support.silence,
        Some(SilencePolicy {
            reprompt_after: Duration::from_secs(8),
            hang_up_after: 3
        })
    );
    assert_eq!(
        support.tools,
        vec![ToolSpec {
            name: "lookup_order".into(),
            description: "Look up an order.".into(),
            parameters: json!({
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"]
            }),
            url: "https://backend.example.com/tools/lookup_order".into(),
            timeout: Duration::from_millis(8000),
        }]
    );
}

#[test]
fn mcp_servers_instructions_files_and_routing_of_a_full_file() {
    let agents = load_full();
    let support = agents.by_name("support").unwrap();
    let [crm] = support.mcp.as_slice() else {
        panic!("one MCP server expected");
    };
    assert_eq!(crm.server_label, "crm");
    assert_eq!(crm.server_url, "https://mcp.example.com/sse");
    assert_eq!(crm.allowed_tools, Some(vec!["find_customer".to_owned()]));
    assert_eq!(
        crm.authorization.as_ref().unwrap().expose_secret(),
        "Bearer crm-secret"
    );
    assert!(!format!("{agents:?}").contains("crm-secret"));

    // Relative to the agents file's directory, not the working directory; trimmed.
    let sales = agents.by_name("sales").unwrap();
    assert_eq!(sales.instructions, "Sell politely.");
    // Routing: by number (whatsapp: or not), else the default.
    assert_eq!(agents.for_number("whatsapp:+15550001111").name, "sales");
    assert_eq!(agents.for_number("+15551234568").name, "support");
    assert_eq!(agents.for_number("+15559999999").name, "support");
    assert!(agents.call_the_business());
}

#[test]
fn an_agent_with_only_its_required_keys_gets_the_defaults() {
    let agents = ok(concat!(
        "[[agent]]\nname = \"a\"\ninstructions = \"Help.\"\n",
        "[[agent.tools]]\nname = \"t\"\ndescription = \"d\"\nurl = \"https://x.example/t\"\n"
    ));
    let agent = &agents.profiles()[0];
    assert!(!agent.is_default);
    assert!(agent.numbers.is_empty());
    assert_eq!(agent.voice, "marin");
    assert_eq!(agent.model, "gpt-realtime-1.5");
    assert_eq!(agent.greeting, None);
    assert_eq!(agent.builtins, vec![Builtin::EndCall]);
    assert_eq!(agent.transfer_to, None);
    assert_eq!(agent.turn_detection, None);
    assert_eq!(agent.noise_reduction, NoiseReduction::NearField);
    assert_eq!(agent.context_timeout, DEFAULT_CONTEXT_TIMEOUT);
    assert_eq!(agent.max_call_duration, None);
    assert_eq!(agent.silence, None);
    assert!(agent.mcp.is_empty());
    let tool = &agent.tools[0];
    assert_eq!(tool.timeout, DEFAULT_TOOL_TIMEOUT);
    assert_eq!(tool.parameters, json!({"type": "object", "properties": {}}));
    // The first agent answers when none is marked default.
    assert_eq!(agents.default_agent().name, "a");
}

#[test]
fn every_unknown_key_is_reported_with_its_line() {
    let problems = errors(
        r#"title = "agents"
[[agent]]
name = "a"
instructions = "Help."
voce = "cedar"
greting = "Hi"

[[agent.tools]]
name = "t"
description = "d"
url = "https://x.example/t"
timeout = 5

[[agent.mcp]]
server_label = "crm"
server_url = "https://mcp.example.com"
token = "x"
"#,
    );
    assert_problem(&problems, 1, "title", "unknown");
    assert_problem(&problems, 5, "voce", "is unknown, expected one of");
    assert_problem(&problems, 6, "greting", "is unknown");
    assert_problem(&problems, 12, "timeout", "tool \"t\"");
    assert_problem(&problems, 17, "token", "MCP server \"crm\"");
    assert_eq!(problems.len(), 5, "{}", AgentFileErrors(problems.clone()));
}

#[test]
fn wrong_types_are_reported_per_key_without_a_second_missing_error() {
    let problems = errors(
        r#"[[agent]]
name = 5
instructions = "Help."
voice = 5
default = "yes"
numbers = ["+15551234567", 7]

[[agent.tools]]
name = "t"
description = "d"
url = "https://x.example/t"
timeout_ms = "fast"
"#,
    );
    assert_problem(&problems, 2, "name", "invalid type");
    assert_problem(&problems, 4, "voice", "invalid type");
    assert_problem(&problems, 5, "default", "invalid type");
    assert_problem(&problems, 6, "numbers", "invalid type");
    assert_problem(&problems, 12, "timeout_ms", "expected a whole number");
    assert_problem(&problems, 12, "timeout_ms", "tool \"t\"");
    // `name` was given (wrongly): it is not also reported as missing.
    assert_eq!(problems.len(), 5, "{}", AgentFileErrors(problems.clone()));
    assert!(
        problems[0].message.starts_with("agent #1: "),
        "{:?}",
        problems[0]
    );
}

#[test]
fn a_syntax_error_names_its_line() {
    let problems = errors("[[agent]]\nname = \"a\"\ninstructions = \"Help.\nvoice = \"x\"\n");
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].line, Some(3));
    assert!(problems[0].message.starts_with("not valid TOML"));
}

#[test]
fn a_key_given_twice_in_one_table_is_reported_at_the_second() {
    let problems = errors("[[agent]]\nname = \"a\"\ninstructions = \"Help.\"\nname = \"b\"\n");
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].line, Some(4));
    assert!(
        problems[0].message.contains("duplicate key"),
        "{:?}",
        problems[0]
    );
}

#[test]
fn the_problems_of_every_agent_are_reported_together_in_file_order() {
    let problems = errors(
        r#"[[agent]]
name = "a"
instructions = "Help."
voice = ""

[[agent]]
name = "b"
instructions = "Help."
colour = "blue"

[[agent]]
name = "a"
instructions = "Help."
max_call_seconds = 0
"#,
    );
    assert_problem(&problems, 4, "voice", "must not be empty");
    assert_problem(&problems, 9, "colour", "is unknown");
    assert_problem(
        &problems,
        12,
        "name",
        "already the name of the agent on line 2",
    );
    assert_problem(&problems, 14, "max_call_seconds", "positive");
    assert_eq!(problems.len(), 4);
    let lines: Vec<_> = problems.iter().map(|p| p.line).collect();
    assert!(lines.is_sorted(), "{lines:?}");
}

#[test]
fn a_number_claimed_twice_is_reported_at_the_later_claim_and_masked() {
    let problems = errors(
        r#"[[agent]]
name = "a"
instructions = "Help."
numbers = ["+15551234567", "+15551234567"]

[[agent]]
name = "b"
instructions = "Help."
numbers = [
  "whatsapp:+15551234567",
]
"#,
    );
    assert_problem(&problems, 4, "numbers", "twice");
    assert_problem(
        &problems,
        10,
        "numbers",
        "agent \"a\" already claims on line 4",
    );
    assert_eq!(problems.len(), 2);
    assert!(
        problems.iter().all(|p| !p.message.contains("5551234567")),
        "numbers are masked: {problems:?}"
    );
}

#[test]
fn numbers_must_be_e164() {
    let problems = errors(
        "[[agent]]\nname = \"a\"\ninstructions = \"Help.\"\nnumbers = [\"5551234567\", \"sip:x\"]\n",
    );
    assert_eq!(problems.len(), 2);
    assert_problem(&problems, 4, "numbers", "not an E.164 number");
}

#[test]
fn only_one_agent_may_be_the_default() {
    let problems = errors(
        r#"[[agent]]
name = "a"
instructions = "Help."
default = true

[[agent]]
name = "b"
instructions = "Help."
default = false

[[agent]]
name = "c"
instructions = "Help."
default = true
"#,
    );
    assert_eq!(problems.len(), 1);
    assert_problem(
        &problems,
        14,
        "default",
        "agent \"a\" on line 4 is already the default",
    );
}

#[test]
fn names_follow_the_rule() {
    let long = "x".repeat(65);
    for bad in ["", "with space", "dotted.name", "ünicode", long.as_str()] {
        let problems = errors(&format!(
            "[[agent]]\nname = {bad:?}\ninstructions = \"Help.\"\n"
        ));
        assert_problem(&problems, 2, "name", "must be 1 to 64 letters");
    }
    let fine = "A-z_09".repeat(10);
    ok(&format!(
        "[[agent]]\nname = {fine:?}\ninstructions = \"Help.\"\n"
    ));
}

#[test]
fn tool_names_follow_the_rule_avoid_builtins_and_are_unique_per_agent() {
    let tool = |name: &str| {
        format!(
            "[[agent.tools]]\nname = {name:?}\ndescription = \"d\"\nurl = \"https://x.example\"\n"
        )
    };
    let text = format!(
        "{MINIMAL}{}{}{}{}",
        tool("lookup"),
        tool("lookup"),
        tool("end_call"),
        tool("bad name")
    );
    let problems = errors(&text);
    assert_problem(
        &problems,
        9,
        "name",
        "already the name of this agent's tool on line 5",
    );
    assert_problem(&problems, 13, "name", "built-in");
    assert_problem(&problems, 17, "name", "must be 1 to 64");
    assert_eq!(problems.len(), 3);
    // Two agents may each have a tool of the same name.
    ok(&format!(
        "{MINIMAL}{}[[agent]]\nname = \"b\"\ninstructions = \"Help.\"\n{}",
        tool("lookup"),
        tool("lookup")
    ));
}

#[test]
fn a_missing_key_is_reported_at_its_table_header() {
    let problems = errors(
        r#"# agents

[[agent]]
numbers = ["+15551234567"]

[[agent]]
name = "b"
instructions = "Help."

[[agent.tools]]
name = "t"

[[agent.mcp]]
server_label = "crm"
"#,
    );
    assert_problem(&problems, 3, "name", "is missing");
    assert_problem(&problems, 3, "instructions", "is missing");
    assert_problem(&problems, 10, "description", "is missing");
    assert_problem(&problems, 10, "url", "is missing");
    assert_problem(&problems, 13, "server_url", "is missing");
    assert_eq!(problems.len(), 5);
}

#[test]
fn instructions_come_from_exactly_one_place() {
    let problems =
        errors("[[agent]]\nname = \"a\"\ninstructions = \"Help.\"\ninstructions_file = \"p.md\"\n");
    assert_eq!(problems.len(), 1);
    assert_problem(&problems, 4, "instructions_file", "keep one");

    let problems = errors("[[agent]]\nname = \"a\"\ninstructions = \"  \"\n");
    assert_problem(&problems, 3, "instructions", "must not be empty");
}

#[test]
fn an_instructions_file_that_is_missing_or_empty_is_an_error() {
    let scratch = Scratch::new();
    scratch.write("empty.md", " \n\n");
    let path = scratch.write(
        "agents.toml",
        r#"[[agent]]
name = "a"
instructions_file = "nope.md"

[[agent]]
name = "b"
instructions_file = "empty.md"
"#,
    );
    let problems = load(&path, &defaults(), &|_| None).unwrap_err().0;
    assert_problem(&problems, 3, "instructions_file", "cannot be read");
    assert_problem(&problems, 3, "instructions_file", "nope.md");
    assert_problem(&problems, 7, "instructions_file", "which is empty");
    assert_eq!(problems.len(), 2);
}

#[test]
fn builtin_tools_are_known_names_and_transfer_call_needs_a_target() {
    let problems = errors(&format!(
        "{MINIMAL}builtin_tools = [\"end_call\", \"hold\", \"end_call\", \"transfer_call\"]\n"
    ));
    assert_problem(
        &problems,
        4,
        "builtin_tools",
        "\"hold\", which is not a built-in",
    );
    assert_problem(&problems, 4, "builtin_tools", "twice");
    assert_problem(
        &problems,
        4,
        "transfer_to",
        "is missing: transfer_call needs it",
    );
    assert_eq!(problems.len(), 3);

    let agents = ok(&format!("{MINIMAL}builtin_tools = []\n"));
    assert!(agents.profiles()[0].builtins.is_empty());
}

#[test]
fn transfer_targets_are_numbers_sip_or_client() {
    let target = |raw: &str| {
        ok(&format!(
            "{MINIMAL}builtin_tools = [\"transfer_call\"]\ntransfer_to = {raw:?}\n"
        ))
        .profiles()[0]
            .transfer_to
            .clone()
    };
    assert_eq!(
        target("+15557654321"),
        Some(TransferTarget::Number(E164::parse("+15557654321").unwrap()))
    );
    assert_eq!(
        target("sip:desk@example.sip.twilio.com"),
        Some(TransferTarget::Sip(
            "sip:desk@example.sip.twilio.com".into()
        ))
    );
    assert_eq!(
        target("client:alice"),
        Some(TransferTarget::Client("alice".into()))
    );
    for bad in [
        "15557654321",
        "+1555",
        "sip:",
        "client:",
        "client:a b",
        "whatsapp:+15557654321",
    ] {
        let problems = errors(&format!(
            "{MINIMAL}builtin_tools = [\"transfer_call\"]\ntransfer_to = {bad:?}\n"
        ));
        assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
        assert_problem(
            &problems,
            5,
            "transfer_to",
            "must be \"+E164\", \"sip:…\" or \"client:…\"",
        );
    }
}

#[test]
fn durations_and_timeouts_are_checked_against_their_ranges() {
    for (key, value, fragment) in [
        ("max_call_seconds", "0", "positive"),
        ("max_call_seconds", "-5", "positive"),
        ("context_timeout_ms", "0", "between 1 and 5000"),
        ("context_timeout_ms", "5001", "between 1 and 5000"),
        ("silence_reprompt_secs", "0", "positive"),
    ] {
        let problems = errors(&format!("{MINIMAL}{key} = {value}\n"));
        assert_eq!(problems.len(), 1, "{key} = {value}: {problems:?}");
        assert_problem(&problems, 4, key, fragment);
    }
    let agent = ok(&format!("{MINIMAL}context_timeout_ms = 5000\n"));
    assert_eq!(
        agent.profiles()[0].context_timeout,
        Duration::from_millis(5000)
    );

    let tool = |timeout: &str| {
        format!(
            "{MINIMAL}[[agent.tools]]\nname = \"t\"\ndescription = \"d\"\nurl = \"https://x.example\"\ntimeout_ms = {timeout}\n"
        )
    };
    for bad in ["0", "30001"] {
        assert_problem(&errors(&tool(bad)), 8, "timeout_ms", "between 1 and 30000");
    }
    assert_eq!(
        ok(&tool("30000")).profiles()[0].tools[0].timeout,
        Duration::from_secs(30)
    );
}

#[test]
fn urls_are_https_or_http_to_a_loopback_host() {
    for good in [
        "https://backend.example.com/context",
        "http://127.0.0.1:8000/context",
        "http://localhost:8000/context",
        "http://[::1]:8000/context",
    ] {
        let agents = ok(&format!("{MINIMAL}context_url = {good:?}\n"));
        assert_eq!(agents.profiles()[0].context_url.as_deref(), Some(good));
    }
    for bad in [
        "http://backend.example.com/context",
        "http://10.0.0.1/context",
        "ftp://backend.example.com/context",
        "not a url",
    ] {
        let problems = errors(&format!("{MINIMAL}context_url = {bad:?}\n"));
        assert_eq!(problems.len(), 1, "{bad}");
        assert_eq!(problems[0].key.as_deref(), Some("context_url"));
        assert_eq!(problems[0].line, Some(4));

        let problems = errors(&format!(
            "{MINIMAL}[[agent.tools]]\nname = \"t\"\ndescription = \"d\"\nurl = {bad:?}\n"
        ));
        assert_problem(&problems, 7, "url", "");

        let problems = errors(&format!(
            "{MINIMAL}[[agent.mcp]]\nserver_label = \"m\"\nserver_url = {bad:?}\n"
        ));
        assert_problem(&problems, 6, "server_url", "");
    }
}

#[test]
fn an_mcp_server_must_be_reachable_by_openai() {
    let problems = errors(&format!(
        "{MINIMAL}[[agent.mcp]]\nserver_label = \"m\"\nserver_url = \"http://127.0.0.1:9000/sse\"\n"
    ));
    assert_problem(&problems, 6, "server_url", "https://");
}

#[test]
fn a_tool_description_is_at_most_1024_characters() {
    let tool = |description: &str| {
        format!(
            "{MINIMAL}[[agent.tools]]\nname = \"t\"\ndescription = {description:?}\nurl = \"https://x.example\"\n"
        )
    };
    let longest = "é".repeat(MAX_DESCRIPTION_CHARS);
    assert_eq!(
        ok(&tool(&longest)).profiles()[0].tools[0].description,
        longest
    );
    let problems = errors(&tool(&"a".repeat(MAX_DESCRIPTION_CHARS + 1)));
    assert_problem(&problems, 6, "description", "got 1025");
    assert_problem(&errors(&tool("")), 6, "description", "1 to 1024");
}

#[test]
fn tool_parameters_are_an_object_schema_table() {
    let tool = |parameters: &str| {
        format!(
            "{MINIMAL}[[agent.tools]]\nname = \"t\"\ndescription = \"d\"\nurl = \"https://x.example\"\nparameters = {parameters}\n"
        )
    };
    assert_problem(
        &errors(&tool("\"object\"")),
        8,
        "parameters",
        "invalid type",
    );
    assert_problem(
        &errors(&tool("{ type = \"string\" }")),
        8,
        "parameters",
        "type = \"object\"",
    );
    assert_problem(
        &errors(&tool("{ type = \"object\", x = nan }")),
        8,
        "parameters",
        "JSON",
    );
    let agents = ok(&tool(
        "{ type = \"object\", properties = { when = { type = \"string\", default = 1979-05-27 } } }",
    ));
    assert_eq!(
        agents.profiles()[0].tools[0].parameters,
        json!({"type": "object", "properties": {"when": {"type": "string", "default": "1979-05-27"}}})
    );
}

#[test]
fn turn_detection_is_a_table_of_a_known_type() {
    assert_problem(
        &errors(&format!(
            "{MINIMAL}turn_detection = {{ type = \"push_to_talk\" }}\n"
        )),
        4,
        "turn_detection",
        "server_vad",
    );
    assert_problem(
        &errors(&format!(
            "{MINIMAL}turn_detection = {{ threshold = 0.5 }}\n"
        )),
        4,
        "turn_detection",
        "semantic_vad",
    );
    assert_problem(
        &errors(&format!("{MINIMAL}turn_detection = \"server_vad\"\n")),
        4,
        "turn_detection",
        "invalid type",
    );
    let agents = ok(&format!(
        "{MINIMAL}turn_detection = {{ type = \"server_vad\", threshold = 0.5, silence_duration_ms = 400 }}\n"
    ));
    assert_eq!(
        agents.profiles()[0].turn_detection,
        Some(json!({"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 400}))
    );
}

#[test]
fn noise_reduction_is_near_or_far_field() {
    assert_problem(
        &errors(&format!("{MINIMAL}noise_reduction = \"loud\"\n")),
        4,
        "noise_reduction",
        "\"near_field\" or \"far_field\"",
    );
}

#[test]
fn the_silence_policy_needs_its_reprompt_and_defaults_its_hang_up_count() {
    let agents = ok(&format!("{MINIMAL}silence_reprompt_secs = 10\n"));
    assert_eq!(
        agents.profiles()[0].silence,
        Some(SilencePolicy {
            reprompt_after: Duration::from_secs(10),
            hang_up_after: DEFAULT_SILENCE_HANGUP_AFTER
        })
    );
    assert_eq!(DEFAULT_SILENCE_HANGUP_AFTER, 2);
    assert_problem(
        &errors(&format!("{MINIMAL}silence_hangup_after = 2\n")),
        4,
        "silence_hangup_after",
        "needs silence_reprompt_secs",
    );
    assert_problem(
        &errors(&format!(
            "{MINIMAL}silence_reprompt_secs = 5\nsilence_hangup_after = 0\n"
        )),
        5,
        "silence_hangup_after",
        "1 or more",
    );
}

#[test]
fn an_mcp_authorization_comes_from_the_named_variable_which_must_be_set() {
    let text = format!(
        "{MINIMAL}[[agent.mcp]]\nserver_label = \"crm\"\nserver_url = \"https://mcp.example.com\"\nauthorization_env = \"CRM_TOKEN\"\n"
    );
    let problems = load_text(&text).unwrap_err().0;
    assert_eq!(problems.len(), 1);
    assert_problem(
        &problems,
        7,
        "authorization_env",
        "CRM_TOKEN, which is not set",
    );

    let agents = load_with(&text, &[("CRM_TOKEN", "tok-123")]).unwrap();
    let server = &agents.profiles()[0].mcp[0];
    assert_eq!(
        server.authorization.as_ref().unwrap().expose_secret(),
        "tok-123"
    );
    assert_eq!(server.allowed_tools, None);

    // Another problem of the same server never shows the variable's value.
    let broken = text.replace("crm", "bad label");
    let problems = load_with(&broken, &[("CRM_TOKEN", "tok-123")]).unwrap_err();
    assert_problem(&problems.0, 5, "server_label", "must be 1 to 64");
    assert!(!problems.to_string().contains("tok-123"));
}

#[test]
fn mcp_labels_are_unique_per_agent_and_allowed_tools_not_empty() {
    let server = |label: &str, allowed: &str| {
        format!(
            "[[agent.mcp]]\nserver_label = {label:?}\nserver_url = \"https://mcp.example.com\"\nallowed_tools = {allowed}\n"
        )
    };
    let problems = errors(&format!(
        "{MINIMAL}{}{}",
        server("crm", "[\"a\"]"),
        server("crm", "[\"\"]")
    ));
    assert_problem(&problems, 9, "server_label", "already the label");
    assert_problem(&problems, 11, "allowed_tools", "empty tool name");
    assert_eq!(problems.len(), 2);
}

#[test]
fn a_file_without_agents_is_an_error() {
    for text in ["", "# nothing yet\n"] {
        let problems = errors(text);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, None);
        assert!(problems[0].message.contains("defines no agent"));
        assert!(
            problems[0]
                .to_string()
                .contains("agents.toml: defines no agent")
        );
    }
    let problems = errors("[agent]\nname = \"a\"\ninstructions = \"Help.\"\n");
    assert_problem(&problems, 1, "agent", "[[agent]]");
}

#[test]
fn an_unreadable_file_is_an_error_naming_it() {
    let scratch = Scratch::new();
    let path = scratch.0.join("missing.toml");
    let problems = load(&path, &defaults(), &|_| None).unwrap_err();
    assert_eq!(problems.0.len(), 1);
    assert!(
        problems
            .to_string()
            .starts_with(&format!("{}: cannot be read", path.display())),
        "{problems}"
    );
}

#[test]
fn the_webhook_secret_is_asked_for_by_the_agents_that_call_the_business() {
    assert_eq!(missing_webhook_secret(&ok(MINIMAL)), None);
    let agents = ok(&format!(
        "{MINIMAL}[[agent.tools]]\nname = \"t\"\ndescription = \"d\"\nurl = \"https://x.example\"\n\
         [[agent]]\nname = \"b\"\ninstructions = \"Help.\"\ncontext_url = \"https://x.example/c\"\n\
         [[agent]]\nname = \"c\"\ninstructions = \"Help.\"\n"
    ));
    let message = missing_webhook_secret(&agents).unwrap();
    assert!(
        message.starts_with("CALLBRIDGE_WEBHOOK_SECRET is missing"),
        "{message}"
    );
    assert!(message.contains("agent \"a\" (tool \"t\")"), "{message}");
    assert!(message.contains("agent \"b\" (context_url)"), "{message}");
    assert!(!message.contains("agent \"c\""), "{message}");
}

#[test]
fn the_example_file_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents.example.toml");
    let agents = match load(&path, &defaults(), &|_| None) {
        Ok(agents) => agents,
        Err(errors) => panic!("agents.example.toml:\n{errors}"),
    };
    let names: Vec<&str> = agents.profiles().iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["support", "sales"]);
    let support = agents.default_agent();
    assert_eq!(support.name, "support");
    assert_eq!(support.tools[0].name, "lookup_order");
    assert_eq!(
        support.tools[0].url,
        "http://127.0.0.1:8000/tools/lookup_order"
    );
    assert!(matches!(support.transfer_to, Some(TransferTarget::Sip(_))));
    assert!(support.silence.is_some());
    // Its tool calls the business: it needs the webhook secret.
    assert!(missing_webhook_secret(&agents).is_some());
}

#[test]
fn entries_that_are_not_tables_are_reported_and_the_rest_still_checked() {
    let problems = errors("agent = [1]\n");
    assert_problem(&problems, 1, "agent", "not a table");

    let problems = errors(&format!(
        "[[agent]]\nname = \"a\"\ninstructions = \"Help.\"\ntools = [1]\n\n{}voice = \"\"\n",
        MINIMAL.replace("\"a\"", "\"b\"")
    ));
    assert_eq!(problems.len(), 2, "{}", AgentFileErrors(problems.clone()));
    assert!(
        problems[0].message.starts_with("agent \"a\": "),
        "{:?}",
        problems[0]
    );
    assert_problem(&problems, 9, "voice", "must not be empty");
}

#[test]
fn parse_reads_instructions_files_through_the_reader_it_is_given() {
    let text = "[[agent]]\nname = \"a\"\ninstructions_file = \"prompts/a.txt\"\n\n\
                [[agent]]\nname = \"b\"\ninstructions_file = \"/elsewhere/b.txt\"\n";
    let asked = std::cell::RefCell::new(Vec::new());
    let read = |path: &Path| {
        asked.borrow_mut().push(path.to_path_buf());
        match path.to_str() {
            Some("/srv/prompts/a.txt") => Ok("  Help with orders.\n".to_owned()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file",
            )),
        }
    };
    let problems = parse(
        Path::new("/srv/agents.toml"),
        text,
        &defaults(),
        &|_| None,
        &read,
    )
    .unwrap_err()
    .0;
    assert_eq!(
        asked.borrow().as_slice(),
        [
            PathBuf::from("/srv/prompts/a.txt"),
            PathBuf::from("/elsewhere/b.txt")
        ]
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        (problems[0].line, problems[0].key.as_deref()),
        (Some(7), Some("instructions_file"))
    );
    assert!(problems[0].message.contains("/elsewhere/b.txt"));
    assert!(problems[0].message.contains("no such file"));
    let agents = parse(
        Path::new("/srv/agents.toml"),
        &text[..text.find("\n\n").unwrap()],
        &defaults(),
        &|_| None,
        &read,
    )
    .unwrap();
    assert_eq!(agents.profiles()[0].instructions, "Help with orders.");
}
