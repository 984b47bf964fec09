//! The metald daemon: reads its configuration, builds the adapters (SQLite
//! store, VMM backend), re-attaches to VMs that survived a restart, and
//! serves the API until SIGTERM or SIGINT. VMs keep running when metald
//! stops; the next metald adopts them.

mod backends;
mod config;
mod health;
mod limits;
mod metrics;
mod network;
mod quotas;
mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use metald_api::{
    ApiServer, AuthConfig, Authenticator, ConnectionLimits, JwtKey, JwtRules, RateLimiter, Tls,
    TlsFiles,
};
use metald_core::VmService;
use metald_core::service::{Ports, ServiceConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::backends::backend;
use crate::config::{AuthMode, ClientIdentity, Config, JwtAlgorithm};

fn main() {
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let telemetry = telemetry::init(&config);
    limits::raise_open_files();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(run(config));
    telemetry.shutdown();
    if let Err(e) = result {
        eprintln!("metald: {e:#}");
        std::process::exit(1);
    }
}

fn authenticator(config: &Config) -> anyhow::Result<Authenticator> {
    let read = |p: &std::path::Path, var: &str| {
        std::fs::read(p).with_context(|| format!("{var}: reading {}", p.display()))
    };
    let jwt = match (
        config.jwt_algorithm,
        &config.jwt_secret_file,
        &config.jwt_public_key_file,
    ) {
        (JwtAlgorithm::Hs256, Some(f), _) => {
            let mut secret = read(f, "UNKEY_METALD_JWT_SECRET_FILE")?;
            while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
                secret.pop();
            }
            if secret.len() < 16 {
                bail!("UNKEY_METALD_JWT_SECRET_FILE: the secret must be at least 16 bytes");
            }
            Some(JwtKey::Hs256(secret))
        }
        (JwtAlgorithm::Rs256, _, Some(f)) => Some(JwtKey::Rs256Pem(read(
            f,
            "UNKEY_METALD_JWT_PUBLIC_KEY_FILE",
        )?)),
        (JwtAlgorithm::EdDsa, _, Some(f)) => Some(JwtKey::EdDsaPem(read(
            f,
            "UNKEY_METALD_JWT_PUBLIC_KEY_FILE",
        )?)),
        (_, None, None) => None,
        (alg, _, _) => bail!(
            "UNKEY_METALD_JWT_ALGORITHM={alg:?} needs {}",
            if alg == JwtAlgorithm::Hs256 {
                "UNKEY_METALD_JWT_SECRET_FILE"
            } else {
                "UNKEY_METALD_JWT_PUBLIC_KEY_FILE"
            }
        ),
    };
    let jwks = match &config.jwt_jwks_file {
        Some(f) => {
            let jwks = metald_api::jwks::Jwks::load(f)
                .map_err(|e| anyhow::anyhow!("UNKEY_METALD_JWT_JWKS_FILE: {e}"))?;
            let watched = jwks.clone();
            metald_api::reload::watch("JWKS", vec![f.clone()], move || {
                watched.reload().map(|n| format!("{n} keys"))
            });
            Some(jwks)
        }
        None => None,
    };
    if config.auth_mode == AuthMode::Jwt && jwt.is_none() && jwks.is_none() {
        bail!(
            "UNKEY_METALD_AUTH_MODE=jwt needs a key: set UNKEY_METALD_JWT_SECRET_FILE (HS256), \
             UNKEY_METALD_JWT_PUBLIC_KEY_FILE with UNKEY_METALD_JWT_ALGORITHM, or UNKEY_METALD_JWT_JWKS_FILE; \
             or use UNKEY_METALD_AUTH_MODE=dev for development"
        );
    }
    if config.auth_mode == AuthMode::Dev {
        warn!(
            "development tokens (dev_customer_<id>) are accepted: never run like this in production"
        );
    }
    let auth = Authenticator::with_jwks(
        AuthConfig {
            dev_tokens: config.auth_mode == AuthMode::Dev,
            jwt,
            customer_claim: config.jwt_customer_claim.clone(),
        },
        jwks,
    )
    .map_err(anyhow::Error::msg)?;
    Ok(auth.with_rules(JwtRules {
        issuer: config.jwt_issuer.clone(),
        audience: config.jwt_audience.clone(),
        leeway: config.jwt_leeway,
    }))
}

