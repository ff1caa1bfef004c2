//! Writing the two per-frame messages (`input_audio_buffer.append`, Twilio `media`) by hand:
//! they are a fixed shape around one base64 string, which never needs escaping, so a byte scan
//! and a copy replace serde's serializer on the hot path. Anything that does need escaping
//! (a hostile peer can send anything) still goes through serde_json's escaper.

use std::fmt;

/// Appends `value` as the inside of a JSON string literal (without the quotes).
pub fn push_str_content(out: &mut String, value: &str) {
    if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push_str(value);
    } else {
        let quoted = serde_json::to_string(value).expect("a str always serialises");
        out.push_str(&quoted[1..quoted.len() - 1]);
    }
}

/// Appends `value`'s `Display` output as the inside of a JSON string literal.
pub fn push_display_content(out: &mut String, value: impl fmt::Display) {
    struct Escaping<'a>(&'a mut String);
    impl fmt::Write for Escaping<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            push_str_content(self.0, s);
            Ok(())
        }
    }
    fmt::Write::write_fmt(&mut Escaping(out), format_args!("{value}"))
        .expect("writing to a String cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn quoted(value: &str) -> String {
        let mut out = String::from("\"");
        push_str_content(&mut out, value);
        out.push('"');
        out
    }

    #[test]
    fn base64_is_copied_and_anything_else_is_escaped() {
        assert_eq!(quoted("//7+/g=="), "\"//7+/g==\"");
        assert_eq!(quoted("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
        let mut out = String::new();
        push_display_content(&mut out, format_args!("m{}\"", 7));
        assert_eq!(out, "m7\\\"");
    }

    proptest! {
        #[test]
        fn agrees_with_serde_json(value in ".*") {
            prop_assert_eq!(quoted(&value), serde_json::to_string(&value).unwrap());
        }
    }
}
