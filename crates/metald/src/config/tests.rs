//! Unit tests of the settings: defaults, parsing, and errors naming the
//! variable.

use super::*;

#[test]
fn defaults_match_the_wire_contract() {
    let c = Config::try_parse_from(["metald"]).unwrap();
    assert_eq!(c.port, 8080);
    assert_eq!(c.address.to_string(), "0.0.0.0");
    assert_eq!(c.auth_mode, AuthMode::Jwt);
    assert_eq!(c.backend, Backend::Firecracker);
    assert_eq!(c.jailer_enabled, None, "unset: refused as root");
    assert_eq!(c.vm_shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.reconcile_interval, Duration::from_secs(30));
    assert!(!c.shutdown_vms_on_exit, "VMs outlive metald unless asked");
    assert!(c.billing_enabled);
    assert_eq!(c.billing_endpoint, "http://localhost:8081");
    assert_eq!(c.billing_sample_interval, Duration::from_millis(100));
    assert_eq!(c.billing_batch_interval, Duration::from_secs(60));
    assert_eq!(c.billing_heartbeat_interval, Duration::from_secs(30));
    assert_eq!(c.jwt_leeway, Duration::from_secs(30));
    assert_eq!(c.request_timeout_max, Duration::from_secs(300));
    assert_eq!(c.tls_client_identity, ClientIdentity::Spiffe);
    assert!(c.tls_cert_file.is_none() && c.rate_limit_rps.is_none());
}

#[test]
fn front_door_settings_are_checked() {
    for args in [
        &["--rate-limit-rps", "0"][..],
        &["--rate-limit-rps", "fast"],
        &["--rate-limit-rps", "1", "--rate-limit-burst", "0"],
        &["--rate-limit-burst", "5"],
        &["--request-timeout-max", "0s"],
        &["--tls-cert-file", "/c.pem"],
        &["--tls-client-identity", "dns"],
    ] {
        let all = [&["metald"][..], args].concat();
        assert!(Config::try_parse_from(all).is_err(), "{args:?}");
    }
    let c = Config::try_parse_from(["metald", "--rate-limit-rps", "0.5", "--jwt-leeway", "0s"])
        .unwrap();
    assert_eq!(c.rate_limit_rps, Some(0.5));
    assert_eq!(c.jwt_leeway, Duration::ZERO);
}

#[test]
fn shutdown_vms_on_exit_takes_a_boolean() {
    let c = Config::try_parse_from(["metald", "--shutdown-vms-on-exit", "true"]).unwrap();
    assert!(c.shutdown_vms_on_exit);
    let err = Config::try_parse_from(["metald", "--shutdown-vms-on-exit", "maybe"]).unwrap_err();
    assert!(
        err.to_string()
            .contains("UNKEY_METALD_SHUTDOWN_VMS_ON_EXIT"),
        "{err}"
    );
}

#[test]
fn console_log_max_takes_sizes_and_names_the_variable() {
    let c = Config::try_parse_from(["metald"]).unwrap();
    assert_eq!(c.console_log_max, 1 << 20);
    for (v, n) in [("512KiB", 512 << 10), ("2M", 2 << 20), ("65536", 65536)] {
        let c = Config::try_parse_from(["metald", "--console-log-max", v]).unwrap();
        assert_eq!(c.console_log_max, n, "{v}");
    }
    for bad in ["1k", "lots", "1KiB"] {
        let err = Config::try_parse_from(["metald", "--console-log-max", bad])
            .unwrap_err()
            .to_string();
        assert!(err.contains("UNKEY_METALD_CONSOLE_LOG_MAX"), "{bad}: {err}");
    }
}

#[test]
fn durations_use_humantime() {
    let c = Config::try_parse_from([
        "metald",
        "--boot-timeout",
        "1m",
        "--vm-shutdown-timeout",
        "100ms",
    ])
    .unwrap();
    assert_eq!(c.boot_timeout, Duration::from_secs(60));
    assert_eq!(c.vm_shutdown_timeout, Duration::from_millis(100));
}

#[test]
fn bad_values_name_the_variable() {
    for (flag, value, env) in [
        ("--port", "eighty", "UNKEY_METALD_PORT"),
        ("--boot-timeout", "soon", "UNKEY_METALD_BOOT_TIMEOUT"),
        ("--backend", "xen", "UNKEY_METALD_BACKEND"),
        ("--jailer-enabled", "maybe", "UNKEY_METALD_JAILER_ENABLED"),
        (
            "--jailer-uid-start",
            "many",
            "UNKEY_METALD_JAILER_UID_START",
        ),
        (
            "--cloud-hypervisor-user",
            "nobody",
            "UNKEY_METALD_CLOUD_HYPERVISOR_USER",
        ),
        ("--address", "nowhere", "UNKEY_METALD_ADDRESS"),
    ] {
        let err = Config::try_parse_from(["metald", flag, value])
            .unwrap_err()
            .to_string();
        assert!(err.contains(env), "{flag}: {err}");
    }
}
