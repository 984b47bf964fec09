//! Who is calling. Every VmService RPC carries `Authorization: Bearer
//! <token>`; the interceptor turns it into a [`Caller`] placed in the
//! request's extensions, or answers `unauthenticated`.
//!
//! Two token kinds:
//! - development tokens `dev_customer_<id>`, accepted only in dev mode;
//! - JWTs signed with HS256 (shared secret) or RS256/EdDSA (public key),
//!   with `exp` required and `nbf` checked, naming the customer in a
//!   configurable claim (default `sub`). `alg: none` is never accepted.
//!
//! The check runs as a connectrpc interceptor so errors are encoded
//! correctly for Connect, gRPC and gRPC-Web alike. It runs after the body
//! is read (bounded by the server's body limit), before it is decoded.

use std::collections::HashMap;

use connectrpc::interceptor::{StreamRequest, StreamResponse, UnaryRequest, UnaryResponse};
use connectrpc::{ConnectError, Interceptor, Next, NextStream, PayloadStream};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use metald_core::{CustomerId, Error};

use crate::status::to_connect;

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

/// Verifies bearer tokens.
pub struct Authenticator {
    dev_tokens: bool,
    jwt: Option<(DecodingKey, Validation)>,
    customer_claim: String,
}

impl Authenticator {
    /// Prepares keys; fails when a key does not parse.
    pub fn new(config: AuthConfig) -> Result<Self, String> {
        let jwt = match config.jwt {
            None => None,
            Some(key) => {
                let (key, alg) = match key {
                    JwtKey::Hs256(secret) => (DecodingKey::from_secret(&secret), Algorithm::HS256),
                    JwtKey::Rs256Pem(pem) => (
                        DecodingKey::from_rsa_pem(&pem)
                            .map_err(|e| format!("RSA public key: {e}"))?,
                        Algorithm::RS256,
                    ),
                    JwtKey::EdDsaPem(pem) => (
                        DecodingKey::from_ed_pem(&pem)
                            .map_err(|e| format!("Ed25519 public key: {e}"))?,
                        Algorithm::EdDSA,
                    ),
                };
                let mut validation = Validation::new(alg);
                validation.validate_exp = true;
                validation.validate_nbf = true;
                validation.leeway = 0;
                validation.set_required_spec_claims(&["exp"]);
                Some((key, validation))
            }
        };
        if !config.dev_tokens && jwt.is_none() {
            return Err("no way to authenticate: enable dev tokens or configure a JWT key".into());
        }
        Ok(Authenticator {
            dev_tokens: config.dev_tokens,
            jwt,
            customer_claim: config.customer_claim,
        })
    }

    /// The customer an `Authorization` header value speaks for.
    pub fn authenticate(&self, header: Option<&str>) -> Result<CustomerId, Error> {
        let unauth = |m: &str| Error::Unauthenticated(m.to_owned());
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
        let Some((key, validation)) = &self.jwt else {
            return Err(unauth("invalid token: expected dev_customer_<id>"));
        };
        let data =
            jsonwebtoken::decode::<HashMap<String, serde_json::Value>>(token, key, validation)
                .map_err(|e| unauth(&format!("invalid token: {e}")))?;
        let customer = data
            .claims
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
}

/// Paths served without a token: health checks and reflection.
fn is_public(path: Option<&str>) -> bool {
    path.is_some_and(|p| {
        p.starts_with("/grpc.health.v1.Health/")
            || p.starts_with("/grpc.reflection.v1.ServerReflection/")
            || p.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    })
}

/// The interceptor that authenticates every non-public RPC.
pub struct AuthInterceptor(pub std::sync::Arc<Authenticator>);

impl AuthInterceptor {
    fn check(&self, ctx: &mut connectrpc::RequestContext) -> Result<(), ConnectError> {
        if is_public(ctx.path()) {
            return Ok(());
        }
        let header = ctx
            .header(http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        let customer = self.0.authenticate(header).map_err(to_connect)?;
        ctx.extensions_mut().insert(Caller(customer));
        Ok(())
    }
}

#[connectrpc::async_trait]
impl Interceptor for AuthInterceptor {
    async fn intercept_unary(
        &self,
        mut req: UnaryRequest,
        next: Next<'_>,
    ) -> Result<UnaryResponse, ConnectError> {
        self.check(&mut req.ctx)?;
        next.run(req).await
    }

    async fn intercept_streaming(
        &self,
        mut req: StreamRequest,
        inbound: PayloadStream,
        next: NextStream<'_>,
    ) -> Result<StreamResponse, ConnectError> {
        self.check(&mut req.ctx)?;
        next.run(req, inbound).await
    }
}

/// The caller a handler runs for; the interceptor guarantees it is there.
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
}
