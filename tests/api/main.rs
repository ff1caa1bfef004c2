//! End-to-end tests: each spawns the real application on port 0 and talks to it as Twilio does.
//! One test binary (zero2prod's layout) so the crate is linked once.

mod acting;
mod agents;
mod browser;
mod business;
mod calls;
mod cost;
mod dashboard;
mod endings;
mod events;
mod events_durable;
mod fake_twilio;
mod hardening;
mod helpers;
mod openapi;
mod outbound;
mod server;
mod simulate;
mod store;
mod stream;
mod survival;
mod voice;
