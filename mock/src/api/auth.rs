//! Bearer-token verification, independent of the proxy's hand-rolled signer: `jsonwebtoken`
//! checks the signature and the time claims, so the two implementations cross-check each other.

use std::fmt;

use http::{header::AUTHORIZATION, HeaderMap};
use jsonwebtoken::{
    decode, decode_header, errors::ErrorKind, get_current_timestamp, Algorithm, DecodingKey,
    Validation,
};
use serde_json::{Map, Value};

/// Why a request's credentials were refused. The messages are part of the documented API and
/// never include the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenError {
    MissingBearer,
    MultipleAuthorization,
    Malformed,
    UnsupportedAlgorithm,
    InvalidType,
    MissingKid,
    UnknownKid,
    InvalidSignature,
    MissingClaim(&'static str),
    InvalidClaim(&'static str),
    InvalidAudience,
    Expired,
    NotYetValid,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingBearer => f.write_str("missing bearer token"),
            Self::MultipleAuthorization => f.write_str("multiple authorization headers"),
            Self::Malformed => f.write_str("malformed token"),
            Self::UnsupportedAlgorithm => f.write_str("unsupported algorithm"),
            Self::InvalidType => f.write_str("invalid token type"),
            Self::MissingKid => f.write_str("missing kid"),
            Self::UnknownKid => f.write_str("unknown kid"),
            Self::InvalidSignature => f.write_str("invalid signature"),
            Self::MissingClaim(claim) => write!(f, "missing claim: {claim}"),
            Self::InvalidClaim(claim) => write!(f, "invalid claim: {claim}"),
            Self::InvalidAudience => f.write_str("invalid audience"),
            Self::Expired => f.write_str("token expired"),
            Self::NotYetValid => f.write_str("token not yet valid"),
        }
    }
}

/// Checks `Authorization` headers against one key id and secret.
pub(crate) struct Verifier {
    key_id: String,
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub(crate) fn new(key_id: String, secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "nbf"]);
        validation.validate_nbf = true;
        // The default 60 s would accept a token the proxy should already have refreshed.
        validation.leeway = 0;
        Self {
            key_id,
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    pub(crate) fn verify(&self, headers: &HeaderMap) -> Result<(), TokenError> {
        let mut authorization = headers.get_all(AUTHORIZATION).iter();
        let value = authorization.next().ok_or(TokenError::MissingBearer)?;
        if authorization.next().is_some() {
            return Err(TokenError::MultipleAuthorization);
        }
        let token = bearer_token(value.as_bytes()).ok_or(TokenError::MissingBearer)?;

        // Header checks first, so a wrong key id is reported as such rather than as a bad
        // signature.
        let header = decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        if header.typ.as_deref() != Some("JWT") {
            return Err(TokenError::InvalidType);
        }
        match header.kid {
            None => return Err(TokenError::MissingKid),
            Some(kid) if kid != self.key_id => return Err(TokenError::UnknownKid),
            Some(_) => {}
        }

        let claims = decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|error| match error.kind() {
                ErrorKind::InvalidSignature => TokenError::InvalidSignature,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(name(claim)),
                ErrorKind::InvalidClaimFormat(claim) => TokenError::InvalidClaim(name(claim)),
                ErrorKind::InvalidAudience => TokenError::InvalidAudience,
                _ => TokenError::Malformed,
            })?
            .claims;

        // jsonwebtoken only knows the registered claims it validates; `iat` is required here.
        match claims.get("iat") {
            None => return Err(TokenError::MissingClaim("iat")),
            Some(iat) if iat.as_u64().is_none() => return Err(TokenError::InvalidClaim("iat")),
            Some(_) => {}
        }
        // jsonwebtoken accepts `exp == now`; RFC 7519 §4.1.4 requires the current time to be
        // before `exp`.
        let now = get_current_timestamp();
        if claims
            .get("exp")
            .and_then(Value::as_u64)
            .is_some_and(|exp| exp <= now)
        {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// The credentials of `Authorization: Bearer <token>`; the scheme is case-insensitive
/// (RFC 9110 §11.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(b"Bearer ".len())?;
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"Bearer ") && !token.is_empty()).then_some(token)
}

/// The static name of a claim jsonwebtoken reports, which is one of those we asked it for.
fn name(claim: &str) -> &'static str {
    match claim {
        "exp" => "exp",
        "nbf" => "nbf",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_token_required() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b"Bear"), None);
    }
}
