//! The HS256 signer, hand-rolled from `hmac`, `sha2` and `base64` (RFC 7515, RFC 7519).
//!
//! Everything that does not depend on the clock (the encoded header, the keyed HMAC state) is
//! computed once, so minting a token is one small `format` and one HMAC over ~150 bytes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The registered time claims of a token, in UNIX seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

/// Mints compact HS256 JWS tokens for one key id and secret.
#[derive(Clone)]
pub struct Signer {
    /// `base64url(header) "."`, ready to be extended with the payload.
    header_dot: String,
    /// The HMAC state after absorbing the key; cloned per token instead of re-keying.
    mac: Hmac<Sha256>,
}

impl Signer {
    /// `secret` is used as raw bytes: CM.com's secrets are not base64-decoded first.
    pub fn new(key_id: &str, secret: &[u8]) -> Self {
        // serde_json escapes the key id exactly as JSON requires (quotes, backslashes, controls).
        let kid = serde_json::to_string(key_id).expect("a str always serialises");
        let header = format!(r#"{{"alg":"HS256","typ":"JWT","kid":{kid}}}"#);
        let mut header_dot = URL_SAFE_NO_PAD.encode(header);
        header_dot.push('.');
        let mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
        Self { header_dot, mac }
    }

    /// Returns `header.payload.signature`, the payload being exactly
    /// `{"iat":<n>,"nbf":<n>,"exp":<n>}`.
    pub fn sign(&self, claims: Claims) -> String {
        let Claims { iat, nbf, exp } = claims;
        let payload = format!(r#"{{"iat":{iat},"nbf":{nbf},"exp":{exp}}}"#);

        // 43 = the length of an unpadded base64url SHA-256 MAC.
        let mut token = String::with_capacity(self.header_dot.len() + payload.len() * 4 / 3 + 48);
        token.push_str(&self.header_dot);
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);

        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), &mut token);
        token
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};

    const KEY_ID: &str = "3b438437-04a4-40bb-8389-54bb02766fba";
    const SECRET: &str = "AC4Etykn7jusGR5FwLDAtILtQbiQbTMKedP31szXg4WlSbjGEXyNMZ";

    fn claims(iat: u64, exp: u64) -> Claims {
        Claims { iat, nbf: iat, exp }
    }

    #[test]
    fn matches_the_reference_vector() {
        let token = Signer::new(KEY_ID, SECRET.as_bytes()).sign(claims(1704067200, 1704067260));
        assert_eq!(
            token,
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6IjNiNDM4NDM3LTA0YTQtNDBiYi04Mzg5LTU0YmIwMjc2NmZiYSJ9.\
             eyJpYXQiOjE3MDQwNjcyMDAsIm5iZiI6MTcwNDA2NzIwMCwiZXhwIjoxNzA0MDY3MjYwfQ.\
             3htbVOTgyRG1ivmF10YTWe14lAj1t9pwB7k1cPN_8ks"
        );
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Decoded {
        iat: u64,
        nbf: u64,
        exp: u64,
    }

    /// Checks a token with an independent implementation (the `jsonwebtoken` crate).
    fn verify(token: &str, secret: &[u8]) -> jsonwebtoken::errors::Result<Decoded> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        decode::<Decoded>(token, &DecodingKey::from_secret(secret), &validation).map(|d| d.claims)
    }

    #[test]
    fn independent_verifier_accepts_our_tokens() {
        let c = Claims {
            iat: 1_800_000_000,
            nbf: 1_799_999_995,
            exp: 1_800_000_060,
        };
        let token = Signer::new(KEY_ID, SECRET.as_bytes()).sign(c);
        let decoded = verify(&token, SECRET.as_bytes()).expect("valid token");
        assert_eq!(
            decoded,
            Decoded {
                iat: c.iat,
                nbf: c.nbf,
                exp: c.exp
            }
        );
        let header = decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(KEY_ID));
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.alg, Algorithm::HS256);
    }

    #[test]
    fn independent_verifier_rejects_another_secret() {
        let token = Signer::new(KEY_ID, b"one secret").sign(claims(1, 61));
        assert!(verify(&token, b"another secret").is_err());
    }

    #[test]
    fn key_id_is_json_escaped() {
        for kid in [
            "a\"b",
            "back\\slash",
            "line\nbreak\u{1}",
            "ünïcødé ✓",
            "</script>",
        ] {
            let token = Signer::new(kid, b"s").sign(claims(1, 61));
            assert_eq!(
                decode_header(&token).unwrap().kid.as_deref(),
                Some(kid),
                "kid {kid:?}"
            );
            verify(&token, b"s").expect("valid token");
        }
    }

    #[test]
    fn secret_is_used_as_raw_bytes_not_base64() {
        // "c2VjcmV0" is base64 for "secret": a signer that decoded it would match the second.
        let raw = Signer::new("k", b"c2VjcmV0").sign(claims(1, 61));
        assert!(verify(&raw, b"c2VjcmV0").is_ok());
        assert!(verify(&raw, b"secret").is_err());
    }

    #[test]
    fn debug_shows_no_key_material() {
        let signer = Signer::new(KEY_ID, SECRET.as_bytes());
        let debug = format!("{signer:?}");
        // Exactly this: it says what it is, and nothing of the key.
        assert_eq!(debug, "Signer { .. }");
        assert!(
            !debug.contains(SECRET) && !debug.contains("AC4E"),
            "{debug}"
        );
    }
}
