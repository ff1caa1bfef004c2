//! `/dashboard`: who may see it, what its cookie is, that its pages and streams follow the
//! calls as they are stored, and that no page or stream shows a full phone number.

use std::sync::Arc;
use std::time::{Duration, Instant};

use callbridge::dashboard::session::LIFETIME;
use callbridge::routes::dashboard::{Access, ROUTES};
use reqwest::StatusCode;
use reqwest::header::{LOCATION, SET_COOKIE};
use serde_json::json;

use crate::calls::API_TOKEN;
use crate::fake_twilio::agent_audio;
use crate::helpers::*;
use crate::stream::{connected_call, delta};
use callbridge_testkit::realtime::FakeRealtime;

/// The test calls' parties (see `voice_form`), digits only: none may appear in full anywhere.
pub const FULL_NUMBERS: [&str; 2] = ["5511999990000", "558551234567"];

/// Fails if `body` holds either party's number in full, also when split up by spaces,
/// dashes, dots or parentheses.
pub fn assert_no_full_number(body: &str, what: &str) {
    for run in body.split(|c: char| !c.is_ascii_digit() && !" -.()".contains(c)) {
        let digits: String = run.chars().filter(char::is_ascii_digit).collect();
        for number in FULL_NUMBERS {
            assert!(
                !digits.contains(number),
                "{what} shows {number} in full (as {run:?}):\n{body}"
            );
        }
    }
}

/// A browser, as far as these tests need one: no redirects followed, its cookie sent by hand.
pub struct Browser {
    pub address: String,
    pub http: reqwest::Client,
    pub cookie: Option<String>,
}

impl Browser {
    pub fn new(app: &Client) -> Self {
        callbridge::tls::install_crypto_provider();
        Self {
            address: app.address.clone(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookie: None,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.address));
        if let Some(cookie) = &self.cookie {
            request = request.header("Cookie", cookie);
        }
        request
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.request(reqwest::Method::POST, path)
            .form(form)
            .send()
            .await
            .unwrap()
    }

    /// Signs in with `token`; on success keeps the cookie and returns the `Set-Cookie` header.
    pub async fn sign_in(&mut self, token: &str) -> reqwest::Response {
        let response = self.post("/dashboard/login", &[("token", token)]).await;
        if let Some(set) = response.headers().get(SET_COOKIE) {
            let pair = set.to_str().unwrap().split(';').next().unwrap().to_owned();
            self.cookie = Some(pair);
        }
        response
    }

    /// The page's text, asserting it was served as HTML with 200.
    pub async fn page(&self, path: &str) -> String {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "text/html; charset=utf-8"
        );
        response.text().await.unwrap()
    }

    /// The sign-out form's token, read from a page.
    pub async fn csrf(&self) -> String {
        let page = self.page("/dashboard").await;
        let (_, rest) = page.split_once(r#"name="csrf" value=""#).unwrap();
        rest.split('"').next().unwrap().to_owned()
    }
}

/// Reads a `text/event-stream` response event by event.
pub struct Events {
    response: reqwest::Response,
    buffer: String,
    /// Everything received, to check for numbers.
    pub received: String,
}

impl Events {
    pub async fn open(browser: &Browser, path: &str) -> Self {
        let response = browser.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Self {
            response,
            buffer: String::new(),
            received: String::new(),
        }
    }

    /// The next event's name and data; `None` when the stream ended. Fails after 5 s.
    pub async fn next(&mut self) -> Option<(String, String)> {
        let received = &mut self.received;
        let buffer = &mut self.buffer;
        let response = &mut self.response;
        let next = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    let mut name = None;
                    let mut data = Vec::new();
                    for line in block.lines() {
                        if let Some(value) = line.strip_prefix("event: ") {
                            name = Some(value.to_owned());
                        } else if let Some(value) = line.strip_prefix("data: ") {
                            data.push(value);
                        }
                    }
                    if let Some(name) = name {
                        return Some((name, data.join("\n")));
                    }
                    continue;
                }
                let chunk = response.chunk().await.ok()??;
                let text = String::from_utf8(chunk.to_vec()).unwrap();
                received.push_str(&text);
                buffer.push_str(&text);
            }
        })
        .await;
        next.unwrap_or_else(|_| panic!("no event within 5 s; received so far:\n{}", self.received))
    }

    /// Reads events until one named `name` whose data satisfies `until`; returns its data.
    pub async fn until(&mut self, name: &str, until: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "no {name} event as expected; the last was:\n{last}"
            );
            let (event, data) = self.next().await.expect("the stream is open");
            if event == name {
                if until(&data) {
                    return data;
                }
                last = data;
            }
        }
    }
}

