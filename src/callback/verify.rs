//! The signature CM.com puts on its callbacks (fact sheet §4.3): `Authorization: HMAC <sig>`,
//! where `sig` is the standard, padded base64 of HMAC-SHA256 over the raw body bytes, keyed with
//! the secret's UTF-8 bytes: the secret the tokens are signed with.
//!
//! After a rotation the previous secret is still accepted for `callback.previous_secret_grace`:
//! CM.com may go on signing with the old one for a while, and callbacks already in its retry
//! queue were signed with it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::ProxyError;
use crate::token::Clock;

/// An HMAC-SHA256 digest.
const SIGNATURE_BYTES: usize = 32;
/// Its standard base64, padded.
const ENCODED_BYTES: usize = 44;

/// Why a callback's signature was refused. Never carries the signature itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the callback carries no Authorization header")]
    Missing,
    #[error("the callback's Authorization is not HMAC followed by the base64 of 32 bytes")]
    Malformed,
    #[error("the callback's signature does not match its body")]
    Mismatch,
}

impl SignatureError {
    /// The metric label of each, in `callbacks_refused_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing_signature",
            Self::Malformed => "malformed_signature",
            Self::Mismatch => "bad_signature",
        }
    }
}

impl From<SignatureError> for ProxyError {
    fn from(error: SignatureError) -> Self {
        Self::CallbackSignature {
            reason: error.reason(),
            message: error.to_string(),
        }
    }
}

/// The digest in an `Authorization` value: the scheme `HMAC`, in any case (RFC 9110 §11.1), one
/// or more spaces, then exactly the padded standard base64 of 32 bytes. Anything else, a
/// `Bearer` token or URL-safe base64 included, is malformed.
pub fn parse_authorization(value: &[u8]) -> Result<[u8; SIGNATURE_BYTES], SignatureError> {
    let (scheme, rest) = value.split_at_checked(4).ok_or(SignatureError::Malformed)?;
    if !scheme.eq_ignore_ascii_case(b"HMAC") || rest.first() != Some(&b' ') {
        return Err(SignatureError::Malformed);
    }
    let encoded = rest.trim_ascii_start();
    if encoded.len() != ENCODED_BYTES {
        return Err(SignatureError::Malformed);
    }
    // base64 sizes its output conservatively (33 bytes for 44 characters).
    let mut digest = [0; SIGNATURE_BYTES + 3];
    match STANDARD.decode_slice(encoded, &mut digest) {
        Ok(SIGNATURE_BYTES) => Ok(digest[..SIGNATURE_BYTES].try_into().expect("32 bytes")),
        _ => Err(SignatureError::Malformed),
    }
}

/// Which secret a callback was signed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignedWith {
    Current,
    /// The one before the last rotation, within its grace period.
    Previous,
}

impl SignedWith {
    /// The metric label, in `callbacks_verified_total{secret}`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Previous => "previous",
        }
    }
}

/// The keys callbacks are checked against, keyed once (the HMAC's padded key blocks), cloned per
/// callback.
struct Keys {
    current: Hmac<Sha256>,
    /// The previous key and when (on the clock) it stops being accepted.
    previous: Option<(Hmac<Sha256>, Duration)>,
}

/// Checks callbacks against the current secret, and the previous one during its grace period.
pub struct Verifier {
    keys: ArcSwap<Keys>,
    grace: Duration,
    clock: Arc<dyn Clock>,
}

