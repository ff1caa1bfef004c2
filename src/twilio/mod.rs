//! Everything that speaks Twilio's protocols: request signatures, TwiML, and the signed-webhook
//! extractor used by every route Twilio calls.

pub mod media;
pub mod rest;
pub mod signature;
pub mod socket;
pub mod twiml;
pub mod webhook;
