//! DHCPv4 and IPv6 router advertisements for the guests on metald's host
//! bridge, served by dnsmasq (Debian's `dnsmasq-base`), the way libvirt
//! does it: one dnsmasq per bridge, no DNS server (`--port=0`), bound to the
//! bridge alone, DHCPv4 for static leases only (the hosts file, one
//! `MAC,IP` line per IPAM lease, re-read on SIGHUP), and router
//! advertisements for the IPv6 prefix, with the autonomous flag so the
//! guest's kernel configures the EUI-64 address of its MAC (SLAAC).
//!
//! Everything dnsmasq writes lives in one directory of metald's data dir:
//! the hosts file, its lease file, its pid file and its log. dnsmasq runs
//! as root (`--user=root`): it re-reads the hosts file inside metald's data
//! directory, which only root may enter.
//!
//! dnsmasq daemonises itself, so like the VMMs it outlives metald: a
//! starting metald adopts the dnsmasq its pid file names when that process
//! runs with exactly this configuration's arguments (checked in
//! `/proc/<pid>/cmdline`), and otherwise stops it (a dnsmasq of this
//! directory with other arguments: the settings changed) and starts a new
//! one. [`DhcpServer::stop_if_unused`] stops it on a clean stop of metald
//! when no VM interface has a line left.
//!
//! dnsmasq constructs router advertisements only for /64 prefixes (SLAAC
//! needs 64 interface bits): with an IPv6 subnet of another length no RA is
//! sent, and guests need the kernel command line's `metald.ip6=` /
//! `metald.gw6=` (or their own configuration).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::dhcp_hosts::{self, HostEntry, Hosts};

/// What the server hands out, and where its files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The host bridge to serve on.
    pub bridge: String,
    /// Its own directory (metald uses `<data_dir>/dhcp`).
    pub dir: PathBuf,
    /// The VMs' IPv4 subnet; the gateway is its first host address.
    pub ipv4_subnet: ipnet::Ipv4Net,
    /// The VMs' IPv6 subnet; router advertisements only when it is a /64.
    pub ipv6_subnet: ipnet::Ipv6Net,
    /// DNS servers to tell guests (DHCPv4 option 6, RDNSS in the RA); none
    /// by default.
    pub dns: Vec<IpAddr>,
    /// The link MTU to tell guests (DHCPv4 option 26, the RA's MTU option).
    pub mtu: u32,
    /// DHCPv4 lease time, seconds (dnsmasq's minimum is 120).
    pub lease_secs: u32,
}

impl DhcpConfig {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether router advertisements (SLAAC) are sent: only for a /64.
    pub fn router_advertisements(&self) -> bool {
        self.ipv6_subnet.prefix_len() == 64
    }
}

/// dnsmasq's command line (after the program name).
pub(crate) fn args(c: &DhcpConfig) -> Vec<String> {
    let path = |name: &str| c.file(name).display().to_string();
    let v4 = c.ipv4_subnet.trunc();
    let gateway = v4.hosts().next().unwrap_or(v4.network());
    let pool = 1u64 << (32 - u32::from(v4.prefix_len()));
    let mut a = vec![
        "--conf-file=/dev/null".to_string(),
        "--port=0".to_string(),
        "--bind-interfaces".to_string(),
        format!("--interface={}", c.bridge),
        "--except-interface=lo".to_string(),
        "--user=root".to_string(),
        format!("--pid-file={}", path("dnsmasq.pid")),
        format!("--dhcp-leasefile={}", path("leases")),
        format!("--dhcp-hostsfile={}", path("hosts")),
        format!("--log-facility={}", path("dnsmasq.log")),
        "--quiet-dhcp".to_string(),
        "--quiet-ra".to_string(),
        "--dhcp-authoritative".to_string(),
        format!("--dhcp-lease-max={}", pool.min(1 << 24)),
        format!(
            "--dhcp-range={},static,{},{}",
            v4.network(),
            v4.netmask(),
            c.lease_secs
        ),
        format!("--dhcp-option=option:router,{gateway}"),
        format!("--dhcp-option=option:mtu,{}", c.mtu),
    ];
    let dns4: Vec<String> = c
        .dns
        .iter()
        .filter(|d| d.is_ipv4())
        .map(|d| d.to_string())
        .collect();
    if !dns4.is_empty() {
        a.push(format!(
            "--dhcp-option=option:dns-server,{}",
            dns4.join(",")
        ));
    }
    if c.router_advertisements() {
        a.push("--enable-ra".to_string());
        a.push(format!("--dhcp-range=::,constructor:{},ra-only", c.bridge));
        a.push(format!("--ra-param={},mtu:{},60", c.bridge, c.mtu));
        let dns6: Vec<String> = c
            .dns
            .iter()
            .filter(|d| d.is_ipv6())
            .map(|d| format!("[{d}]"))
            .collect();
        if !dns6.is_empty() {
            a.push(format!(
                "--dhcp-option=option6:dns-server,{}",
                dns6.join(",")
            ));
        }
    }
    a
}

