//! Every setting of the daemon: a command-line flag and a `UNKEY_METALD_*`
//! environment variable each. A value that does not parse stops start-up
//! with an error naming the variable, never a silent default.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Which VMM drives the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Firecracker, configured over its API socket (optionally jailed).
    Firecracker,
    /// Cloud Hypervisor, configured over its API socket.
    Cloudhypervisor,
    /// QEMU `-M microvm`, controlled over QMP.
    Qemu,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

/// How API callers authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// JWTs only (production).
    Jwt,
    /// Also accept `dev_customer_<id>` tokens (development and tests).
    Dev,
}

/// What part of a client certificate names the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientIdentity {
    /// The URI SAN `spiffe://<trust domain>/<path>`.
    Spiffe,
    /// The subject's common name.
    Cn,
}

/// QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QemuAccel {
    /// KVM when /dev/kvm opens, else TCG.
    Auto,
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation (slow, works everywhere).
    Tcg,
}

/// JWT signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "EdDSA")]
    EdDsa,
}

fn uid_gid(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s
        .split_once(':')
        .ok_or("write it as uid:gid, e.g. 900000:900000")?;
    let n = |x: &str| {
        x.parse::<u32>()
            .map_err(|_| format!("{x:?} is not a numeric id"))
    };
    Ok((n(u)?, n(g)?))
}

/// A size in bytes: a number, optionally with `KiB`, `MiB` or `GiB` (or
/// `K`, `M`, `G`, the same binary units).
fn bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (write sizes like 1048576, 512KiB, 1MiB)"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        other => return Err(format!("unknown unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A console log cap: at least 64 KiB.
fn log_cap(s: &str) -> Result<u64, String> {
    let n = bytes(s)?;
    if n < metald_vmm::logcap::MIN_MAX {
        return Err(format!("{s:?} is below the minimum of 64KiB"));
    }
    Ok(n)
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 100ms, 30s, 1m)"))
}

/// A duration that must not be zero.
fn positive_duration(s: &str) -> Result<Duration, String> {
    duration(s).and_then(|d| {
        (!d.is_zero())
            .then_some(d)
            .ok_or("must be above zero".into())
    })
}

/// A positive, finite rate.
fn rate(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    (r.is_finite() && r > 0.0)
        .then_some(r)
        .ok_or(format!("{s:?} must be above zero"))
}

