//! Stand-ins for callbridge's two peers, shared by its end-to-end tests and by the load
//! generator: a fake OpenAI Realtime server ([`realtime`]) and a client that speaks Twilio
//! Media Streams ([`media_streams`]), plus the cheap wire helpers both use ([`wire`]).

pub mod media_streams;
pub mod realtime;
pub mod wire;
