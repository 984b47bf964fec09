//! metaldctl, the operator CLI, run as a binary against the real metald:
//! a real guest's whole lifecycle, its tables and formats, its config
//! precedence, TLS, and every error path's one line and exit status.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Assets, Daemon, state_of, wait_for_console};

const BOOT: Duration = Duration::from_secs(120);
const MARKER: &str = "METALD-GUEST-READY";
const T: &str = "dev_customer_ctl";

/// What one metaldctl run printed and how it exited.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// metaldctl with no connection settings from the environment or the
/// user's config file, only what a test passes.
fn ctl_command(config_home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_metaldctl"));
    c.env_remove("METALD_ADDR")
        .env_remove("METALD_TOKEN")
        .env_remove("METALD_CA_FILE")
        .env_remove("METALD_CONFIG")
        .env_remove("METALD_CLIENT_CERT")
        .env_remove("METALD_CLIENT_KEY")
        .env_remove("UNKEY_METALD_DATA_DIR")
        .env("XDG_CONFIG_HOME", config_home)
        .stdin(Stdio::null());
    c
}

fn run_cmd(mut c: Command) -> Out {
    let o = c.output().expect("run metaldctl");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `metaldctl --addr <d> --token <token> args…`.
fn ctl(d: &Daemon, token: &str, args: &[&str]) -> Out {
    let home = tempfile::tempdir().unwrap();
    let mut c = ctl_command(home.path());
    c.args(["--addr", &d.url, "--token", token]).args(args);
    run_cmd(c)
}

/// A run that must succeed; its stdout.
fn ctl_ok(d: &Daemon, args: &[&str]) -> String {
    let o = ctl(d, T, args);
    assert_eq!(o.code, 0, "metaldctl {args:?} failed: {}", o.stderr);
    assert_eq!(o.stderr, "", "metaldctl {args:?} wrote to stderr");
    o.stdout
}

/// The single error line of a failed run, after checking its exit status
/// and that nothing else was printed.
fn error_line(o: &Out, code: i32) -> String {
    assert_eq!(o.code, code, "exit status; stderr: {}", o.stderr);
    assert_eq!(o.stdout, "", "nothing on stdout on failure");
    assert!(o.stderr.ends_with('\n'), "{:?}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "one line: {:?}", o.stderr);
    o.stderr.trim_end().to_owned()
}

/// The cells of an aligned table, after checking every cell starts at its
/// header's column and nothing overlaps.
fn table(text: &str) -> Vec<Vec<String>> {
    let mut lines = text.lines();
    let header = lines.next().expect("a header line");
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|&(i, c)| c != ' ' && (i == 0 || header.as_bytes()[i - 1] == b' '))
        .map(|(i, _)| i)
        .collect();
    let mut rows = Vec::new();
    for line in std::iter::once(header).chain(lines) {
        let mut cells = Vec::new();
        for (n, &s) in starts.iter().enumerate() {
            assert!(line.len() > s, "row too short for column {n}: {line:?}");
            assert_ne!(&line[s..s + 1], " ", "column {n} misaligned in {line:?}");
            assert!(
                s == 0 || &line[s - 1..s] == " ",
                "column {n} runs into its neighbour in {line:?}"
            );
            let end = starts
                .get(n + 1)
                .copied()
                .unwrap_or(line.len())
                .min(line.len());
            let cell = line[s..end].trim_end();
            assert!(
                !cell.contains("  "),
                "cell {cell:?} spans columns in {line:?}"
            );
            cells.push(cell.to_owned());
        }
        rows.push(cells);
    }
    rows
}

/// Reads a child's stdout on a thread, so a test can wait with a deadline.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded) for `n` lines containing `needle`; all lines so far.
fn wait_lines(rx: &mpsc::Receiver<String>, needle: &str, n: usize, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut seen = String::new();
    while seen.matches(needle).count() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(_) => panic!("{needle:?} x{n} not seen within {limit:?}; got:\n{seen}"),
        }
    }
    seen
}

