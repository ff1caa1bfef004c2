//! Phone numbers as Twilio sends them: `+E164` for PSTN legs, `whatsapp:+E164` for WhatsApp calls.

use std::fmt;

/// A number in E.164 form: `+` then 8 to 15 digits, the first not zero.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct E164(String);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("not an E.164 number: expected '+' followed by 8 to 15 digits")]
pub struct InvalidPhoneNumber;

impl E164 {
    pub fn parse(raw: &str) -> Result<Self, InvalidPhoneNumber> {
        let digits = raw.strip_prefix('+').ok_or(InvalidPhoneNumber)?;
        let valid = (8..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidPhoneNumber)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A call party as Twilio names it in webhooks (`From`/`To`): `whatsapp:+E164` for
    /// WhatsApp legs, `+E164` for phone legs.
    pub fn from_address(raw: &str) -> Result<Self, InvalidPhoneNumber> {
        Self::parse(raw.strip_prefix("whatsapp:").unwrap_or(raw))
    }

    /// The address Twilio expects for WhatsApp legs and messages.
    pub fn whatsapp_address(&self) -> String {
        format!("whatsapp:{}", self.0)
    }
}

impl fmt::Display for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Displays an address with all but the last four digits hidden, so logs identify a caller to
/// someone who already knows the number without exposing it to everyone who reads the logs.
pub struct Masked<'a>(pub &'a str);

impl fmt::Display for Masked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digit_count = self.0.bytes().filter(u8::is_ascii_digit).count();
        let mut digits_seen = 0;
        for c in self.0.chars() {
            if c.is_ascii_digit() {
                digits_seen += 1;
                if digit_count - digits_seen >= 4 {
                    f.write_str("*")?;
                    continue;
                }
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Masked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Hides every phone-number-like run in free text the way [`Masked`] hides an address: a run
/// of at least [`NUMBER_DIGITS`] digits, which may be split by single spaces, dashes, dots or
/// parentheses (`+55 11 99999-0000`), keeps only its last four digits. People read numbers out
/// in transcripts and key them in, and tools echo them, so a page that shows such text would
/// otherwise show the very numbers the call's own record hides. Shorter runs (an order number,
/// a time, a price) stay as they are.
pub fn mask_numbers_in(text: &str) -> std::borrow::Cow<'_, str> {
    let runs = digit_runs(text);
    if runs.is_empty() {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut masked = String::with_capacity(text.len());
    let mut copied = 0;
    for (start, end) in runs {
        masked.push_str(&text[copied..start]);
        masked.push_str(&Masked(&text[start..end]).to_string());
        copied = end;
    }
    masked.push_str(&text[copied..]);
    std::borrow::Cow::Owned(masked)
}

/// The fewest digits a run must have to be taken for a phone number: E.164 numbers have 8 to
/// 15 (see [`E164::parse`]).
pub const NUMBER_DIGITS: usize = 8;

/// Byte ranges of the runs [`mask_numbers_in`] hides: digits joined by at most one separator
/// between any two of them, with at least `NUMBER_DIGITS` digits in all.
fn digit_runs(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        let mut end = i;
        let mut digits = 0;
        let mut j = i;
        while j < bytes.len() {
            if bytes[j].is_ascii_digit() {
                digits += 1;
                j += 1;
                end = j;
            } else if matches!(bytes[j], b' ' | b'-' | b'.' | b'(' | b')')
                && bytes.get(j + 1).is_some_and(u8::is_ascii_digit)
            {
                j += 1;
            } else {
                break;
            }
        }
        if digits >= NUMBER_DIGITS {
            runs.push((start, end));
        }
        i = end.max(i + 1);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_address_forms() {
        let wa = E164::from_address("whatsapp:+5511999990000").unwrap();
        assert_eq!(wa.as_str(), "+5511999990000");
        let pstn = E164::from_address("+14158675309").unwrap();
        assert_eq!(pstn.whatsapp_address(), "whatsapp:+14158675309");
    }

    #[test]
    fn rejects_non_e164() {
        for bad in [
            "",
            "+",
            "14158675309",
            "+1234567",
            "+1234567890123456",
            "+0123456789",
            "+1415abc5309",
            "whatsapp:14158675309",
            "client:alice",
        ] {
            assert!(E164::from_address(bad).is_err(), "{bad} accepted");
        }
        assert!(E164::parse("+12345678").is_ok());
        assert!(E164::parse("+123456789012345").is_ok());
    }

    #[test]
    fn masking_keeps_the_last_four_digits() {
        assert_eq!(
            Masked("whatsapp:+5511999990000").to_string(),
            "whatsapp:+*********0000"
        );
        assert_eq!(Masked("+14158675309").to_string(), "+*******5309");
        assert_eq!(Masked("123").to_string(), "123");
        assert_eq!(Masked("client:alice").to_string(), "client:alice");
    }

    #[test]
    fn numbers_in_free_text_are_masked_and_short_runs_kept() {
        assert_eq!(
            mask_numbers_in("call me on +55 11 99999-0000 please"),
            "call me on +** ** *****-0000 please"
        );
        assert_eq!(
            mask_numbers_in("whatsapp:+5511999990000 and 14158675309"),
            "whatsapp:+*********0000 and *******5309"
        );
        assert_eq!(
            mask_numbers_in("order 4411, at 10.30, costs 1 234.50"),
            "order 4411, at 10.30, costs 1 234.50"
        );
        // Two separators in a row end a run: a list of short numbers is not one long one.
        assert_eq!(mask_numbers_in("1234, 5678"), "1234, 5678");
        assert_eq!(
            mask_numbers_in("pressed: 1 2 3 4 5 6 7 8"),
            "pressed: * * * * 5 6 7 8"
        );
        assert!(matches!(
            mask_numbers_in("nothing to hide"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(mask_numbers_in("ação 12345678é"), "ação ****5678é");
    }
}
