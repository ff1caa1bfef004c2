//! Twilio's resource identifiers (SIDs), parsed where a request enters: two letters naming the
//! kind of resource, then 32 hex digits, 34 characters in all.
//!
//! Why strictly: `X-Twilio-Signature` joins the sorted parameter names and values with no
//! separator, so whoever holds one signed request can move text across the boundary between a
//! value and the next name (or swallow the next parameter into a value) without changing the
//! signature. A field that took any string could be rewritten that way. A SID has a fixed length
//! and alphabet and is preceded by its own fixed name, so every such shift leaves it malformed:
//! the request fails to parse and is refused.
//!
//! Hand-written because the rule is one length and one alphabet check; no crate models Twilio's
//! SIDs.

use std::fmt;
use std::marker::PhantomData;

use serde::{Deserialize, Deserializer};

/// Every Twilio SID: a two-letter prefix and 32 hex digits.
const SID_LEN: usize = 34;

/// The kind of resource a SID names: the prefixes Twilio gives it and what errors call it.
pub trait SidKind {
    const NAME: &'static str;
    const PREFIXES: &'static [&'static str];
}

/// The marker types behind the SID aliases below.
pub mod kind {
    use super::SidKind;

    #[derive(Debug)]
    pub enum Account {}
    #[derive(Debug)]
    pub enum Call {}
    #[derive(Debug)]
    pub enum Content {}
    #[derive(Debug)]
    pub enum Message {}
    #[derive(Debug)]
    pub enum Stream {}

    impl SidKind for Account {
        const NAME: &'static str = "AccountSid";
        const PREFIXES: &'static [&'static str] = &["AC"];
    }

    impl SidKind for Call {
        const NAME: &'static str = "CallSid";
        const PREFIXES: &'static [&'static str] = &["CA"];
    }

    impl SidKind for Content {
        const NAME: &'static str = "ContentSid";
        const PREFIXES: &'static [&'static str] = &["HX"];
    }

    /// WhatsApp and SMS messages are `SM…`; messages with media or content templates may be `MM…`.
    impl SidKind for Message {
        const NAME: &'static str = "MessageSid";
        const PREFIXES: &'static [&'static str] = &["SM", "MM"];
    }

    impl SidKind for Stream {
        const NAME: &'static str = "StreamSid";
        const PREFIXES: &'static [&'static str] = &["MZ"];
    }
}

pub type AccountSid = Sid<kind::Account>;
pub type CallSid = Sid<kind::Call>;
pub type ContentSid = Sid<kind::Content>;
pub type MessageSid = Sid<kind::Message>;
pub type StreamSid = Sid<kind::Stream>;

/// A well-formed SID of kind `K`, kept exactly as Twilio wrote it.
pub struct Sid<K>(String, PhantomData<K>);

/// Says what was expected, never the rejected text: it may be a folded request's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidSid {
    kind: &'static str,
    prefixes: &'static [&'static str],
}

impl fmt::Display for InvalidSid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not a Twilio {} ({} followed by 32 hex digits)",
            self.kind,
            self.prefixes.join(" or ")
        )
    }
}

impl std::error::Error for InvalidSid {}

impl<K: SidKind> Sid<K> {
    pub fn parse(raw: &str) -> Result<Self, InvalidSid> {
        Self::from_string(raw.to_owned())
    }

    fn from_string(raw: String) -> Result<Self, InvalidSid> {
        let well_formed = raw.len() == SID_LEN
            && K::PREFIXES.iter().any(|prefix| raw.starts_with(prefix))
            && raw.as_bytes()[2..].iter().all(u8::is_ascii_hexdigit);
        if well_formed {
            Ok(Self(raw, PhantomData))
        } else {
            Err(InvalidSid {
                kind: K::NAME,
                prefixes: K::PREFIXES,
            })
        }
    }
}

impl<K> Sid<K> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<K> From<Sid<K>> for String {
    fn from(sid: Sid<K>) -> Self {
        sid.0
    }
}

impl<'de, K: SidKind> Deserialize<'de> for Sid<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::from_string(raw).map_err(serde::de::Error::custom)
    }
}

impl<K> fmt::Display for Sid<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<K: SidKind> fmt::Debug for Sid<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({:?})", K::NAME, self.0)
    }
}

