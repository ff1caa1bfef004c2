//! Agents that act, end to end: the real app on port 0 with a directory of agents, the fake
//! OpenAI Realtime server, a fake business that verifies every Standard Webhooks signature with
//! the reference library, and wiremock standing in for Twilio's REST API (hang-ups, transfers,
//! outbound calls).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use callbridge::agents::{AgentProfile, Agents, Builtin, SilencePolicy, ToolSpec, TransferTarget};
use callbridge::config::Config;
use callbridge::domain::phone::E164;
use callbridge_testkit::business::{Answer, FakeBusiness};
use callbridge_testkit::realtime::{FakeRealtime, FakeSession};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::calls::API_TOKEN;
use crate::fake_twilio::{FakeTwilio, agent_audio, frame};
use crate::helpers::*;
use crate::stream::delta;

/// The customer, on every call here.
const CALLER: &str = "+5511999990000";
/// The number the sales agent answers.
const SALES: &str = "+15551110001";
/// The number the support agent answers.
const SUPPORT: &str = "+15551110002";
/// A number no agent claims: the default agent answers it.
const UNCLAIMED: &str = "+15559999999";
/// Our WhatsApp sender for outbound calls (the `To` of the permission replies in `helpers`).
const BUSINESS: &str = "+558551234567";
const CONTENT_SID: &str = "HX0123456789abcdef0123456789abcdef";

/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(600);

struct Rig {
    app: TestApp,
    fake: FakeRealtime,
    business: FakeBusiness,
    /// Twilio's REST API.
    rest: MockServer,
}

/// An app whose agent directory is `agents(&business)`, configured to sign business requests
/// with the fake business's secret and to place outbound calls through the REST fake.
async fn rig(agents: impl FnOnce(&FakeBusiness) -> Vec<AgentProfile>) -> Rig {
    rig_with(agents, |_| {}).await
}

async fn rig_with(
    agents: impl FnOnce(&FakeBusiness) -> Vec<AgentProfile>,
    tweak: impl FnOnce(&mut Config),
) -> Rig {
    let fake = FakeRealtime::start().await;
    let business = FakeBusiness::start().await;
    let rest = MockServer::start().await;
    let rest_url = rest.uri();
    let mut config = test_config(&[
        ("OPENAI_REALTIME_URL", fake.url.as_str()),
        ("TWILIO_API_BASE_URL", rest_url.as_str()),
        ("CALLBRIDGE_WEBHOOK_SECRET", FakeBusiness::SECRET),
        ("CALLBRIDGE_API_TOKEN", API_TOKEN),
        ("TWILIO_WHATSAPP_NUMBER", BUSINESS),
        ("TWILIO_CALL_PERMISSION_CONTENT_SID", CONTENT_SID),
    ]);
    tweak(&mut config);
    let app = spawn_app_with(config).await;
    app.state.agents.replace(Agents::new(agents(&business)));
    Rig {
        app,
        fake,
        business,
        rest,
    }
}

/// An agent that answers `numbers` and is not the default.
fn agent(name: &str, instructions: &str, numbers: &[&str]) -> AgentProfile {
    AgentProfile {
        numbers: numbers.iter().map(|n| E164::parse(n).unwrap()).collect(),
        is_default: false,
        ..AgentProfile::new(name, instructions, "marin", "gpt-realtime-1.5")
    }
}

fn tool(business: &FakeBusiness, name: &str, timeout: Duration) -> ToolSpec {
    ToolSpec {
        name: name.to_owned(),
        description: format!("{name}, answered by the business."),
        parameters: json!({"type":"object","properties":{"order_id":{"type":"string"}},"required":["order_id"]}),
        url: business.url(&format!("/tools/{name}")),
        timeout,
    }
}

/// The default agent, with the business's `lookup_order` tool.
fn order_desk(business: &FakeBusiness) -> AgentProfile {
    AgentProfile {
        tools: vec![tool(business, "lookup_order", Duration::from_secs(5))],
        ..AgentProfile::new("orders", "You look up orders.", "marin", "gpt-realtime-1.5")
    }
}

/// One call in progress: both ends, with the first `session.update` already read.
struct Call {
    sid: String,
    twilio: FakeTwilio,
    session: FakeSession,
    update: Value,
}

impl Rig {
    /// Twilio's voice webhook for an inbound WhatsApp call to `to`; the TwiML's parameters.
    async fn answer(&self, sid: &str, to: &str) -> std::collections::HashMap<String, String> {
        let to = format!("whatsapp:{to}");
        let from = format!("whatsapp:{CALLER}");
        let params = form(&[
            ("CallSid", sid),
            ("AccountSid", ACCOUNT_SID),
            ("From", &from),
            ("To", &to),
            ("CallStatus", "ringing"),
            ("Direction", "inbound"),
            ("ApiVersion", "2010-04-01"),
        ]);
        self.open_stream_params(&params).await
    }

    async fn open_stream_params(
        &self,
        params: &[(String, String)],
    ) -> std::collections::HashMap<String, String> {
        let response = self.app.post_signed("/voice", params).await;
        assert_eq!(response.status(), 200);
        parse_twiml(&response.text().await.unwrap()).parameters
    }

    /// Opens the stream `/voice` handed out and starts it with the TwiML's `<Parameter>`s, as
    /// Twilio does.
    async fn stream(
        &self,
        sid: &str,
        parameters: &std::collections::HashMap<String, String>,
    ) -> FakeTwilio {
        let mut twilio = FakeTwilio::connect(&self.app, &parameters["token"]).await;
        twilio
            .start_with(sid, ACCOUNT_SID, serde_json::to_value(parameters).unwrap())
            .await;
        twilio
    }

