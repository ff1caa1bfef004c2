//! What bounds the resources one client can hold, so that clients that never finish their
//! requests cannot take the server down: a deadline on every request's body, a cap on open
//! connections derived from `MAX_CONCURRENT_CALLS`, and enough file descriptors for both.
//!
//! actix times only the head of a connection's first request (`client_request_timeout`). A
//! client that sent its headers and then dribbled its body, one byte now and then, kept its
//! connection (and a descriptor) for as long as it liked; a thousand such clients used up the
//! default 1,024 descriptors, and the server stopped accepting anyone, Twilio and health checks
//! included. Keep-alive is off for the same reason (see `startup`): actix does not time the head
//! of a connection's later requests at all.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::HttpMessage;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::CONTENT_LENGTH;
use actix_web::http::{ConnectionType, Method};
use actix_web::middleware::Next;
use actix_web::web::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::error::json_error;

/// How long a client may take to send a request's head (actix's own timer).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest body any route accepts (Twilio's webhooks); routes check their own, smaller
/// limits. Bodies are read whole before routing, so this is also what one connection can make
/// the server hold in memory.
pub const MAX_REQUEST_BODY: usize = 64 * 1024;

/// Connections kept free for everything that is not a call: health checks, metrics, the API,
/// and webhooks beyond the one per call already counted.
pub const SPARE_CONNECTIONS: usize = 256;

