//! `/dashboard`: the operators' pages (see `crate::dashboard`).
//!
//! Every route is in [`ROUTES`], with what it needs: the sign-in pages and the assets are open;
//! every other page wants the session cookie and sends whoever lacks it to sign in (303); the
//! event streams answer 401 without it, as a script cannot follow a redirect to a form. The
//! routes are mounted from that list, and the tests walk it, so a new route cannot be added
//! without saying which it is. Without `CALLBRIDGE_API_TOKEN` the dashboard is off and says so
//! (503, as the API answers `api_disabled`).

use std::future::{Ready, ready};

use actix_web::cookie::{Cookie, SameSite, time};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, Route, web};
use askama::Template;
use serde::Deserialize;

use super::api::{page_cursor, token_matches};
use crate::dashboard::live::{self, BoardWatch, CallWatch};
use crate::dashboard::session::{self, COOKIE, Refused, Session, SessionKey};
use crate::dashboard::views::{
    BoardPage, CallPage, Chrome, HistoryView, LiveView, LoginPage, MessagePage, RecentView,
};
use crate::dashboard::{CSS, LINES_PER_CARD, LIVE_CALLS_SHOWN, RECENT_CALLS, SCRIPT};
use crate::state::AppState;
use crate::store::models::ListCursor;

/// Who may use a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The stylesheet and the script: served even while the dashboard is off, so its pages
    /// (the "disabled" one too) look right.
    Asset,
    /// Signing in: open to anyone while the dashboard is on.
    SignIn,
    /// A page for the signed-in; anyone else is sent to sign in (303 to `/dashboard/login`).
    Page,
    /// An event stream for the signed-in; anyone else gets 401.
    Stream,
}

/// One dashboard route.
pub struct DashboardRoute {
    pub method: Method,
    /// As actix matches it (`{call_sid}` is a path parameter).
    pub path: &'static str,
    pub access: Access,
    handler: fn() -> Route,
}

/// Every dashboard route; `configure` mounts exactly these.
pub static ROUTES: [DashboardRoute; 9] = [
    DashboardRoute {
        method: Method::GET,
        path: "/dashboard",
        access: Access::Page,
        handler: || web::get().to(board),
    },
    DashboardRoute {
        method: Method::GET,
        path: "/dashboard/login",
        access: Access::SignIn,
        handler: || web::get().to(login_form),
    },
    DashboardRoute {
        method: Method::POST,
        path: "/dashboard/login",
        access: Access::SignIn,
        handler: || web::post().to(sign_in),
    },
    DashboardRoute {
        method: Method::POST,
        path: "/dashboard/logout",
        access: Access::Page,
        handler: || web::post().to(sign_out),
    },
    DashboardRoute {
        method: Method::GET,
        path: "/dashboard/live",
        access: Access::Stream,
        handler: || web::get().to(board_stream),
    },
    DashboardRoute {
        method: Method::GET,
        path: "/dashboard/calls/{call_sid}",
        access: Access::Page,
        handler: || web::get().to(call_page),
    },
    DashboardRoute {
        method: Method::GET,
        path: "/dashboard/calls/{call_sid}/live",
        access: Access::Stream,
        handler: || web::get().to(call_stream),
    },
    DashboardRoute {
        method: Method::GET,
        path: "/dashboard/assets/dashboard.css",
        access: Access::Asset,
        handler: || web::get().to(stylesheet),
    },
    DashboardRoute {
        method: Method::GET,
        path: "/dashboard/assets/dashboard.js",
        access: Access::Asset,
        handler: || web::get().to(script),
    },
];

/// Where the session cookie is sent: the dashboard only, never the API or Twilio's webhooks.
const COOKIE_PATH: &str = "/dashboard";
const LOGIN: &str = "/dashboard/login";

/// The headers every dashboard answer carries: pages hold private conversations (no caching),
/// and the pages load only what the binary serves (the policy would stop an injected script
/// even if escaping ever failed).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; script-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn configure(cfg: &mut web::ServiceConfig) {
    let headers = actix_web::middleware::DefaultHeaders::new()
        .add((header::CACHE_CONTROL, "no-store"))
        .add((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((header::REFERRER_POLICY, "no-referrer"));
    let mut scope = web::scope(COOKIE_PATH).wrap(headers);
    for route in &ROUTES {
        let relative = route
            .path
            .strip_prefix(COOKIE_PATH)
            .expect("every dashboard route is under /dashboard");
        scope = scope.route(relative, (route.handler)());
    }
    cfg.service(scope);
}

/// Why a dashboard request was not served.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("the dashboard is off: set CALLBRIDGE_API_TOKEN to turn it on")]
    Disabled,
    #[error("sign in first")]
    SignedOut,
    #[error("sign in at /dashboard/login first")]
    Unauthorized,
    #[error("that is not the API token")]
    WrongToken,
    #[error(
        "the form has expired or did not come from this dashboard: reload the page and try again"
    )]
    Forbidden,
    #[error("no call with this CallSid is known")]
    CallNotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("something went wrong; it has been logged")]
    Internal(#[source] anyhow::Error),
}

