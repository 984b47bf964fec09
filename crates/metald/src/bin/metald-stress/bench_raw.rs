//! The raw VMM path the boot benches compare metald with, written here on
//! purpose (not with metald's own backend code, or the comparison would
//! measure nothing): spawn the VMM, wait for its socket, configure it as
//! metald's backend does, start the guest, and wait until the VMM reports
//! it running.
//!
//! - QEMU: the command line of `metald-vmm`'s `qemu/args.rs` (microvm,
//!   paused with `-S`, console to a file, QMP socket, kernel, initrd,
//!   drives), then QMP `qmp_capabilities`, `cont`, `query-status`.
//! - Firecracker: `--api-sock`, then `PUT /machine-config`,
//!   `/boot-source`, `/drives/<id>`, `/metrics`, `InstanceStart`, `GET /`.
//! - Cloud Hypervisor: `--api-socket`, `vmm.ping`, `vm.create`, `vm.boot`,
//!   then `vm.info` until `Running`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::bench_daemon::{Backend, HostFlags};
use crate::guest::Guest;

/// How long a VMM may take to answer on its socket, as metald's default.
const READY: Duration = Duration::from_secs(30);
/// One API exchange.
const CALL: Duration = Duration::from_secs(10);

/// A VMM started by hand, with its own directory.
pub struct RawVm {
    child: Child,
    dir: PathBuf,
}

impl RawVm {
    /// SIGKILL, reap, remove the directory.
    pub async fn remove(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Boots `guest` on `backend` the raw way in `dir` (made here, removed by
/// [`RawVm::remove`] or on failure).
pub async fn boot(
    host: &HostFlags,
    backend: Backend,
    guest: &Guest,
    dir: PathBuf,
    name: &str,
) -> Result<RawVm, String> {
    std::fs::create_dir_all(&dir).map_err(|e| format!("raw VM directory: {e}"))?;
    let bin = host.binary(backend)?;
    let file = |n: &str| -> Result<std::fs::File, String> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(n))
            .map_err(|e| format!("raw VM file {n}: {e}"))
    };
    let mut cmd = Command::new(&bin);
    let socket = match backend {
        Backend::Qemu => {
            let sock = dir.join("qmp.sock");
            cmd.args(qemu_args(guest, &host.qemu_accel, &dir, name));
            sock
        }
        Backend::Firecracker => {
            let sock = dir.join("firecracker.sock");
            file("firecracker.log")?;
            cmd.arg("--api-sock").arg(&sock).args(["--id", name]);
            cmd.arg("--log-path").arg(dir.join("firecracker.log"));
            cmd.args(["--level", "Warning"]);
            sock
        }
        Backend::CloudHypervisor => {
            let sock = dir.join("ch.sock");
            cmd.arg("--api-socket")
                .arg(format!("path={}", sock.display()));
            sock
        }
    };
    let (out, err) = match backend {
        Backend::Qemu => (file("qemu.log")?, file("qemu.log")?),
        _ => (file("console.log")?, file("vmm.log")?),
    };
    cmd.current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let mut vm = RawVm { child, dir };
    let started = match backend {
        Backend::Qemu => start_qemu(&mut vm.child, &socket).await,
        Backend::Firecracker => start_firecracker(&mut vm.child, &socket, guest, &vm.dir).await,
        Backend::CloudHypervisor => start_cloud_hypervisor(&mut vm.child, &socket, guest).await,
    };
    match started {
        Ok(()) => Ok(vm),
        Err(e) => {
            vm.remove().await;
            Err(format!("raw {}: {e}", backend.name()))
        }
    }
}

/// What `metald-vmm`'s `qemu/args.rs` passes for a 1-vCPU VM without
/// interfaces (commas in paths doubled, as QEMU needs).
fn qemu_args(g: &Guest, accel: &str, dir: &Path, name: &str) -> Vec<String> {
    let esc = |p: &Path| p.display().to_string().replace(',', ",,");
    let cpu = if accel == "kvm" { "host" } else { "max" };
    let mut a: Vec<String> = [
        "-name", name, "-machine", "microvm", "-accel", accel, "-cpu", cpu, "-smp", "cpus=1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.push("-m".into());
    a.push(format!("{}M", g.memory_mib));
    a.extend(["-nodefaults", "-no-user-config", "-nographic", "-S"].map(String::from));
    a.push("-chardev".into());
    a.push(format!(
        "file,id=console,path={},append=on",
        esc(&dir.join("console.log"))
    ));
    a.extend(["-serial", "chardev:console", "-qmp"].map(String::from));
    a.push(format!(
        "unix:{},server=on,wait=off",
        esc(&dir.join("qmp.sock"))
    ));
    a.extend(["-kernel".to_owned(), g.kernel.clone()]);
    if let Some(i) = &g.initrd {
        a.extend(["-initrd".to_owned(), i.clone()]);
    }
    a.extend(["-append".to_owned(), g.kernel_args.clone()]);
    if let Some(d) = &g.disk {
        a.push("-drive".into());
        a.push(format!(
            "id=disk0,file={},format=raw,if=none,readonly=on",
            esc(Path::new(d))
        ));
        a.extend([
            "-device".to_owned(),
            "virtio-blk-device,drive=disk0".to_owned(),
        ]);
    }
    a
}

/// Connects to `socket` with metald's backoff (1 ms doubling to 20 ms)
/// until it answers, the VMM exits, or [`READY`] passes.
async fn connect(child: &mut Child, socket: &Path) -> Result<UnixStream, String> {
    let deadline = Instant::now() + READY;
    let mut delay = Duration::from_millis(1);
    loop {
        match UnixStream::connect(socket).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("no answer on its socket within {READY:?}: {e}"));
            }
            Err(_) => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the VMM exited while starting: {status}"));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(20));
    }
}