/// metald: runs microVMs for many tenants and serves the VM API over
/// ConnectRPC, gRPC and gRPC-Web on one port.
#[derive(Debug, Clone, Parser)]
#[command(name = "metald", version, about, long_about = None)]
pub struct Config {
    /// VMM backend.
    #[arg(
        long,
        env = "UNKEY_METALD_BACKEND",
        value_enum,
        default_value = "firecracker"
    )]
    pub backend: Backend,

    /// Address the API listens on.
    #[arg(long, env = "UNKEY_METALD_ADDRESS", default_value = "0.0.0.0")]
    pub address: IpAddr,

    /// API port (0 picks a free port; the chosen address is printed).
    #[arg(long, env = "UNKEY_METALD_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Directory for the SQLite database (metald.db) and per-VM files.
    #[arg(long, env = "UNKEY_METALD_DATA_DIR", default_value = "/var/lib/metald")]
    pub data_dir: PathBuf,

    /// Where the files a VM may use live, `:`-separated. An entry holding
    /// `{customer}` (as a whole path component) is private to that
    /// customer: writable disks come only from such a root. Default:
    /// `<data dir>/assets` (shared, read-only) and
    /// `<data dir>/assets/customers/{customer}`.
    #[arg(long, env = "UNKEY_METALD_ASSET_DIRS", value_delimiter = ':')]
    pub asset_dirs: Vec<String>,

    /// Host block devices a VM may use as disks, `:`-separated: `/dev/x`
    /// (every customer, read-only) or `/dev/x=<customer>` (that customer,
    /// also writable). Default: none.
    #[arg(
        long,
        env = "UNKEY_METALD_ALLOWED_BLOCK_DEVICES",
        value_delimiter = ':'
    )]
    pub allowed_block_devices: Vec<String>,

    /// How callers authenticate.
    #[arg(
        long,
        env = "UNKEY_METALD_AUTH_MODE",
        value_enum,
        default_value = "jwt"
    )]
    pub auth_mode: AuthMode,

    /// JWT signature algorithm.
    #[arg(
        long,
        env = "UNKEY_METALD_JWT_ALGORITHM",
        value_enum,
        default_value = "HS256"
    )]
    pub jwt_algorithm: JwtAlgorithm,

    /// File holding the HS256 shared secret (trailing newline ignored).
    #[arg(long, env = "UNKEY_METALD_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM public key file for RS256 or EdDSA.
    #[arg(long, env = "UNKEY_METALD_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// JWT claim that holds the customer id.
    #[arg(long, env = "UNKEY_METALD_JWT_CUSTOMER_CLAIM", default_value = "sub")]
    pub jwt_customer_claim: String,

    /// Issuer every JWT's `iss` must equal (default: not checked).
    #[arg(long, env = "UNKEY_METALD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Audience every JWT's `aud` must contain (default: not checked).
    #[arg(long, env = "UNKEY_METALD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// JWKS file of verification keys, picked by the token's `kid`;
    /// re-read when it changes.
    #[arg(long, env = "UNKEY_METALD_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,

    /// Clock skew allowed on a JWT's `exp` and `nbf`.
    #[arg(long, env = "UNKEY_METALD_JWT_LEEWAY", default_value = "30s", value_parser = duration)]
    pub jwt_leeway: Duration,

    /// TLS certificate chain (PEM) for the API port; with the key, the
    /// port speaks only TLS. Re-read when it changes.
    #[arg(long, env = "UNKEY_METALD_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// Private key (PEM) of the TLS certificate.
    #[arg(long, env = "UNKEY_METALD_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// CA certificates (PEM) client certificates must chain to (mTLS).
    #[arg(
        long,
        env = "UNKEY_METALD_TLS_CLIENT_CA_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_client_ca_file: Option<PathBuf>,

    /// What part of a client certificate names the caller.
    #[arg(
        long,
        env = "UNKEY_METALD_TLS_CLIENT_IDENTITY",
        value_enum,
        default_value = "spiffe"
    )]
    pub tls_client_identity: ClientIdentity,

    /// Requests per second each customer may make (default: unlimited).
    #[arg(long, env = "UNKEY_METALD_RATE_LIMIT_RPS", value_parser = rate)]
    pub rate_limit_rps: Option<f64>,

    /// Requests a customer may make at once above the rate (default: the
    /// rate rounded up).
    #[arg(long, env = "UNKEY_METALD_RATE_LIMIT_BURST", requires = "rate_limit_rps",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: Option<u32>,

    /// Longest any request may take; a client's shorter `grpc-timeout` or
    /// `connect-timeout-ms` is honoured.
    #[arg(long, env = "UNKEY_METALD_REQUEST_TIMEOUT_MAX", default_value = "5m", value_parser = positive_duration)]
    pub request_timeout_max: Duration,

    /// A connection with no request in flight for this long is closed.
    #[arg(long, env = "UNKEY_METALD_IDLE_TIMEOUT", default_value = "5m", value_parser = positive_duration)]
    pub idle_timeout: Duration,

    /// Longest a client may take to send a request's headers, or to start
    /// its first request on a new connection.
    #[arg(long, env = "UNKEY_METALD_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub header_read_timeout: Duration,

    /// Most HTTP/2 streams one connection may have open at once.
    #[arg(long, env = "UNKEY_METALD_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http2_max_concurrent_streams: u32,

    /// QEMU binary (default: qemu-system-x86_64 on PATH).
    #[arg(long, env = "UNKEY_METALD_QEMU_BINARY")]
    pub qemu_binary: Option<PathBuf>,

    /// QEMU accelerator.
    #[arg(
        long,
        env = "UNKEY_METALD_QEMU_ACCEL",
        value_enum,
        default_value = "auto"
    )]
    pub qemu_accel: QemuAccel,

    /// Firecracker binary (default: firecracker on PATH).
    #[arg(long, env = "UNKEY_METALD_FIRECRACKER_BINARY")]
    pub firecracker_binary: Option<PathBuf>,

    /// Run each Firecracker through the jailer (own uid, chroot, cgroups).
    /// Unset, metald refuses to run Firecracker as root: set it to false to
    /// accept that risk explicitly.
    #[arg(long, env = "UNKEY_METALD_JAILER_ENABLED", action = clap::ArgAction::Set)]
    pub jailer_enabled: Option<bool>,

    /// Jailer binary (default: jailer on PATH).
    #[arg(long, env = "UNKEY_METALD_JAILER_BINARY")]
    pub jailer_binary: Option<PathBuf>,

    /// Where the jailer makes each VM's chroot (default: <data dir>/jailer).
    #[arg(long, env = "UNKEY_METALD_JAILER_CHROOT_DIR")]
    pub jailer_chroot_dir: Option<PathBuf>,

    /// First uid/gid of the range jailed VMs run as (one per VM).
    #[arg(long, env = "UNKEY_METALD_JAILER_UID_START", default_value_t = 900_000)]
    pub jailer_uid_start: u32,

    /// Size of the jailer's uid/gid range.
    #[arg(long, env = "UNKEY_METALD_JAILER_UID_COUNT", default_value_t = 4096)]
    pub jailer_uid_count: u32,

    /// cgroup version the jailer uses, 1 or 2 (default: 2 when the host has
    /// a cgroup2 hierarchy with the cpu and memory controllers, else 1).
    #[arg(long, env = "UNKEY_METALD_JAILER_CGROUP_VERSION")]
    pub jailer_cgroup_version: Option<u8>,

    /// Parent cgroup of the jailed VMs' cgroups.
    #[arg(
        long,
        env = "UNKEY_METALD_JAILER_PARENT_CGROUP",
        default_value = "metald"
    )]
    pub jailer_parent_cgroup: String,

    /// Cloud Hypervisor binary (default: cloud-hypervisor on PATH).
    #[arg(long, env = "UNKEY_METALD_CLOUD_HYPERVISOR_BINARY")]
    pub cloud_hypervisor_binary: Option<PathBuf>,

    /// Run each Cloud Hypervisor as this `uid:gid` (it needs access to
    /// /dev/kvm and /dev/net/tun); default: metald's own user.
    #[arg(long, env = "UNKEY_METALD_CLOUD_HYPERVISOR_USER", value_parser = uid_gid)]
    pub cloud_hypervisor_user: Option<(u32, u32)>,

    /// Put each QEMU and Cloud Hypervisor in its own cgroups with CPU and
    /// memory limits (the jailer does this for Firecracker).
    #[arg(long, env = "UNKEY_METALD_CGROUPS_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub cgroups_enabled: bool,

    /// cgroup version for those cgroups, 1 or 2 (default: as the host has).
    #[arg(long, env = "UNKEY_METALD_CGROUP_VERSION")]
    pub cgroup_version: Option<u8>,

    /// Parent cgroup of the VMs' cgroups.
    #[arg(long, env = "UNKEY_METALD_CGROUP_PARENT", default_value = "metald")]
    pub cgroup_parent: String,

    /// Most bytes each VM's console log, and each log of its VMM, holds;
    /// the newest output is kept (see docs/backends.md). At least 64KiB.
    #[arg(long, env = "UNKEY_METALD_CONSOLE_LOG_MAX", default_value = "1MiB", value_parser = log_cap)]
    pub console_log_max: u64,

    /// How long a VMM may take to start and report the guest running.
    #[arg(long, env = "UNKEY_METALD_BOOT_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub boot_timeout: Duration,

    /// How long a graceful VM shutdown waits before killing the VMM, when
    /// the request gives no timeout.
    #[arg(long, env = "UNKEY_METALD_VM_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub vm_shutdown_timeout: Duration,

    /// Show the host's own details in GetVmInfo's `backend_info`: host
    /// paths (the VMM's socket, its console log), the VMM's host pid, a
    /// jailed VMM's uid and jail name. Off: a customer learns nothing of
    /// the host. For a host whose every caller is its operator.
    #[arg(long, env = "UNKEY_METALD_VM_INFO_HOST_DETAILS", default_value_t = false, action = clap::ArgAction::Set)]
    pub vm_info_host_details: bool,

    /// How long metald waits for in-flight requests when it is stopped.
    #[arg(long, env = "UNKEY_METALD_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// How often the reconciler looks for VMs whose VMM died and for VMM
    /// processes or files no VM claims (one pass also runs at start-up).
    #[arg(long, env = "UNKEY_METALD_RECONCILE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub reconcile_interval: Duration,

    #[command(flatten)]
    pub quotas: crate::quotas::QuotaArgs,

    #[command(flatten)]
    pub otel: crate::telemetry::OtelArgs,

    #[command(flatten)]
    pub telemetry: telemetry::TelemetryArgs,

    #[command(flatten)]
    pub network: network::NetworkArgs,

    #[command(flatten)]
    pub dhcp: dhcp::DhcpArgs,

    /// Shut every VM down (gracefully, within the VM shutdown timeout) when
    /// metald stops. By default VMs keep running and the next metald adopts
    /// them.
    #[arg(
        long,
        env = "UNKEY_METALD_SHUTDOWN_VMS_ON_EXIT",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub shutdown_vms_on_exit: bool,

    /// Send usage to the billing service. When false, VMs are still
    /// sampled (for GetVmInfo) but nothing is spooled or sent.
    #[arg(
        long,
        env = "UNKEY_METALD_BILLING_ENABLED",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub billing_enabled: bool,

    /// Base URL of billing.v1.BillingService.
    #[arg(
        long,
        env = "UNKEY_METALD_BILLING_ENDPOINT",
        default_value = "http://localhost:8081"
    )]
    pub billing_endpoint: String,

    /// How often every running or paused VM is sampled.
    #[arg(long, env = "UNKEY_METALD_BILLING_SAMPLE_INTERVAL", default_value = "100ms", value_parser = duration)]
    pub billing_sample_interval: Duration,

    /// How often spooled samples are sent, one batch per VM.
    #[arg(long, env = "UNKEY_METALD_BILLING_BATCH_INTERVAL", default_value = "1m", value_parser = duration)]
    pub billing_batch_interval: Duration,

    /// How often a heartbeat lists the running VMs.
    #[arg(long, env = "UNKEY_METALD_BILLING_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = duration)]
    pub billing_heartbeat_interval: Duration,

    /// Spooled samples are fsynced at least this often (at most this much
    /// is lost if the host loses power).
    #[arg(long, env = "UNKEY_METALD_BILLING_SYNC_INTERVAL", default_value = "1s", value_parser = duration)]
    pub billing_sync_interval: Duration,

    /// Most samples the spool holds while the billing service is
    /// unreachable (5 000 000 ≈ 1 000 VMs for 8 minutes at 100 ms); beyond
    /// it samples are dropped with an error and reported as gaps.
    #[arg(
        long,
        env = "UNKEY_METALD_BILLING_SPOOL_MAX_SAMPLES",
        default_value_t = 5_000_000
    )]
    pub billing_spool_max_samples: i64,

    /// Names this metald to the billing service (default: the host name).
    #[arg(long, env = "UNKEY_METALD_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Log filter (tracing EnvFilter syntax, e.g. `info,metald_core=debug`).
    #[arg(long, env = "UNKEY_METALD_LOG", default_value = "info")]
    pub log: String,

    /// Log lines as JSON objects or as text; `auto` is JSON when stdout is
    /// not a terminal (systemd's journal, a log shipper).
    #[arg(
        long,
        env = "UNKEY_METALD_LOG_FORMAT",
        value_enum,
        default_value = "auto"
    )]
    pub log_format: LogFormat,
}