/// A route's method, for reqwest (actix and reqwest use different `http` versions).
fn method(route: &callbridge::routes::dashboard::DashboardRoute) -> reqwest::Method {
    reqwest::Method::from_bytes(route.method.as_str().as_bytes()).unwrap()
}

/// A route's path with its parameter filled in.
fn concrete(path: &str) -> String {
    path.replace("{call_sid}", &call_sid(1))
}

pub async fn dashboard_app(fake: &FakeRealtime, extra: &[(&str, &str)]) -> TestApp {
    let mut overrides = vec![
        ("OPENAI_REALTIME_URL", fake.url.as_str()),
        ("CALLBRIDGE_API_TOKEN", API_TOKEN),
    ];
    overrides.extend_from_slice(extra);
    spawn_app(&overrides).await
}

/// What a browser without a valid session gets from every dashboard route.
async fn assert_every_route_refused(browser: &Browser, why: &str) {
    for route in &ROUTES {
        let path = concrete(route.path);
        let response = browser
            .request(method(route), &path)
            .form(&[("csrf", "x")])
            .send()
            .await
            .unwrap();
        let status = response.status();
        match route.access {
            Access::Page => {
                assert_eq!(
                    status,
                    StatusCode::SEE_OTHER,
                    "{} {path} {why}",
                    route.method
                );
                assert_eq!(response.headers()[LOCATION], "/dashboard/login");
            }
            Access::Stream => {
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{} {path} {why}",
                    route.method
                );
            }
            Access::SignIn => assert!(
                status == StatusCode::OK || status == StatusCode::UNAUTHORIZED,
                "{} {path} {why}: {status}",
                route.method
            ),
            Access::Asset => assert_eq!(status, StatusCode::OK, "{path}"),
        }
        assert!(
            response.headers().get(SET_COOKIE).is_none(),
            "{path} {why} issued a session"
        );
    }
}

