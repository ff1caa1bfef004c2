//! The Twilio REST calls we need: create a call, end or redirect a call, send a message. Form
//! bodies, Basic auth, JSON answers, Twilio's error JSON parsed into a typed error.
//! The base URL comes from `TWILIO_API_BASE_URL` so tests can stand a fake in.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Twilio answers in well under a second; a request still pending after this will not help a
/// caller who is waiting.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// "The requested resource was not found": for a hang-up, the call has already ended.
pub const ERROR_NOT_FOUND: i64 = 20404;
/// "WhatsApp Voice: Call permission not granted by consumer".
pub const ERROR_NO_CALL_PERMISSION: i64 = 37000;

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("Twilio refused the request: error {code}: {message}")]
    Api {
        status: u16,
        code: i64,
        message: String,
        more_info: Option<String>,
    },
    #[error("Twilio did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach Twilio: {0}")]
    Network(String),
    #[error("Twilio answered HTTP {status} with a body that is not Twilio's JSON")]
    Unexpected { status: u16 },
}

impl RestError {
    /// Twilio's error code, when Twilio gave one.
    pub fn code(&self) -> Option<i64> {
        match self {
            Self::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
struct TwilioErrorBody {
    code: Option<i64>,
    message: Option<String>,
    more_info: Option<String>,
}

/// The part of a created resource we use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Created {
    pub sid: String,
    #[serde(default)]
    pub status: String,
}

#[derive(Clone)]
pub struct TwilioRest {
    http: reqwest::Client,
    account_url: String,
    account_sid: String,
    auth_token: SecretString,
    request_timeout: Duration,
}

impl TwilioRest {
    pub fn new(
        base_url: &str,
        account_sid: &str,
        auth_token: SecretString,
        request_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            http,
            account_url: format!("{base_url}/2010-04-01/Accounts/{account_sid}"),
            account_sid: account_sid.to_owned(),
            auth_token,
            request_timeout,
        })
    }

    /// `POST Calls.json`. `params` are Twilio's PascalCase names; repeat a name for lists.
    pub async fn create_call(&self, params: &[(&str, &str)]) -> Result<Created, RestError> {
        self.post("Calls.json", params).await
    }

    /// Ends a live call. A call that has already ended counts as success.
    pub async fn hang_up(&self, call_sid: &str) -> Result<(), RestError> {
        match self
            .post(
                &format!("Calls/{call_sid}.json"),
                &[("Status", "completed")],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if error.code() == Some(ERROR_NOT_FOUND) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Replaces what a live call is doing with `twiml` (a transfer's `<Dial>`): Twilio leaves
    /// the media stream and carries out the new instructions.
    pub async fn redirect(&self, call_sid: &str, twiml: &str) -> Result<(), RestError> {
        self.post(&format!("Calls/{call_sid}.json"), &[("Twiml", twiml)])
            .await
            .map(|_| ())
    }

    /// `POST Messages.json`.
    pub async fn send_message(&self, params: &[(&str, &str)]) -> Result<Created, RestError> {
        self.post("Messages.json", params).await
    }

    async fn post(&self, resource: &str, params: &[(&str, &str)]) -> Result<Created, RestError> {
        let response = self
            .http
            .post(format!("{}/{resource}", self.account_url))
            .basic_auth(&self.account_sid, Some(self.auth_token.expose_secret()))
            .form(params)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    RestError::Timeout(self.request_timeout)
                } else {
                    // Without the URL: it is ours, and an error message is no place for it.
                    RestError::Network(e.without_url().to_string())
                }
            })?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| {
            if e.is_timeout() {
                RestError::Timeout(self.request_timeout)
            } else {
                RestError::Network(e.without_url().to_string())
            }
        })?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).map_err(|_| RestError::Unexpected { status });
        }
        match serde_json::from_slice::<TwilioErrorBody>(&body) {
            Ok(TwilioErrorBody {
                code: Some(code),
                message,
                more_info,
            }) => Err(RestError::Api {
                status,
                code,
                message: message.unwrap_or_default(),
                more_info,
            }),
            _ => Err(RestError::Unexpected { status }),
        }
    }
}
