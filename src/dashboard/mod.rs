//! The operators' dashboard (`/dashboard`): live calls with their transcripts as they are
//! stored, recent calls, and each call's history. Server-rendered HTML (askama), a little plain
//! JavaScript, no build step and nothing fetched from elsewhere: the CSS and the script are
//! compiled into the binary.
//!
//! Everything it shows comes from the database, so with Postgres one machine's dashboard shows
//! every machine's calls. Only who is speaking comes from memory (see `call::speaking`): it is
//! known for the calls this machine carries.
//!
//! - [`session`]: the sign-in cookie, signed with a key derived from the API token.
//! - [`views`]: what the pages show, masked, and the templates that render it.
//! - [`live`]: the event streams that keep an open page up to date.
//!
//! The routes are in `routes::dashboard`.

pub mod live;
pub mod session;
pub mod views;

use std::sync::atomic::{AtomicUsize, Ordering};

/// How many live calls the board shows (the newest); the rest are counted.
pub const LIVE_CALLS_SHOWN: i64 = 50;

/// How many of a live call's newest lines its card shows; its page shows them all.
pub const LINES_PER_CARD: i64 = 8;

/// How many calls a page of recent calls lists.
pub const RECENT_CALLS: i64 = 20;

/// The CSS and the script, compiled in.
pub const CSS: &str = include_str!("assets/dashboard.css");
pub const SCRIPT: &str = include_str!("assets/dashboard.js");

/// The dashboard's event streams open on this machine. Each stream polls the database, so an
/// operator (and a test) can see that a closed page's stream really ended.
#[derive(Debug, Default)]
pub struct OpenStreams(AtomicUsize);

impl OpenStreams {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn opened(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    fn closed(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
