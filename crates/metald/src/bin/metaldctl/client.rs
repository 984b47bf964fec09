//! The connection to metald: the generated `VmService` and health clients
//! over one HTTP client (plaintext, or TLS for https://), speaking the
//! Connect protocol with the bearer token on every call.

use std::sync::Arc;

use connectrpc::client::{ClientConfig, ClientTransport, HttpClient};
use connectrpc_health::HealthClient;
use metald_proto::vmprovisioner::v1 as pb;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Settings;
use crate::error::CliError;

/// Where the system's CA bundle is when `SSL_CERT_FILE` does not say.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Largest `GET /health` body read.
const MAX_HEALTH_BODY: usize = 64 << 10;

/// metald, as one operator command talks to it.
pub struct Api {
    pub addr: String,
    http: HttpClient,
    config: ClientConfig,
    pub vms: pb::VmServiceClient<HttpClient>,
}

/// One unary call on `api.vms` with `req`, its owned response or the
/// error as metaldctl prints it.
macro_rules! rpc {
    ($api:expr, $method:ident, $req:expr) => {
        $api.vms
            .$method($req)
            .await
            .map(|r| r.into_owned())
            .map_err(|e| $crate::error::CliError::from_connect(&e, &$api.addr))
    };
}
pub(crate) use rpc;

impl Api {
    pub fn connect(s: &Settings) -> Result<Api, CliError> {
        let base: http::Uri = s
            .addr
            .parse()
            .map_err(|_| CliError::usage("--addr is not a URL"))?;
        let http = if base.scheme_str() == Some("https") {
            HttpClient::with_tls(tls_config(s)?)
        } else {
            if s.ca_file.is_some() || s.client_cert.is_some() {
                return Err(CliError::usage(
                    "--ca-file and --cert need an https:// --addr",
                ));
            }
            HttpClient::plaintext()
        };
        let mut config = ClientConfig::new(base);
        if let Some(token) = &s.token {
            let value = http::HeaderValue::try_from(format!("Bearer {token}"))
                .map_err(|_| CliError::usage("--token holds characters a header cannot"))?;
            config = config.with_default_header(http::header::AUTHORIZATION, value);
        }
        let vms = pb::VmServiceClient::new(http.clone(), config.clone());
        Ok(Api {
            addr: s.addr.clone(),
            http,
            config,
            vms,
        })
    }

    /// `grpc.health.v1.Health/Check` for the whole server: its status name.
    pub async fn grpc_health(&self) -> Result<String, CliError> {
        let health = HealthClient::new(self.http.clone(), self.config.clone());
        let resp = health
            .check(connectrpc_health::wire::HealthCheckRequest::default())
            .await
            .map_err(|e| CliError::from_connect(&e, &self.addr))?
            .into_owned();
        Ok(match resp.status.as_known() {
            Some(s) => buffa::Enumeration::proto_name(&s).to_owned(),
            None => format!("status {}", resp.status.to_i32()),
        })
    }

    /// `GET /health`: the HTTP status and the body (bounded).
    pub async fn http_health(&self) -> Result<(u16, String), CliError> {
        use http_body_util::BodyExt;
        let uri = format!("{}/health", self.addr);
        let req = http::Request::get(uri)
            .body(connectrpc::client::full_body(bytes::Bytes::new()))
            .map_err(|e| CliError::usage(e.to_string()))?;
        let resp = self
            .http
            .send(req)
            .await
            .map_err(|e| CliError::from_connect(&e, &self.addr))?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_HEALTH_BODY)
            .collect()
            .await
            .map_err(|e| CliError::unavailable(format!("reading GET /health: {e}")))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// TLS with the roots from `--ca-file`, else the system's.
fn tls_config(s: &Settings) -> Result<Arc<rustls::ClientConfig>, CliError> {
    let (path, what) = match &s.ca_file {
        Some(p) => (p.clone(), "--ca-file"),
        None => (
            std::env::var_os("SSL_CERT_FILE")
                .map(Into::into)
                .unwrap_or_else(|| SYSTEM_ROOTS.into()),
            "the system CA bundle",
        ),
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|e| CliError::usage(format!("{what}: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| CliError::usage(format!("{what}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| CliError::usage(format!("{what}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(CliError::usage(format!("{what} holds no certificate")));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::usage(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    let config = match &s.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| CliError::usage(format!("--cert: {e}")))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| CliError::usage(format!("--key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| CliError::usage(format!("--cert/--key: {e}")))?
        }
    };
    Ok(Arc::new(config))
}
