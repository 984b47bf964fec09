//! Unit tests of the validated VM types.

use super::*;

fn kernel() -> tempfile_path::Tmp {
    tempfile_path::Tmp::new()
}

/// A tiny self-cleaning temp file, so these tests need no extra crate.
mod tempfile_path {
    pub struct Tmp(pub std::path::PathBuf);
    impl Tmp {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!("metald-core-test-{}", uuid::Uuid::new_v4()));
            std::fs::write(&p, b"k").unwrap();
            Tmp(p)
        }
        pub fn s(&self) -> String {
            self.0.to_str().unwrap().to_owned()
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn valid(k: &tempfile_path::Tmp) -> VmSpecInput {
    VmSpecInput {
        vcpu_count: 1,
        memory_bytes: 128 << 20,
        kernel_path: k.s(),
        ..Default::default()
    }
}

fn field_of(e: Error) -> String {
    match e {
        Error::InvalidArgument { field, .. } => field,
        other => panic!("expected invalid argument, got {other:?}"),
    }
}

#[test]
fn accepts_a_minimal_spec() {
    let k = kernel();
    let spec = VmSpec::new(valid(&k)).unwrap();
    assert_eq!(spec.vcpus, 1);
    assert_eq!(spec.memory_bytes, 128 << 20);
}

#[test]
fn a_cloned_spec_shares_its_fields_until_one_copy_changes() {
    let k = kernel();
    let spec = VmSpec::new(valid(&k)).unwrap();
    let copy = spec.clone();
    assert!(Arc::ptr_eq(&spec.0, &copy.0), "a clone copies no field");
    let moved = copy.at_host_paths(PathBuf::from("/elsewhere/vmlinux"), None, []);
    assert!(!Arc::ptr_eq(&spec.0, &moved.0));
    assert_eq!(moved.kernel(), Path::new("/elsewhere/vmlinux"));
    assert_eq!(spec.kernel(), k.0.as_path(), "the original is unchanged");
    assert_eq!(copy, spec);
}

#[test]
fn vcpu_bounds() {
    let k = kernel();
    for bad in [0, -1, 33] {
        let e = VmSpec::new(VmSpecInput {
            vcpu_count: bad,
            ..valid(&k)
        })
        .unwrap_err();
        assert_eq!(field_of(e), "config.cpu.vcpu_count");
    }
    assert!(
        VmSpec::new(VmSpecInput {
            vcpu_count: 32,
            ..valid(&k)
        })
        .is_ok()
    );
}

#[test]
fn memory_rules() {
    let k = kernel();
    for bad in [0, (64 << 20) - (1 << 20), (128 << 20) + 1, -5] {
        let e = VmSpec::new(VmSpecInput {
            memory_bytes: bad,
            ..valid(&k)
        })
        .unwrap_err();
        assert_eq!(field_of(e), "config.memory.size_bytes", "{bad}");
    }
    assert!(
        VmSpec::new(VmSpecInput {
            memory_bytes: 64 << 20,
            ..valid(&k)
        })
        .is_ok()
    );
}

#[test]
fn paths_must_be_absolute_and_bounded() {
    let k = kernel();
    let long = format!("/{}", "x".repeat(MAX_PATH_LEN));
    for bad in ["", "relative/vmlinux", "a\0b", &long] {
        let e = VmSpec::new(VmSpecInput {
            kernel_path: bad.into(),
            ..valid(&k)
        })
        .unwrap_err();
        assert_eq!(field_of(e), "config.boot.kernel_path", "{bad}");
    }
}

#[test]
fn disks_are_checked_and_root_goes_first() {
    let k = kernel();
    let d = kernel();
    let disk = |id: &str, path: String, root: bool| DiskInput {
        id: id.into(),
        path,
        is_root_device: root,
        ..Default::default()
    };
    let e = VmSpec::new(VmSpecInput {
        disks: vec![disk("a", d.s(), false), disk("a", d.s(), false)],
        ..valid(&k)
    })
    .unwrap_err();
    assert_eq!(field_of(e), "config.storage[1].id");
    let e = VmSpec::new(VmSpecInput {
        disks: vec![disk("a", "disk.img".into(), false)],
        ..valid(&k)
    })
    .unwrap_err();
    assert_eq!(field_of(e), "config.storage[0].path");
    let spec = VmSpec::new(VmSpecInput {
        disks: vec![disk("data", d.s(), false), disk("", d.s(), true)],
        ..valid(&k)
    })
    .unwrap();
    assert_eq!(spec.disks[0].id, "disk1");
    assert!(spec.disks[0].is_root);
    let mut limited = disk("a", d.s(), false);
    limited
        .options
        .insert("rate_limit_ops_per_sec".into(), "fast".into());
    let e = VmSpec::new(VmSpecInput {
        disks: vec![limited.clone()],
        ..valid(&k)
    })
    .unwrap_err();
    assert_eq!(
        field_of(e),
        "config.storage[0].options.rate_limit_ops_per_sec"
    );
    limited
        .options
        .insert("rate_limit_ops_per_sec".into(), "500".into());
    assert!(
        VmSpec::new(VmSpecInput {
            disks: vec![limited],
            ..valid(&k)
        })
        .is_ok()
    );
}

#[test]
fn network_kernel_args_are_reserved() {
    let k = kernel();
    for bad in [
        "ip=10.0.0.9::10.0.0.1:255.255.255.0::eth0:off",
        "console=ttyS0 metald.ip6=fd00::9/64",
        "metald.gw6=fd00::1 quiet",
        "ip",
    ] {
        let e = VmSpec::new(VmSpecInput {
            kernel_args: bad.into(),
            ..valid(&k)
        })
        .unwrap_err();
        assert_eq!(field_of(e), "config.boot.kernel_args", "{bad}");
    }
    for ok in [
        "console=ttyS0 metald.ping=10.0.0.1 metald.sink=9000 metald.burn=3",
        "ipv6.disable=1",
    ] {
        assert!(
            VmSpec::new(VmSpecInput {
                kernel_args: ok.into(),
                ..valid(&k)
            })
            .is_ok(),
            "{ok}"
        );
    }
}

#[test]
fn vm_id_charset_and_length() {
    assert!(VmId::parse("vm-1_a", "vm_id").is_ok());
    for bad in ["", "-x", "a b", "a/b", "é", &"x".repeat(65)] {
        let e = VmId::parse(bad, "vm_id").unwrap_err();
        assert_eq!(field_of(e), "vm_id", "{bad:?}");
    }
    let g = VmId::generate();
    assert!(VmId::parse(g.as_str(), "vm_id").is_ok());
}

#[test]
fn ids_read_from_json_are_validated_like_client_input() {
    let ok: VmId = serde_json::from_str("\"web-1\"").unwrap();
    assert_eq!(ok.as_str(), "web-1");
    for bad in ["\"../etc\"", "\"\"", "\"a b\"", "\"-x\""] {
        assert!(serde_json::from_str::<VmId>(bad).is_err(), "{bad}");
    }
    assert!(serde_json::from_str::<CustomerId>("\"a b\"").is_err());
    assert_eq!(serde_json::to_string(&ok).unwrap(), "\"web-1\"");
}