/// The dnsmasq binary: on `PATH`, else Debian's `/usr/sbin/dnsmasq`.
fn program() -> Result<PathBuf, String> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("dnsmasq"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "dnsmasq is not installed (Debian package dnsmasq-base): it serves the \
             guests' DHCP and router advertisements"
                .to_string()
        })
}

/// A process's command line, split at its NULs.
fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

fn is_dnsmasq(argv: &[String]) -> bool {
    argv.first()
        .and_then(|p| Path::new(p).file_name())
        .is_some_and(|n| n == "dnsmasq")
}

/// The pid in `dir`'s pid file and its command line, if that process is a
/// dnsmasq serving `dir`'s hosts file.
fn of_dir(dir: &Path) -> Option<(i32, Vec<String>)> {
    let text = std::fs::read_to_string(dir.join("dnsmasq.pid")).ok()?;
    let pid: i32 = text.trim().parse().ok().filter(|p| *p > 0)?;
    let argv = cmdline(pid)?;
    let hosts = format!("--dhcp-hostsfile={}", dir.join("hosts").display());
    (is_dnsmasq(&argv) && argv.contains(&hosts)).then_some((pid, argv))
}

/// The pid in the pid file, if its process is a dnsmasq of this directory:
/// `Ok` when it runs with exactly `args`, `Err` when with other ones.
fn recorded(c: &DhcpConfig, args: &[String]) -> Option<Result<i32, i32>> {
    let (pid, argv) = of_dir(&c.dir)?;
    Some(if argv[1..] == *args {
        Ok(pid)
    } else {
        Err(pid)
    })
}

/// With the server turned off: stops a dnsmasq an earlier metald left
/// serving `dir` (its DHCP directory); returns its pid if there was one.
pub fn stop_leftover(dir: &Path) -> Result<Option<i32>, String> {
    let Some((pid, _)) = of_dir(dir) else {
        return Ok(None);
    };
    terminate(pid)?;
    let _ = std::fs::remove_file(dir.join("dnsmasq.pid"));
    Ok(Some(pid))
}