impl Verifier {
    pub fn new(secret: &[u8], grace: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            keys: ArcSwap::from_pointee(Keys {
                current: key(secret),
                previous: None,
            }),
            grace,
            clock,
        }
    }

    /// The secret changed: it signs from now on, and the one it replaces is accepted for the
    /// grace period. Called by the credentials' reloader, the only writer.
    pub fn rotate(&self, secret: &[u8]) {
        let old = self.keys.load();
        let previous =
            (!self.grace.is_zero()).then(|| (old.current.clone(), self.clock.now() + self.grace));
        self.keys.store(Arc::new(Keys {
            current: key(secret),
            previous,
        }));
    }

    /// Checks `authorization` against `body`, in constant time for each key tried.
    pub fn verify(
        &self,
        authorization: Option<&[u8]>,
        body: &[u8],
    ) -> Result<SignedWith, SignatureError> {
        let signature = parse_authorization(authorization.ok_or(SignatureError::Missing)?)?;
        let keys = self.keys.load();
        let matches = |key: &Hmac<Sha256>| {
            let mut mac = key.clone();
            mac.update(body);
            // `verify_slice` compares in constant time (subtle).
            mac.verify_slice(&signature).is_ok()
        };
        if matches(&keys.current) {
            return Ok(SignedWith::Current);
        }
        match &keys.previous {
            Some((key, until)) if self.clock.now() < *until && matches(key) => {
                Ok(SignedWith::Previous)
            }
            _ => Err(SignatureError::Mismatch),
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("Verifier")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

fn key(secret: &[u8]) -> Hmac<Sha256> {
    Hmac::new_from_slice(secret).expect("HMAC takes a key of any length")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Computed with python3 at authoring time, not with this crate:
    /// `base64.b64encode(hmac.new(secret, body, hashlib.sha256).digest())`.
    const SECRET: &[u8] = b"AC4Etykn7jusGR5FwLDAtILtQbiQbTMKedP31szXg4WlSbjGEXyNMZ";
    const BODY: &[u8] = br#"{"id":"58128784-9e8d-4424-a89d-08bfe273381c","type":"numberVerify.state","numberVerify":{"id":"0662f56b-13e0-4b64-b7ed-7ca75516fb85","state":"completed","match":true},"created":"2024-01-01T00:00:00+00:00"}"#;
    const SIGNATURE: &str = "jVnHHR8BzMzEC6aCK13Ch/PkqgFPhptnyEoxfPdPiOo=";
    const OTHER_SECRET: &[u8] = b"the-next-secret";
    const OTHER_SIGNATURE: &str = "cuYBtPGMBFMqIqBrd/ZCsNb4ntvQkyz4taZGQZSh6sk=";

    struct ManualClock(AtomicU64);

    impl Clock for ManualClock {
        fn now(&self) -> Duration {
            Duration::from_secs(self.0.load(Ordering::SeqCst))
        }
    }

    fn header(signature: &str) -> Vec<u8> {
        format!("HMAC {signature}").into_bytes()
    }

    #[test]
    fn accepts_the_signature_an_independent_implementation_computed() {
        let verifier = Verifier::new(SECRET, Duration::ZERO, Arc::new(ManualClock(0.into())));
        let signed = verifier.verify(Some(&header(SIGNATURE)), BODY);
        assert_eq!(signed, Ok(SignedWith::Current));
        let mut tampered = BODY.to_vec();
        tampered[10] ^= 1;
        assert_eq!(
            verifier.verify(Some(&header(SIGNATURE)), &tampered),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verifier.verify(None, BODY), Err(SignatureError::Missing));
        // CM.com's published example value is a placeholder (fact sheet §4.3).
        assert_eq!(
            verifier.verify(
                Some(b"HMAC MIi9ZMyar2v+o7H7LD7oNolO5LrTJaC+8uKvYUGqJvM="),
                BODY
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn the_header_must_be_hmac_and_32_bytes_of_padded_standard_base64() {
        let valid = parse_authorization(&header(SIGNATURE)).unwrap();
        assert_eq!(
            parse_authorization(format!("hmac   {SIGNATURE}").as_bytes()),
            Ok(valid)
        );
        for bad in [
            String::new(),
            "HMAC".into(),
            "HMAC ".into(),
            format!("HMAC{SIGNATURE}"),
            format!("Bearer {SIGNATURE}"),
            format!("HMACX {SIGNATURE}"),
            format!("HMAC {}", SIGNATURE.trim_end_matches('=')),
            format!("HMAC {SIGNATURE}="),
            format!("HMAC {SIGNATURE} "),
            format!("HMAC {}", SIGNATURE.replace('+', "-").replace('/', "_")),
            // 33 bytes, then 31: the right length of text, the wrong one of digest.
            format!("HMAC {}", "A".repeat(44)),
            format!("HMAC {}==", "A".repeat(42)),
        ] {
            assert_eq!(
                parse_authorization(bad.as_bytes()),
                Err(SignatureError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_previous_secret_passes_only_within_its_grace_period() {
        let clock = Arc::new(ManualClock(1_000.into()));
        let verifier = Verifier::new(SECRET, Duration::from_secs(300), clock.clone());
        verifier.rotate(OTHER_SECRET);
        assert_eq!(
            verifier.verify(Some(&header(OTHER_SIGNATURE)), BODY),
            Ok(SignedWith::Current)
        );
        assert_eq!(
            verifier.verify(Some(&header(SIGNATURE)), BODY),
            Ok(SignedWith::Previous)
        );
        clock.0.store(1_299, Ordering::SeqCst);
        assert_eq!(
            verifier.verify(Some(&header(SIGNATURE)), BODY),
            Ok(SignedWith::Previous)
        );
        clock.0.store(1_300, Ordering::SeqCst);
        assert_eq!(
            verifier.verify(Some(&header(SIGNATURE)), BODY),
            Err(SignatureError::Mismatch)
        );
        // A second rotation forgets the first secret at once.
        clock.0.store(1_000, Ordering::SeqCst);
        verifier.rotate(b"a third one");
        assert_eq!(
            verifier.verify(Some(&header(SIGNATURE)), BODY),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn debug_shows_the_grace_period_and_no_key() {
        let grace = Duration::from_secs(300);
        let verifier = Verifier::new(SECRET, grace, Arc::new(ManualClock(0.into())));
        assert_eq!(format!("{verifier:?}"), "Verifier { grace: 300s, .. }");
    }
}