/// Ctrl-C to a running metaldctl: it must stop at once and exit 0.
fn interrupt(mut child: std::process::Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "Ctrl-C ends it cleanly: {status:?}");
            return;
        }
        assert!(Instant::now() < deadline, "still running after Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_ctl(d: &Daemon, args: &[&str], home: &Path) -> std::process::Child {
    let mut c = ctl_command(home);
    c.args(["--addr", &d.url, "--token", T])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c.spawn().expect("spawn metaldctl")
}

async fn api_state(d: &Daemon, vm: &str) -> String {
    state_of(&d.ok(T, "GetVmInfo", json!({"vm_id": vm})).await)
}

#[tokio::test(flavor = "multi_thread")]
async fn metaldctl_drives_a_real_guest_through_its_whole_lifecycle() {
    let assets = Assets::load();
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();

    // create -f, in the CreateVmRequest's JSON shape.
    let file = dir.path().join("vm.json");
    let body = json!({"vm_id": "from-file", "config": assets.config()});
    std::fs::write(&file, body.to_string()).unwrap();
    let out = ctl_ok(&d, &["create", "-f", file.to_str().unwrap()]);
    assert_eq!(out, "from-file created\n");
    // create with flags.
    let disk = format!("{},ro,root", assets.disk);
    let out = ctl_ok(
        &d,
        &[
            "create",
            "--name",
            "flags-vm",
            "--vcpus",
            "2",
            "--memory",
            "256MiB",
            "--kernel",
            &assets.kernel,
            "--initrd",
            &assets.initrd,
            "--kernel-args",
            &assets.kernel_args,
            "--disk",
            &disk,
            "--metadata",
            "team=ops",
        ],
    );
    assert_eq!(out, "flags-vm created\n");
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": "flags-vm"})).await;
    assert_eq!(info["config"]["cpu"]["vcpuCount"], 2);
    assert_eq!(info["config"]["memory"]["sizeBytes"], "268435456");
    assert_eq!(info["config"]["boot"]["kernelPath"], assets.kernel.as_str());
    assert_eq!(info["config"]["storage"][0]["readOnly"], true);
    assert_eq!(info["config"]["storage"][0]["isRootDevice"], true);
    assert_eq!(info["config"]["metadata"]["team"], "ops");
    // info -o json's config makes the same VM again through create -f.
    let shown: Value =
        serde_json::from_str(&ctl_ok(&d, &["info", "flags-vm", "-o", "json"])).unwrap();
    let copy = dir.path().join("copy.json");
    let body = json!({"vm_id": "copy", "config": shown["config"]});
    std::fs::write(&copy, body.to_string()).unwrap();
    assert_eq!(
        ctl_ok(&d, &["create", "-f", copy.to_str().unwrap()]),
        "copy created\n"
    );
    let copied = d.ok(T, "GetVmInfo", json!({"vm_id": "copy"})).await;
    assert_eq!(copied["config"], info["config"]);
    assert_eq!(ctl_ok(&d, &["delete", "copy"]), "copy deleted\n");

    assert_eq!(ctl_ok(&d, &["boot", "from-file"]), "from-file running\n");
    assert_eq!(api_state(&d, "from-file").await, "VM_STATE_RUNNING");

    // list: an aligned table with both, in metald's order.
    let rows = table(&ctl_ok(&d, &["list"]));
    assert_eq!(rows[0], ["ID", "STATE", "VCPUS", "MEMORY", "IPS", "AGE"]);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[1][..5], ["from-file", "running", "1", "128MiB", "-"]);
    assert_eq!(rows[2][..5], ["flags-vm", "created", "2", "256MiB", "-"]);
    assert!(
        rows[1][5].ends_with('s') || rows[1][5].ends_with('m'),
        "{rows:?}"
    );
    let wide = table(&ctl_ok(&d, &["list", "-o", "wide"]));
    assert_eq!(wide[0][6..], ["MAC", "CUSTOMER", "CREATED", "METADATA"]);
    assert_eq!(wide[2][7], "ctl");
    assert_eq!(wide[2][9], "team=ops");
    let running = table(&ctl_ok(&d, &["list", "--state", "running"]));
    assert_eq!(running.len(), 2, "{running:?}");
    assert_eq!(running[1][0], "from-file");
    let listed: Value = serde_json::from_str(&ctl_ok(&d, &["list", "-o", "json"])).unwrap();
    assert_eq!(listed["totalCount"], 2);
    assert_eq!(listed["vms"][0]["vmId"], "from-file");
    let yaml = ctl_ok(&d, &["list", "-o", "yaml"]);
    assert!(yaml.contains("vmId: from-file"), "{yaml}");

    // info: the API's JSON, and a summary.
    let info: Value =
        serde_json::from_str(&ctl_ok(&d, &["info", "from-file", "-o", "json"])).unwrap();
    assert_eq!(state_of(&info), "VM_STATE_RUNNING");
    assert_eq!(info["vmId"], "from-file");
    let console_log = info["backendInfo"]["console_log"]
        .as_str()
        .unwrap()
        .to_owned();
    let summary = ctl_ok(&d, &["info", "from-file"]);
    assert!(summary.contains("State:         running\n"), "{summary}");
    assert!(summary.contains("Memory:        128MiB\n"), "{summary}");

    // console follows the guest's output until Ctrl-C.
    let mut console = spawn_ctl(&d, &["console", "from-file"], dir.path());
    let rx = lines_of(&mut console);
    let seen = wait_lines(&rx, MARKER, 1, BOOT);
    assert!(seen.contains("kernel="), "{seen}");
    interrupt(console);
    // --no-follow prints what is there and exits (with --data-dir given too).
    let data_dir = d.data_dir.to_str().unwrap();
    let once = ctl_ok(
        &d,
        &[
            "console",
            "from-file",
            "--no-follow",
            "--data-dir",
            data_dir,
        ],
    );
    assert!(once.contains(MARKER), "{once}");

    // watch refreshes the list until Ctrl-C.
    let mut watch = spawn_ctl(&d, &["watch", "--interval", "200ms"], dir.path());
    let rx = lines_of(&mut watch);
    let frames = wait_lines(
        &rx,
        "Every 200ms: metaldctl list",
        2,
        Duration::from_secs(30),
    );
    assert!(frames.matches("from-file").count() >= 1, "{frames}");
    interrupt(watch);

    assert_eq!(ctl_ok(&d, &["pause", "from-file"]), "from-file paused\n");
    assert_eq!(api_state(&d, "from-file").await, "VM_STATE_PAUSED");
    assert_eq!(ctl_ok(&d, &["resume", "from-file"]), "from-file running\n");
    assert_eq!(api_state(&d, "from-file").await, "VM_STATE_RUNNING");
    assert_eq!(ctl_ok(&d, &["reboot", "from-file"]), "from-file running\n");
    wait_for_console(&console_log, MARKER, 2, BOOT).await;
    let out = ctl_ok(&d, &["shutdown", "from-file", "--timeout", "20s"]);
    assert_eq!(out, "from-file shutdown\n");
    assert_eq!(api_state(&d, "from-file").await, "VM_STATE_SHUTDOWN");

    assert_eq!(ctl_ok(&d, &["delete", "from-file"]), "from-file deleted\n");
    assert_eq!(ctl_ok(&d, &["delete", "flags-vm"]), "flags-vm deleted\n");
    let gone = d.call(T, "GetVmInfo", json!({"vm_id": "from-file"})).await;
    assert_eq!(gone.unwrap_err().0, "not_found");
    let rows = table(&ctl_ok(&d, &["list"]));
    assert_eq!(rows.len(), 1, "only the header is left: {rows:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_is_one_line_with_its_code_and_a_non_zero_exit() {
    let assets = Assets::load();
    let mut d = Daemon::start();

    let e = error_line(&ctl(&d, T, &["info", "nope"]), 1);
    assert_eq!(e, r#"metaldctl: not_found: vm "nope" not found"#);
    let e = error_line(&ctl(&d, T, &["boot", "nope"]), 1);
    assert_eq!(e, r#"metaldctl: not_found: vm "nope" not found"#);

    let e = error_line(&ctl(&d, "bogus", &["list"]), 1);
    assert!(e.starts_with("metaldctl: unauthenticated: "), "{e}");
    let home = tempfile::tempdir().unwrap();
    let mut c = ctl_command(home.path());
    c.args(["--addr", &d.url, "list"]);
    let e = error_line(&run_cmd(c), 1);
    assert!(
        e.starts_with("metaldctl: unauthenticated: "),
        "no token: {e}"
    );

    d.ok(
        T,
        "CreateVm",
        json!({"vm_id": "idle", "config": assets.config()}),
    )
    .await;
    let e = error_line(&ctl(&d, T, &["pause", "idle"]), 1);
    assert_eq!(
        e,
        r#"metaldctl: failed_precondition: cannot pause vm "idle" in state created"#
    );
    let e = error_line(&ctl(&d, T, &["console", "idle"]), 1);
    assert!(
        e.starts_with(r#"metaldctl: unavailable: no console log of vm "idle" on this host"#)
            && e.contains("a remote console is not available"),
        "{e}"
    );
    let e = error_line(&ctl(&d, T, &["create", "--name", "x"]), 1);
    assert!(e.starts_with("metaldctl: invalid_argument: "), "{e}");

    // Usage errors: clap's message on one line, exit status 2.
    let e = error_line(&ctl(&d, T, &["list", "--bogus"]), 2);
    assert_eq!(
        e,
        "metaldctl: usage: unexpected argument '--bogus' found (see metaldctl --help)"
    );
    let e = error_line(&ctl(&d, T, &["boot"]), 2);
    assert_eq!(
        e,
        "metaldctl: usage: the following required arguments were not provided: <VM> \
         (see metaldctl --help)"
    );
    let e = error_line(&ctl(&d, T, &["info", "x", "-o", "wide"]), 2);
    assert!(
        e.starts_with("metaldctl: usage: invalid value 'wide'"),
        "{e}"
    );
    let e = error_line(&ctl(&d, T, &["create", "--memory", "lots"]), 2);
    assert!(
        e.starts_with("metaldctl: usage: invalid value 'lots'"),
        "{e}"
    );
    let e = error_line(&ctl(&d, T, &["create", "--disk", "/x,readonly"]), 2);
    assert!(e.contains("unknown option \"readonly\""), "{e}");

    // health needs no token.
    let mut c = ctl_command(home.path());
    c.args(["--addr", &d.url, "health"]);
    let o = run_cmd(c);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // (`degraded` also answers 200: a check serving does not need failed.)
    assert!(o.stdout.contains("GET /health      200 "), "{}", o.stdout);
    assert!(
        o.stdout.contains("\nstore "),
        "metald's checks are listed: {}",
        o.stdout
    );
    assert!(
        o.stdout.contains("grpc.health.v1   SERVING"),
        "{}",
        o.stdout
    );

    // metald down.
    d.stop(rustix::process::Signal::TERM);
    let e = error_line(&ctl(&d, T, &["list"]), 1);
    let want = format!("metaldctl: unavailable: cannot reach metald at {}: ", d.url);
    assert!(e.starts_with(&want), "{e}");
    let e = error_line(&ctl(&d, T, &["health"]), 1);
    assert!(e.starts_with(&want), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn flags_beat_the_environment_which_beats_the_config_file() {
    let d = Daemon::start();
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join("metald");
    std::fs::create_dir_all(&cfg).unwrap();
    let toml = format!("addr = \"{}\"\ntoken = \"dev_customer_fromfile\"\n", d.url);
    std::fs::write(cfg.join("metaldctl.toml"), toml).unwrap();
    d.ok(
        "dev_customer_fromfile",
        "CreateVm",
        json!({"vm_id": "mine", "config": Assets::load().config()}),
    )
    .await;

    // The default config file alone.
    let mut c = ctl_command(home.path());
    c.args(["list", "-o", "json"]);
    let o = run_cmd(c);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["vms"][0]["vmId"], "mine", "the file's token was used");

    // The environment beats it: this token's customer has no VMs.
    let mut c = ctl_command(home.path());
    c.env("METALD_TOKEN", "dev_customer_fromenv")
        .args(["list", "-o", "json"]);
    let o = run_cmd(c);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    // (proto3 JSON leaves out empty fields: no VMs, no total.)
    assert_eq!(v, json!({}), "{}", o.stdout);
    let mut c = ctl_command(home.path());
    c.env("METALD_ADDR", "http://127.0.0.1:1").arg("list");
    let e = error_line(&run_cmd(c), 1);
    assert!(
        e.contains("cannot reach metald at http://127.0.0.1:1"),
        "{e}"
    );

    // A flag beats the environment.
    let mut c = ctl_command(home.path());
    c.env("METALD_ADDR", "http://127.0.0.1:1")
        .args(["--addr", &d.url, "list", "-o", "json"]);
    let o = run_cmd(c);
    assert_eq!(o.code, 0, "{}", o.stderr);

    // --config names another file; a bad key in it is a usage error.
    let other = home.path().join("other.toml");
    std::fs::write(&other, "adress = \"x\"\n").unwrap();
    let mut c = ctl_command(home.path());
    c.args(["--config", other.to_str().unwrap(), "list"]);
    let e = error_line(&run_cmd(c), 2);
    assert!(
        e.starts_with("metaldctl: usage: config file: unknown key \"adress\""),
        "{e}"
    );
}

/// Writes a CA and, signed by it, metald's certificate for 127.0.0.1 and a
/// client certificate naming customer `ctl` by SPIFFE ID. Their paths: CA,
/// server certificate and key, client certificate and key.
fn pki(dir: &Path) -> [String; 5] {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_path = write("ca.pem", p.self_signed(&ca_key).unwrap().pem());
    let ca = Issuer::new(p, ca_key);
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    let spiffe = "spiffe://metald.test/customer/ctl";
    client.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
    let sign = |name: &str, params: CertificateParams| {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap().pem();
        (
            write(&format!("{name}.pem"), cert),
            write(&format!("{name}.key"), key.serialize_pem()),
        )
    };
    let (server_cert, server_key) = sign("server", server);
    let (client_cert, client_key) = sign("client", client);
    [ca_path, server_cert, server_key, client_cert, client_key]
}

#[tokio::test(flavor = "multi_thread")]
async fn https_addresses_speak_tls_and_mtls_checked_against_the_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, server_cert, server_key, client_cert, client_key] = pki(dir.path());
    let d = Daemon::start_with(&[
        "--auth-mode",
        "dev",
        "--tls-cert-file",
        &server_cert,
        "--tls-key-file",
        &server_key,
        "--tls-client-ca-file",
        &ca,
    ]);
    assert!(d.url.starts_with("https://"), "{}", d.url);
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut c = ctl_command(home.path());
        c.args(["--addr", &d.url]).args(args);
        run_cmd(c)
    };

    // The client certificate alone names the customer: no token needed.
    let mtls = [
        "--ca-file",
        &ca,
        "--cert",
        &client_cert,
        "--key",
        &client_key,
    ];
    let o = run(&[&mtls[..], &["list"]].concat());
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(table(&o.stdout)[0][0], "ID");
    let o = run(&[&mtls[..], &["info", "x"]].concat());
    assert_eq!(
        error_line(&o, 1),
        r#"metaldctl: not_found: vm "x" not found"#
    );

    // Without a certificate metald refuses the connection.
    let e = error_line(&run(&["--ca-file", &ca, "--token", T, "list"]), 1);
    assert!(
        e.starts_with("metaldctl: unavailable: cannot reach metald at https://"),
        "{e}"
    );
    // metald's certificate is signed by no root the system trusts.
    let e = error_line(
        &run(&["--cert", &client_cert, "--key", &client_key, "list"]),
        1,
    );
    assert!(
        e.starts_with("metaldctl: unavailable: cannot reach metald at https://"),
        "{e}"
    );
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    let e = error_line(&run(&["--cert", &client_cert, "list"]), 2);
    assert_eq!(e, "metaldctl: usage: --cert and --key go together");
}

#[test]
fn completions_name_every_subcommand() {
    let home = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let mut c = ctl_command(home.path());
        c.args(["completions", shell]);
        let o = run_cmd(c);
        assert_eq!(o.code, 0, "{}", o.stderr);
        for sub in [
            "create",
            "boot",
            "pause",
            "resume",
            "reboot",
            "shutdown",
            "delete",
            "info",
            "list",
            "console",
            "watch",
            "health",
            "completions",
        ] {
            assert!(o.stdout.contains(sub), "{shell} completions lack {sub}");
        }
    }
}
