//! Logging setup and the per-request span.
//!
//! Every request gets one span (tracing-actix-web) with an empty `call_sid` field that handlers
//! fill in once they know it, so every line logged while handling a call's webhook carries it.

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Libraries that log what they send, credentials included, below `info`: tungstenite writes
/// the whole Realtime upgrade request (`Authorization: Bearer` with the OpenAI key) at trace,
/// and every frame's payload (transcripts, audio); the HTTP stack below reqwest could log the
/// Basic credential of our Twilio REST calls. They are held at `info` whatever `RUST_LOG` says.
const CAPPED_TARGETS: [&str; 7] = [
    "tungstenite",
    "tokio_tungstenite",
    "reqwest",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
];

/// Installs the global subscriber. `RUST_LOG` filters (default `info`), except that no
/// directive can open up `CAPPED_TARGETS` below `info`.
pub fn init(format: LogFormat) {
    let requested = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A separate filter both must pass, so no more specific `RUST_LOG` directive overrides it.
    let filter = requested.and(secret_safe_levels());
    let fmt = tracing_subscriber::fmt::layer();
    let layer = match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => fmt.with_filter(filter).boxed(),
    };
    // A second init (tests) keeps the first subscriber; nothing to report.
    drop(tracing_subscriber::registry().with(layer).try_init());
}

fn secret_safe_levels() -> Targets {
    CAPPED_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |targets, target| targets.with_target(*target, LevelFilter::INFO),
    )
}

pub struct CallRootSpan;

impl RootSpanBuilder for CallRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        tracing_actix_web::root_span!(request, call_sid = tracing::field::Empty)
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}
