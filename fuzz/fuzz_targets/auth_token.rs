//! The bearer-token check every VmService call passes: the
//! `Authorization` header, development tokens and JWTs.
//!
//! The first byte picks what the rest is:
//! - 0: the header value, checked by an authenticator taking development
//!   tokens and HS256 JWTs, and by one taking JWTs only;
//! - 1: a JWT's claims, signed with the right key under the usual header;
//! - 2: a JWT's header and claims (split at the first newline), signed
//!   with the right key, so the claims and header rules are reached past
//!   the signature.

#![no_main]

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use metald_api::auth::DEV_TOKEN_PREFIX;
use metald_api::{AuthConfig, Authenticator, JwtKey};
use metald_core::CustomerId;
use serde_json::Value;

const SECRET: &[u8] = b"metald-fuzz-secret";

fn authenticator(dev_tokens: bool) -> Authenticator {
    Authenticator::new(AuthConfig {
        dev_tokens,
        jwt: Some(JwtKey::Hs256(SECRET.to_vec())),
        customer_claim: "sub".into(),
    })
    .expect("an HS256 key is always usable")
}

static DEV_AND_JWT: LazyLock<Authenticator> = LazyLock::new(|| authenticator(true));
static JWT_ONLY: LazyLock<Authenticator> = LazyLock::new(|| authenticator(false));

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => header(rest),
        1 => signed(br#"{"alg":"HS256","typ":"JWT"}"#, rest),
        _ => {
            let (head, claims) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            signed(head, claims);
        }
    }
});

/// A customer metald let in is a valid customer id.
fn valid_customer(c: &CustomerId) {
    assert_eq!(CustomerId::parse(c.as_str()).ok().as_ref(), Some(c));
}

fn header(raw: &[u8]) {
    // What the interceptor does with the header the HTTP layer parsed.
    let Ok(value) = http::HeaderValue::from_bytes(raw) else {
        return;
    };
    let text = value.to_str().unwrap_or("");
    let both = DEV_AND_JWT.authenticate(Some(text));
    let jwt_only = JWT_ONLY.authenticate(Some(text));
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .map(str::trim);
    if let Ok(c) = &both {
        valid_customer(c);
        assert!(token.is_some(), "accepted without 'Bearer ': {text:?}");
    }
    if let Some(id) = token.and_then(|t| t.strip_prefix(DEV_TOKEN_PREFIX)) {
        assert!(
            jwt_only.is_err(),
            "development token accepted with development tokens off: {text:?}"
        );
        if let Ok(c) = &both {
            assert_eq!(c.as_str(), id);
        }
    }
    if let Ok(c) = &jwt_only {
        valid_customer(c);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn signed(head: &[u8], claims: &[u8]) {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(head),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    )
    .expect("HS256 signing");
    let before = now();
    let token = format!("{message}.{signature}");
    let result = JWT_ONLY.authenticate(Some(&format!("Bearer {token}")));
    let after = now();
    let Ok(customer) = result else {
        return;
    };
    valid_customer(&customer);
    // Header fields jsonwebtoken skips are not checked (not even for
    // UTF-8): read `alg` as JSON when the header is JSON throughout.
    let alg = match serde_json::from_slice::<Value>(head) {
        Ok(head) => head["alg"].as_str().map(str::to_owned),
        Err(_) => jsonwebtoken::decode_header(&token)
            .ok()
            .map(|h| format!("{:?}", h.alg)),
    };
    assert_eq!(
        alg.as_deref(),
        Some("HS256"),
        "accepted a JWT not signed with HS256"
    );
    let claims: Value = serde_json::from_slice(claims).expect("accepted JWT claims are JSON");
    assert_eq!(claims["sub"].as_str(), Some(customer.as_str()));
    let exp = claims["exp"]
        .as_f64()
        .expect("an accepted JWT has a numeric exp");
    assert!(exp >= before as f64, "accepted an expired JWT (exp {exp})");
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_f64().expect("an accepted JWT's nbf is numeric");
        assert!(nbf <= after as f64, "accepted a JWT before its nbf ({nbf})");
    }
}