async fn start_qemu(child: &mut Child, socket: &Path) -> Result<(), String> {
    let stream = connect(child, socket).await?;
    let exchange = async {
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        let greeting = lines.next_line().await.map_err(|e| e.to_string())?;
        if !greeting.is_some_and(|g| g.contains("\"QMP\"")) {
            return Err("no QMP greeting".to_owned());
        }
        let mut ret = Value::Null;
        for cmd in ["qmp_capabilities", "cont", "query-status"] {
            let line = format!("{}\n", json!({ "execute": cmd }));
            w.write_all(line.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            // Events (e.g. RESUME) come between; the answer has `return`.
            ret = loop {
                let l = lines.next_line().await.map_err(|e| e.to_string())?;
                let v: Value = serde_json::from_str(&l.ok_or("QMP closed")?)
                    .map_err(|e| format!("QMP: {e}"))?;
                if let Some(r) = v.get("return") {
                    break r.clone();
                }
                if let Some(e) = v.get("error") {
                    return Err(format!("QMP {cmd}: {e}"));
                }
            };
        }
        match ret["status"].as_str() {
            Some("running") => Ok(()),
            other => Err(format!("guest is {other:?} after cont")),
        }
    };
    tokio::time::timeout(CALL, exchange)
        .await
        .map_err(|_| "QMP did not answer".to_owned())?
}

/// One HTTP/1.1 exchange on a Unix socket; the status and body.
async fn http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let (head_end, len) = loop {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (i + 4, len);
            }
        };
        while buf.len() < head_end + len {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no HTTP status")?;
        let end = buf.len().min(head_end + len);
        Ok((
            status,
            String::from_utf8_lossy(&buf[head_end..end]).into_owned(),
        ))
    };
    tokio::time::timeout(CALL, exchange)
        .await
        .map_err(|_| format!("{method} {path}: no answer"))?
        .map_err(|e| format!("{method} {path}: {e}"))
}

/// A call that must answer 2xx; its body.
async fn ok(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<String, String> {
    let (status, text) = http(socket, method, path, body).await?;
    if (200..300).contains(&status) {
        Ok(text)
    } else {
        Err(format!("{method} {path}: {status} {text}"))
    }
}

async fn start_firecracker(
    child: &mut Child,
    socket: &Path,
    g: &Guest,
    dir: &Path,
) -> Result<(), String> {
    drop(connect(child, socket).await?);
    ok(socket, "GET", "/", None).await?;
    let machine = json!({"vcpu_count": 1, "mem_size_mib": g.memory_mib, "smt": false});
    ok(socket, "PUT", "/machine-config", Some(&machine)).await?;
    let mut boot = json!({"kernel_image_path": g.kernel, "boot_args": g.kernel_args});
    if let Some(i) = &g.initrd {
        boot["initrd_path"] = json!(i);
    }
    ok(socket, "PUT", "/boot-source", Some(&boot)).await?;
    if let Some(d) = &g.disk {
        let drive = json!({"drive_id": "root", "path_on_host": d, "is_root_device": true, "is_read_only": true});
        ok(socket, "PUT", "/drives/root", Some(&drive)).await?;
    }
    let metrics = dir.join("metrics");
    std::fs::File::create(&metrics).map_err(|e| format!("metrics file: {e}"))?;
    ok(
        socket,
        "PUT",
        "/metrics",
        Some(&json!({"metrics_path": metrics})),
    )
    .await?;
    ok(
        socket,
        "PUT",
        "/actions",
        Some(&json!({"action_type": "InstanceStart"})),
    )
    .await?;
    let info: Value =
        serde_json::from_str(&ok(socket, "GET", "/", None).await?).map_err(|e| e.to_string())?;
    match info["state"].as_str() {
        Some("Running") => Ok(()),
        other => Err(format!("firecracker is {other:?} after InstanceStart")),
    }
}

async fn start_cloud_hypervisor(child: &mut Child, socket: &Path, g: &Guest) -> Result<(), String> {
    drop(connect(child, socket).await?);
    ok(socket, "GET", "/api/v1/vmm.ping", None).await?;
    let mut payload = json!({"kernel": g.kernel, "cmdline": g.kernel_args});
    if let Some(i) = &g.initrd {
        payload["initramfs"] = json!(i);
    }
    let mut config = json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": g.memory_mib << 20},
        "payload": payload,
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    if let Some(d) = &g.disk {
        config["disks"] = json!([{"id": "root", "path": d, "readonly": true}]);
    }
    ok(socket, "PUT", "/api/v1/vm.create", Some(&config)).await?;
    ok(socket, "PUT", "/api/v1/vm.boot", None).await?;
    // As metald: vm.info, 5 ms doubling to 100 ms, until Running.
    let deadline = Instant::now() + CALL;
    let mut delay = Duration::from_millis(5);
    loop {
        let info = ok(socket, "GET", "/api/v1/vm.info", None).await?;
        if serde_json::from_str::<Value>(&info).is_ok_and(|v| v["state"] == "Running") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not Running within {CALL:?}"));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}