    /// An inbound call to `to`, connected, its session configured.
    async fn call(&self, n: u64, to: &str) -> Call {
        let sid = call_sid(n);
        let parameters = self.answer(&sid, to).await;
        let twilio = self.stream(&sid, &parameters).await;
        let mut session = self.fake.next_session().await;
        let update = session.expect_session_update().await;
        Call {
            sid,
            twilio,
            session,
            update,
        }
    }

    /// `GET /calls/{sid}` once `ready` holds for it (the writer stores records asynchronously).
    async fn call_detail_when(&self, sid: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let response = self.app.api_get(&format!("/calls/{sid}")).await;
            if response.status() == 200 {
                let body: Value = response.json().await.unwrap();
                if ready(&body) {
                    return body;
                }
                assert!(Instant::now() < deadline, "never ready: {body:#}");
            }
            assert!(Instant::now() < deadline, "GET /calls/{sid} never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn events_of_type(&self, sid: &str, kind: &str) -> Vec<Value> {
        let detail = self
            .call_detail_when(sid, |d| events(d).iter().any(|e| e["type"] == kind))
            .await;
        events(&detail)
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }

    async fn end_reason(&self, sid: &str) -> String {
        let detail = self
            .call_detail_when(sid, |d| d["call"]["end_reason"].is_string())
            .await;
        detail["call"]["end_reason"].as_str().unwrap().to_owned()
    }

    /// Twilio's REST API takes every request to `path` with a call resource.
    async fn rest_accepts(&self, resource: &str, sid: &str) {
        Mock::given(method("POST"))
            .and(path(format!(
                "/2010-04-01/Accounts/{ACCOUNT_SID}/{resource}"
            )))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"sid": sid, "status": "in-progress"})),
            )
            .mount(&self.rest)
            .await;
    }

    /// The form bodies of every request Twilio's REST API got, in order, with their paths.
    async fn rest_requests(&self) -> Vec<(String, Vec<(String, String)>)> {
        self.rest
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| {
                (
                    r.url.path().to_owned(),
                    serde_urlencoded::from_bytes(&r.body).unwrap(),
                )
            })
            .collect()
    }
}

fn events(detail: &Value) -> Vec<Value> {
    detail["events"].as_array().cloned().unwrap_or_default()
}

fn calls_path(sid: &str) -> String {
    format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{sid}.json")
}

// --- What the fake Realtime server says.

fn created(response_id: &str) -> Value {
    json!({"type":"response.created","event_id":"ev","response":{"id":response_id,"object":"realtime.response","status":"in_progress","output":[]}})
}

fn done(response_id: &str) -> Value {
    json!({"type":"response.done","event_id":"ev","response":{"id":response_id,"object":"realtime.response","status":"completed"}})
}

fn function_call(response_id: &str, call_id: &str, name: &str, arguments: &str) -> Value {
    json!({"type":"response.function_call_arguments.done","event_id":"ev","response_id":response_id,"item_id":format!("item_{call_id}"),"output_index":0,"call_id":call_id,"name":name,"arguments":arguments})
}

fn function_call_item(response_id: &str, call_id: &str, name: &str, arguments: &str) -> Value {
    json!({"type":"response.output_item.done","event_id":"ev","response_id":response_id,"output_index":0,"item":{"id":format!("item_{call_id}"),"object":"realtime.item","type":"function_call","status":"completed","call_id":call_id,"name":name,"arguments":arguments}})
}

/// A response that makes the function calls `calls` (`(call_id, name, arguments)`) and ends.
fn respond_with_calls(session: &FakeSession, response_id: &str, calls: &[(&str, &str, &str)]) {
    session.send(created(response_id));
    for (call_id, name, arguments) in calls {
        session.send(function_call(response_id, call_id, name, arguments));
    }
    session.send(done(response_id));
}

// --- What the fake Realtime server hears.

/// The next client event that is not caller audio.
async fn next_event(session: &mut FakeSession) -> Value {
    loop {
        let event = session.recv().await;
        if event["type"] != "input_audio_buffer.append" {
            return event;
        }
    }
}

/// Every client event but caller audio that arrives within `within`.
async fn events_within(session: &mut FakeSession, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while let Ok(event) = tokio::time::timeout_at(deadline, session.recv()).await {
        if event["type"] != "input_audio_buffer.append" {
            seen.push(event);
        }
    }
    seen
}

fn is_response_create(event: &Value) -> bool {
    event["type"] == "response.create"
}

/// The `(call_id, output)` of a `function_call_output` item; panics on anything else.
fn output_of(event: &Value) -> (String, String) {
    assert_eq!(event["type"], "conversation.item.create", "{event}");
    assert_eq!(event["item"]["type"], "function_call_output", "{event}");
    (
        event["item"]["call_id"].as_str().unwrap().to_owned(),
        event["item"]["output"].as_str().unwrap().to_owned(),
    )
}

