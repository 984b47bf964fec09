//! JWT verification keys from a JWKS file (`{"keys": [...]}`, RFC 7517),
//! picked by the token's `kid`. The file is re-read when it changes
//! ([`crate::reload`]), so an issuer can rotate keys without a restart:
//! publish the new key next to the old one, switch signing, then remove
//! the old key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use jsonwebtoken::jwk::{JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// One usable key: how to verify, and which algorithms it may sign with.
#[derive(Clone)]
pub struct JwksKey {
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

/// The keys of a JWKS file, by `kid`; swapped whole on reload.
pub struct Jwks {
    path: PathBuf,
    keys: RwLock<Arc<HashMap<String, JwksKey>>>,
}

impl Jwks {
    /// Reads `path`; fails when it does not parse or holds no usable key.
    pub fn load(path: &Path) -> Result<Arc<Jwks>, String> {
        let keys = read(path)?;
        Ok(Arc::new(Jwks {
            path: path.to_owned(),
            keys: RwLock::new(Arc::new(keys)),
        }))
    }

    /// The file the keys come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file; on error the keys in use stay as they were.
    /// Returns how many keys are now in use.
    pub fn reload(&self) -> Result<usize, String> {
        let keys = read(&self.path)?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    /// The key a token's `kid` names, if the set has it.
    pub fn key(&self, kid: &str) -> Option<JwksKey> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        keys.get(kid).cloned()
    }
}

fn read(path: &Path) -> Result<HashMap<String, JwksKey>, String> {
    let text = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a JWKS document. Every key must have a `kid` and be usable for
/// signatures; encryption keys (`use: enc`) are skipped.
pub fn parse(bytes: &[u8]) -> Result<HashMap<String, JwksKey>, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = HashMap::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        let kid = jwk
            .common
            .key_id
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| format!("keys[{i}] has no kid"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
        let algorithms = match jwk.common.key_algorithm {
            Some(a) => {
                let alg = a
                    .to_string()
                    .parse::<Algorithm>()
                    .map_err(|_| format!("key {kid:?}: alg {a} cannot sign JWTs"))?;
                if alg.family() != key.family() {
                    return Err(format!("key {kid:?}: alg {a} does not fit its key type"));
                }
                vec![alg]
            }
            None => key.family().algorithms().to_vec(),
        };
        if keys
            .insert(kid.clone(), JwksKey { key, algorithms })
            .is_some()
        {
            return Err(format!("kid {kid:?} appears twice"));
        }
    }
    if keys.is_empty() {
        return Err("no signing key".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    #[test]
    fn keys_are_found_by_kid_with_their_algorithms() {
        let doc = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{ED_X}","kid":"a"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{ED_X}","kid":"b","alg":"EdDSA"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{ED_X}","kid":"c","use":"enc"}}]}}"#
        );
        let keys = parse(doc.as_bytes()).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys["b"].algorithms, vec![Algorithm::EdDSA]);
        assert!(keys["a"].algorithms.contains(&Algorithm::EdDSA));
    }

    #[test]
    fn bad_documents_name_the_fault() {
        for (doc, needle) in [
            ("[]".to_owned(), "not a JWKS"),
            (r#"{"keys":[]}"#.to_owned(), "no signing key"),
            (
                format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{ED_X}"}}]}}"#),
                "no kid",
            ),
            (
                format!(
                    r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{ED_X}","kid":"k","alg":"RS256"}}]}}"#
                ),
                "does not fit",
            ),
            (
                format!(
                    r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{ED_X}","kid":"k"}},{{"kty":"OKP","crv":"Ed25519","x":"{ED_X}","kid":"k"}}]}}"#
                ),
                "twice",
            ),
        ] {
            let err = parse(doc.as_bytes()).err().unwrap_or_default();
            assert!(err.contains(needle), "{doc}: {err}");
        }
    }
}
