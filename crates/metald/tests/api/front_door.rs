//! The API door under hostile or careless clients: TLS and mTLS (with
//! certificate rotation), JWT issuer/audience rules and JWKS key rotation,
//! a refusal before an unauthenticated body is read, and per-customer
//! request rates.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connectrpc::Protocol;
use connectrpc::client::{ClientConfig, Http2Connection, HttpClient};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use metald_proto::vmprovisioner::v1 as pb;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Assets, Daemon, without_colours};

/// A test CA that issues server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = p.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(p, key),
        }
    }

    /// (certificate PEM, key PEM) for 127.0.0.1.
    fn server(&self) -> (String, String) {
        let p = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".into()]).unwrap();
        let key = KeyPair::generate().unwrap();
        (
            p.signed_by(&key, &self.issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }

    /// (certificate PEM, key PEM) of a client with this SPIFFE ID.
    fn client(&self, spiffe: &str) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
        p.distinguished_name.push(DnType::CommonName, "a client");
        let key = KeyPair::generate().unwrap();
        (
            p.signed_by(&key, &self.issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    // Written aside and renamed, as secret managers do.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// A client TLS configuration trusting `ca`, presenting `cert` if given.
fn client_tls(ca: &str, cert: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match cert {
        None => b.with_no_client_auth(),
        Some((c, k)) => {
            let chain = CertificateDer::pem_slice_iter(c.as_bytes())
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
    })
}

fn config(d: &Daemon, protocol: Protocol, token: Option<&str>) -> ClientConfig {
    let c = ClientConfig::new(d.url.parse().unwrap()).with_protocol(protocol);
    let c = if protocol == Protocol::Connect {
        c.json()
    } else {
        c
    };
    match token {
        Some(t) => c.with_default_header("authorization", format!("Bearer {t}")),
        None => c,
    }
}

type Client<T> = pb::VmServiceClient<T>;

async fn list<T>(c: &Client<T>) -> Result<pb::ListVmsResponse, connectrpc::ConnectError>
where
    T: connectrpc::client::ClientTransport,
    <T::ResponseBody as http_body::Body>::Error: std::fmt::Display,
{
    c.list_vms(pb::ListVmsRequest::default())
        .await
        .map(|r| r.into_owned())
}

/// A TLS-only metald in dev-auth mode; `client_ca` turns on mTLS.
fn tls_daemon(dir: &Path, server: &(String, String), client_ca: Option<&str>) -> Daemon {
    let cert = write(dir, "cert.pem", &server.0);
    let key = write(dir, "key.pem", &server.1);
    let mut args = format!(
        "--auth-mode dev --tls-cert-file {} --tls-key-file {}",
        cert.display(),
        key.display()
    );
    if let Some(ca) = client_ca {
        let ca = write(dir, "client-ca.pem", ca);
        args.push_str(&format!(" --tls-client-ca-file {}", ca.display()));
    }
    let d = Daemon::start_with(&args.split(' ').collect::<Vec<_>>());
    assert!(d.url.starts_with("https://"), "{}", d.url);
    d
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_connect_grpc_and_grpc_web_and_refuses_plaintext() {
    let assets = Assets::load();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("metald test CA");
    let d = tls_daemon(dir.path(), &ca.server(), None);
    let tls = client_tls(&ca.pem, None);

    let plain = d.url.replace("https://", "http://");
    let e = crate::harness::connect_json(&plain, "dev_customer_a", "ListVms", json!({})).await;
    assert_eq!(
        e.unwrap_err().0,
        "transport",
        "plaintext must not be served"
    );

    let connect = Client::new(
        HttpClient::with_tls(tls.clone()),
        config(&d, Protocol::Connect, Some("dev_customer_a")),
    );
    let vm: pb::VmConfig = serde_json::from_value(assets.config()).unwrap();
    let created = connect
        .create_vm(pb::CreateVmRequest {
            vm_id: "over-tls".into(),
            config: buffa::MessageField::some(vm),
            ..Default::default()
        })
        .await
        .expect("Connect JSON over TLS")
        .into_owned();
    assert_eq!(created.vm_id, "over-tls");

    let h2 = Http2Connection::connect_tls(d.url.parse().unwrap(), tls.clone())
        .await
        .expect("HTTP/2 by ALPN")
        .shared(8);
    let grpc = Client::new(h2, config(&d, Protocol::Grpc, Some("dev_customer_a")));
    let info = grpc
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "over-tls".into(),
            ..Default::default()
        })
        .await
        .expect("gRPC over TLS")
        .into_owned();
    assert_eq!(info.vm_id, "over-tls");

    let web = Client::new(
        HttpClient::with_tls(tls),
        config(&d, Protocol::GrpcWeb, Some("dev_customer_a")),
    );
    let listed = list(&web).await.expect("gRPC-Web over TLS");
    assert_eq!(listed.total_count, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_refuses_clients_without_a_certificate_and_names_customers_by_spiffe_id() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("metald test CA");
    let clients = Ca::new("metald client CA");
    let d = tls_daemon(dir.path(), &ca.server(), Some(&clients.pem));
    let client = |cert: Option<&(String, String)>, proto, token| {
        Client::new(
            HttpClient::with_tls(client_tls(&ca.pem, cert)),
            config(&d, proto, token),
        )
    };

    let none = client(None, Protocol::Connect, Some("dev_customer_a"));
    assert!(list(&none).await.is_err(), "no client certificate");
    let stranger = Ca::new("someone else").client("spiffe://metald.test/customer/a");
    let forged = client(Some(&stranger), Protocol::Connect, Some("dev_customer_a"));
    assert!(list(&forged).await.is_err(), "certificate of another CA");

    // The control plane: its certificate names it, the token the customer.
    let plane = clients.client("spiffe://metald.test/control-plane");
    let c = client(Some(&plane), Protocol::GrpcWeb, Some("dev_customer_a"));
    list(&c).await.expect("valid certificate and token");
    let e = list(&client(Some(&plane), Protocol::Connect, None))
        .await
        .unwrap_err();
    assert_eq!(e.code, connectrpc::ErrorCode::Unauthenticated, "{e:?}");

    // A customer's own workload: its SPIFFE ID names the customer.
    let own = clients.client("spiffe://metald.test/customer/b");
    let b = client(Some(&own), Protocol::Connect, None);
    let err = b
        .boot_vm(pb::BootVmRequest {
            vm_id: "nothing-here".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code,
        connectrpc::ErrorCode::NotFound,
        "authenticated as b"
    );
    let is_audit = |l: &str| l.contains("metald::audit") && l.contains("rpc=\"BootVm\"");
    let log = log_with(&d, is_audit).await;
    let audit = log
        .lines()
        .find(|l| is_audit(l))
        .unwrap_or_else(|| panic!("no audit line for BootVm in:\n{log}"));
    for needle in [
        "customer=b",
        "peer=\"spiffe://metald.test/customer/b\"",
        "vm_id=\"nothing-here\"",
        "outcome=\"not_found\"",
    ] {
        assert!(audit.contains(needle), "{needle} not in {audit}");
    }
}

/// metald's log, without colour codes, once a line `want` accepts is in
/// it (bounded).
async fn log_with(d: &Daemon, want: impl Fn(&str) -> bool) -> String {
    without_colours(&d.log_when(|l| want(&without_colours(l))).await)
}

/// Polls `f` until it returns true, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replaced_certificate_files_are_picked_up_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let d = tls_daemon(dir.path(), &old_ca.server(), None);
    let pid = d.pid();
    // An HTTP/2 connection opened before the change.
    let h2 = Http2Connection::connect_tls(d.url.parse().unwrap(), client_tls(&old_ca.pem, None))
        .await
        .unwrap()
        .shared(8);
    let open = Client::new(h2, config(&d, Protocol::Grpc, Some("dev_customer_a")));
    list(&open).await.unwrap();

    let (cert, key) = new_ca.server();
    write(dir.path(), "key.pem", &key);
    write(dir.path(), "cert.pem", &cert);
    let fresh = |ca: &str| {
        Client::new(
            HttpClient::with_tls(client_tls(ca, None)),
            config(&d, Protocol::Connect, Some("dev_customer_a")),
        )
    };
    let new_client = fresh(&new_ca.pem);
    eventually(
        Duration::from_secs(15),
        "the new certificate served",
        || async { list(&new_client).await.is_ok() },
    )
    .await;
    assert!(
        list(&fresh(&old_ca.pem)).await.is_err(),
        "new connections get the new certificate"
    );
    list(&open).await.expect("the open connection survives");
    assert_eq!(d.pid(), pid, "no restart");
}

/// An Ed25519 signing key with its JWK.
struct JwtSigner {
    kid: String,
    key: EncodingKey,
    jwk: serde_json::Value,
}

impl JwtSigner {
    fn new(kid: &str) -> JwtSigner {
        use base64::Engine;
        let pair = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
        JwtSigner {
            kid: kid.into(),
            key: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA"}),
        }
    }

    fn token(&self, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(self.kid.clone());
        encode(&h, &claims, &self.key).unwrap()
    }
}

fn jwks(dir: &Path, keys: &[&JwtSigner]) -> PathBuf {
    let doc = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    write(dir, "jwks.json", &doc.to_string())
}

fn claims(sub: &str, iss: &str, aud: Option<&str>) -> serde_json::Value {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let mut c = json!({"sub": sub, "iss": iss, "exp": exp});
    if let Some(a) = aud {
        c["aud"] = json!(a);
    }
    c
}

fn jwt_daemon(dir: &Path, keys: &[&JwtSigner]) -> Daemon {
    let file = jwks(dir, keys).display().to_string();
    let args =
        format!("--auth-mode jwt --jwt-jwks-file {file} --jwt-issuer {ISS} --jwt-audience metald");
    Daemon::start_with(&args.split(' ').collect::<Vec<_>>())
}

const ISS: &str = "https://issuer.metald.test";

#[tokio::test(flavor = "multi_thread")]
async fn jwts_from_another_issuer_or_for_another_audience_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = JwtSigner::new("k1");
    let d = jwt_daemon(dir.path(), &[&k1]);
    let good = k1.token(claims("acme", ISS, Some("metald")));
    d.ok(&good, "ListVms", json!({})).await;
    for (what, c) in [
        (
            "issuer",
            claims("acme", "https://evil.test", Some("metald")),
        ),
        ("audience", claims("acme", ISS, Some("billing"))),
        ("missing audience", claims("acme", ISS, None)),
    ] {
        let (code, msg) = d
            .call(&k1.token(c), "ListVms", json!({}))
            .await
            .unwrap_err();
        assert_eq!(code, "unauthenticated", "{what}: {msg}");
        assert!(msg.contains("iss") || msg.contains("aud"), "{what}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_jwks_is_used_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (JwtSigner::new("k1"), JwtSigner::new("k2"));
    let d = jwt_daemon(dir.path(), &[&k1]);
    let (t1, t2) = (
        k1.token(claims("acme", ISS, Some("metald"))),
        k2.token(claims("acme", ISS, Some("metald"))),
    );
    d.ok(&t1, "ListVms", json!({})).await;
    let e = d.call(&t2, "ListVms", json!({})).await.unwrap_err();
    assert_eq!(e.0, "unauthenticated", "{e:?}");

    jwks(dir.path(), &[&k1, &k2]);
    eventually(Duration::from_secs(15), "the new key accepted", || async {
        d.call(&t2, "ListVms", json!({})).await.is_ok()
    })
    .await;
    d.ok(&t1, "ListVms", json!({})).await;

    jwks(dir.path(), &[&k2]);
    eventually(Duration::from_secs(15), "the old key refused", || async {
        d.call(&t1, "ListVms", json!({})).await.is_err()
    })
    .await;
    let e = d.call(&t1, "ListVms", json!({})).await.unwrap_err();
    assert_eq!(e.0, "unauthenticated", "{e:?}");
    d.ok(&t2, "ListVms", json!({})).await;
}

const BIG: usize = 8 << 20;

/// Sends an HTTP/1.1 request announcing an 8 MB body, only its first KiB,
/// and returns the answer read while the rest is still unsent.
async fn answer_before_the_body(d: &Daemon, auth: Option<&str>) -> String {
    let headers: Vec<_> = auth.iter().map(|a| ("Authorization", *a)).collect();
    partial_post(d, &headers, BIG).await
}

/// Posts CreateVm announcing `announced` body bytes, sends 1 KiB of them
/// (or all, if fewer), and returns the answer (within 10 s).
async fn partial_post(d: &Daemon, headers: &[(&str, &str)], announced: usize) -> String {
    let addr = d.url.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut head = format!(
        "POST /vmprovisioner.v1.VmService/CreateVm HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: {announced}\r\n"
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b' '; announced.min(1024)]).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        // Until the JSON error's end (or metald closes the connection):
        // the rest of the body is never sent.
        while !answer.ends_with(b"}") {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answered with 1 KiB of 8 MiB sent");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unauthenticated_8mb_body_is_answered_before_it_is_sent() {
    let d = Daemon::start();
    for auth in [None, Some("Bearer not-a-token"), Some("Basic YTpi")] {
        let a = answer_before_the_body(&d, auth).await;
        assert!(a.starts_with("HTTP/1.1 401"), "{auth:?}: {a}");
        assert!(a.contains("\"code\":\"unauthenticated\""), "{auth:?}: {a}");
    }
    // A valid caller announcing more than the API accepts is refused as
    // early, naming the limit.
    let a = answer_before_the_body(&d, Some("Bearer dev_customer_a")).await;
    assert!(a.starts_with("HTTP/1.1 429"), "{a}");
    assert!(
        a.contains("resource_exhausted") && a.contains("1048576"),
        "{a}"
    );
    let log = log_with(&d, |l| l.contains("outcome=\"resource_exhausted\"")).await;
    let audited = |outcome: &str| {
        log.lines().any(|l| {
            l.contains("metald::audit")
                && l.contains("rpc=\"CreateVm\"")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
    };
    assert!(audited("unauthenticated"), "refusals are audited:\n{log}");
    assert!(
        audited("resource_exhausted"),
        "refusals are audited:\n{log}"
    );

    // gRPC over h2c: the refusal comes while the body stream stays open.
    let tcp = tokio::net::TcpStream::connect(d.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (mut body_tx, body) = http_body_util::channel::Channel::<bytes::Bytes>::new(4);
    let req = http::Request::post(format!("{}/vmprovisioner.v1.VmService/CreateVm", d.url))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let pending = send.send_request(req);
    body_tx
        .send_data(bytes::Bytes::from(vec![0u8; 1024]))
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("answered with 1 KiB sent")
        .unwrap();
    assert_eq!(resp.headers()["grpc-status"], "16", "{:?}", resp.headers());
    drop(body_tx);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customer_over_its_rate_is_refused_while_another_is_not() {
    // 0.2 requests a second: nothing refills within the test.
    let d = Daemon::start_with(&[
        "--auth-mode",
        "dev",
        "--rate-limit-rps",
        "0.2",
        "--rate-limit-burst",
        "3",
    ]);
    for _ in 0..3 {
        d.ok("dev_customer_a", "ListVms", json!({})).await;
    }
    let (code, msg) = d
        .call("dev_customer_a", "ListVms", json!({}))
        .await
        .unwrap_err();
    assert_eq!(code, "resource_exhausted", "{msg}");
    assert!(msg.contains("retry in"), "{msg}");
    let r = reqwest::Client::new()
        .post(format!("{}/vmprovisioner.v1.VmService/ListVms", d.url))
        .header("content-type", "application/json")
        .header("authorization", "Bearer dev_customer_a")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&wait), "Retry-After {wait}");
    let grpc = Client::new(
        HttpClient::plaintext(),
        config(&d, Protocol::GrpcWeb, Some("dev_customer_a")),
    );
    let e = list(&grpc).await.unwrap_err();
    assert_eq!(e.code, connectrpc::ErrorCode::ResourceExhausted);

    for _ in 0..3 {
        d.ok("dev_customer_b", "ListVms", json!({})).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_body_meets_the_deadline() {
    let d = Daemon::start_with(&["--auth-mode", "dev", "--request-timeout-max", "2s"]);
    let token = ("Authorization", "Bearer dev_customer_a");
    // The server's maximum ends a body that never completes.
    let start = Instant::now();
    let a = partial_post(&d, &[token], 4096).await;
    let took = start.elapsed();
    assert!(a.contains("deadline_exceeded"), "{a}");
    assert!(took >= Duration::from_secs(2), "{took:?}");
    // A client's shorter deadline is honoured.
    let start = Instant::now();
    let a = partial_post(&d, &[token, ("Connect-Timeout-Ms", "300")], 4096).await;
    assert!(a.contains("deadline_exceeded"), "{a}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}
