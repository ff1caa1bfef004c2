//! `X-Twilio-Signature`: HMAC-SHA1 over the URL Twilio requested plus the sorted form parameters
//! (Twilio's webhook security scheme). Pure functions, no I/O, so every official vector is a unit
//! test.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

type HmacSha1 = Hmac<Sha1>;

/// What Twilio signed besides the URL.
#[derive(Clone, Copy, Debug)]
pub enum SignedBody<'a> {
    /// Form parameters (name, value) as received, in any order, duplicates kept.
    Form(&'a [(String, String)]),
    /// A raw JSON body: Twilio puts its SHA-256 in the URL's `bodySHA256` query parameter and
    /// signs the URL alone.
    Json(&'a [u8]),
}

/// Why a request was refused; logged at warn, never with the signature or the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the X-Twilio-Signature header is missing")]
    Missing,
    #[error("the X-Twilio-Signature header is not valid base64")]
    NotBase64,
    #[error("the JSON body does not match the bodySHA256 query parameter")]
    BodyHashMismatch,
    #[error("the signature does not match the URL and parameters")]
    Mismatch,
}

/// The signature Twilio would send for this URL and body, base64-encoded.
pub fn compute(auth_token: &[u8], url: &str, body: SignedBody<'_>) -> String {
    STANDARD.encode(mac_for(auth_token, url, body).finalize().into_bytes())
}

