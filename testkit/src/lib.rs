//! Stand-ins for callbridge's peers, shared by its end-to-end tests and by the load
//! generator: a fake OpenAI Realtime server ([`realtime`]), a client that speaks Twilio
//! Media Streams ([`media_streams`]), the business's webhook endpoints ([`business`]), the
//! cheap wire helpers the first two use ([`wire`]), plus a scratch directory for the files a
//! test makes that is removed when the test ends ([`scratch`]).

pub mod business;
pub mod media_streams;
pub mod realtime;
pub mod scratch;
pub mod wire;
