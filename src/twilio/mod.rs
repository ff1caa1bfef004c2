//! Everything that speaks Twilio's protocols: request signatures, resource ids, call statuses and
//! directions, TwiML, and the signed-webhook extractor used by every route Twilio calls.

pub mod call;
pub mod ids;
pub mod media;
pub mod media_stream;
pub mod rest;
pub mod signature;
pub mod socket;
pub mod twiml;
pub mod webhook;
