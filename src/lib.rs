//! callbridge: answers Twilio (WhatsApp) calls with an OpenAI Realtime voice agent.
//!
//! Twilio's voice webhook (`routes::voice`) answers with TwiML that connects the call to our
//! `/stream/{token}` WebSocket; the bridge passes µ-law audio straight through to an OpenAI Realtime
//! session and back. `startup::Application` wires it together from a `config::Config`.
//! `simulate` places a call against a running server the way Twilio would, for trying it out
//! without a phone.

pub mod admission;
pub mod agents;
pub mod call;
pub mod clock;
pub mod config;
pub mod consent;
pub mod dashboard;
pub mod domain;
pub mod error;
pub mod events;
pub mod json;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod simulate;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod twilio;
pub mod webhooks;
