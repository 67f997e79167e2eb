//! `HARNESS_API_KEY`: the bearer key of the inference routes. The key is kept
//! only as its SHA-256, and a caller's is hashed and compared in constant time,
//! so neither the time an answer takes nor the key's length tells a caller how
//! close a guess was. The key itself is never logged.

use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::fetch::Secret;

/// The key callers must send.
pub struct ApiKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

impl ApiKey {
    pub fn new(key: &Secret) -> Self {
        ApiKey {
            digest: Sha256::digest(key.expose().as_bytes()).into(),
        }
    }

    /// Whether `headers` carry `Authorization: Bearer <this key>`.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers.get(AUTHORIZATION).and_then(bearer) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(given).into();
        digest.ct_eq(&self.digest).into()
    }
}

/// The token of a `Bearer` authorization (the scheme is case-insensitive).
fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let value = value.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn only_the_exact_key_as_a_bearer_token_is_admitted() {
        let key = ApiKey::new(&Secret::new("s3cret-key"));
        assert!(key.admits(&headers("Bearer s3cret-key")));
        assert!(key.admits(&headers("bearer s3cret-key")));
        for wrong in [
            "Bearer s3cret-ke",
            "Bearer s3cret-key2",
            "Bearer ",
            "Basic s3cret-key",
            "s3cret-key",
            "Bearer S3CRET-KEY",
        ] {
            assert!(!key.admits(&headers(wrong)), "{wrong}");
        }
        assert!(!key.admits(&HeaderMap::new()));
        assert!(!format!("{key:?}").contains("s3cret"));
    }
}