/// Checks `signature` (the header value) in constant time, accepting both the with- and
/// without-default-port forms of `url`, as Twilio's own validators do, because Twilio's
/// signing side is inconsistent about ports.
pub fn validate(
    auth_token: &[u8],
    url: &str,
    body: SignedBody<'_>,
    signature: Option<&str>,
) -> Result<(), SignatureError> {
    let signature = signature.ok_or(SignatureError::Missing)?;
    let expected = STANDARD
        .decode(signature.trim())
        .map_err(|_| SignatureError::NotBase64)?;
    if let SignedBody::Json(raw) = body {
        let declared = query_param(url, "bodySHA256").ok_or(SignatureError::BodyHashMismatch)?;
        let actual = hex_lower(&Sha256::digest(raw));
        if !declared.eq_ignore_ascii_case(&actual) {
            return Err(SignatureError::BodyHashMismatch);
        }
    }
    let candidates = [without_port(url), with_default_port(url)];
    let matched = candidates.iter().any(|candidate| {
        mac_for(auth_token, candidate, body)
            .verify_slice(&expected)
            .is_ok()
    });
    if matched {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

fn mac_for(auth_token: &[u8], url: &str, body: SignedBody<'_>) -> HmacSha1 {
    let mut mac = HmacSha1::new_from_slice(auth_token).expect("HMAC accepts keys of any length");
    mac.update(url.as_bytes());
    if let SignedBody::Form(params) = body {
        let mut sorted: Vec<&(String, String)> = params.iter().collect();
        sorted.sort_unstable();
        for (name, value) in sorted {
            mac.update(name.as_bytes());
            mac.update(value.as_bytes());
        }
    }
    mac
}

/// Splits `scheme://authority/rest` without normalising anything: the signed string must stay
/// byte-for-byte what Twilio saw, so a URL parser that re-encodes paths is not an option here.
fn split_authority(url: &str) -> Option<(&str, &str, &str)> {
    let scheme_end = url.find("://")?;
    let (scheme, after) = (&url[..scheme_end], &url[scheme_end + 3..]);
    let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    Some((scheme, &after[..authority_end], &after[authority_end..]))
}

/// The host part of an authority and whether it carried an explicit port.
fn host_and_port(authority: &str) -> (&str, bool) {
    let host_end = match authority.rfind(':') {
        Some(colon) if !authority[colon..].contains(']') => colon,
        _ => return (authority, false),
    };
    (&authority[..host_end], true)
}

fn default_port(scheme: &str) -> &'static str {
    match scheme {
        "https" | "wss" => "443",
        _ => "80",
    }
}

fn without_port(url: &str) -> String {
    match split_authority(url) {
        Some((scheme, authority, rest)) => {
            let (host, _) = host_and_port(authority);
            format!("{scheme}://{host}{rest}")
        }
        None => url.to_owned(),
    }
}

fn with_default_port(url: &str) -> String {
    match split_authority(url) {
        Some((scheme, authority, rest)) if !host_and_port(authority).1 => {
            format!("{scheme}://{authority}:{}{rest}", default_port(scheme))
        }
        _ => url.to_owned(),
    }
}

fn query_param<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    let query = url.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or(query);
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn hex_lower(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| {
            [
                HEX[usize::from(b >> 4)] as char,
                HEX[usize::from(b & 15)] as char,
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOKEN: &[u8] = b"12345";
    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn official_params() -> Vec<(String, String)> {
        params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ])
    }

    fn check(url: &str, body: SignedBody<'_>, signature: &str) -> Result<(), SignatureError> {
        validate(TOKEN, url, body, Some(signature))
    }

    // The vector of twilio-python's test_request_validator.py.
    #[test]
    fn official_base_vector() {
        let p = official_params();
        assert_eq!(
            compute(TOKEN, URL, SignedBody::Form(&p)),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert_eq!(
            check(URL, SignedBody::Form(&p), "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
            Ok(())
        );
    }

    #[test]
    fn official_vector_accepted_when_our_url_carries_a_port() {
        let p = official_params();
        let url = "https://mycompany.com:1234/myapp.php?foo=1&bar=2";
        assert_eq!(
            check(url, SignedBody::Form(&p), "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
            Ok(())
        );
    }

    #[test]
    fn official_vector_signed_with_default_https_port() {
        let p = official_params();
        let with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        assert_eq!(
            compute(TOKEN, with_port, SignedBody::Form(&p)),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        );
        assert_eq!(
            check(URL, SignedBody::Form(&p), "kvajT1Ptam85bY51eRf/AJRuM3w="),
            Ok(())
        );
        assert_eq!(
            check(
                with_port,
                SignedBody::Form(&p),
                "RSOYDt4T1cUTdK1PDd93/VVr8B8="
            ),
            Ok(())
        );
    }

    #[test]
    fn official_vector_signed_with_default_http_port() {
        let p = official_params();
        let with_port = "http://mycompany.com:80/myapp.php?foo=1&bar=2";
        assert_eq!(
            compute(TOKEN, with_port, SignedBody::Form(&p)),
            "0ZXoZLH/DfblKGATFgpif+LLRf4="
        );
        let without = "http://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            check(
                without,
                SignedBody::Form(&p),
                "0ZXoZLH/DfblKGATFgpif+LLRf4="
            ),
            Ok(())
        );
    }

    #[test]
    fn official_vector_with_a_non_default_port_kept() {
        let p = official_params();
        let url = "http://mycompany.com:1234/myapp.php?foo=1&bar=2";
        assert_eq!(
            compute(TOKEN, url, SignedBody::Form(&p)),
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        );
        assert_eq!(
            check(url, SignedBody::Form(&p), "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),
            Ok(())
        );
    }

    #[test]
    fn official_vector_with_duplicate_keys() {
        let p = params(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
        ]);
        assert_eq!(
            compute(TOKEN, URL, SignedBody::Form(&p)),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        );
        assert_eq!(
            check(URL, SignedBody::Form(&p), "IK+Dwps556ElfBT0I3Rgjkr1wJU="),
            Ok(())
        );
    }

    #[test]
    fn official_vector_with_json_body() {
        let body = br#"{"property": "value", "boolean": true}"#;
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2&bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert_eq!(
            check(url, SignedBody::Json(body), "a9nBmqA0ju/hNViExpshrM61xv4="),
            Ok(())
        );
        let tampered = br#"{"property": "value", "boolean": false}"#;
        assert_eq!(
            check(
                url,
                SignedBody::Json(tampered),
                "a9nBmqA0ju/hNViExpshrM61xv4="
            ),
            Err(SignatureError::BodyHashMismatch)
        );
        assert_eq!(
            check(URL, SignedBody::Json(body), "a9nBmqA0ju/hNViExpshrM61xv4="),
            Err(SignatureError::BodyHashMismatch)
        );
    }

    #[test]
    fn our_websocket_vector() {
        let url = "wss://example.com/stream";
        assert_eq!(
            compute(TOKEN, url, SignedBody::Form(&[])),
            "KG4JbhDlv15BMlxSTOWKt9btbgg="
        );
        let with_port = "wss://example.com:443/stream";
        let signature = compute(TOKEN, with_port, SignedBody::Form(&[]));
        assert_eq!(check(url, SignedBody::Form(&[]), &signature), Ok(()));
    }

    #[test]
    fn missing_or_garbled_headers_are_refused() {
        let p = official_params();
        assert_eq!(
            validate(TOKEN, URL, SignedBody::Form(&p), None),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            check(URL, SignedBody::Form(&p), "not base64!"),
            Err(SignatureError::NotBase64)
        );
        assert_eq!(
            check(URL, SignedBody::Form(&p), ""),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            validate(
                b"54321",
                URL,
                SignedBody::Form(&p),
                Some("RSOYDt4T1cUTdK1PDd93/VVr8B8=")
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn port_helpers_handle_ipv6_and_bare_hosts() {
        assert_eq!(
            without_port("http://[::1]:8080/voice"),
            "http://[::1]/voice"
        );
        assert_eq!(
            with_default_port("http://[::1]/voice"),
            "http://[::1]:80/voice"
        );
        assert_eq!(
            with_default_port("https://a.example?x=1"),
            "https://a.example:443?x=1"
        );
        assert_eq!(without_port("not a url"), "not a url");
    }

    fn arb_params() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec(("[A-Za-z]{1,12}", "[ -~]{0,24}"), 0..8)
    }

    proptest! {
        #[test]
        fn sign_then_validate_round_trips(path in "/[a-z/]{0,20}", p in arb_params()) {
            let url = format!("https://example.com{path}");
            let sig = compute(TOKEN, &url, SignedBody::Form(&p));
            prop_assert_eq!(check(&url, SignedBody::Form(&p), &sig), Ok(()));
        }

        #[test]
        fn parameter_order_does_not_matter(p in arb_params(), seed in any::<u64>()) {
            let url = "https://example.com/voice";
            let sig = compute(TOKEN, url, SignedBody::Form(&p));
            let mut shuffled = p.clone();
            let n = shuffled.len();
            if n > 1 {
                shuffled.rotate_left(usize::try_from(seed % n as u64).expect("below n"));
                shuffled.swap(0, n - 1);
            }
            prop_assert_eq!(check(url, SignedBody::Form(&shuffled), &sig), Ok(()));
        }

        #[test]
        fn any_changed_url_byte_fails(p in arb_params(), index in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let url = "https://example.com/voice/status?x=1";
            let sig = compute(TOKEN, url, SignedBody::Form(&p));
            let mut bytes = url.as_bytes().to_vec();
            let i = index.index(bytes.len());
            bytes[i] ^= flip;
            let changed = String::from_utf8_lossy(&bytes).into_owned();
            // Adding or removing a default port is the one change Twilio tolerates by design.
            prop_assume!(without_port(&changed) != without_port(url) || changed == url);
            prop_assert_eq!(check(&changed, SignedBody::Form(&p), &sig), Err(SignatureError::Mismatch));
        }

        #[test]
        fn any_changed_param_fails(p in arb_params().prop_filter("non-empty", |p| !p.is_empty()),
                                   index in any::<prop::sample::Index>(), extra in "[a-z0-9]{1,4}", in_name in any::<bool>()) {
            let url = "https://example.com/voice";
            let sig = compute(TOKEN, url, SignedBody::Form(&p));
            let mut changed = p.clone();
            let i = index.index(changed.len());
            if in_name { changed[i].0.push_str(&extra) } else { changed[i].1.push_str(&extra) }
            prop_assert_eq!(check(url, SignedBody::Form(&changed), &sig), Err(SignatureError::Mismatch));
        }

        #[test]
        fn an_added_or_removed_param_fails(p in arb_params(), name in "[A-Z][a-z]{1,8}", value in "[a-z0-9]{0,6}") {
            let url = "https://example.com/voice";
            let sig = compute(TOKEN, url, SignedBody::Form(&p));
            let mut added = p.clone();
            added.push((name, value));
            prop_assert_eq!(check(url, SignedBody::Form(&added), &sig), Err(SignatureError::Mismatch));
            if !p.is_empty() {
                let removed = &p[1..];
                prop_assert_eq!(check(url, SignedBody::Form(removed), &sig), Err(SignatureError::Mismatch));
            }
        }

        #[test]
        fn any_changed_signature_byte_fails(p in arb_params(), index in 0usize..20, flip in 1u8..=255) {
            let url = "https://example.com/voice";
            let sig = compute(TOKEN, url, SignedBody::Form(&p));
            let mut raw = STANDARD.decode(&sig).unwrap();
            raw[index] ^= flip;
            prop_assert_eq!(check(url, SignedBody::Form(&p), &STANDARD.encode(raw)), Err(SignatureError::Mismatch));
        }
    }
}