/// The text of a `message` item with `role`; panics on anything else.
fn message_text(event: &Value, role: &str) -> String {
    assert_eq!(event["type"], "conversation.item.create", "{event}");
    assert_eq!(event["item"]["type"], "message", "{event}");
    assert_eq!(event["item"]["role"], role, "{event}");
    assert_eq!(event["item"]["content"][0]["type"], "input_text", "{event}");
    event["item"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Reads the outputs the bridge sends after a round, then its `response.create`, and checks
/// that no second `response.create` (nor anything else) follows.
async fn expect_outputs_then_one_response(
    session: &mut FakeSession,
    count: usize,
) -> Vec<(String, String)> {
    let mut outputs = Vec::new();
    for _ in 0..count {
        outputs.push(output_of(&next_event(session).await));
    }
    let create = next_event(session).await;
    assert!(is_response_create(&create), "{create}");
    assert_eq!(
        create.get("response"),
        None,
        "a plain response.create: {create}"
    );
    let after = events_within(session, QUIET).await;
    assert!(
        after.is_empty(),
        "nothing follows the response.create: {after:?}"
    );
    outputs
}

fn declared_tools(update: &Value) -> Vec<String> {
    update["session"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["type"], "function", "{t}");
            t["name"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// The body a tool call to `tool` from `agent` on an inbound call `sid` to `business` carries.
fn tool_call_body(
    sid: &str,
    agent: &str,
    business: &str,
    tool: &str,
    call_id: &str,
    arguments: Value,
) -> Value {
    json!({
        "type": "tool.call",
        "call_sid": sid,
        "agent": agent,
        "tool": tool,
        "call_id": call_id,
        "arguments": arguments,
        "caller": CALLER,
        "business": business,
        "channel": "whatsapp",
        "direction": "inbound",
    })
}

/// Media frames and marks Twilio receives: `(media payloads, mark names)` of the next `count`
/// deltas.
async fn receive_audio(twilio: &mut FakeTwilio, count: usize) -> (Vec<String>, Vec<String>) {
    let (mut media, mut marks) = (Vec::new(), Vec::new());
    while media.len() < count || marks.len() < count {
        let message = twilio.recv().await;
        match message["event"].as_str() {
            Some("media") => media.push(message["media"]["payload"].as_str().unwrap().to_owned()),
            Some("mark") => marks.push(message["mark"]["name"].as_str().unwrap().to_owned()),
            _ => panic!("unexpected message to Twilio: {message}"),
        }
    }
    (media, marks)
}

/// The call is still going: caller audio reaches OpenAI and agent audio reaches Twilio.
async fn audio_still_flows(call: &mut Call, n: usize) {
    call.twilio.media(n, &frame(7, n)).await;
    let append = call.session.recv().await;
    assert_eq!(append["type"], "input_audio_buffer.append", "{append}");
    assert_eq!(append["audio"], frame(7, n));
    call.session
        .send(delta("resp_more", "item_more", &frame(8, n)));
    let media = call.twilio.recv().await;
    assert_eq!(media["event"], "media", "{media}");
    assert_eq!(media["media"]["payload"], frame(8, n));
    let mark = call.twilio.recv().await;
    assert_eq!(mark["event"], "mark", "{mark}");
}

// --- 1. Routing.

#[tokio::test]
async fn each_number_gets_its_own_agent_and_the_rest_go_to_the_default() {
    let rig = rig(|business| {
        vec![
            AgentProfile {
                voice: "cedar".into(),
                model: "gpt-realtime-sales".into(),
                tools: vec![tool(business, "quote_price", Duration::from_secs(5))],
                ..agent("sales", "You sell.", &[SALES])
            },
            AgentProfile {
                voice: "ash".into(),
                model: "gpt-realtime-support".into(),
                tools: vec![
                    tool(business, "lookup_order", Duration::from_secs(5)),
                    tool(business, "open_ticket", Duration::from_secs(5)),
                ],
                ..agent("support", "You help.", &[SUPPORT])
            },
            AgentProfile {
                is_default: true,
                ..agent("front", "You route callers.", &[])
            },
        ]
    })
    .await;

    let expectations = [
        (
            SALES,
            "sales",
            "You sell.",
            "cedar",
            "gpt-realtime-sales",
            vec!["quote_price", "end_call"],
        ),
        (
            SUPPORT,
            "support",
            "You help.",
            "ash",
            "gpt-realtime-support",
            vec!["lookup_order", "open_ticket", "end_call"],
        ),
        (
            UNCLAIMED,
            "front",
            "You route callers.",
            "marin",
            "gpt-realtime-1.5",
            vec!["end_call"],
        ),
    ];
    for (n, (to, name, instructions, voice, model, tools)) in (1..).zip(expectations) {
        let call = rig.call(100 + n, to).await;
        assert_eq!(
            call.session.path_and_query,
            format!("/v1/realtime?model={model}"),
            "{name}"
        );
        let session = &call.update["session"];
        assert_eq!(session["instructions"], instructions, "{name}");
        assert_eq!(session["audio"]["output"]["voice"], voice, "{name}");
        assert_eq!(declared_tools(&call.update), tools, "{name}");
        assert_eq!(session["tool_choice"], "auto", "{name}");
        let detail = rig
            .call_detail_when(&call.sid, |d| d["call"]["agent"] == name)
            .await;
        assert_eq!(detail["call"]["agent"], name);
    }

    let refused = rig
        .app
        .api_post("/calls", json!({"to": CALLER, "agent": "nope"}))
        .await;
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_agent", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn a_new_directory_applies_to_the_next_call_and_a_live_call_keeps_its_agent() {
    let rig = rig(|business| {
        vec![AgentProfile {
            is_default: true,
            tools: vec![tool(business, "open_ticket", Duration::from_secs(5))],
            ..agent("support", "Support, first edition.", &[SUPPORT])
        }]
    })
    .await;
    let mut live = rig.call(201, SUPPORT).await;
    assert_eq!(
        live.update["session"]["instructions"],
        "Support, first edition."
    );

    rig.app.state.agents.replace(Agents::new(vec![AgentProfile {
        is_default: true,
        voice: "verse".into(),
        tools: vec![tool(&rig.business, "lookup_order", Duration::from_secs(5))],
        ..agent("support", "Support, second edition.", &[SUPPORT])
    }]));

    // The live call still has the tool the new directory dropped.
    respond_with_calls(
        &live.session,
        "resp_1",
        &[("call_t", "open_ticket", r#"{"order_id":"7"}"#)],
    );
    let request = rig.business.next_request("/tools/open_ticket").await;
    assert!(request.verified);
    assert_eq!(
        request.json.unwrap(),
        tool_call_body(
            &live.sid,
            "support",
            SUPPORT,
            "open_ticket",
            "call_t",
            json!({"order_id":"7"})
        )
    );
    let outputs = expect_outputs_then_one_response(&mut live.session, 1).await;
    assert_eq!(outputs, [("call_t".to_owned(), "{}".to_owned())]);

    let next = rig.call(202, SUPPORT).await;
    let session = &next.update["session"];
    assert_eq!(session["instructions"], "Support, second edition.");
    assert_eq!(session["audio"]["output"]["voice"], "verse");
    assert_eq!(declared_tools(&next.update), ["lookup_order", "end_call"]);
    assert!(
        rig.business
            .requests()
            .iter()
            .all(|r| r.path == "/tools/open_ticket"),
        "nothing else was asked of the business"
    );
}

// --- 2. Tool round trips.

#[tokio::test]
async fn a_tool_call_is_posted_signed_and_its_answer_goes_back_with_one_response() {
    let rig = rig(|business| vec![order_desk(business)]).await;
    let answer = r#"{"status":"shipped","eta":"tomorrow"}"#;
    rig.business
        .answer("/tools/lookup_order", Answer::text(200, answer));
    let mut call = rig.call(301, SALES).await;

    respond_with_calls(
        &call.session,
        "resp_1",
        &[("call_1", "lookup_order", r#"{"order_id":"A-42"}"#)],
    );
    let request = rig.business.next_request("/tools/lookup_order").await;
    assert!(
        request.verified,
        "the reference library accepts the signature"
    );
    assert_eq!(request.method, "POST");
    assert_eq!(
        request.json.clone().unwrap(),
        tool_call_body(
            &call.sid,
            "orders",
            SALES,
            "lookup_order",
            "call_1",
            json!({"order_id":"A-42"})
        )
    );
    let outputs = expect_outputs_then_one_response(&mut call.session, 1).await;
    assert_eq!(outputs, [("call_1".to_owned(), answer.to_owned())]);
    assert_eq!(rig.business.requests().len(), 1);

    // 7. The call's history and the metrics show the tool call.
    let recorded = rig.events_of_type(&call.sid, "tool_call").await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let data = &recorded[0]["data"];
    assert_eq!(data["tool"], "lookup_order");
    assert_eq!(data["outcome"], "ok");
    assert_eq!(data["call_id"], "call_1");
    assert!(data["latency_ms"].is_u64(), "{data}");
    let metrics = rig.app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("callbridge_tool_calls_total{tool=\"lookup_order\",outcome=\"ok\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("callbridge_tool_duration_seconds_count{tool=\"lookup_order\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn two_calls_of_one_response_give_two_outputs_then_one_response() {
    let rig = rig(|business| vec![order_desk(business)]).await;
    rig.business.answer(
        "/tools/lookup_order",
        Answer::json(200, json!({"status":"found"})),
    );
    let mut call = rig.call(302, SALES).await;
    respond_with_calls(
        &call.session,
        "resp_1",
        &[
            ("call_a", "lookup_order", r#"{"order_id":"1"}"#),
            ("call_b", "lookup_order", r#"{"order_id":"2"}"#),
        ],
    );
    let mut asked = [
        rig.business.next_request("/tools/lookup_order").await,
        rig.business.next_request("/tools/lookup_order").await,
    ];
    asked.sort_by_key(|r| {
        r.json.as_ref().unwrap()["call_id"]
            .as_str()
            .unwrap()
            .to_owned()
    });
    for (request, (call_id, order)) in asked.iter().zip([("call_a", "1"), ("call_b", "2")]) {
        assert!(request.verified);
        assert_eq!(
            request.json.clone().unwrap(),
            tool_call_body(
                &call.sid,
                "orders",
                SALES,
                "lookup_order",
                call_id,
                json!({"order_id": order})
            )
        );
    }
    let outputs = expect_outputs_then_one_response(&mut call.session, 2).await;
    let found = json!({"status":"found"}).to_string();
    assert_eq!(
        outputs,
        [
            ("call_a".to_owned(), found.clone()),
            ("call_b".to_owned(), found)
        ],
        "in the order the calls were made"
    );
}

#[tokio::test]
async fn a_call_reported_twice_is_run_once() {
    let rig = rig(|business| vec![order_desk(business)]).await;
    let mut call = rig.call(303, SALES).await;
    let arguments = r#"{"order_id":"A-42"}"#;
    call.session.send(created("resp_1"));
    call.session
        .send(function_call("resp_1", "call_1", "lookup_order", arguments));
    call.session.send(function_call_item(
        "resp_1",
        "call_1",
        "lookup_order",
        arguments,
    ));
    call.session.send(done("resp_1"));
    let outputs = expect_outputs_then_one_response(&mut call.session, 1).await;
    assert_eq!(outputs, [("call_1".to_owned(), "{}".to_owned())]);
    assert_eq!(rig.business.requests().len(), 1, "one POST");

    // Reported only as a finished item, a call runs as well.
    call.session.send(created("resp_2"));
    call.session.send(function_call_item(
        "resp_2",
        "call_2",
        "lookup_order",
        arguments,
    ));
    call.session.send(done("resp_2"));
    let outputs = expect_outputs_then_one_response(&mut call.session, 1).await;
    assert_eq!(outputs, [("call_2".to_owned(), "{}".to_owned())]);
    assert_eq!(rig.business.requests().len(), 2);
}

#[tokio::test]
async fn a_failing_or_late_tool_gives_the_agent_an_error_and_the_call_goes_on() {
    let rig = rig(|business| {
        vec![AgentProfile {
            tools: vec![
                tool(business, "lookup_order", Duration::from_secs(5)),
                tool(business, "slow_lookup", Duration::from_millis(300)),
            ],
            ..order_desk(business)
        }]
    })
    .await;
    rig.business
        .answer("/tools/lookup_order", Answer::text(500, "database down"));
    rig.business.answer(
        "/tools/slow_lookup",
        Answer::json(200, json!({"status":"late"})).after(Duration::from_secs(2)),
    );
    let mut call = rig.call(304, SALES).await;

    respond_with_calls(
        &call.session,
        "resp_1",
        &[("call_500", "lookup_order", r#"{"order_id":"1"}"#)],
    );
    let outputs = expect_outputs_then_one_response(&mut call.session, 1).await;
    let error: Value = serde_json::from_str(&outputs[0].1).unwrap();
    assert_eq!(outputs[0].0, "call_500");
    assert!(error["error"].is_string(), "{error}");
    assert!(
        !outputs[0].1.contains("database down"),
        "the business's error page is not read to the caller"
    );
    audio_still_flows(&mut call, 0).await;

    let asked = Instant::now();
    respond_with_calls(
        &call.session,
        "resp_2",
        &[("call_late", "slow_lookup", r#"{"order_id":"2"}"#)],
    );
    let output = output_of(&next_event(&mut call.session).await);
    let waited = asked.elapsed();
    assert_eq!(output.0, "call_late");
    let error: Value = serde_json::from_str(&output.1).unwrap();
    assert!(error["error"].is_string(), "{error}");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500),
        "given up at the tool's timeout, not the business's delay: {waited:?}"
    );
    let create = next_event(&mut call.session).await;
    assert!(is_response_create(&create), "{create}");
    audio_still_flows(&mut call, 1).await;

    let outcomes: Vec<Value> = rig
        .call_detail_when(&call.sid, |d| {
            events(d)
                .iter()
                .filter(|e| e["type"] == "tool_call")
                .count()
                == 2
        })
        .await["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "tool_call")
        .map(|e| e["data"]["outcome"].clone())
        .collect();
    assert_eq!(outcomes, ["refused", "timeout"]);
}

#[tokio::test]
async fn while_the_caller_speaks_outputs_go_without_a_response_create() {
    let rig = rig(|business| vec![order_desk(business)]).await;
    rig.business.answer(
        "/tools/lookup_order",
        Answer::json(200, json!({"status":"shipped"})).after(Duration::from_millis(400)),
    );
    let mut call = rig.call(305, SALES).await;
    respond_with_calls(
        &call.session,
        "resp_1",
        &[("call_1", "lookup_order", r#"{"order_id":"1"}"#)],
    );
    call.session.send(json!({"type":"input_audio_buffer.speech_started","event_id":"ev","audio_start_ms":100,"item_id":"item_user"}));
    let output = output_of(&next_event(&mut call.session).await);
    assert_eq!(
        output,
        ("call_1".to_owned(), json!({"status":"shipped"}).to_string())
    );
    let after = events_within(&mut call.session, QUIET).await;
    assert!(
        !after.iter().any(is_response_create),
        "the caller's own turn will read the output: {after:?}"
    );
}

// --- 3. A slow tool.

/// Real-time pacing: one frame every 20 ms, as Twilio and OpenAI send them.
const PACE: Duration = Duration::from_millis(20);

/// Asserts frames kept arriving from `from` to `to`: many of them, never 0.5 s without one.
fn assert_steady(direction: &str, from: Instant, arrivals: &[Instant], to: Instant) {
    assert!(
        arrivals.len() > 100,
        "{direction}: only {} frames",
        arrivals.len()
    );
    let mut previous = from;
    let mut largest = Duration::ZERO;
    for &at in arrivals.iter().chain([&to]) {
        largest = largest.max(at.saturating_duration_since(previous));
        previous = at;
    }
    assert!(
        largest < Duration::from_millis(500),
        "{direction}: {largest:?} without a frame"
    );
}

/// Twilio's side of a call in real time: a caller frame every 20 ms until `stop`, recording
/// when each frame of agent audio arrives.
fn pace_caller(mut twilio: FakeTwilio, stop: Arc<AtomicBool>) -> JoinHandle<Vec<Instant>> {
    tokio::spawn(async move {
        let mut heard = Vec::new();
        let mut next = Instant::now();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            twilio.media(n, &frame(2, n)).await;
            n += 1;
            next += PACE;
            while let Ok(message) = tokio::time::timeout_at(next, twilio.recv()).await {
                if message["event"] == "media" {
                    heard.push(Instant::now());
                }
            }
        }
        heard
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tool_gets_one_holding_sentence_and_audio_keeps_flowing_both_ways() {
    let rig = rig(|business| vec![order_desk(business)]).await;
    let answer = json!({"status":"shipped"}).to_string();
    rig.business.answer(
        "/tools/lookup_order",
        Answer::text(200, answer.clone()).after(Duration::from_secs(3)),
    );
    let Call {
        twilio,
        mut session,
        ..
    } = rig.call(306, SALES).await;
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let caller = pace_caller(twilio, Arc::clone(&stop));

    // OpenAI's side: agent audio every 20 ms, and the script of the round.
    session.send(created("resp_1"));
    session.send(function_call(
        "resp_1",
        "call_slow",
        "lookup_order",
        r#"{"order_id":"A-42"}"#,
    ));
    let asked = Instant::now();
    session.send(done("resp_1"));
    let hold_until = asked + Duration::from_millis(3400);
    let (mut speaking, mut item) = ("resp_1", "item_1");
    let mut appends = Vec::new();
    let mut next_delta = Instant::now();
    let mut holding_asked_at = None;
    let mut holding_done_at = None;
    let mut output_at = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_delta) => {
                session.send(delta(speaking, item, &agent_audio(20, 0x55)));
                next_delta += PACE;
            }
            () = tokio::time::sleep_until(hold_until),
                if holding_asked_at.is_some() && holding_done_at.is_none() => {
                session.send(done("resp_hold"));
                holding_done_at = Some(Instant::now());
            }
            event = session.recv() => {
                let now = Instant::now();
                match event["type"].as_str().unwrap() {
                    "input_audio_buffer.append" => appends.push(now),
                    "response.create" if output_at.is_none() => {
                        assert!(holding_asked_at.is_none(), "one holding sentence per round: {event}");
                        assert_eq!(event["response"]["tool_choice"], "none", "{event}");
                        assert!(event["response"]["instructions"].is_string(), "{event}");
                        holding_asked_at = Some(now);
                        session.send(created("resp_hold"));
                        (speaking, item) = ("resp_hold", "item_hold");
                    }
                    "response.create" => {
                        assert_eq!(event.get("response"), None, "{event}");
                        break;
                    }
                    "conversation.item.create" => {
                        assert!(
                            holding_done_at.is_some(),
                            "the output waits for the holding sentence to end: {event}"
                        );
                        assert_eq!(output_of(&event), ("call_slow".to_owned(), answer.clone()));
                        output_at = Some(now);
                    }
                    _ => panic!("unexpected event: {event}"),
                }
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let heard = caller.await.unwrap();
    let ended = Instant::now();

    let holding_after = holding_asked_at.unwrap() - asked;
    assert!(
        holding_after >= Duration::from_millis(1150) && holding_after < Duration::from_millis(2000),
        "the holding sentence is asked for about 1.2 s after the request: {holding_after:?}"
    );
    assert!(output_at.unwrap() >= holding_done_at.unwrap());
    assert_eq!(rig.business.requests().len(), 1);
    assert_steady("caller → OpenAI", began, &appends, ended);
    assert_steady("agent → Twilio", began, &heard, ended);
}

// --- 4. Built-ins and limits.

#[tokio::test]
async fn end_call_waits_for_playback_then_hangs_up_through_twilio_then_closes() {
    let rig = rig(|business| vec![order_desk(business)]).await;
    let sid = call_sid(401);
    rig.rest_accepts(&format!("Calls/{sid}.json"), &sid).await;
    let mut call = rig.call(401, SALES).await;

    call.session.send(created("resp_1"));
    for n in 0..5 {
        call.session.send(delta(
            "resp_1",
            "item_1",
            &agent_audio(100, u8::try_from(n).unwrap()),
        ));
    }
    call.session.send(function_call(
        "resp_1",
        "call_end",
        "end_call",
        r#"{"reason":"the caller said goodbye"}"#,
    ));
    call.session.send(done("resp_1"));
    let (media, marks) = receive_audio(&mut call.twilio, 5).await;
    assert_eq!(media[4], agent_audio(100, 4));

    let output = output_of(&next_event(&mut call.session).await);
    assert_eq!(output, ("call_end".to_owned(), r#"{"ok":true}"#.to_owned()));
    let after = events_within(&mut call.session, QUIET).await;
    assert!(
        !after.iter().any(is_response_create),
        "no new response after end_call: {after:?}"
    );
    assert_eq!(
        call.twilio.closed_within(QUIET).await,
        None,
        "the caller is still hearing the goodbye"
    );
    assert!(rig.rest_requests().await.is_empty(), "not hung up yet");

    // Twilio played everything.
    call.twilio.echo_mark(marks.last().unwrap()).await;
    assert_eq!(
        call.twilio.closed_within(Duration::from_secs(5)).await,
        Some(Some(1000)),
        "a normal close: no apology"
    );
    let requests = rig.rest_requests().await;
    assert_eq!(
        requests,
        [(
            calls_path(&sid),
            vec![("Status".to_owned(), "completed".to_owned())]
        )],
        "hung up before the stream closed"
    );
    assert_eq!(rig.end_reason(&sid).await, "agent_ended");
}

#[tokio::test]
async fn transfer_call_redirects_the_call_to_the_agents_number() {
    let rig = rig(|business| {
        vec![AgentProfile {
            builtins: vec![Builtin::EndCall, Builtin::TransferCall],
            transfer_to: Some(TransferTarget::Number(E164::parse("+15557654321").unwrap())),
            ..order_desk(business)
        }]
    })
    .await;
    let sid = call_sid(402);
    rig.rest_accepts(&format!("Calls/{sid}.json"), &sid).await;
    let mut call = rig.call(402, SALES).await;
    assert_eq!(
        declared_tools(&call.update),
        ["lookup_order", "end_call", "transfer_call"]
    );

    respond_with_calls(
        &call.session,
        "resp_1",
        &[("call_x", "transfer_call", r#"{"reason":"wants a person"}"#)],
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.rest_requests().await.is_empty() {
        assert!(Instant::now() < deadline, "no transfer reached Twilio");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        rig.rest_requests().await,
        [(
            calls_path(&sid),
            vec![(
                "Twiml".to_owned(),
                "<Response><Dial><Number>+15557654321</Number></Dial></Response>".to_owned()
            )]
        )]
    );
    let after = events_within(&mut call.session, QUIET).await;
    assert!(
        after.is_empty(),
        "a transfer that worked gives no output and no response: {after:?}"
    );

    // Twilio moves the call to the <Dial>: the stream stops.
    call.twilio.stop().await;
    let _ = call.twilio.closed_within(Duration::from_secs(5)).await;
    assert_eq!(rig.end_reason(&sid).await, "transferred");
    assert_eq!(
        rig.rest_requests().await.len(),
        1,
        "no hang-up after a transfer"
    );
}

/// Settings for calls that end on their own: short goodbyes.
fn short_farewells(config: &mut Config) {
    config.call.farewell_limit = Duration::from_secs(2);
    config.call.playback_wait = Duration::from_secs(2);
}

/// The agent says its goodbye when asked: a response with a little audio, played at once.
async fn say_goodbye(call: &mut Call, response_id: &str) {
    call.session.send(created(response_id));
    call.session
        .send(delta(response_id, "item_bye", &agent_audio(100, 9)));
    call.session.send(done(response_id));
    let (_, marks) = receive_audio(&mut call.twilio, 1).await;
    call.twilio.echo_mark(&marks[0]).await;
}

#[tokio::test]
async fn a_call_at_its_time_limit_says_goodbye_and_ends() {
    let rig = rig_with(
        |business| {
            vec![AgentProfile {
                max_call_duration: Some(Duration::from_secs(1)),
                ..order_desk(business)
            }]
        },
        short_farewells,
    )
    .await;
    let sid = call_sid(403);
    rig.rest_accepts(&format!("Calls/{sid}.json"), &sid).await;
    let started = Instant::now();
    let mut call = rig.call(403, SALES).await;
    let farewell = next_event(&mut call.session).await;
    assert!(is_response_create(&farewell), "{farewell}");
    assert_eq!(farewell["response"]["tool_choice"], "none", "{farewell}");
    let at = started.elapsed();
    assert!(
        at >= Duration::from_millis(900) && at < Duration::from_secs(3),
        "{at:?}"
    );
    say_goodbye(&mut call, "resp_bye").await;
    assert_eq!(
        call.twilio.closed_within(Duration::from_secs(5)).await,
        Some(Some(1000))
    );
    assert_eq!(rig.rest_requests().await.len(), 1, "hung up through Twilio");
    assert_eq!(rig.end_reason(&sid).await, "max_duration");
}

#[tokio::test]
async fn a_silent_caller_is_checked_on_then_the_call_ends() {
    let rig = rig_with(
        |business| {
            vec![AgentProfile {
                silence: Some(SilencePolicy {
                    reprompt_after: Duration::from_secs(1),
                    hang_up_after: 1,
                }),
                ..order_desk(business)
            }]
        },
        short_farewells,
    )
    .await;
    let sid = call_sid(404);
    rig.rest_accepts(&format!("Calls/{sid}.json"), &sid).await;
    let mut call = rig.call(404, SALES).await;

    let check_in = next_event(&mut call.session).await;
    assert!(is_response_create(&check_in), "{check_in}");
    assert_eq!(check_in["response"]["tool_choice"], "none", "{check_in}");
    say_goodbye(&mut call, "resp_check").await;

    let farewell = next_event(&mut call.session).await;
    assert!(is_response_create(&farewell), "{farewell}");
    assert_ne!(
        farewell["response"]["instructions"], check_in["response"]["instructions"],
        "the second time it is a goodbye"
    );
    say_goodbye(&mut call, "resp_bye").await;
    assert_eq!(
        call.twilio.closed_within(Duration::from_secs(5)).await,
        Some(Some(1000))
    );
    assert_eq!(rig.rest_requests().await.len(), 1, "hung up through Twilio");
    assert_eq!(rig.end_reason(&sid).await, "silence");
    let check_ins = rig.events_of_type(&sid, "silence").await;
    assert_eq!(check_ins.len(), 1, "{check_ins:?}");
}

// --- 5. Keypresses.

#[tokio::test]
async fn keypresses_close_together_reach_the_agent_as_one_message() {
    let rig = rig(|business| vec![order_desk(business)]).await;
    let mut call = rig.call(501, SALES).await;
    let stream_sid = call.twilio.stream_sid.clone();
    for (sequence, digit) in (10..).zip(["1", "2", "3"]) {
        call.twilio
            .send(json!({"event":"dtmf","streamSid":stream_sid,"sequenceNumber":sequence.to_string(),"dtmf":{"track":"inbound_track","digit":digit}}))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pressed = next_event(&mut call.session).await;
    assert_eq!(message_text(&pressed, "user"), "The caller pressed: 1 2 3");
    let create = next_event(&mut call.session).await;
    assert!(is_response_create(&create), "{create}");
    let after = events_within(&mut call.session, Duration::from_millis(1500)).await;
    assert!(
        after.is_empty(),
        "one message for the three keys: {after:?}"
    );

    let keys = rig.events_of_type(&call.sid, "dtmf").await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0]["data"]["digits"], "123");
}

// --- 6. Context at call start.

fn with_context(business: &FakeBusiness, timeout: Duration) -> AgentProfile {
    AgentProfile {
        context_url: Some(business.url("/context")),
        context_timeout: timeout,
        greeting: Some("Say hello.".into()),
        ..AgentProfile::new(
            "concierge",
            "You are the concierge for {{customer}}.",
            "marin",
            "gpt-realtime-1.5",
        )
    }
}

#[tokio::test]
async fn the_business_context_shapes_the_first_session_update_and_greeting() {
    let rig = rig(|business| vec![with_context(business, Duration::from_millis(1500))]).await;
    rig.business.answer(
        "/context",
        Answer::json(
            200,
            json!({"instructions":"X","context":"Y","greeting":"Z","variables":{"customer":"Ana"}}),
        ),
    );
    let mut call = rig.call(601, SALES).await;
    let request = rig.business.next_request("/context").await;
    assert!(request.verified);
    assert_eq!(
        request.json.unwrap(),
        json!({
            "type": "call.context",
            "call_sid": call.sid,
            "agent": "concierge",
            "caller": CALLER,
            "business": SALES,
            "channel": "whatsapp",
            "direction": "inbound",
            "variables": {},
        })
    );
    assert_eq!(
        call.update["session"]["instructions"],
        "You are the concierge for Ana.\n\nX"
    );
    assert_eq!(
        message_text(&next_event(&mut call.session).await, "system"),
        "Y"
    );
    assert_eq!(
        message_text(&next_event(&mut call.session).await, "system"),
        "Z",
        "the business's greeting replaces the agent's"
    );
    let create = next_event(&mut call.session).await;
    assert!(is_response_create(&create), "{create}");
}

#[tokio::test]
async fn a_slow_context_endpoint_does_not_hold_the_call_up() {
    let rig = rig(|business| vec![with_context(business, Duration::from_millis(300))]).await;
    rig.business.answer(
        "/context",
        Answer::json(200, json!({"instructions":"too late","context":"too late"}))
            .after(Duration::from_secs(3)),
    );
    let sid = call_sid(602);
    let parameters = rig.answer(&sid, SALES).await;
    let started = Instant::now();
    let twilio = rig.stream(&sid, &parameters).await;
    let mut session = rig.fake.next_session().await;
    let update = session.expect_session_update().await;
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(1500),
        "configured at the context timeout, not the endpoint's delay: {waited:?}"
    );
    assert_eq!(
        update["session"]["instructions"], "You are the concierge for .",
        "the agent's own instructions, the unfilled placeholder empty"
    );
    assert_eq!(
        message_text(&next_event(&mut session).await, "system"),
        "Say hello."
    );
    assert!(is_response_create(&next_event(&mut session).await));

    let failures = rig.events_of_type(&sid, "context_failed").await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["name"], "timeout");
    let metrics = rig.app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("callbridge_context_requests_total{outcome=\"timeout\"} 1\n"),
        "{metrics}"
    );

    // The call goes on with what it has.
    let mut call = Call {
        sid,
        twilio,
        session,
        update,
    };
    audio_still_flows(&mut call, 0).await;
    let after = events_within(&mut call.session, QUIET).await;
    assert!(after.is_empty(), "{after:?}");
}

#[tokio::test]
async fn post_calls_variables_reach_the_context_request_and_the_prompt() {
    let rig = rig(|business| {
        vec![
            AgentProfile {
                is_default: true,
                ..agent("front", "You route callers.", &[])
            },
            AgentProfile {
                is_default: false,
                ..with_context(business, Duration::from_millis(1500))
            },
        ]
    })
    .await;
    let sid = call_sid(603);
    // Twilio sends the permission request, then creates the call.
    Mock::given(method("POST"))
        .and(path(format!(
            "/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
        )))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"sid": format!("SM{:032}", 1), "status": "queued"})),
        )
        .mount(&rig.rest)
        .await;
    Mock::given(method("POST"))
        .and(path(format!(
            "/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
        )))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"sid": sid, "status": "queued"})),
        )
        .mount(&rig.rest)
        .await;
    let asked = rig
        .app
        .api_post("/call-permissions", json!({"to": CALLER}))
        .await;
    assert_eq!(asked.status(), 201);
    let accepted = rig
        .app
        .post_signed(
            "/messaging",
            &permission_reply_form(&format!("SMa{:031}", 1), "ACCEPTED"),
        )
        .await;
    assert_eq!(accepted.status(), 204);
    let placed = rig
        .app.api_post(
            "/calls",
            json!({"to": CALLER, "agent": "concierge", "variables": {"customer": "Ana", "order": "A-42"}}),
        )
        .await;
    assert_eq!(placed.status(), 201, "{}", placed.text().await.unwrap());

    // The user picks up.
    let from = format!("whatsapp:{BUSINESS}");
    let to = format!("whatsapp:{CALLER}");
    let parameters = rig
        .open_stream_params(&form(&[
            ("CallSid", &sid),
            ("AccountSid", ACCOUNT_SID),
            ("From", &from),
            ("To", &to),
            ("Direction", "outbound-api"),
            ("CallStatus", "in-progress"),
        ]))
        .await;
    assert_eq!(parameters["agent"], "concierge");
    let _twilio = rig.stream(&sid, &parameters).await;
    let request = rig.business.next_request("/context").await;
    assert!(request.verified);
    assert_eq!(
        request.json.unwrap(),
        json!({
            "type": "call.context",
            "call_sid": sid,
            "agent": "concierge",
            "caller": CALLER,
            "business": BUSINESS,
            "channel": "whatsapp",
            "direction": "outbound",
            "variables": {"customer": "Ana", "order": "A-42"},
        })
    );
    let mut session = rig.fake.next_session().await;
    let update = session.expect_session_update().await;
    assert_eq!(
        update["session"]["instructions"],
        "You are the concierge for Ana."
    );
}
