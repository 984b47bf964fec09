//! TLS on the API port (rustls), with optional client certificates (mTLS).
//!
//! The server configuration is built whole from the PEM files and swapped
//! when they change ([`crate::reload`]); each new connection takes the
//! configuration in force when it arrives, so open connections keep
//! theirs and none is dropped. ALPN offers `h2` then `http/1.1`, so gRPC
//! clients get HTTP/2 and curl-style clients either.
//!
//! With a client CA, every connection must present a certificate that
//! chains to it (refused in the handshake otherwise). Its identity, the
//! SPIFFE ID (URI SAN `spiffe://…`) or the subject CN, is recorded for the
//! audit log, and may name the customer of a request that carries no
//! bearer token (see [`PeerIdentity::customer`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinHandle;

/// Which part of a client certificate names the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIdentity {
    /// The URI SAN `spiffe://<trust domain>/<path>`.
    Spiffe,
    /// The subject's common name.
    Cn,
}

/// Where the TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key of the leaf (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates client certificates must chain to; unset, clients
    /// are not asked for one.
    pub client_ca: Option<PathBuf>,
    /// What names a client.
    pub identity: ClientIdentity,
}

/// The verified identity of a TLS client, per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The SPIFFE ID or CN, as the certificate states it.
    pub id: String,
    kind: ClientIdentity,
}

impl PeerIdentity {
    /// The customer this certificate speaks for when a request has no
    /// bearer token: with `cn`, the common name; with `spiffe`, `<id>` of
    /// a SPIFFE ID `spiffe://<trust domain>/customer/<id>`. Other SPIFFE
    /// IDs (a control plane's, say) name a peer only, and its requests
    /// must carry a token.
    pub fn customer(&self) -> Option<&str> {
        match self.kind {
            ClientIdentity::Cn => Some(&self.id),
            ClientIdentity::Spiffe => {
                let rest = self.id.strip_prefix("spiffe://")?;
                let (_domain, path) = rest.split_once('/')?;
                path.strip_prefix("customer/").filter(|c| !c.contains('/'))
            }
        }
    }
}

/// The API port's TLS state.
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    config: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Reads the files; fails naming the file at fault.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = build(&files, &provider)?;
        Ok(Arc::new(Tls {
            files,
            provider,
            config: RwLock::new(Arc::new(config)),
        }))
    }

    /// Re-reads the files; on error the configuration in use stays.
    pub fn reload(&self) -> Result<String, String> {
        let config = build(&self.files, &self.provider)?;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(format!("certificate {}", self.files.cert.display()))
    }

    /// Reloads whenever one of the files changes.
    pub fn watch(self: &Arc<Self>) -> JoinHandle<()> {
        let mut paths = vec![self.files.cert.clone(), self.files.key.clone()];
        paths.extend(self.files.client_ca.clone());
        let me = self.clone();
        crate::reload::watch("TLS", paths, move || me.reload())
    }

    /// An acceptor with the configuration now in force.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// The identity a verified client chain states, if any.
    pub fn peer_identity(&self, chain: Option<&[CertificateDer<'_>]>) -> Option<PeerIdentity> {
        let leaf = chain?.first()?;
        let id = identity_of(leaf, self.files.identity)?;
        Some(PeerIdentity {
            id,
            kind: self.files.identity,
        })
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no certificate in it", path.display()));
    }
    Ok(certs)
}

fn build(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<ServerConfig, String> {
    let chain = certs(&files.cert, "TLS certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key, "TLS key")?)
        .map_err(|e| format!("TLS key {}: {e}", files.key.display()))?;
    let certified = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| format!("TLS key {}: {e}", files.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca, "TLS client CA")? {
                roots
                    .add(c)
                    .map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let resolver = rustls::sign::SingleCertAndKey::from(certified);
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The SPIFFE ID or CN of a certificate.
fn identity_of(der: &CertificateDer<'_>, kind: ClientIdentity) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    match kind {
        ClientIdentity::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        ClientIdentity::Spiffe => {
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                    Some((*u).to_owned())
                }
                _ => None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_customer_spiffe_ids_name_a_customer() {
        let spiffe = |id: &str| PeerIdentity {
            id: id.into(),
            kind: ClientIdentity::Spiffe,
        };
        assert_eq!(
            spiffe("spiffe://metald.test/customer/acme").customer(),
            Some("acme")
        );
        for id in [
            "spiffe://metald.test/control-plane",
            "spiffe://metald.test/customer/a/b",
            "spiffe://metald.test",
            "https://metald.test/customer/acme",
        ] {
            assert_eq!(spiffe(id).customer(), None, "{id}");
        }
        let cn = PeerIdentity {
            id: "acme".into(),
            kind: ClientIdentity::Cn,
        };
        assert_eq!(cn.customer(), Some("acme"));
    }
}