/// TLS on the API port, reloaded when its files change; `None` when no
/// certificate is configured (a warning unless the port is loopback-only).
fn api_tls(config: &Config) -> anyhow::Result<Option<Arc<Tls>>> {
    let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
        if !config.address.is_loopback() {
            warn!(
                address = %config.address,
                "the API port is plaintext on a non-loopback address: set UNKEY_METALD_TLS_CERT_FILE \
                 and UNKEY_METALD_TLS_KEY_FILE, or put metald behind a TLS-terminating proxy"
            );
        }
        return Ok(None);
    };
    let tls = Tls::load(TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: config.tls_client_ca_file.clone(),
        identity: match config.tls_client_identity {
            ClientIdentity::Spiffe => metald_api::ClientIdentity::Spiffe,
            ClientIdentity::Cn => metald_api::ClientIdentity::Cn,
        },
    })
    .map_err(|e| anyhow::anyhow!("UNKEY_METALD_TLS_*: {e}"))?;
    tls.watch();
    info!(
        mtls = config.tls_client_ca_file.is_some(),
        "TLS on the API port"
    );
    Ok(Some(tls))
}

/// The API server with the transport policy the configuration asks for.
fn api_server(
    config: &Config,
    service: VmService,
    auth: Arc<Authenticator>,
    tls: Option<Arc<Tls>>,
    health: metald_api::Health,
) -> anyhow::Result<ApiServer> {
    let rate = match config.rate_limit_rps {
        Some(rps) => {
            let burst = config
                .rate_limit_burst
                .unwrap_or(rps.ceil().max(1.0) as u32);
            Some(
                RateLimiter::new(rps, burst)
                    .map_err(|e| anyhow::anyhow!("UNKEY_METALD_RATE_LIMIT_*: {e}"))?,
            )
        }
        None => None,
    };
    Ok(ApiServer {
        service,
        auth,
        tls,
        rate,
        request_timeout_max: config.request_timeout_max,
        rpc_observer: None,
        connections: ConnectionLimits {
            idle_timeout: config.idle_timeout,
            header_read_timeout: config.header_read_timeout,
            max_concurrent_streams: config.http2_max_concurrent_streams,
            ..ConnectionLimits::default()
        },
        health,
    })
}

fn billing_config(config: &Config) -> anyhow::Result<metald_billing::BillingConfig> {
    let min = std::time::Duration::from_millis(10);
    for (name, d) in [
        (
            "UNKEY_METALD_BILLING_SAMPLE_INTERVAL",
            config.billing_sample_interval,
        ),
        (
            "UNKEY_METALD_BILLING_BATCH_INTERVAL",
            config.billing_batch_interval,
        ),
        (
            "UNKEY_METALD_BILLING_HEARTBEAT_INTERVAL",
            config.billing_heartbeat_interval,
        ),
        (
            "UNKEY_METALD_BILLING_SYNC_INTERVAL",
            config.billing_sync_interval,
        ),
    ] {
        if d < min {
            bail!("{name} must be at least 10ms");
        }
    }
    if config.billing_spool_max_samples < 1 {
        bail!("UNKEY_METALD_BILLING_SPOOL_MAX_SAMPLES must be positive");
    }
    let instance_id = match &config.instance_id {
        Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
        Some(_) => bail!("UNKEY_METALD_INSTANCE_ID must not be empty"),
        None => rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned(),
    };
    Ok(metald_billing::BillingConfig {
        enabled: config.billing_enabled,
        endpoint: config.billing_endpoint.clone(),
        sample_interval: config.billing_sample_interval,
        batch_interval: config.billing_batch_interval,
        heartbeat_interval: config.billing_heartbeat_interval,
        sync_interval: config.billing_sync_interval,
        max_spooled_samples: config.billing_spool_max_samples,
        instance_id,
    })
}

/// Holds an exclusive lock on the data directory for metald's lifetime, so
/// two metalds never manage (and reconcile away) each other's VMs. The
/// kernel drops the lock when metald exits, however it exits.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("metald.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("UNKEY_METALD_DATA_DIR: opening {}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| {
            anyhow::anyhow!(
                "UNKEY_METALD_DATA_DIR: {} is in use by another metald (lock {} is held)",
                dir.display(),
                path.display()
            )
        },
    )?;
    Ok(file)
}

