//! Who is calling. Every VmService RPC carries `Authorization: Bearer
//! <token>`; [`crate::door`] turns it into a [`Caller`] placed in the
//! request's extensions before the body is read, or answers
//! `unauthenticated`.
//!
//! Two token kinds:
//! - development tokens `dev_customer_<id>`, accepted only in dev mode;
//! - JWTs signed with HS256 (shared secret) or RS256/EdDSA (public key),
//!   or with a key of a JWKS file picked by the token's `kid`; `exp` is
//!   required, `nbf` checked (both with a leeway for clock skew), `iss`
//!   and `aud` checked when configured; the customer is named in a
//!   configurable claim (default `sub`). `alg: none` is never accepted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use connectrpc::ConnectError;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use metald_core::{CustomerId, Error};

use crate::jwks::Jwks;

/// Prefix of development tokens.
pub const DEV_TOKEN_PREFIX: &str = "dev_customer_";

/// The authenticated customer, as handlers find it in the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub CustomerId);

/// Key material for verifying JWTs.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 with a shared secret.
    Hs256(Vec<u8>),
    /// RS256 with a PEM public key.
    Rs256Pem(Vec<u8>),
    /// EdDSA (Ed25519) with a PEM public key.
    EdDsaPem(Vec<u8>),
}

/// How callers authenticate.
#[derive(Clone)]
pub struct AuthConfig {
    /// Accept `dev_customer_<id>` tokens.
    pub dev_tokens: bool,
    /// Accept JWTs verified with this key.
    pub jwt: Option<JwtKey>,
    /// The JWT claim holding the customer id.
    pub customer_claim: String,
}

/// Claims every JWT is held to beyond its signature.
#[derive(Debug, Clone, Default)]
pub struct JwtRules {
    /// `iss` must equal this (unset: not checked).
    pub issuer: Option<String>,
    /// `aud` must contain this (unset: not checked).
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// Verifies bearer tokens.
pub struct Authenticator {
    dev_tokens: bool,
    jwt: Option<(DecodingKey, Algorithm)>,
    jwks: Option<Arc<Jwks>>,
    rules: JwtRules,
    customer_claim: String,
}

impl Authenticator {
    /// Prepares keys; fails when a key does not parse.
    pub fn new(config: AuthConfig) -> Result<Self, String> {
        let jwt = match config.jwt {
            None => None,
            Some(JwtKey::Hs256(secret)) => {
                Some((DecodingKey::from_secret(&secret), Algorithm::HS256))
            }
            Some(JwtKey::Rs256Pem(pem)) => Some((
                DecodingKey::from_rsa_pem(&pem).map_err(|e| format!("RSA public key: {e}"))?,
                Algorithm::RS256,
            )),
            Some(JwtKey::EdDsaPem(pem)) => Some((
                DecodingKey::from_ed_pem(&pem).map_err(|e| format!("Ed25519 public key: {e}"))?,
                Algorithm::EdDSA,
            )),
        };
        if !config.dev_tokens && jwt.is_none() {
            return Err("no way to authenticate: enable dev tokens or configure a JWT key".into());
        }
        Ok(Authenticator {
            dev_tokens: config.dev_tokens,
            jwt,
            jwks: None,
            rules: JwtRules::default(),
            customer_claim: config.customer_claim,
        })
    }

    /// Like [`Authenticator::new`], where the JWT keys may also (or only)
    /// come from a JWKS file.
    pub fn with_jwks(config: AuthConfig, jwks: Option<Arc<Jwks>>) -> Result<Self, String> {
        if jwks.is_none() {
            return Self::new(config);
        }
        let dev_tokens = config.dev_tokens;
        let mut a = Self::new(AuthConfig {
            dev_tokens: true,
            ..config
        })?;
        a.dev_tokens = dev_tokens;
        a.jwks = jwks;
        Ok(a)
    }

    /// Holds every JWT to `rules` (issuer, audience, leeway).
    pub fn with_rules(mut self, rules: JwtRules) -> Self {
        self.rules = rules;
        self
    }

    /// The customer an `Authorization` header value speaks for.
    pub fn authenticate(&self, header: Option<&str>) -> Result<CustomerId, Error> {
        let header = header.ok_or_else(|| unauth("missing Authorization header"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauth("Authorization header must be 'Bearer <token>'"))?;
        if let Some(id) = token.strip_prefix(DEV_TOKEN_PREFIX) {
            if !self.dev_tokens {
                return Err(unauth(
                    "development tokens are disabled (UNKEY_METALD_AUTH_MODE=jwt)",
                ));
            }
            return CustomerId::parse(id);
        }
        if self.jwt.is_none() && self.jwks.is_none() {
            return Err(unauth("invalid token: expected dev_customer_<id>"));
        }
        let claims = self.verify(token)?;
        let customer = claims
            .get(&self.customer_claim)
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                unauth(&format!(
                    "token has no string claim {:?}",
                    self.customer_claim
                ))
            })?;
        CustomerId::parse(customer)
    }

