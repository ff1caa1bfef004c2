//! Twilio frames both the core's and the driver's tests feed a call.

use serde_json::{Value, json};

pub const STREAM_SID: &str = "MZ0123456789abcdef0123456789abcdef";

/// Twilio's `start`, with the `<Parameter>`s our TwiML sets.
pub fn start_event(account_sid: &str, call_sid: &str, token: &str, direction: &str) -> Value {
    json!({
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": STREAM_SID,
        "start": {
            "accountSid": account_sid,
            "streamSid": STREAM_SID,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": {
                "token": token,
                "from": "whatsapp:+5511999990000",
                "to": "whatsapp:+558551234567",
                "direction": direction
            },
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        }
    })
}