/// Host networking for VMs, when enabled: the bridge, the DHCP server and
/// its hosts file rebuilt from the VM rows.
async fn host_network(
    config: &Config,
    store: &metald_store::SqliteStore,
) -> anyhow::Result<Option<Arc<network::HostNetwork>>> {
    let n = &config.network;
    if n.enabled {
        let (isolation, deprecated) = n.isolation();
        if let Some(w) = deprecated {
            warn!("{w}");
        }
        let host = metald_network::Host::setup(metald_network::NetworkConfig {
            bridge: n.bridge.clone(),
            ipv4_subnet: n.ipv4_subnet,
            ipv6_subnet: n.ipv6_subnet,
            isolation: match isolation {
                config::network::Isolation::Customer => metald_network::Isolation::Customer,
                config::network::Isolation::Vm => metald_network::Isolation::Vm,
                config::network::Isolation::None => metald_network::Isolation::None,
            },
            egress: n.egress,
            protect_host: n.protect_host,
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "UNKEY_METALD_NETWORK_*: setting up bridge {}: {e}",
                n.bridge
            )
        })?;
        info!(bridge = %n.bridge, v4 = %n.ipv4_subnet, v6 = %n.ipv6_subnet, ?isolation, egress = n.egress, protect_host = n.protect_host, "VM networking ready");
        let dhcp = network::dhcp_server(config).await?;
        let net = network::HostNetwork::new(host, dhcp, config.dhcp.network_kernel_args);
        net.restore(store)
            .await
            .map_err(|e| anyhow::anyhow!("rebuilding the DHCP hosts file: {e}"))?;
        Ok(Some(Arc::new(net)))
    } else {
        info!("VM networking disabled (UNKEY_METALD_NETWORK_ENABLED=false)");
        Ok(None)
    }
}

/// The periodic reconciler; `clock` tells the health check how it went.
fn spawn_reconciler(
    service: VmService,
    every: std::time::Duration,
    clock: Arc<health::ReconcileClock>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match service.reconcile(false).await {
                Ok(_) => clock.passed(),
                Err(e) => {
                    warn!(error = %e, "reconcile pass failed");
                    clock.failed(e.to_string());
                }
            }
        }
    })
}

/// Tells systemd (when metald runs under it with `NOTIFY_SOCKET`) how
/// start-up or stopping is going; nothing otherwise.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "telling systemd failed");
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    Ok(())
}

/// The service and the adapters it runs on.
struct Opened {
    service: VmService,
    store: metald_store::SqliteStore,
    billing: Arc<metald_billing::Billing>,
    billing_tasks: metald_billing::BillingTasks,
    backend: health::BackendFacts,
    metrics: Arc<metrics::Metrics>,
    network: Option<Arc<network::HostNetwork>>,
}

/// The service over its adapters: the backend, the store, billing, the
/// host network and the metrics.
async fn open_service(
    config: &Config,
    assets: metald_core::assets::AssetPolicy,
) -> anyhow::Result<Opened> {
    let metrics = Arc::new(metrics::Metrics::new(config.telemetry.high_cardinality));
    let (vmm, backend_facts) = backend(config)?;
    let db = config.data_dir.join("metald.db");
    let store = metald_store::SqliteStore::open(&db)
        .await
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", db.display()))?;
    let (billing, billing_tasks) =
        metald_billing::Billing::start(billing_config(config)?, &config.data_dir)
            .await
            .map_err(anyhow::Error::msg)?;
    let network = host_network(config, &store).await?;
    let service = VmService::new(
        Ports {
            store: Arc::new(store.clone()),
            vmm,
            network: network
                .clone()
                .map(|n| n as Arc<dyn metald_core::ports::Network>),
            usage: Some(billing.clone()),
            observers: vec![billing.clone()],
            telemetry: metrics.clone(),
        },
        ServiceConfig {
            default_shutdown_timeout: config.vm_shutdown_timeout,
            assets,
            quotas: config.quotas.book()?,
            host: Some(config.quotas.host()?),
            host_details_in_info: config.vm_info_host_details,
        },
    );
    Ok(Opened {
        service,
        store,
        billing,
        billing_tasks,
        backend: backend_facts,
        metrics,
        network,
    })
}

/// The metrics listener, when enabled.
async fn serve_metrics(
    config: &Config,
    opened: &Opened,
    health: &metald_api::Health,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let t = &config.telemetry;
    if !t.prometheus_enabled {
        info!("Prometheus metrics disabled (UNKEY_METALD_OTEL_PROMETHEUS_ENABLED=false)");
        return Ok(None);
    }
    let collector = metrics::BillingCollector(opened.billing.clone());
    let scrape = metrics::Scrape {
        registry: opened.metrics.registry(Some(collector)),
        metrics: opened.metrics.clone(),
        // The service's store: a scrape reads its kept rows, not SQLite.
        store: opened.service.store(),
        backend: opened.service.backend_name(),
        health: health.clone(),
    };
    let addr = SocketAddr::new(t.prometheus_address, t.prometheus_port);
    Ok(Some(metrics::serve(addr, scrape).await?))
}

/// The API listener; once bound, a plain line on stdout tells scripts and
/// tests the API is up and where.
async fn bind_api(config: &Config, tls: bool) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = SocketAddr::new(config.address, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding UNKEY_METALD_ADDRESS:UNKEY_METALD_PORT = {addr}"))?;
    let local = listener.local_addr()?;
    let scheme = if tls { "https" } else { "http" };
    info!(%local, data_dir = %config.data_dir.display(), "metald serving");
    println!("metald listening on {scheme}://{local}");
    Ok(listener)
}