    /// Checks a JWT's signature (with the key its `kid` names in the JWKS,
    /// else the configured key) and its claims.
    fn verify(&self, token: &str) -> Result<HashMap<String, serde_json::Value>, Error> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| jwt_error(&e))?;
        let (key, algorithms) = match (&header.kid, &self.jwks, &self.jwt) {
            (Some(kid), Some(jwks), _) => {
                let k = jwks.key(kid).ok_or_else(|| {
                    unauth(&format!(
                        "token's kid {:?} is not a known key",
                        kid.chars().take(64).collect::<String>()
                    ))
                })?;
                (k.key, k.algorithms)
            }
            (_, _, Some((key, alg))) => (key.clone(), vec![*alg]),
            (None, Some(_), None) => {
                return Err(unauth("token has no kid naming its key"));
            }
            (_, None, None) => return Err(unauth("invalid token")),
        };
        let validation = self.validation(algorithms);
        jsonwebtoken::decode::<HashMap<String, serde_json::Value>>(token, &key, &validation)
            .map(|d| d.claims)
            .map_err(|e| jwt_error(&e))
    }

    fn validation(&self, algorithms: Vec<Algorithm>) -> Validation {
        let mut v = Validation::new(Algorithm::HS256);
        v.algorithms = algorithms;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.leeway = self.rules.leeway.as_secs();
        let mut required = vec!["exp"];
        match &self.rules.issuer {
            Some(iss) => {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            None => v.iss = None,
        }
        match &self.rules.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        v
    }
}

fn unauth(m: &str) -> Error {
    Error::Unauthenticated(m.to_owned())
}

/// A JWT failure in words a client can act on (no key material, no host
/// state).
fn jwt_error(e: &jsonwebtoken::errors::Error) -> Error {
    let m = match e.kind() {
        ErrorKind::ExpiredSignature => "token has expired (exp)".to_owned(),
        ErrorKind::ImmatureSignature => "token is not valid yet (nbf)".to_owned(),
        ErrorKind::InvalidIssuer => "token's issuer (iss) is not accepted".to_owned(),
        ErrorKind::InvalidAudience => "token's audience (aud) is not accepted".to_owned(),
        ErrorKind::InvalidSignature => "token's signature does not verify".to_owned(),
        ErrorKind::InvalidAlgorithm => "token's algorithm (alg) is not accepted".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("token lacks the claim {c:?}"),
        _ => format!("invalid token: {e}"),
    };
    unauth(&m)
}

