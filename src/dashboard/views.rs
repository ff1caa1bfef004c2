//! What the dashboard's pages show, built from the store's records, and the askama templates
//! that render it (`templates/dashboard/*.html`, HTML-escaped by askama's own escaper).
//!
//! Every phone number goes through masking here, once: the call's parties through
//! [`Masked`], and any free text (transcript lines, event details and data) through
//! [`mask_numbers_in`], since a caller may read a number out and a tool may echo one. The
//! templates only ever see masked text.

use askama::Template;

use crate::call::speaking::Speaking;
use crate::clock::rfc3339;
use crate::domain::phone::{Masked, mask_numbers_in};
use crate::store::dashboard::{BARGE_IN, LiveCall, LiveCalls, TOOL_CALL};
use crate::store::models::{
    CallDetail, CallEvent, CallLatency, CallRecord, ListCursor, StoredLine, TokenUsage,
};
use crate::twilio::call::Direction;

/// What every page's frame needs: the sign-out form's CSRF token when signed in.
pub struct Chrome {
    pub csrf: Option<String>,
}

#[derive(Template)]
#[template(path = "dashboard/login.html")]
pub struct LoginPage {
    pub chrome: Chrome,
    pub error: Option<&'static str>,
}

#[derive(Template)]
#[template(path = "dashboard/message.html")]
pub struct MessagePage {
    pub chrome: Chrome,
    pub title: &'static str,
    pub message: String,
}

#[derive(Template)]
#[template(path = "dashboard/board.html")]
pub struct BoardPage {
    pub chrome: Chrome,
    pub live: LiveView,
    pub recent: RecentView,
}

/// The live calls section alone, as the board's stream sends it.
#[derive(Template)]
#[template(path = "dashboard/live.html")]
pub struct LiveFragment<'a> {
    pub live: &'a LiveView,
}

/// The recent calls section alone, as the board's stream sends it.
#[derive(Template)]
#[template(path = "dashboard/recent.html")]
pub struct RecentFragment<'a> {
    pub recent: &'a RecentView,
}

#[derive(Template)]
#[template(path = "dashboard/call.html")]
pub struct CallPage {
    pub chrome: Chrome,
    pub history: HistoryView,
}

/// A call's history alone, as the call page's stream sends it.
#[derive(Template)]
#[template(path = "dashboard/history.html")]
pub struct HistoryFragment<'a> {
    pub history: &'a HistoryView,
}

/// A moment, as a `<time>` element shows it: machine-readable, and UTC text that the page's
/// script turns into the viewer's local time.
#[derive(Debug, Clone)]
pub struct Moment {
    pub iso: String,
    pub text: String,
}

impl Moment {
    fn at(unix_ms: i64) -> Self {
        let iso = rfc3339(unix_ms);
        let text = format!("{} UTC", iso.trim_end_matches('Z').replacen('T', " ", 1));
        Self { iso, text }
    }
}

