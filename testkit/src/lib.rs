//! Stand-ins for callbridge's peers, shared by its end-to-end tests and by the load
//! generator: a fake OpenAI Realtime server ([`realtime`]), a client that speaks Twilio
//! Media Streams ([`media_streams`]), the business's webhook endpoints ([`business`]), plus the
//! cheap wire helpers the first two use ([`wire`]).

pub mod business;
pub mod media_streams;
pub mod realtime;
pub mod wire;
