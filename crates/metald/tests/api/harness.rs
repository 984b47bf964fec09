//! Starts the real `metald` binary on a free port with a temporary data
//! directory, and talks to it the way clients do: Connect JSON over plain
//! HTTP (like curl), or the generated Rust client over gRPC / gRPC-Web.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Paths of the test guest made by `scripts/guest-assets.sh`.
#[derive(Debug, Clone)]
pub struct Assets {
    pub kernel: String,
    pub initrd: String,
    pub disk: String,
    /// Kernel arguments suited to this host (see guest-assets.sh).
    pub kernel_args: String,
}

/// `assets.env`: `METALD_ASSETS_ENV`, else the one the README's test
/// command prepares in the checkout (as a path without `..`, as asset
/// roots must be).
fn assets_env() -> PathBuf {
    std::env::var("METALD_ASSETS_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            root.canonicalize()
                .unwrap_or(root)
                .join(".metald/assets/assets.env")
        })
}

impl Assets {
    /// Reads `assets.env`; fails loudly when the README's test command was
    /// not used (it prepares the assets first).
    pub fn load() -> Assets {
        let path = assets_env();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run scripts/guest-assets.sh (the README's test command does)",
                path.display()
            )
        });
        let find = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(|v| v.trim_matches('"').to_owned())
        };
        let get =
            |k: &str| find(k).unwrap_or_else(|| panic!("{k} missing from {}", path.display()));
        Assets {
            kernel: get("METALD_GUEST_KERNEL"),
            initrd: get("METALD_GUEST_INITRD"),
            disk: get("METALD_GUEST_DISK"),
            kernel_args: find("METALD_GUEST_KERNEL_ARGS")
                .unwrap_or_else(|| "console=ttyS0 reboot=k panic=1".into()),
        }
    }

    /// A CreateVm config in the seed README's shape, for these assets.
    pub fn config(&self) -> Value {
        json!({
            "cpu": {"vcpu_count": 1},
            "memory": {"size_bytes": 134217728},
            "boot": {
                "kernel_path": self.kernel,
                "initrd_path": self.initrd,
                "kernel_args": self.kernel_args
            },
            "storage": [{"id": "root", "path": self.disk, "read_only": true, "is_root_device": true}]
        })
    }
}

