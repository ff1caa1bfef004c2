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
}