/// The caller a handler runs for; the door guarantees it is there.
pub fn caller(ctx: &connectrpc::RequestContext) -> Result<CustomerId, ConnectError> {
    ctx.extensions()
        .get::<Caller>()
        .map(|c| c.0.clone())
        .ok_or_else(|| {
            ConnectError::new(connectrpc::ErrorCode::Unauthenticated, "not authenticated")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn auth(dev: bool) -> Authenticator {
        Authenticator::new(AuthConfig {
            dev_tokens: dev,
            jwt: Some(JwtKey::Hs256(b"s3cret".to_vec())),
            customer_claim: "sub".into(),
        })
        .unwrap()
    }

    fn hs(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn dev_tokens_only_in_dev_mode() {
        assert_eq!(
            auth(true)
                .authenticate(Some("Bearer dev_customer_acme"))
                .unwrap()
                .as_str(),
            "acme"
        );
        assert!(matches!(
            auth(false).authenticate(Some("Bearer dev_customer_acme")),
            Err(Error::Unauthenticated(_))
        ));
    }

    #[test]
    fn missing_or_malformed_headers_are_rejected() {
        let a = auth(true);
        for h in [
            None,
            Some(""),
            Some("Basic abc"),
            Some("Bearer "),
            Some("Bearer dev_customer_"),
        ] {
            assert!(
                matches!(a.authenticate(h), Err(Error::Unauthenticated(_))),
                "{h:?}"
            );
        }
    }

    #[test]
    fn valid_jwt_names_the_customer() {
        let t = hs(json!({"sub": "cust-1", "exp": now() + 60}), b"s3cret");
        assert_eq!(
            auth(false)
                .authenticate(Some(&format!("Bearer {t}")))
                .unwrap()
                .as_str(),
            "cust-1"
        );
    }

    #[test]
    fn custom_claim() {
        let a = Authenticator::new(AuthConfig {
            dev_tokens: false,
            jwt: Some(JwtKey::Hs256(b"k".to_vec())),
            customer_claim: "customer_id".into(),
        })
        .unwrap();
        let t = hs(
            json!({"sub": "x", "customer_id": "c2", "exp": now() + 60}),
            b"k",
        );
        assert_eq!(
            a.authenticate(Some(&format!("Bearer {t}")))
                .unwrap()
                .as_str(),
            "c2"
        );
    }

    #[test]
    fn bad_jwts_are_rejected() {
        let a = auth(false);
        let wrong_key = hs(json!({"sub": "c", "exp": now() + 60}), b"other");
        let expired = hs(json!({"sub": "c", "exp": now() - 120}), b"s3cret");
        let not_yet = hs(
            json!({"sub": "c", "exp": now() + 600, "nbf": now() + 300}),
            b"s3cret",
        );
        let no_exp = hs(json!({"sub": "c"}), b"s3cret");
        // alg "none": header {"alg":"none","typ":"JWT"}, unsigned.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                json!({"sub": "c", "exp": now() + 60}).to_string()
            )
        );
        for t in [wrong_key, expired, not_yet, no_exp, none, "garbage".into()] {
            assert!(
                matches!(
                    a.authenticate(Some(&format!("Bearer {t}"))),
                    Err(Error::Unauthenticated(_))
                ),
                "{t}"
            );
        }
    }

    fn with_rules(iss: Option<&str>, aud: Option<&str>, leeway: u64) -> Authenticator {
        auth(false).with_rules(JwtRules {
            issuer: iss.map(Into::into),
            audience: aud.map(Into::into),
            leeway: Duration::from_secs(leeway),
        })
    }

    fn check(a: &Authenticator, t: &str) -> Result<CustomerId, Error> {
        a.authenticate(Some(&format!("Bearer {t}")))
    }

    #[test]
    fn issuer_and_audience_are_checked_only_when_configured() {
        let exp = now() + 60;
        let t = |c: serde_json::Value| hs(c, b"s3cret");
        let good = t(json!({"sub": "c", "exp": exp, "iss": "idp", "aud": ["x", "metald"]}));
        let a = with_rules(Some("idp"), Some("metald"), 0);
        assert!(check(&a, &good).is_ok());
        for (bad, needle) in [
            (
                t(json!({"sub": "c", "exp": exp, "iss": "evil", "aud": "metald"})),
                "iss",
            ),
            (
                t(json!({"sub": "c", "exp": exp, "iss": "idp", "aud": "other"})),
                "aud",
            ),
            (t(json!({"sub": "c", "exp": exp, "aud": "metald"})), "iss"),
            (t(json!({"sub": "c", "exp": exp, "iss": "idp"})), "aud"),
        ] {
            let e = check(&a, &bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        // Unconfigured, a token carrying aud or iss is not refused for it.
        assert!(check(&with_rules(None, None, 0), &good).is_ok());
    }

    #[test]
    fn leeway_absorbs_small_clock_skew_only() {
        let a = with_rules(None, None, 30);
        let just_expired = hs(json!({"sub": "c", "exp": now() - 10}), b"s3cret");
        let long_expired = hs(json!({"sub": "c", "exp": now() - 120}), b"s3cret");
        let early = hs(
            json!({"sub": "c", "exp": now() + 60, "nbf": now() + 10}),
            b"s3cret",
        );
        assert!(check(&a, &just_expired).is_ok());
        assert!(check(&a, &early).is_ok());
        let e = check(&a, &long_expired).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");
    }

    #[test]
    fn jwks_keys_are_picked_by_kid() {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"jwks-secret-key!");
        let path = dir.path().join("jwks.json");
        std::fs::write(
            &path,
            json!({"keys": [{"kty": "oct", "k": k, "kid": "h1", "alg": "HS256"}]}).to_string(),
        )
        .unwrap();
        let a = Authenticator::with_jwks(
            AuthConfig {
                dev_tokens: false,
                jwt: None,
                customer_claim: "sub".into(),
            },
            Some(Jwks::load(&path).unwrap()),
        )
        .unwrap();
        let signed = |kid: Option<&str>| {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = kid.map(Into::into);
            let claims = json!({"sub": "c", "exp": now() + 60});
            encode(&h, &claims, &EncodingKey::from_secret(b"jwks-secret-key!")).unwrap()
        };
        assert_eq!(check(&a, &signed(Some("h1"))).unwrap().as_str(), "c");
        let e = check(&a, &signed(Some("h9"))).unwrap_err().to_string();
        assert!(e.contains("\"h9\" is not a known key"), "{e}");
        let e = check(&a, &signed(None)).unwrap_err().to_string();
        assert!(e.contains("no kid"), "{e}");
        assert!(check(&a, "dev_customer_x").is_err(), "dev tokens stay off");
    }
}