/// Descriptors the process needs besides connections: the database pool (SQLite's file, its
/// WAL and shared memory per connection), the listener, each worker's event loop, the log,
/// Twilio REST connections.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// Reads the request's body completely, within `timeout` of its head, before the route sees it.
///
/// A body that is late, too large or broken is answered at once (408, 413, 400) and the
/// connection closed. WebSocket handshakes are left alone: their "body" is the call itself.
/// Only a GET can be one; any other request asking for an upgrade has its body (for actix, the
/// rest of the connection) read within the deadline like every other.
pub async fn read_body_within(
    timeout: Duration,
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    if req.method() == Method::GET && req.head().upgrade() {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    let mut payload = req.take_payload();
    let outcome = if declared.is_some_and(|length| length > MAX_REQUEST_BODY as u64) {
        Err(BodyRefused::TooLarge)
    } else {
        tokio::time::timeout(timeout, read_body(&mut payload))
            .await
            .unwrap_or(Err(BodyRefused::Late(timeout)))
    };
    match outcome {
        Ok(body) => {
            req.set_payload(Payload::from(body));
            Ok(next.call(req).await?.map_into_boxed_body())
        }
        Err(refused) => {
            let mut response = json_error(refused.status(), refused.code(), &refused.to_string());
            response
                .head_mut()
                .set_connection_type(ConnectionType::Close);
            // actix closes a connection whose request body is unread only while that body is
            // still wanted when the response ends; a dropped chunked body it reads to its end
            // instead, however slowly it comes. So the response carries the request body along.
            let response = response
                .map_body(|_, body| WithUnreadBody {
                    body,
                    _unread: payload,
                })
                .map_into_boxed_body();
            Ok(req.into_response(response))
        }
    }
}

/// A response body that keeps the unfinished request body alive until it has been sent.
struct WithUnreadBody {
    body: BoxBody,
    _unread: Payload,
}

impl MessageBody for WithUnreadBody {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}

#[derive(Debug, thiserror::Error)]
enum BodyRefused {
    #[error("the request body did not arrive within {} seconds", .0.as_secs())]
    Late(Duration),
    #[error("the request body is larger than {MAX_REQUEST_BODY} bytes")]
    TooLarge,
    #[error("the request body could not be read: {0}")]
    Broken(String),
}

impl BodyRefused {
    fn status(&self) -> StatusCode {
        match self {
            Self::Late(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Broken(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Late(_) => "request_timeout",
            Self::TooLarge => "body_too_large",
            Self::Broken(_) => "unreadable_body",
        }
    }
}

async fn read_body(payload: &mut Payload) -> Result<Bytes, BodyRefused> {
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| BodyRefused::Broken(e.to_string()))?;
        if body.len() + chunk.len() > MAX_REQUEST_BODY {
            return Err(BodyRefused::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// How many connections the server accepts at once, and what that takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionBudget {
    /// Connections accepted at once across all workers.
    pub total: usize,
    /// actix counts connections per worker (`HttpServer::max_connections`).
    pub per_worker: usize,
    /// What `total` would be if descriptors did not limit it.
    pub wanted: usize,
}

impl ConnectionBudget {
    /// Every call holds one connection for its stream, and at most about one more for its
    /// webhooks (`/voice`, status callbacks) while they run; `SPARE_CONNECTIONS` are left for
    /// the rest. Each stream also holds a descriptor for its OpenAI socket (and no more streams
    /// are accepted than `max_calls`), so with only `open_files` descriptors the cap is lowered
    /// until connections, OpenAI sockets and `RESERVED_DESCRIPTORS` fit even if every
    /// connection were a call: refusing a connection beats a live call failing to reach OpenAI.
    pub fn new(max_calls: usize, workers: usize, open_files: u64) -> Self {
        let workers = workers.max(1);
        let wanted = max_calls
            .saturating_mul(2)
            .saturating_add(SPARE_CONNECTIONS);
        let usable =
            usize::try_from(open_files.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
        // With at least `max_calls` connections, OpenAI sockets stop growing at `max_calls`;
        // below that, each connection may bring one.
        let fitting = usable.saturating_sub(max_calls).max(usable / 2);
        let total = wanted.min(fitting).max(workers);
        Self {
            total,
            per_worker: total.div_ceil(workers),
            wanted,
        }
    }

    /// Whether the descriptors lowered the cap below what `MAX_CONCURRENT_CALLS` needs.
    pub fn is_short(&self) -> bool {
        self.total < self.wanted
    }

    /// The descriptors `new` would need to grant the whole cap.
    pub fn descriptors_wanted(max_calls: usize) -> u64 {
        let connections = max_calls
            .saturating_mul(2)
            .saturating_add(SPARE_CONNECTIONS);
        (connections as u64)
            .saturating_add(max_calls as u64)
            .saturating_add(RESERVED_DESCRIPTORS)
    }
}

/// Raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard one, which the process may do
/// on its own: the usual soft default, 1,024, is far below what a thousand calls need. Returns
/// the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_follows_the_call_limit() {
        let budget = ConnectionBudget::new(1000, 2, 1_048_576);
        assert_eq!(
            budget,
            ConnectionBudget {
                total: 2256,
                per_worker: 1128,
                wanted: 2256
            }
        );
        assert!(!budget.is_short());
        assert_eq!(ConnectionBudget::new(1, 3, 1_048_576).per_worker, 86);
        assert_eq!(ConnectionBudget::descriptors_wanted(1000), 3384);
    }

    #[test]
    fn too_few_descriptors_lower_the_cap_so_live_calls_keep_theirs() {
        // 1,024 descriptors, 1,000 calls: 448 connections, each perhaps a call with its
        // OpenAI socket, plus the reserve, make 1,024.
        let starved = ConnectionBudget::new(1000, 2, 1024);
        assert!(starved.is_short());
        assert_eq!((starved.total, starved.per_worker), (448, 224));
        // Enough for 300 calls' connections and sockets, but not for 2 x 300 + 256.
        let tight = ConnectionBudget::new(300, 4, 1024);
        assert_eq!(tight.total, 1024 - 128 - 300);
        assert!(tight.is_short());
        assert!(!ConnectionBudget::new(100, 4, 1024).is_short());
        assert_eq!(
            ConnectionBudget::new(1000, 2, 0).total,
            2,
            "one per worker at least"
        );
    }
}
