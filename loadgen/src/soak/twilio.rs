//! The soak's fake Twilio REST API (wiremock): callbridge hangs up a call that ended with the
//! apology through it. Each hang-up is answered as Twilio answers it, and counted per call.

use std::collections::HashMap;

use anyhow::Context;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

pub struct TwilioRest {
    server: MockServer,
}

/// `/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`.
const CALL_PATH: &str = r"^/2010-04-01/Accounts/[^/]+/Calls/[^/]+\.json$";

impl TwilioRest {
    /// Serves on 127.0.0.1:`port`.
    pub async fn start(port: u16) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("cannot bind the fake Twilio REST API to port {port}"))?;
        let server = MockServer::builder().listener(listener).start().await;
        Mock::given(method("POST"))
            .and(path_regex(CALL_PATH))
            .respond_with(|request: &Request| {
                let sid = call_sid(request).unwrap_or_default();
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!({"sid": sid, "status": "completed"}))
            })
            .mount(&server)
            .await;
        Ok(Self { server })
    }

    /// `Status=completed` requests received, per CallSid.
    pub async fn hang_ups(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for request in self.server.received_requests().await.unwrap_or_default() {
            let completed = url::form_urlencoded::parse(&request.body)
                .any(|(name, value)| name == "Status" && value == "completed");
            if let (true, Some(sid)) = (completed, call_sid(&request)) {
                *counts.entry(sid).or_default() += 1;
            }
        }
        counts
    }
}

fn call_sid(request: &Request) -> Option<String> {
    let last = request.url.path_segments()?.next_back()?;
    Some(last.strip_suffix(".json")?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use callbridge::twilio::rest::TwilioRest as Client;
    use secrecy::SecretString;

    #[tokio::test]
    async fn callbridge_s_hang_up_is_answered_and_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let fake = TwilioRest::start(port).await.unwrap();
        callbridge::tls::install_crypto_provider();
        let client = Client::new(
            &format!("http://127.0.0.1:{port}"),
            "AC00000000000000000000000000000000",
            SecretString::from("token"),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        client.hang_up("CA1").await.unwrap();
        client.hang_up("CA1").await.unwrap();
        client.hang_up("CA2").await.unwrap();
        let counts = fake.hang_ups().await;
        assert_eq!(counts.get("CA1"), Some(&2));
        assert_eq!(counts.get("CA2"), Some(&1));
        assert_eq!(counts.len(), 2);
    }
}