impl From<anyhow::Error> for DashboardError {
    fn from(error: anyhow::Error) -> Self {
        Self::Internal(error)
    }
}

impl From<askama::Error> for DashboardError {
    fn from(error: askama::Error) -> Self {
        Self::Internal(error.into())
    }
}

impl ResponseError for DashboardError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Disabled => StatusCode::SERVICE_UNAVAILABLE,
            Self::SignedOut => StatusCode::SEE_OTHER,
            Self::Unauthorized | Self::WrongToken => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::CallNotFound => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let title = match self {
            Self::SignedOut => {
                return HttpResponse::SeeOther()
                    .insert_header((header::LOCATION, LOGIN))
                    .finish();
            }
            Self::Unauthorized => {
                return HttpResponse::Unauthorized()
                    .content_type("text/plain; charset=utf-8")
                    .body(self.to_string());
            }
            Self::WrongToken => {
                let page = LoginPage {
                    chrome: Chrome { csrf: None },
                    error: Some("That is not the API token."),
                };
                return html(self.status_code(), page.render());
            }
            Self::Disabled => "Dashboard off",
            Self::Forbidden => "Not allowed",
            Self::CallNotFound => "No such call",
            Self::BadRequest(_) => "Bad request",
            Self::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "dashboard request failed");
                "Something went wrong"
            }
        };
        let page = MessagePage {
            chrome: Chrome { csrf: None },
            title,
            message: self.to_string(),
        };
        html(self.status_code(), page.render())
    }
}

fn html(status: StatusCode, rendered: Result<String, askama::Error>) -> HttpResponse {
    match rendered {
        Ok(body) => HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .body(body),
        Err(error) => {
            tracing::error!(%error, "a dashboard page cannot be rendered");
            HttpResponse::InternalServerError().finish()
        }
    }
}

/// The key sessions are signed with, or `Disabled` without an API token.
fn session_key(state: &AppState) -> Result<SessionKey, DashboardError> {
    state
        .config
        .api_token
        .as_ref()
        .map(SessionKey::derive)
        .ok_or(DashboardError::Disabled)
}

/// The request's session, if its cookie carries a valid one.
fn session_of(req: &HttpRequest, state: &AppState, key: &SessionKey) -> Option<Session> {
    let cookie = req.cookie(COOKIE)?;
    match key.verify(cookie.value(), state.clock.now_ms()) {
        Ok(session) => Some(session),
        Err(Refused::Expired) => {
            tracing::debug!("a dashboard session has expired: sign-in asked for");
            None
        }
        Err(refused) => {
            tracing::info!(%refused, "refused a dashboard session cookie");
            None
        }
    }
}

fn app_state(req: &HttpRequest) -> &web::Data<AppState> {
    req.app_data::<web::Data<AppState>>()
        .expect("AppState is registered on every app")
}

/// A signed-in operator, for a page: anyone else is sent to sign in.
pub struct SignedIn {
    key: SessionKey,
    session: Session,
}

impl SignedIn {
    fn chrome(&self) -> Chrome {
        Chrome {
            csrf: Some(self.key.csrf_token(&self.session)),
        }
    }
}

impl FromRequest for SignedIn {
    type Error = DashboardError;
    type Future = Ready<Result<Self, DashboardError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let state = app_state(req);
        ready(session_key(state).and_then(|key| {
            let session = session_of(req, state, &key).ok_or(DashboardError::SignedOut)?;
            Ok(Self { key, session })
        }))
    }
}

/// A signed-in operator, for an event stream: anyone else gets 401.
pub struct Viewer(Session);

impl FromRequest for Viewer {
    type Error = DashboardError;
    type Future = Ready<Result<Self, DashboardError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let state = app_state(req);
        ready(session_key(state).and_then(|key| {
            session_of(req, state, &key)
                .map(Viewer)
                .ok_or(DashboardError::Unauthorized)
        }))
    }
}

/// The session cookie with its attributes; `value: None` is the one that removes it.
fn session_cookie(state: &AppState, value: Option<&Session>) -> Cookie<'static> {
    let secure = state
        .config
        .public_base_url
        .as_str()
        .starts_with("https://");
    let lifetime = i64::try_from(session::LIFETIME.as_secs()).unwrap_or(i64::MAX);
    Cookie::build(COOKIE, value.map_or_else(String::new, |s| s.value.clone()))
        .path(COOKIE_PATH)
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(time::Duration::seconds(if value.is_some() {
            lifetime
        } else {
            0
        }))
        .finish()
}

