//! Logging setup and the per-request span.
//!
//! Every request gets one span (tracing-actix-web) with an empty `call_sid` field that handlers
//! fill in once they know it, so every line logged while handling a call's webhook carries it.

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
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
    // Colour codes only for a person at a terminal: in a file or a log pipeline they are noise.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    // A second init (tests) keeps the first subscriber; nothing to report.
    drop(subscriber(format, colour, requested, std::io::stdout).try_init());
}

/// Lines in `format` to `writer` (pretty ones coloured if `colour`), filtered by `requested`
/// and by the caps.
///
/// Both filters are global (layers of their own), not a per-layer filter of the output layer.
/// In tracing-subscriber 0.3 a per-layer filter that `log` asks whether a record is enabled,
/// with no record logged after, swallows the next event on that thread. sqlx asks before every
/// Postgres statement and rustls logs through `log`, so with `RUST_LOG=debug` (rustls is
/// capped) or `debug,sqlx=warn`, callbridge's own lines after a query or a TLS handshake went
/// missing.
fn subscriber<W>(
    format: LogFormat,
    colour: bool,
    requested: EnvFilter,
    writer: W,
) -> impl tracing::Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let output = match format {
        // The current span carries the call's fields; the list of every enclosing span would
        // repeat them on each line.
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => fmt.with_ansi(colour).boxed(),
    };
    // Each filter layer must let an event through: the caps hold whatever `RUST_LOG` opens.
    tracing_subscriber::registry()
        .with(requested)
        .with(secret_safe_levels())
        .with(output)
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Everything written, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<serde_json::Value> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect()
        }
    }

    /// Messages logged while `log_and_ask` runs under `RUST_LOG=rust_log`, in JSON.
    fn messages(rust_log: &str, log_and_ask: impl FnOnce()) -> Vec<String> {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = subscriber(
            LogFormat::Json,
            false,
            EnvFilter::new(rust_log),
            move || writer.clone(),
        );
        tracing::subscriber::with_default(subscriber, log_and_ask);
        captured
            .lines()
            .iter()
            .map(|line| line["message"].as_str().unwrap().to_owned())
            .collect()
    }

    /// What `format` writes for one line inside a call's span.
    fn written(format: LogFormat, colour: bool) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = subscriber(format, colour, EnvFilter::new("info"), move || {
            writer.clone()
        });
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("call", call_sid = "CA1", stream_sid = "MZ1");
            let _entered = span.enter();
            tracing::warn!(peer = "OpenAI", "ignored a message");
        });
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_json_line_carries_the_calls_span_fields_once() {
        let line = written(LogFormat::Json, false);
        assert_eq!(line.matches("\"CA1\"").count(), 1, "{line}");
        let line: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(line["span"]["call_sid"], "CA1");
        assert_eq!(line["peer"], "OpenAI");
    }

    #[test]
    fn pretty_lines_are_coloured_only_when_asked() {
        let plain = written(LogFormat::Pretty, false);
        assert!(!plain.contains('\u{1b}'), "{plain:?}");
        assert!(plain.contains("call_sid=\"CA1\""), "{plain}");
        assert!(written(LogFormat::Pretty, true).contains('\u{1b}'));
    }

    /// What a library logging through `log` does for a record the filters turn down: `log`
    /// asks (tracing, via `LogTracer`) whether `target` is enabled at `level`, and then logs
    /// nothing. sqlx does this before every statement; rustls for every debug line.
    fn a_library_asks_log_about(target: &str, level: log::Level) {
        use log::Log;
        let record = log::Metadata::builder().target(target).level(level).build();
        let _ = tracing_log::LogTracer::new().enabled(&record);
    }

    #[test]
    fn a_line_after_a_record_the_filters_turn_down_is_still_written() {
        for (rust_log, target) in [
            ("debug,sqlx=warn", "sqlx::query"),
            // Capped, whatever RUST_LOG says.
            ("debug", "rustls::client::hs"),
        ] {
            let written = messages(rust_log, || {
                tracing::info!("before");
                a_library_asks_log_about(target, log::Level::Debug);
                tracing::info!("after");
                tracing::trace!("below the level asked for");
            });
            assert_eq!(written, ["before", "after"], "RUST_LOG={rust_log}");
        }
    }

    #[test]
    fn rust_log_cannot_open_a_capped_target_below_info() {
        let written = messages("trace", || {
            tracing::trace!(target: "tungstenite::handshake", "the upgrade request, key and all");
            tracing::info!(target: "tungstenite::handshake", "connected");
            tracing::trace!("callbridge's own trace line");
        });
        assert_eq!(written, ["connected", "callbridge's own trace line"]);
    }
}