// Written out rather than derived: a derive would demand the same traits of the marker `K`.
impl<K> Clone for Sid<K> {
    fn clone(&self) -> Self {
        Self(self.0.clone(), PhantomData)
    }
}

impl<K> PartialEq for Sid<K> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<K> Eq for Sid<K> {}

impl<K> std::hash::Hash for Sid<K> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn each_kind_takes_its_prefix_and_32_hex_digits() {
        assert_eq!(
            CallSid::parse(&format!("CA{HEX}")).unwrap().as_str(),
            format!("CA{HEX}")
        );
        assert!(AccountSid::parse(&format!("AC{HEX}")).is_ok());
        assert!(ContentSid::parse(&format!("HX{HEX}")).is_ok());
        assert!(MessageSid::parse(&format!("SM{HEX}")).is_ok());
        assert!(MessageSid::parse(&format!("MM{HEX}")).is_ok());
        assert!(StreamSid::parse(&format!("MZ{HEX}")).is_ok());
        assert!(CallSid::parse(&format!("CA{}", HEX.to_uppercase())).is_ok());
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            String::new(),
            "CA".into(),
            "CA1".into(),
            format!("CA{}", &HEX[1..]),
            format!("CA{HEX}0"),
            format!("CA{HEX}CallStatusringing"),
            format!("AC{HEX}"),
            format!("ca{HEX}"),
            format!("CA{}g", &HEX[1..]),
            format!("CA{} ", &HEX[1..]),
            format!(" CA{}", &HEX[1..]),
            format!("CA{}é", &HEX[2..]),
        ] {
            assert!(CallSid::parse(&bad).is_err(), "{bad:?} accepted");
        }
        assert!(MessageSid::parse(&format!("SZ{HEX}")).is_err());
        assert!(StreamSid::parse(&format!("CA{HEX}")).is_err());
    }

    #[test]
    fn errors_say_what_was_expected_and_not_what_was_sent() {
        let error = MessageSid::parse("SM_secret-payload").unwrap_err();
        assert_eq!(
            error.to_string(),
            "not a Twilio MessageSid (SM or MM followed by 32 hex digits)"
        );
        let error = serde_json::from_str::<CallSid>(r#""CA_secret-payload""#).unwrap_err();
        assert!(!error.to_string().contains("secret"), "{error}");
        assert!(error.to_string().contains("CallSid"), "{error}");
    }

    #[test]
    fn deserializes_from_forms_and_json() {
        #[derive(Deserialize)]
        struct Form {
            #[serde(rename = "CallSid")]
            call_sid: CallSid,
        }
        let form: Form = serde_urlencoded::from_str(&format!("CallSid=CA{HEX}")).unwrap();
        assert_eq!(form.call_sid.to_string(), format!("CA{HEX}"));
        assert!(serde_urlencoded::from_str::<Form>("CallSid=CA1").is_err());
        let escaped: StreamSid = serde_json::from_str(&format!(r#""\u004dZ{HEX}""#)).unwrap();
        assert_eq!(escaped.as_str(), format!("MZ{HEX}"));
        assert!(serde_json::from_str::<StreamSid>("17").is_err());
    }

    proptest! {
        #[test]
        fn a_valid_sid_round_trips(hex in "[0-9a-fA-F]{32}") {
            let raw = format!("CA{hex}");
            let sid = CallSid::parse(&raw).unwrap();
            prop_assert_eq!(sid.as_str(), raw.as_str());
            prop_assert_eq!(String::from(sid), raw);
        }

        /// Whatever text a folded request moves onto the end of a SID, or takes off it, the
        /// result is refused.
        #[test]
        fn a_sid_with_text_moved_on_or_off_its_end_is_refused(
            hex in "[0-9a-f]{32}",
            extra in ".{1,40}",
            cut in 1usize..34,
        ) {
            let sid = format!("CA{hex}");
            let longer = sid.clone() + &extra;
            prop_assert!(CallSid::parse(&longer).is_err());
            prop_assert!(CallSid::parse(&sid[..sid.len() - cut]).is_err());
        }

        #[test]
        fn parse_never_panics(raw in ".{0,64}") {
            let _ = CallSid::parse(&raw);
            let _ = MessageSid::parse(&raw);
        }
    }
}