fn see_other(location: &'static str) -> actix_web::HttpResponseBuilder {
    let mut response = HttpResponse::SeeOther();
    response.insert_header((header::LOCATION, location));
    response
}

async fn login_form(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, DashboardError> {
    let key = session_key(&state)?;
    if session_of(&req, &state, &key).is_some() {
        return Ok(see_other("/dashboard").finish());
    }
    let page = LoginPage {
        chrome: Chrome { csrf: None },
        error: None,
    };
    Ok(html(StatusCode::OK, page.render()))
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

async fn sign_in(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<LoginForm>,
) -> Result<HttpResponse, DashboardError> {
    let key = session_key(&state)?;
    let expected = state
        .config
        .api_token
        .as_ref()
        .ok_or(DashboardError::Disabled)?;
    if !token_matches(form.token.trim(), expected) {
        let info = req.connection_info();
        tracing::warn!(
            client = info.realip_remote_addr().unwrap_or("unknown"),
            "dashboard sign-in refused: the token given is not CALLBRIDGE_API_TOKEN"
        );
        return Err(DashboardError::WrongToken);
    }
    let session = key.issue(state.clock.now_ms());
    tracing::info!("signed in to the dashboard");
    Ok(see_other("/dashboard")
        .cookie(session_cookie(&state, Some(&session)))
        .finish())
}

#[derive(Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

async fn sign_out(
    user: SignedIn,
    state: web::Data<AppState>,
    form: web::Form<LogoutForm>,
) -> Result<HttpResponse, DashboardError> {
    if !user.key.check_csrf(&user.session, &form.csrf) {
        tracing::warn!("refused a dashboard sign-out without this session's form token");
        return Err(DashboardError::Forbidden);
    }
    Ok(see_other(LOGIN)
        .cookie(session_cookie(&state, None))
        .finish())
}

#[derive(Deserialize)]
struct BoardQuery {
    before: Option<String>,
}

async fn board(
    user: SignedIn,
    state: web::Data<AppState>,
    query: web::Query<BoardQuery>,
) -> Result<HttpResponse, DashboardError> {
    let before = page_cursor(query.before.as_deref(), ListCursor::decode)
        .map_err(|error| DashboardError::BadRequest(error.to_string()))?;
    let now_ms = state.clock.now_ms();
    let live = state
        .store
        .live_calls(LIVE_CALLS_SHOWN, LINES_PER_CARD)
        .await?;
    let speaking: Vec<_> = live
        .calls
        .iter()
        .map(|call| state.speaking.get(&call.call.call_sid))
        .collect();
    let recent = state
        .store
        .list_calls(RECENT_CALLS, before.as_ref())
        .await?;
    let limit = usize::try_from(RECENT_CALLS).unwrap_or(usize::MAX);
    let page = BoardPage {
        chrome: user.chrome(),
        live: LiveView::new(&live, &speaking, state.lifecycle.is_draining(), now_ms),
        recent: RecentView::new(&recent, limit, before.is_none(), now_ms),
    };
    Ok(html(StatusCode::OK, page.render()))
}

async fn call_page(
    user: SignedIn,
    state: web::Data<AppState>,
    call_sid: web::Path<String>,
) -> Result<HttpResponse, DashboardError> {
    // The same read as `GET /calls/{sid}`.
    let detail = state
        .store
        .call(&call_sid)
        .await?
        .ok_or(DashboardError::CallNotFound)?;
    let page = CallPage {
        chrome: user.chrome(),
        history: HistoryView::new(&detail, state.speaking.get(&call_sid), state.clock.now_ms()),
    };
    Ok(html(StatusCode::OK, page.render()))
}

fn event_stream<W: live::Watch>(
    state: web::Data<AppState>,
    viewer: &Viewer,
    watch: W,
) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        // Proxies that buffer responses (nginx) would hold the events back.
        .insert_header(("X-Accel-Buffering", HeaderValue::from_static("no")))
        .streaming(live::stream(state, watch, viewer.0.expires_at_secs))
}

async fn board_stream(viewer: Viewer, state: web::Data<AppState>) -> HttpResponse {
    event_stream(state, &viewer, BoardWatch::default())
}

async fn call_stream(
    viewer: Viewer,
    state: web::Data<AppState>,
    call_sid: web::Path<String>,
) -> HttpResponse {
    event_stream(state, &viewer, CallWatch::new(call_sid.into_inner()))
}

async fn stylesheet() -> HttpResponse {
    asset("text/css; charset=utf-8", CSS)
}

async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// Compiled in, so they change only with the binary: revalidated rather than kept.
fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}