/// Where the test guest's files are (the directory of `assets.env`).
pub fn assets_dir() -> PathBuf {
    assets_env()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The asset roots a test metald uses: the test guest's directory
/// (shared), `<data dir>/assets` (shared) and
/// `<data dir>/assets/customers/{customer}` (private).
pub fn asset_dirs(data_dir: &Path) -> String {
    format!(
        "{}:{}:{}",
        assets_dir().display(),
        data_dir.join("assets").display(),
        data_dir.join("assets/customers/{customer}").display()
    )
}

/// The host-wide key of the caller's VM `name` (its files, processes and
/// cgroups are named by it).
pub async fn vm_key(d: &Daemon, token: &str, name: &str) -> String {
    let info = d.ok(token, "GetVmInfo", json!({"vm_id": name})).await;
    info["backendInfo"]["vm_key"]
        .as_str()
        .unwrap_or_else(|| panic!("no vm_key in {info}"))
        .to_owned()
}

/// Per-VM directories left for any VM called `name`.
pub fn vm_dirs(d: &Daemon, name: &str) -> Vec<PathBuf> {
    keyed(&d.data_dir.join("vms"), name)
}

/// Entries of `dir` named by the key of a VM called `name` (keys are the
/// name, a dash and random hex).
pub fn keyed(dir: &Path, name: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{name}-")))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A running metald.
pub struct Daemon {
    child: Option<Child>,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub url: String,
    extra_args: Vec<String>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_metald")
}

/// metald as every test starts it: loopback on an ephemeral port, QEMU
/// under TCG, the data dir and asset roots under `data_dir`, its own
/// metrics port, text logs, and no billing or host bridge unless a test
/// asks (flags win over the environment).
pub fn base_command(data_dir: &Path) -> Command {
    let mut c = Command::new(bin());
    c.args([
        "--address",
        "127.0.0.1",
        "--port",
        "0",
        "--qemu-accel",
        "tcg",
    ])
    .arg("--data-dir")
    .arg(data_dir)
    .arg("--asset-dirs")
    .arg(asset_dirs(data_dir))
    .env_remove("UNKEY_METALD_AUTH_MODE")
    .env("UNKEY_METALD_BACKEND", "qemu")
    .env("UNKEY_METALD_BILLING_ENABLED", "false")
    .env("UNKEY_METALD_NETWORK_ENABLED", "false")
    // A metald removes the cgroups under its parent that none of its VMs
    // claims, so daemons side by side each get a parent of their own.
    .env("UNKEY_METALD_CGROUP_PARENT", cgroup_parent(data_dir))
    .env("UNKEY_METALD_LOG_FORMAT", "text")
    // Tests read a VM's console log and socket where GetVmInfo says they
    // are (off by default: `host_safety` checks that).
    .env("UNKEY_METALD_VM_INFO_HOST_DETAILS", "true")
    // Every test's metald on its own metrics port (a test that needs
    // it reads it with `Daemon::metrics_addr`).
    .env("UNKEY_METALD_OTEL_PROMETHEUS_PORT", "0");
    c
}

/// The parent cgroup of the VMs of the metald on `data_dir`.
pub fn cgroup_parent(data_dir: &Path) -> String {
    let dir = data_dir.file_name().unwrap_or_default().to_string_lossy();
    format!("metald-suite-{dir}")
}

/// The parent cgroup's directory in each hierarchy metald makes VM
/// cgroups in: cpu and memory on a v1 host (here, or co-mounted), the
/// unified one on a v2 host.
pub fn cgroup_parent_dirs(data_dir: &Path) -> Vec<PathBuf> {
    ["cpu", "cpu,cpuacct", "memory", "unified", ""]
        .iter()
        .map(|c| {
            Path::new("/sys/fs/cgroup")
                .join(c)
                .join(cgroup_parent(data_dir))
        })
        .collect()
}

/// The cgroups process `pid` is in, in the hierarchies metald puts
/// VMMs in (cpu and memory on a v1 host, the unified one on v2), as
/// paths from each hierarchy's root.
pub fn cgroups_of(pid: i32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let v2 = !Path::new("/sys/fs/cgroup/cpu").exists();
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let wanted = if v2 {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == "cpu" || c == "memory")
            };
            wanted.then(|| path.to_owned())
        })
        .collect()
}

