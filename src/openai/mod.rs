//! The OpenAI Realtime (GA) side: event shapes and the WebSocket client.

pub mod client;
pub mod events;
pub mod pricing;