fn signal(pid: i32, sig: libc::c_int) -> Result<(), String> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "signalling dnsmasq ({pid}): {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// SIGTERM, then waits (5 s at most) for the process to be gone.
fn terminate(pid: i32) -> Result<(), String> {
    signal(pid, libc::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while cmdline(pid).is_some_and(|a| is_dnsmasq(&a)) {
        if Instant::now() > deadline {
            return Err(format!("dnsmasq ({pid}) did not stop within 5 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts dnsmasq (it daemonises; its parent exits once it serves, or
/// with the reason it cannot) and returns the daemon's pid.
fn launch(c: &DhcpConfig, args: &[String]) -> Result<i32, String> {
    let pid_file = c.file("dnsmasq.pid");
    let _ = std::fs::remove_file(&pid_file);
    let out = std::process::Command::new(program()?)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| format!("running dnsmasq: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "dnsmasq did not start ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(Ok(pid)) = recorded(c, args) {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            return Err("dnsmasq started but wrote no pid file within 5 s".to_string());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adopts the running dnsmasq of this configuration (telling it to re-read
/// the hosts file), or replaces one with other arguments, or starts one.
fn adopt_or_launch(c: &DhcpConfig, args: &[String]) -> Result<(i32, bool), String> {
    match recorded(c, args) {
        Some(Ok(pid)) => {
            signal(pid, libc::SIGHUP)?;
            Ok((pid, true))
        }
        Some(Err(old)) => {
            tracing::info!(pid = old, "dnsmasq runs with other settings: restarting it");
            terminate(old)?;
            Ok((launch(c, args)?, false))
        }
        None => Ok((launch(c, args)?, false)),
    }
}

/// Stops the host from taking the RAs it sends itself as its own router.
fn no_self_autoconf(bridge: &str) {
    for knob in ["accept_ra", "autoconf"] {
        let path = format!("/proc/sys/net/ipv6/conf/{bridge}/{knob}");
        if let Err(e) = std::fs::write(&path, "0") {
            tracing::warn!(bridge, knob, error = %e, "cannot turn off IPv6 autoconfiguration on the bridge");
        }
    }
}

/// The running server and the hosts file it serves.
pub struct DhcpServer {
    config: DhcpConfig,
    args: Vec<String>,
    hosts: tokio::sync::Mutex<Hosts>,
}

impl std::fmt::Debug for DhcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhcpServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Runs file and process work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("DHCP server task: {e}"))?
}

impl DhcpServer {
    /// Makes the directory, keeps the hosts file's well-formed lines, and
    /// adopts or starts dnsmasq. Call after the bridge exists.
    pub async fn start(config: DhcpConfig) -> Result<DhcpServer, String> {
        if config.bridge.is_empty() || config.bridge.contains('/') || config.bridge.len() > 15 {
            return Err(format!("{:?} is not a bridge name", config.bridge));
        }
        let args = args(&config);
        let c = config.clone();
        let a = args.clone();
        let hosts = blocking(move || {
            std::fs::create_dir_all(&c.dir)
                .map_err(|e| format!("creating the DHCP directory: {e}"))?;
            let (hosts, skipped) = dhcp_hosts::load(&c.file("hosts"))?;
            for line in skipped {
                tracing::warn!(line, "dropping a DHCP hosts line metald did not write");
            }
            dhcp_hosts::store(&c.file("hosts"), &hosts)?;
            if c.router_advertisements() {
                no_self_autoconf(&c.bridge);
            }
            let (pid, adopted) = adopt_or_launch(&c, &a)?;
            tracing::info!(pid, adopted, bridge = %c.bridge, ra = c.router_advertisements(), "DHCP server (dnsmasq) serving");
            Ok(hosts)
        })
        .await?;
        Ok(DhcpServer {
            config,
            args,
            hosts: tokio::sync::Mutex::new(hosts),
        })
    }

    /// The configuration it serves.
    pub fn config(&self) -> &DhcpConfig {
        &self.config
    }

    /// The pid of the dnsmasq serving now, if one runs.
    pub fn pid(&self) -> Option<i32> {
        recorded(&self.config, &self.args).and_then(Result::ok)
    }

    /// Writes `hosts` (when it differs) and has dnsmasq re-read it; a
    /// dnsmasq that is gone is started again.
    async fn publish(&self, current: &mut Hosts, hosts: Hosts) -> Result<(), String> {
        if *current == hosts {
            return Ok(());
        }
        let (c, a, h) = (self.config.clone(), self.args.clone(), hosts.clone());
        blocking(move || {
            dhcp_hosts::store(&c.file("hosts"), &h)?;
            match recorded(&c, &a) {
                Some(Ok(pid)) => signal(pid, libc::SIGHUP),
                _ => {
                    tracing::warn!("dnsmasq is not running: starting it again");
                    adopt_or_launch(&c, &a).map(|_| ())
                }
            }
        })
        .await?;
        *current = hosts;
        Ok(())
    }

    /// Serves `entry` to interface `index` of `vm_id` (idempotent).
    pub async fn set(&self, vm_id: &str, index: usize, entry: HostEntry) -> Result<(), String> {
        crate::names::validate_vm_id(vm_id)?;
        let mut current = self.hosts.lock().await;
        let mut hosts = current.clone();
        hosts.insert((vm_id.to_string(), index), entry);
        self.publish(&mut current, hosts).await
    }

    /// Stops serving interface `index` of `vm_id`; absent is fine.
    pub async fn remove(&self, vm_id: &str, index: usize) -> Result<(), String> {
        let mut current = self.hosts.lock().await;
        let mut hosts = current.clone();
        hosts.remove(&(vm_id.to_string(), index));
        self.publish(&mut current, hosts).await
    }

    /// Replaces every line (the start-up rebuild from metald's records).
    pub async fn replace_all(
        &self,
        entries: impl IntoIterator<Item = ((String, usize), HostEntry)>,
    ) -> Result<(), String> {
        let mut current = self.hosts.lock().await;
        self.publish(&mut current, entries.into_iter().collect())
            .await
    }

    /// The owners (VM id, interface index) of every line.
    pub async fn owners(&self) -> Vec<(String, usize)> {
        self.hosts.lock().await.keys().cloned().collect()
    }

    /// On a clean stop: stops dnsmasq when no line is left (no VM needs
    /// it); returns whether it did. Otherwise it keeps serving the running
    /// VMs and the next metald adopts it.
    pub async fn stop_if_unused(&self) -> Result<bool, String> {
        let current = self.hosts.lock().await;
        if !current.is_empty() {
            return Ok(false);
        }
        let (c, a) = (self.config.clone(), self.args.clone());
        blocking(move || {
            if let Some(Ok(pid)) = recorded(&c, &a) {
                terminate(pid)?;
            }
            let _ = std::fs::remove_file(c.file("dnsmasq.pid"));
            Ok(true)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(v6: &str, dns: &[&str]) -> DhcpConfig {
        DhcpConfig {
            bridge: "metald0".into(),
            dir: "/var/lib/metald/dhcp".into(),
            ipv4_subnet: "10.100.0.0/16".parse().unwrap(),
            ipv6_subnet: v6.parse().unwrap(),
            dns: dns.iter().map(|d| d.parse().unwrap()).collect(),
            mtu: 1500,
            lease_secs: 3600,
        }
    }

    #[test]
    fn the_arguments_serve_static_dhcp_and_slaac_on_the_bridge_only() {
        let a = args(&config("fd00:1::/64", &[]));
        let want = [
            "--conf-file=/dev/null",
            "--port=0",
            "--bind-interfaces",
            "--interface=metald0",
            "--user=root",
            "--pid-file=/var/lib/metald/dhcp/dnsmasq.pid",
            "--dhcp-leasefile=/var/lib/metald/dhcp/leases",
            "--dhcp-hostsfile=/var/lib/metald/dhcp/hosts",
            "--log-facility=/var/lib/metald/dhcp/dnsmasq.log",
            "--dhcp-lease-max=65536",
            "--dhcp-range=10.100.0.0,static,255.255.0.0,3600",
            "--dhcp-option=option:router,10.100.0.1",
            "--dhcp-option=option:mtu,1500",
            "--enable-ra",
            "--dhcp-range=::,constructor:metald0,ra-only",
            "--ra-param=metald0,mtu:1500,60",
        ];
        for w in want {
            assert!(a.iter().any(|x| x == w), "missing {w} in {a:?}");
        }
        assert!(
            !a.iter().any(|x| x.contains("dns-server")),
            "no DNS option unless configured: {a:?}"
        );
        // Nothing dnsmasq writes lies outside its directory.
        for x in &a {
            if let Some((_, path)) = x.split_once("=/")
                && !x.starts_with("--conf-file")
            {
                assert!(path.starts_with("var/lib/metald/dhcp/"), "{x}");
            }
        }
    }

    #[test]
    fn dns_servers_go_to_their_family_and_other_prefixes_get_no_ra() {
        let a = args(&config(
            "fd00:1::/64",
            &["10.0.0.53", "9.9.9.9", "fd00::53"],
        ));
        assert!(a.contains(&"--dhcp-option=option:dns-server,10.0.0.53,9.9.9.9".to_string()));
        assert!(a.contains(&"--dhcp-option=option6:dns-server,[fd00::53]".to_string()));
        let a = args(&config("fd00:1::/112", &["fd00::53"]));
        assert!(
            !a.iter()
                .any(|x| x.contains("ra") && x.starts_with("--enable"))
        );
        assert!(!a.iter().any(|x| x.contains("constructor")), "{a:?}");
        assert!(!a.iter().any(|x| x.contains("option6")), "{a:?}");
    }
}