#[tokio::test]
async fn every_dashboard_route_wants_a_valid_session() {
    let clock = Arc::new(ManualClock::default());
    let config = test_config(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]);
    let app = spawn_app_with_clock(config, clock.clone()).await;
    let mut browser = Browser::new(&app);
    assert_every_route_refused(&browser, "without a cookie").await;

    // A cookie of the right shape that callbridge did not sign.
    browser.cookie =
        Some("callbridge_session=4102444800.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into());
    assert_every_route_refused(&browser, "with a forged cookie").await;

    // A genuine cookie whose session has expired.
    assert_eq!(browser.sign_in(API_TOKEN).await.status(), 303);
    assert_eq!(browser.get("/dashboard").await.status(), 200);
    clock.advance(LIFETIME);
    assert_every_route_refused(&browser, "with an expired cookie").await;

    // A cookie signed under another API token, shown to a server with this one.
    let other_token = "another-api-token-0123456789abcdef0123";
    let other = spawn_app(&[("CALLBRIDGE_API_TOKEN", other_token)]).await;
    let mut elsewhere = Browser::new(&other);
    assert_eq!(elsewhere.sign_in(other_token).await.status(), 303);
    let fresh = spawn_app(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let mut stranger = Browser::new(&fresh);
    stranger.cookie = elsewhere.cookie;
    assert_every_route_refused(&stranger, "with another token's cookie").await;
}

#[tokio::test]
async fn without_the_api_token_the_dashboard_says_it_is_off() {
    let app = spawn_app(&[]).await;
    let browser = Browser::new(&app);
    for route in &ROUTES {
        let path = concrete(route.path);
        let response = browser
            .request(method(route), &path)
            .form(&[("token", "")])
            .send()
            .await
            .unwrap();
        if route.access == Access::Asset {
            assert_eq!(response.status(), 200, "{path}");
            continue;
        }
        assert_eq!(response.status(), 503, "{} {path}", route.method);
        let body = response.text().await.unwrap();
        assert!(body.contains("CALLBRIDGE_API_TOKEN"), "{path}: {body}");
    }
    // As the API does.
    assert_eq!(app.get("/calls").await.status(), 503);
}

#[tokio::test]
async fn signing_in_sets_a_signed_http_only_strict_cookie_for_the_dashboard_only() {
    let app = spawn_app(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let mut browser = Browser::new(&app);
    let login = browser.page("/dashboard/login").await;
    assert!(login.contains(r#"<form class="login" method="post" action="/dashboard/login">"#));

    let response = browser.sign_in(API_TOKEN).await;
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()[LOCATION], "/dashboard");
    let set_cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    let attributes: Vec<&str> = set_cookie.split("; ").collect();
    assert!(
        attributes[0].starts_with("callbridge_session="),
        "{set_cookie}"
    );
    for attribute in [
        "HttpOnly",
        "SameSite=Strict",
        "Secure",
        "Path=/dashboard",
        "Max-Age=43200",
    ] {
        assert!(
            attributes.contains(&attribute),
            "{attribute} missing: {set_cookie}"
        );
    }
    assert!(
        !set_cookie.contains(API_TOKEN),
        "the cookie holds the token"
    );
    let board = browser.page("/dashboard").await;
    assert!(board.contains("Live calls") && board.contains("Sign out"));
    // Signed in, the sign-in page sends the operator on.
    assert_eq!(browser.get("/dashboard/login").await.status(), 303);

    // Over plain http (a local test), the cookie cannot be Secure or browsers would drop it.
    let local = spawn_app(&[
        ("CALLBRIDGE_API_TOKEN", API_TOKEN),
        ("PUBLIC_BASE_URL", "http://localhost:8080"),
    ])
    .await;
    let mut local_browser = Browser::new(&local);
    let response = local_browser.sign_in(API_TOKEN).await;
    let set_cookie = response.headers()[SET_COOKIE].to_str().unwrap();
    assert!(!set_cookie.contains("Secure"), "{set_cookie}");
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));
}

#[tokio::test]
async fn a_wrong_token_shows_the_form_again_with_401_and_a_log_line_without_the_token() {
    let server = Binary::start(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let mut browser = Browser::new(&server);
    let guess = "guessed-token-that-must-not-be-logged-0123";
    let response = browser.sign_in(guess).await;
    assert_eq!(response.status(), 401);
    assert!(response.headers().get(SET_COOKIE).is_none());
    let body = response.text().await.unwrap();
    assert!(body.contains("That is not the API token."), "{body}");
    assert!(body.contains(r#"name="token""#) && !body.contains(guess));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.output().contains("dashboard sign-in refused") {
        assert!(
            Instant::now() < deadline,
            "no log line:\n{}",
            server.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = server.output();
    assert!(
        !output.contains(guess) && !output.contains(API_TOKEN),
        "{output}"
    );
    // An empty form is a wrong token too, not a server error.
    assert_eq!(browser.post("/dashboard/login", &[]).await.status(), 401);
}

#[tokio::test]
async fn signing_out_takes_the_pages_form_token_and_clears_the_cookie() {
    let app = spawn_app(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let mut browser = Browser::new(&app);
    browser.sign_in(API_TOKEN).await;
    let csrf = browser.csrf().await;
    // Another site can make the browser post the form, but cannot know the token.
    for forged in ["", "x", &csrf[1..]] {
        let response = browser.post("/dashboard/logout", &[("csrf", forged)]).await;
        assert_eq!(response.status(), 403, "{forged:?}");
        assert!(response.headers().get(SET_COOKIE).is_none());
    }
    let response = browser.post("/dashboard/logout", &[("csrf", &csrf)]).await;
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()[LOCATION], "/dashboard/login");
    let cleared = response.headers()[SET_COOKIE].to_str().unwrap();
    assert!(cleared.starts_with("callbridge_session=;"), "{cleared}");
    assert!(
        cleared.contains("Max-Age=0") && cleared.contains("Path=/dashboard"),
        "{cleared}"
    );
}

/// Drives one call like Twilio and OpenAI would, and watches it on the board's stream, on its
/// page and on its page's stream: every line as it is stored, who speaks, the barge-in, the
/// end; and never a full number.
#[tokio::test]
async fn a_live_call_is_followed_on_the_board_and_its_page_with_every_number_masked() {
    let fake = FakeRealtime::start().await;
    let app = dashboard_app(&fake, &[]).await;
    let mut browser = Browser::new(&app);
    browser.sign_in(API_TOKEN).await;
    let mut board = Events::open(&browser, "/dashboard/live").await;
    board
        .until("live", |html| html.contains("No live calls."))
        .await;

    let sid = call_sid(7001);
    let (mut twilio, session) = connected_call(&app, &fake, &sid).await;
    let live = board.until("live", |html| html.contains(&sid)).await;
    assert!(live.contains("+*********0000"), "{live}");
    assert!(live.contains("WhatsApp") && live.contains("inbound") && live.contains("default"));

    session.send(json!({"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","content_index":0,"transcript":"Hi, my number is +55 11 99999-0000."}));
    let live = board
        .until("live", |html| html.contains("Hi, my number is"))
        .await;
    assert!(live.contains("+** ** *****-0000"), "{live}");

    // The caller speaks: the board says so.
    session.send(json!({"type":"input_audio_buffer.speech_started","audio_start_ms":100,"item_id":"item_u2"}));
    board
        .until("live", |html| {
            html.contains(r#"<span class="speaking caller">caller</span>"#)
        })
        .await;
    session.send(
        json!({"type":"input_audio_buffer.speech_stopped","audio_end_ms":900,"item_id":"item_u2"}),
    );

    // The agent answers; while its audio plays it is the one speaking.
    session.send(delta("resp_1", "item_a", &agent_audio(200, 1)));
    assert_eq!(twilio.recv().await["event"], "media");
    assert_eq!(twilio.recv().await["event"], "mark");
    session.send(json!({"type":"response.output_audio_transcript.done","response_id":"resp_1","item_id":"item_a","output_index":0,"content_index":0,"transcript":"Thanks, I will call you back."}));
    let live = board
        .until("live", |html| {
            html.contains("Thanks, I will call you back.")
                && html.contains(r#"<span class="speaking agent">agent</span>"#)
        })
        .await;
    assert!(live.contains("<dt>Barge-ins</dt><dd>0</dd>"), "{live}");

    // The caller interrupts the agent: a barge-in, counted from the call's events.
    session.send(json!({"type":"input_audio_buffer.speech_started","audio_start_ms":2000,"item_id":"item_u3"}));
    assert_eq!(twilio.recv().await["event"], "clear");
    board
        .until("live", |html| html.contains("<dt>Barge-ins</dt><dd>1</dd>"))
        .await;

    // The call's page and its stream show the whole history.
    let page = browser.page(&format!("/dashboard/calls/{sid}")).await;
    assert!(
        page.contains("Hi, my number is") && page.contains("barge_in"),
        "{page}"
    );
    assert!(page.contains(&format!(r#"data-stream="/dashboard/calls/{sid}/live""#)));
    assert_no_full_number(&page, "the call's page");
    let mut history = Events::open(&browser, &format!("/dashboard/calls/{sid}/live")).await;
    // The agent's line as the caller heard it: cut where the caller interrupted.
    history
        .until("history", |html| {
            html.contains("Hi, my number is") && html.contains("<p>Thanks, <em class=\"cut\">")
        })
        .await;

    twilio.stop().await;
    twilio.closed_within(Duration::from_secs(2)).await;
    // The call's stream sends the ended call, then ends.
    let ended = history
        .until("history", |html| html.contains("caller_hung_up"))
        .await;
    // Once ended, the record has its cost estimate and latencies, and the page shows them.
    assert!(ended.contains("<dt>Cost (estimate)</dt><dd>$0."), "{ended}");
    assert!(ended.contains("<dt>First agent audio</dt><dd>"), "{ended}");
    assert!(
        ended.contains("<dt>Model</dt><dd>gpt-realtime-1.5</dd>"),
        "{ended}"
    );
    assert_eq!(
        history.next().await.map(|(name, _)| name).as_deref(),
        Some("end")
    );
    assert_eq!(history.next().await, None, "the call's stream ended");
    board
        .until("live", |html| html.contains("No live calls."))
        .await;
    let recent = board
        .until("recent", |html| html.contains("caller_hung_up"))
        .await;
    assert!(recent.contains(&sid));
    assert!(
        recent.contains(r#"<td data-label="Cost">$0."#) && recent.contains(" ms"),
        "{recent}"
    );

    let board_page = browser.page("/dashboard").await;
    for (what, body) in [
        ("the board's stream", board.received.as_str()),
        ("the call's stream", history.received.as_str()),
        ("the board", board_page.as_str()),
    ] {
        assert_no_full_number(body, what);
        assert!(!body.contains(API_TOKEN), "{what} shows the API token");
    }
}

#[tokio::test]
async fn a_stream_ends_when_its_client_goes_away() {
    let app = spawn_app(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let mut browser = Browser::new(&app);
    browser.sign_in(API_TOKEN).await;
    let mut events = Events::open(&browser, "/dashboard/live").await;
    events.next().await.expect("the first section");
    assert_eq!(app.state.dashboard_streams.count(), 1);
    drop(events);
    let deadline = Instant::now() + Duration::from_secs(3);
    while app.state.dashboard_streams.count() > 0 {
        assert!(
            Instant::now() < deadline,
            "the stream still polls after its client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_open_stream_does_not_hold_up_a_stop() {
    let app = spawn_app(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let mut browser = Browser::new(&app);
    browser.sign_in(API_TOKEN).await;
    let mut events = Events::open(&browser, "/dashboard/live").await;
    events.next().await.expect("the first section");
    let asked = Instant::now();
    app.state.lifecycle.begin_drain();
    // No call is live: the drain is over at once, and the stream with it.
    loop {
        if events.next().await.is_none() {
            break;
        }
    }
    tokio::time::timeout(Duration::from_secs(4), app.server)
        .await
        .expect("the server stopped well before its 5 s grace for open connections")
        .unwrap()
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn during_a_drain_the_board_says_so_and_streams_go_on_until_the_server_stops() {
    let fake = FakeRealtime::start().await;
    let app = dashboard_app(&fake, &[]).await;
    let mut browser = Browser::new(&app);
    browser.sign_in(API_TOKEN).await;
    let sid = call_sid(7101);
    let (mut twilio, _session) = connected_call(&app, &fake, &sid).await;
    let mut board = Events::open(&browser, "/dashboard/live").await;
    board.until("live", |html| html.contains(&sid)).await;
    app.state.lifecycle.begin_drain();
    // The live call keeps the drain going, and the stream with it.
    board
        .until("live", |html| {
            html.contains("This server is draining") && html.contains(&sid)
        })
        .await;
    twilio.stop().await;
    twilio.closed_within(Duration::from_secs(2)).await;
    // The last call ended: the drain is over, the server stops and so does the stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    while board.next().await.is_some() {
        assert!(Instant::now() < deadline, "the stream outlived the server");
    }
}

#[tokio::test]
async fn a_stream_signs_out_when_its_session_expires() {
    let clock = Arc::new(ManualClock::default());
    let config = test_config(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]);
    let app = spawn_app_with_clock(config, clock.clone()).await;
    let mut browser = Browser::new(&app);
    browser.sign_in(API_TOKEN).await;
    let mut events = Events::open(&browser, "/dashboard/live").await;
    events.next().await.expect("the first section");
    clock.advance(LIFETIME);
    let mut names = Vec::new();
    while let Some((name, _)) = events.next().await {
        names.push(name);
    }
    assert_eq!(
        names.last().map(String::as_str),
        Some("signed-out"),
        "{names:?}"
    );
}

#[tokio::test]
async fn an_unknown_call_and_a_bad_cursor_are_said_plainly() {
    let app = spawn_app(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let mut browser = Browser::new(&app);
    browser.sign_in(API_TOKEN).await;
    let missing = browser.get("/dashboard/calls/CA404").await;
    assert_eq!(missing.status(), 404);
    assert!(missing.text().await.unwrap().contains("No such call"));
    assert_eq!(browser.get("/dashboard?before=!!").await.status(), 400);
}
