//! One call, from the moment Twilio's media socket opens to the last hang-up.
//!
//! ```text
//!            frames, dial outcomes, side-task results, timer, shutdown
//!   sockets ───────────────────────────▶ ┌──────────┐
//!   tasks      driver (driver.rs)        │   core   │  plain state machine (core.rs):
//!   timer   ◀─────────────────────────── │ (sans-IO)│  no sockets, no runtime, no clock
//!             send, dial, record, spawn, └──────────┘
//!             end the call this way
//! ```
//!
//! - [`core`] decides everything: what to forward, barge-in, when the agent may be dialled, how
//!   the call ends. It is unit-tested by feeding it inputs and reading its actions.
//! - [`driver`] owns the I/O and decides nothing: it turns frames into inputs and actions into
//!   writes, dials, records and side tasks.
//! - [`link`] holds the two links' states, [`leg`] the media leg's wire format (Twilio),
//!   [`ending`] the one policy for how a call ends, [`agent`] what the call tells its agent and
//!   the business (parties, variables, context), [`tools`] the ordering rules of function calls.
//!   The core's own submodules hold its briefing (context lookups) and its acting (tools,
//!   `end_call`, transfers, keypresses, time limit, silence). [`speaking`] tells the dashboard
//!   who is speaking on the calls this machine carries.

pub mod agent;
pub mod core;
pub mod driver;
pub mod ending;
pub mod latency;
pub mod leg;
pub mod link;
pub mod playback;
pub mod speaking;
pub mod tools;
pub mod transcript;

#[cfg(test)]
mod test_frames;