/// Before serving: resume interrupted plans, adopt surviving VMMs, then
/// clean up whatever no VM claims, and tell billing what runs.
async fn settle(service: &VmService) -> anyhow::Result<()> {
    service.recover().await.context("re-attaching to VMs")?;
    service
        .reconcile(true)
        .await
        .context("start-up reconcile")?;
    service
        .announce_all()
        .await
        .context("telling billing which VMs run")?;
    Ok(())
}

/// Where guests' files may come from.
fn asset_policy(config: &Config) -> anyhow::Result<metald_core::assets::AssetPolicy> {
    let assets =
        metald_core::assets::AssetPolicy::new(&config.asset_roots(), &config.allowed_block_devices)
            .map_err(|e| {
                anyhow::anyhow!("UNKEY_METALD_ASSET_DIRS / UNKEY_METALD_ALLOWED_BLOCK_DEVICES: {e}")
            })?;
    info!(roots = ?config.asset_roots(), "asset roots");
    Ok(assets)
}

async fn run(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "UNKEY_METALD_DATA_DIR: creating {}",
            config.data_dir.display()
        )
    })?;
    let _lock = lock_data_dir(&config.data_dir)?;
    let auth = Arc::new(authenticator(&config)?);
    // Before any VM is touched: a bad certificate stops start-up at once.
    let tls = api_tls(&config)?;
    let assets = asset_policy(&config)?;
    let opened = open_service(&config, assets).await?;
    let health = metald_api::Health::new();
    let metrics_server = serve_metrics(&config, &opened, &health).await?;
    let Opened {
        service,
        store,
        billing,
        billing_tasks,
        backend,
        metrics,
        network,
    } = opened;
    settle(&service).await?;
    let clock = Arc::new(health::ReconcileClock::default());
    clock.passed();
    let reconciler = spawn_reconciler(service.clone(), config.reconcile_interval, clock.clone());
    let probes = health::Probes {
        store: store.clone(),
        data_dir: config.data_dir.clone(),
        backend,
        network: config.network.enabled,
        billing,
        billing_lag_limit: (config.billing_batch_interval * 3)
            .max(std::time::Duration::from_secs(60)),
        reconcile: clock,
        reconcile_interval: config.reconcile_interval,
        versions: health::Versions::default(),
    };
    let checks = health::start(health.clone(), probes).await;

    let quota_watch = config.quotas.clone().watch(service.clone())?;

    let mut api = api_server(&config, service.clone(), auth, tls, health)?;
    api.rpc_observer = Some(metrics);
    let listener = bind_api(&config, api.tls.is_some()).await?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(metald_api::serve(listener, api, async {
        let _ = stop_rx.await;
    }));
    // systemd (Type=notify): the API serves.
    notify(&[sd_notify::NotifyState::Ready]);
    stop_signal().await?;
    notify(&[sd_notify::NotifyState::Stopping]);
    checks.abort();
    // Stop accepting, let in-flight requests finish (bounded).
    let _ = stop_tx.send(());
    match tokio::time::timeout(config.drain_timeout, server).await {
        Ok(Ok(Ok(()))) => info!("in-flight requests finished"),
        Ok(Ok(Err(e))) => warn!(error = %e, "server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "server task failed"),
        Err(_) => warn!("in-flight requests did not finish within the drain timeout"),
    }
    for task in [Some(reconciler), Some(quota_watch), metrics_server]
        .into_iter()
        .flatten()
    {
        task.abort();
    }
    stop(&config, &service, billing_tasks, &store, network.as_deref()).await;
    Ok(())
}

/// After the API stopped: VMs shut down if configured, billing flushed,
/// the DHCP server stopped if no VM needs it, the database checkpointed.
async fn stop(
    config: &Config,
    service: &VmService,
    billing_tasks: metald_billing::BillingTasks,
    store: &metald_store::SqliteStore,
    network: Option<&network::HostNetwork>,
) {
    if config.shutdown_vms_on_exit {
        match service.shutdown_all().await {
            Ok(n) => info!(vms = n, "shut VMs down (UNKEY_METALD_SHUTDOWN_VMS_ON_EXIT)"),
            Err(e) => warn!(error = %e, "shutting VMs down failed"),
        }
    } else {
        info!("VMs keep running; the next metald adopts them");
    }
    // Billing last, so it still sees the VMs stop: their final samples and
    // stop notices are written (fsync) and, if the billing service answers,
    // sent. Bounded like the drain; what is cut off is reported as a gap by
    // the next start.
    billing_tasks.shutdown(config.drain_timeout).await;
    if let Some(net) = network {
        net.stop().await;
    }
    // Checkpoints the write-ahead log into the database file.
    store.close().await;
    info!("stopped cleanly");
}