impl Daemon {
    /// The names of the VM cgroups under this metald's parent, in any
    /// hierarchy, each once (a VM's cgroups are named by its key).
    pub fn cgroups(&self) -> Vec<String> {
        let mut names: Vec<String> = cgroup_parent_dirs(&self.data_dir)
            .iter()
            .filter_map(|p| std::fs::read_dir(p).ok())
            .flat_map(|d| d.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// metald in dev-auth mode on a fresh data dir.
    pub fn start() -> Daemon {
        Self::start_with(&["--auth-mode", "dev"])
    }

    /// metald with extra flags on a fresh data dir.
    pub fn start_with(args: &[&str]) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("metald-test-")
            .tempdir()
            .unwrap();
        let data_dir = tmp.path().to_path_buf();
        let mut d = Daemon {
            child: None,
            data_dir,
            _tmp: Some(tmp),
            url: String::new(),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let mut child = base_command(&self.data_dir)
            .args(["--log", "info"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start metald");
        // metald's log goes to a file the test can search (`Daemon::log`),
        // and to the test's output only with METALD_TEST_LOG=1: a failing
        // test prints its panic first and then the log's tail (`Drop`), so
        // the reason leads a CI report.
        let stderr = child.stderr.take().unwrap();
        let log_path = self.log_path();
        let echo = std::env::var_os("METALD_TEST_LOG").is_some_and(|v| v == "1");
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path)
                .ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("{line}");
                }
                if let Some(f) = &mut file {
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("metald listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        // Wait for the readiness line metald prints once it listens.
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("metald did not report listening within 60 s");
            }
        };
        self.url = url;
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        let mut name = self.data_dir.as_os_str().to_owned();
        name.push(".log");
        PathBuf::from(name)
    }

    /// Everything metald logged so far (all its runs on this data dir).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The log once a line `want` accepts is in it, or after 10 s: lines
    /// reach the file through a copying thread, a moment after metald wrote
    /// them.
    pub async fn log_when(&self, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.lines().any(&want) || Instant::now() > deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address metald's metrics listener bound in its latest run
    /// (from its `metrics serving addr=...` log line), waiting for it.
    pub fn metrics_addr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self.log().lines().rev().find_map(|l| {
                let plain = without_colours(l);
                let rest = &plain[plain.find("metrics serving")?..];
                let addr = &rest[rest.find("addr=")? + 5..];
                Some(addr.split_whitespace().next()?.to_owned())
            });
            if let Some(a) = found {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "metald logged no `metrics serving addr=` line"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// metald's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Sends `signal` and waits for metald to exit.
    pub fn stop(&mut self, signal: rustix::process::Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
            signal,
        )
        .unwrap();
        child.wait().unwrap()
    }

    /// Starts metald again on the same data dir.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop first");
        self.spawn();
    }

    /// Calls an RPC with Connect JSON; Ok(body) or Err((code, message)).
    pub async fn call(
        &self,
        token: &str,
        method: &str,
        body: Value,
    ) -> Result<Value, (String, String)> {
        connect_json(&self.url, token, method, body).await
    }

    /// Calls an RPC that must succeed.
    pub async fn ok(&self, token: &str, method: &str, body: Value) -> Value {
        self.call(token, method, body)
            .await
            .unwrap_or_else(|e| panic!("{method} failed: {e:?}"))
    }

    /// Processes whose command line mentions this data dir, but metald
    /// itself and its DHCP server (dnsmasq): the VMMs.
    pub fn vmm_pids(&self) -> Vec<i32> {
        self.processes()
            .into_iter()
            .filter(|p| !is_dnsmasq(*p))
            .collect()
    }

    /// Every process but metald whose command line mentions this data dir.
    fn processes(&self) -> Vec<i32> {
        let me = self.child.as_ref().map(|c| c.id() as i32);
        processes_mentioning(&self.data_dir.to_string_lossy())
            .into_iter()
            .filter(|p| Some(*p) != me)
            .collect()
    }
}

/// Lines of metald's log a failing test prints.
const LOG_TAIL: usize = 80;

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // VMMs (and the DHCP server) outlive metald by design; never leak
        // them from a test.
        for pid in self.processes() {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
            eprintln!(
                "--- the last {} lines of metald's log ({}; METALD_TEST_LOG=1 shows it all as it runs)",
                tail.len(),
                self.data_dir.display()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_file(self.log_path());
        // The test's cgroups go too; a cgroup whose last process was just
        // killed may read busy for a moment, so removal is tried a while.
        for parent in cgroup_parent_dirs(&self.data_dir) {
            let vms: Vec<PathBuf> = std::fs::read_dir(&parent)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default();
            for dir in vms.iter().chain(std::iter::once(&parent)) {
                for _ in 0..50 {
                    if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// Whether `pid` runs dnsmasq (metald's DHCP server).
pub fn is_dnsmasq(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .next()
            .is_some_and(|a| a.ends_with(b"dnsmasq"))
    })
}

/// A log line without its terminal colour sequences (`ESC [ ... m`).
pub fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// Pids whose `/proc/<pid>/cmdline` contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) && !is_zombie(pid) {
            out.push(pid);
        }
    }
    out
}

/// True when `pid` is gone or a zombie (it has exited either way).
pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// One Connect unary call with the JSON codec, as curl would make it.
pub async fn connect_json(
    url: &str,
    token: &str,
    method: &str,
    body: Value,
) -> Result<Value, (String, String)> {
    let client = reqwest::Client::new();
    let mut req = client
        .post(format!("{url}/vmprovisioner.v1.VmService/{method}"))
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if !token.is_empty() {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    // A transport failure (metald gone) is reported as code "transport".
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return Err(("transport".to_owned(), e.to_string())),
    };
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        Ok(v)
    } else {
        Err((
            v["code"].as_str().unwrap_or("?").to_owned(),
            v["message"].as_str().unwrap_or("").to_owned(),
        ))
    }
}

/// Waits (bounded) until `path` contains `needle` `times` times; the
/// console log is the only signal a guest gives that it booted.
pub async fn wait_for_console(path: &str, needle: &str, times: usize, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.matches(needle).count() >= times {
            return text;
        }
        if start.elapsed() > timeout {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            panic!("{needle:?} ×{times} not in {path} after {timeout:?}; console ends:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The state name in a Connect JSON response.
pub fn state_of(v: &Value) -> String {
    v["state"]
        .as_str()
        .unwrap_or("VM_STATE_UNSPECIFIED")
        .to_owned()
}