/// One call's record as the pages show it.
#[derive(Debug, Clone)]
pub struct CallView {
    pub call_sid: String,
    /// The customer, masked: the caller of an inbound call, the callee of an outbound one.
    pub customer: String,
    /// The business's number, masked.
    pub business: String,
    /// `WhatsApp` or `phone`.
    pub channel: &'static str,
    pub agent: String,
    pub direction: &'static str,
    pub status: String,
    pub live: bool,
    pub created: Moment,
    pub answered: Option<Moment>,
    pub ended: Option<Moment>,
    /// When its duration counts from (answered, else created), for the page's clock.
    pub since_ms: i64,
    /// `m:ss` or `h:mm:ss`; for a live call, as of `now_ms`.
    pub duration: String,
    pub end_reason: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    pub openai_session_id: Option<String>,
    /// The model the call ran, once it has ended.
    pub model: Option<String>,
    /// Tokens by kind, as `name value` pairs, for the call's page.
    pub usage: Vec<(&'static str, i64)>,
    /// The estimated cost, `$0.0324`; `None` while the call runs or for an unknown model.
    pub cost: Option<String>,
    /// The turns' median and slowest wait, or else the first audio's: for the list.
    pub latency: Option<String>,
    /// Every latency the record has, as `name value` pairs, for the call's page.
    pub latencies: Vec<(&'static str, String)>,
}

impl CallView {
    pub fn new(call: &CallRecord, now_ms: i64) -> Self {
        let outbound = matches!(
            call.direction,
            Some(Direction::OutboundApi | Direction::OutboundDial)
        );
        let (customer, business) = if outbound {
            (&call.to, &call.from)
        } else {
            (&call.from, &call.to)
        };
        let channel = if customer.starts_with("whatsapp:") || business.starts_with("whatsapp:") {
            "WhatsApp"
        } else {
            "phone"
        };
        let live = call.stream_sid.is_some() && call.ended_at_ms.is_none();
        let since_ms = call.answered_at_ms.unwrap_or(call.created_at_ms);
        let duration_ms = match (call.duration_secs, call.ended_at_ms) {
            (Some(secs), _) => Some(secs.saturating_mul(1000)),
            (None, Some(ended)) => call.answered_at_ms.map(|answered| ended - answered),
            (None, None) if live => Some(now_ms - since_ms),
            (None, None) => None,
        };
        Self {
            call_sid: call.call_sid.clone(),
            customer: party(customer),
            business: party(business),
            channel,
            agent: call.agent.clone().unwrap_or_else(|| "—".to_owned()),
            direction: match call.direction {
                Some(Direction::Inbound) => "inbound",
                Some(Direction::OutboundApi | Direction::OutboundDial) => "outbound",
                None => "—",
            },
            status: call.status.to_string(),
            live,
            created: Moment::at(call.created_at_ms),
            answered: call.answered_at_ms.map(Moment::at),
            ended: call.ended_at_ms.map(Moment::at),
            since_ms,
            duration: duration_ms.map_or_else(|| "—".to_owned(), clock_text),
            end_reason: call.end_reason.clone(),
            input_tokens: call.input_tokens,
            output_tokens: call.output_tokens,
            total_tokens: call.total_tokens,
            openai_session_id: call.openai_session_id.clone(),
            model: call.model.clone(),
            usage: usage_by_kind(&call.usage),
            cost: call.cost_usd.map(dollars),
            latency: latency_summary(&call.latency),
            latencies: latencies(&call.latency),
        }
    }
}

/// Micro-dollars as dollars to a hundredth of a cent, rounded to nearest: `$0.0324`.
pub fn dollars(micro_usd: i64) -> String {
    let ten_thousandths = (micro_usd.max(0) + 50) / 100;
    format!(
        "${}.{:04}",
        ten_thousandths / 10_000,
        ten_thousandths % 10_000
    )
}

fn millis(ms: i64) -> String {
    format!("{ms} ms")
}

fn latency_summary(latency: &CallLatency) -> Option<String> {
    match (latency.turn_p50_ms, latency.turn_max_ms) {
        (Some(p50), Some(max)) => Some(format!("{} (max {})", millis(p50), millis(max))),
        _ => latency
            .first_agent_audio_ms
            .map(|first| format!("first audio {}", millis(first))),
    }
}

fn latencies(latency: &CallLatency) -> Vec<(&'static str, String)> {
    let mut shown = Vec::new();
    let mut add = |name, value: Option<i64>| {
        if let Some(value) = value {
            shown.push((name, millis(value)));
        }
    };
    add("OpenAI connect", latency.openai_connect_ms);
    add("First agent audio", latency.first_agent_audio_ms);
    add("Turn median", latency.turn_p50_ms);
    add("Slowest turn", latency.turn_max_ms);
    if latency.turns > 0 {
        shown.push(("Turns", latency.turns.to_string()));
    }
    shown
}

fn usage_by_kind(usage: &TokenUsage) -> Vec<(&'static str, i64)> {
    [
        ("text in", usage.input_text_tokens),
        ("audio in", usage.input_audio_tokens),
        ("cached text in", usage.input_cached_text_tokens),
        ("cached audio in", usage.input_cached_audio_tokens),
        ("text out", usage.output_text_tokens),
        ("audio out", usage.output_audio_tokens),
    ]
    .into_iter()
    .filter(|(_, tokens)| *tokens > 0)
    .collect()
}

/// A party's address masked, without the `whatsapp:` prefix (the channel is shown apart).
fn party(address: &str) -> String {
    let number = address.strip_prefix("whatsapp:").unwrap_or(address);
    if number.is_empty() {
        "unknown".to_owned()
    } else {
        Masked(number).to_string()
    }
}

/// `m:ss`, or `h:mm:ss` from an hour on; negative spans (clock skew) count as 0.
pub fn clock_text(ms: i64) -> String {
    let seconds = ms.max(0) / 1000;
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    if hours > 0 {
        format!("{hours}:{minutes:02}:{seconds:02}")
    } else {
        format!("{minutes}:{seconds:02}")
    }
}

#[derive(Debug, Clone)]
pub struct LineView {
    /// `caller` or `agent`.
    pub speaker: String,
    pub text: String,
    /// Into the call, `m:ss`.
    pub at: String,
    pub truncated: bool,
}

impl From<&StoredLine> for LineView {
    fn from(line: &StoredLine) -> Self {
        Self {
            speaker: line.speaker.clone(),
            text: mask_numbers_in(&line.text).into_owned(),
            at: clock_text(line.offset_ms),
            truncated: line.truncated,
        }
    }
}

/// A live call's card on the board.
#[derive(Debug, Clone)]
pub struct CardView {
    pub call: CallView,
    /// `caller`, `agent`, `both`, `nobody`; `None` for a call another machine carries.
    pub speaking: Option<&'static str>,
    pub barge_ins: i64,
    pub tool_calls: i64,
    pub lines: Vec<LineView>,
    /// Lines before the ones shown.
    pub earlier: i64,
}

#[derive(Debug, Clone)]
pub struct LiveView {
    pub cards: Vec<CardView>,
    pub total: i64,
    /// Live calls beyond the ones shown.
    pub hidden: i64,
    pub draining: bool,
    /// The server's clock when this was rendered, so the page's clock can correct for its own.
    pub now_ms: i64,
}

impl LiveView {
    /// `speaking[i]` is who speaks on `live.calls[i]`, if this machine knows.
    pub fn new(
        live: &LiveCalls,
        speaking: &[Option<Speaking>],
        draining: bool,
        now_ms: i64,
    ) -> Self {
        let cards: Vec<CardView> = live
            .calls
            .iter()
            .enumerate()
            .map(|(i, live_call)| card(live_call, speaking.get(i).copied().flatten(), now_ms))
            .collect();
        let shown = i64::try_from(cards.len()).unwrap_or(i64::MAX);
        Self {
            cards,
            total: live.total,
            hidden: (live.total - shown).max(0),
            draining,
            now_ms,
        }
    }
}

fn card(live: &LiveCall, speaking: Option<Speaking>, now_ms: i64) -> CardView {
    let shown = i64::try_from(live.lines.len()).unwrap_or(i64::MAX);
    CardView {
        call: CallView::new(&live.call, now_ms),
        speaking: speaking.map(Speaking::label),
        barge_ins: live.barge_ins,
        tool_calls: live.tool_calls,
        lines: live.lines.iter().map(LineView::from).collect(),
        earlier: (live.line_count - shown).max(0),
    }
}

#[derive(Debug, Clone)]
pub struct RecentView {
    pub calls: Vec<CallView>,
    /// Whether this is the newest page (the only one the stream keeps up to date).
    pub first_page: bool,
    /// The link to the next, older page, when there may be one.
    pub older: Option<String>,
}

impl RecentView {
    pub fn new(calls: &[CallRecord], limit: usize, first_page: bool, now_ms: i64) -> Self {
        let older = (calls.len() == limit)
            .then(|| calls.last())
            .flatten()
            .map(|last| format!("/dashboard?before={}", ListCursor::after(last).encode()));
        Self {
            calls: calls
                .iter()
                .map(|call| CallView::new(call, now_ms))
                .collect(),
            first_page,
            older,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EventView {
    /// Into the call, `+m:ss`, from the call's creation.
    pub at: String,
    pub kind: String,
    pub name: String,
    pub detail: Option<String>,
    /// Structured details as compact JSON, masked.
    pub data: Option<String>,
}

impl EventView {
    fn new(event: &CallEvent, created_at_ms: i64) -> Self {
        Self {
            at: format!("+{}", clock_text(event.at_ms - created_at_ms)),
            kind: event.kind.clone(),
            name: mask_numbers_in(&event.name).into_owned(),
            detail: event
                .detail
                .as_deref()
                .map(|detail| mask_numbers_in(detail).into_owned()),
            data: event
                .data
                .as_ref()
                .map(|data| mask_numbers_in(&data.to_string()).into_owned()),
        }
    }
}

/// A call's whole history, for its page.
#[derive(Debug, Clone)]
pub struct HistoryView {
    pub call: CallView,
    pub speaking: Option<&'static str>,
    pub barge_ins: usize,
    pub tool_calls: usize,
    pub events: Vec<EventView>,
    pub lines: Vec<LineView>,
    pub now_ms: i64,
}

impl HistoryView {
    pub fn new(detail: &CallDetail, speaking: Option<Speaking>, now_ms: i64) -> Self {
        let count = |kind: &str| detail.events.iter().filter(|e| e.kind == kind).count();
        Self {
            call: CallView::new(&detail.call, now_ms),
            speaking: speaking.map(Speaking::label),
            barge_ins: count(BARGE_IN),
            tool_calls: count(TOOL_CALL),
            events: detail
                .events
                .iter()
                .map(|event| EventView::new(event, detail.call.created_at_ms))
                .collect(),
            lines: detail.transcript.iter().map(LineView::from).collect(),
            now_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twilio::call::CallStatus;

    fn record() -> CallRecord {
        CallRecord {
            call_sid: "CA1".into(),
            stream_sid: Some("MZ1".into()),
            direction: Some(Direction::Inbound),
            from: "whatsapp:+5511999990000".into(),
            to: "whatsapp:+558551234567".into(),
            agent: Some("support".into()),
            status: CallStatus::InProgress,
            created_at_ms: 1_000,
            answered_at_ms: Some(2_000),
            ended_at_ms: None,
            duration_secs: None,
            end_reason: None,
            openai_session_id: None,
            input_tokens: 0,
            output_tokens: 0,
            total_tokens: 0,
            usage: TokenUsage::default(),
            model: None,
            cost_usd: None,
            latency: CallLatency::default(),
        }
    }

    #[test]
    fn parties_are_masked_and_the_customer_is_whoever_is_not_the_business() {
        let view = CallView::new(&record(), 65_000);
        assert_eq!(view.customer, "+*********0000");
        assert_eq!(view.business, "+********4567");
        assert_eq!(view.channel, "WhatsApp");
        assert!(view.live);
        assert_eq!(view.duration, "1:03");
        let mut outbound = record();
        outbound.direction = Some(Direction::OutboundApi);
        (outbound.from, outbound.to) = (outbound.to.clone(), outbound.from.clone());
        assert_eq!(CallView::new(&outbound, 0).customer, "+*********0000");
    }

    #[test]
    fn cost_and_latency_show_only_when_the_record_has_them() {
        let running = CallView::new(&record(), 0);
        assert_eq!((running.cost, running.latency), (None, None));
        assert!(running.latencies.is_empty() && running.usage.is_empty());
        let mut ended = record();
        ended.cost_usd = Some(32_412);
        ended.latency = CallLatency {
            openai_connect_ms: Some(212),
            first_agent_audio_ms: Some(1180),
            turns: 3,
            turn_p50_ms: Some(640),
            turn_max_ms: Some(1410),
        };
        ended.usage.output_audio_tokens = 1500;
        let view = CallView::new(&ended, 0);
        assert_eq!(view.cost.as_deref(), Some("$0.0324"));
        assert_eq!(view.latency.as_deref(), Some("640 ms (max 1410 ms)"));
        assert_eq!(view.latencies.len(), 5);
        assert_eq!(view.usage, [("audio out", 1500)]);
        ended.latency.turn_p50_ms = None;
        assert_eq!(
            CallView::new(&ended, 0).latency.as_deref(),
            Some("first audio 1180 ms")
        );
        assert_eq!(dollars(0), "$0.0000");
        assert_eq!(dollars(49), "$0.0000");
        assert_eq!(dollars(50), "$0.0001");
        assert_eq!(dollars(12_345_678), "$12.3457");
    }

    #[test]
    fn clock_text_reads_like_a_stopwatch() {
        assert_eq!(clock_text(0), "0:00");
        assert_eq!(clock_text(59_999), "0:59");
        assert_eq!(clock_text(61_000), "1:01");
        assert_eq!(clock_text(3_723_000), "1:02:03");
        assert_eq!(clock_text(-5_000), "0:00");
    }

    #[test]
    fn values_are_html_escaped_in_every_fragment() {
        let mut call = record();
        call.agent = Some("<b>agent</b>".into());
        let live = LiveCalls {
            calls: vec![LiveCall {
                call,
                barge_ins: 0,
                tool_calls: 0,
                lines: vec![StoredLine {
                    sequence: 1,
                    speaker: "caller".into(),
                    text: "<script>alert(1)</script> & \"quotes\"".into(),
                    offset_ms: 0,
                    truncated: false,
                }],
                line_count: 1,
            }],
            total: 1,
        };
        let view = LiveView::new(&live, &[], false, 0);
        let html = LiveFragment { live: &view }.render().unwrap();
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
        assert!(
            html.contains("&#60;script&#62;alert(1)&#60;/script&#62; &#38; &#34;quotes&#34;"),
            "{html}"
        );
        assert!(html.contains("&#60;b&#62;agent&#60;/b&#62;"), "{html}");
    }
}