impl Config {
    /// Parses flags and environment; on a bad value, the error names the
    /// environment variable as well as the flag.
    /// The asset roots in effect (the default when none are configured).
    pub fn asset_roots(&self) -> Vec<String> {
        if self.asset_dirs.iter().any(|d| !d.is_empty()) {
            return self.asset_dirs.clone();
        }
        let base = self.data_dir.join("assets");
        vec![
            base.display().to_string(),
            base.join("customers")
                .join(metald_core::assets::CUSTOMER_PLACEHOLDER)
                .display()
                .to_string(),
        ]
    }

    pub fn load() -> Result<Self, clap::Error> {
        Self::try_parse_from(std::env::args_os())
    }

    /// Like [`Config::load`] from explicit arguments (for tests).
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        <Self as Parser>::try_parse_from(args).map_err(name_the_variable)
    }
}

/// Adds the environment variable to clap's "invalid value" errors, which
/// otherwise name only the flag.
fn name_the_variable(err: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return err;
    }
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    let cmd = <Config as clap::CommandFactory>::command();
    let flag = arg
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_start_matches("--");
    let env = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(flag))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    match env {
        Some(env) => {
            let mut cmd = cmd;
            cmd.error(
                ErrorKind::ValueValidation,
                format!(
                    "invalid value for {env} (--{flag}): {}",
                    inner_message(&err)
                ),
            )
        }
        None => err,
    }
}

fn inner_message(err: &clap::Error) -> String {
    let text = err.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_owned()
}

pub mod dhcp;
pub mod network;
pub mod telemetry;

#[cfg(test)]
mod tests;
