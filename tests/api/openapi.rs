//! `/openapi.json` against the router it describes: every bearer route is in it with its
//! method, nothing else is, and what the routes really answer matches the document.

use std::collections::BTreeSet;

use callbridge_testkit::realtime::FakeRealtime;
use serde_json::{Value, json};

use crate::calls::API_TOKEN;
use crate::helpers::{call_sid, spawn_app};
use crate::stream::{app_with, connected_call};

async fn document(app: &crate::helpers::Client) -> Value {
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

/// The property names of the component schema `name`, with `allOf` parts merged: all of
/// them, and the required ones.
fn properties(doc: &Value, name: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let schema = &doc["components"]["schemas"][name];
    assert!(schema.is_object(), "no schema {name}");
    let parts = match schema["allOf"].as_array() {
        Some(parts) => parts.clone(),
        None => vec![schema.clone()],
    };
    let mut all = BTreeSet::new();
    let mut required = BTreeSet::new();
    for part in parts {
        if let Some(reference) = part["$ref"].as_str() {
            let (more, more_required) =
                properties(doc, reference.trim_start_matches("#/components/schemas/"));
            all.extend(more);
            required.extend(more_required);
        }
        if let Some(props) = part["properties"].as_object() {
            all.extend(props.keys().cloned());
        }
        if let Some(names) = part["required"].as_array() {
            required.extend(names.iter().map(|n| n.as_str().unwrap().to_owned()));
        }
    }
    (all, required)
}

/// `value` has every required field of schema `name` and none the schema does not document.
fn conforms(doc: &Value, name: &str, value: &Value) {
    let (all, required) = properties(doc, name);
    let present: BTreeSet<String> = value
        .as_object()
        .unwrap_or_else(|| panic!("{name}: {value} is not an object"))
        .keys()
        .cloned()
        .collect();
    assert!(
        required.is_subset(&present),
        "{name}: {value} lacks some of {required:?}"
    );
    assert!(
        present.is_subset(&all),
        "{name}: {value} has fields beyond {all:?}"
    );
}

fn in_enum(doc: &Value, name: &str, value: &Value) -> bool {
    doc["components"]["schemas"][name]["enum"]
        .as_array()
        .is_some_and(|values| values.contains(value))
}

#[tokio::test]
async fn every_bearer_route_is_documented_and_nothing_else() {
    let app = spawn_app(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let doc = document(&app).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer"})
    );
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    // Kept for the OpenAPI validator `.ci/run` runs on it.
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("openapi.json"),
        callbridge::routes::openapi_document(),
    )
    .unwrap();

    let routes = callbridge::routes::bearer_routes();
    let mut documented = BTreeSet::new();
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let mounted: BTreeSet<_> = routes
        .iter()
        .map(|(method, path)| (method.to_string(), (*path).to_owned()))
        .collect();
    assert_eq!(documented, mounted, "the document and the router differ");

    for (method, path) in &routes {
        let operation = &doc["paths"][*path][method.as_str().to_lowercase()];
        for status in ["401", "503"] {
            assert_eq!(
                operation["responses"][status]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/Error",
                "{method} {path} documents {status}"
            );
        }
        // Unauthenticated, each answers as documented: 401 with the error body.
        let url = format!(
            "{}{}",
            app.address,
            path.replace("{call_sid}", "CA00000000000000000000000000000001")
                .replace("{id}", "msg_1")
        );
        let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap();
        let response = app.http.request(method, url).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        let body: Value = response.json().await.unwrap();
        conforms(&doc, "Error", &body);
        conforms(&doc, "ErrorBody", &body["error"]);
    }
}

#[tokio::test]
async fn what_the_routes_answer_has_exactly_the_documented_fields() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let doc = document(&app).await;
    let sid = call_sid(9500);
    let (mut twilio, _session) = connected_call(&app, &fake, &sid).await;
    twilio.stop().await;
    app.wait_until_no_call_is_live().await;

    let page: Value = app.api_get("/calls").await.json().await.unwrap();
    conforms(&doc, "CallPage", &page);
    conforms(&doc, "CallRecord", &page["calls"][0]);
    let detail: Value = app
        .api_get(&format!("/calls/{sid}"))
        .await
        .json()
        .await
        .unwrap();
    conforms(&doc, "CallDetail", &detail);
    conforms(&doc, "CallRecord", &detail["call"]);
    conforms(&doc, "TokenUsage", &detail["call"]["usage"]);
    conforms(&doc, "CallLatency", &detail["call"]["latency"]);
    conforms(&doc, "CallEvent", &detail["events"][0]);
    conforms(
        &doc,
        "StoredLine",
        &json!({"sequence": 1, "speaker": "caller", "text": "", "offset_ms": 0, "truncated": false}),
    );
    assert!(in_enum(&doc, "CallStatus", &detail["call"]["status"]));
    assert!(in_enum(&doc, "Direction", &detail["call"]["direction"]));

    // Errors the document lists for the route, with their body.
    let missing = app
        .api_get("/calls/CA0000000000000000000000000000dead")
        .await;
    assert_eq!(missing.status(), 404);
    assert!(doc["paths"]["/calls/{call_sid}"]["get"]["responses"]["404"].is_object());
    let body: Value = missing.json().await.unwrap();
    conforms(&doc, "ErrorBody", &body["error"]);
    let bad = app.api_get("/calls?limit=0").await;
    assert_eq!(bad.status(), 400);
    assert!(doc["paths"]["/calls"]["get"]["responses"]["400"].is_object());
}
