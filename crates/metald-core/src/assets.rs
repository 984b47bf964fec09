//! Which host files a customer's VM may use: the asset roots.
//!
//! Every client-supplied path (`config.boot.kernel_path`,
//! `config.boot.initrd_path`, `config.storage[i].path`) is resolved
//! (symlinks, `..`) and must land inside one of the operator's asset roots.
//! A root whose template contains `{customer}` is private to that customer:
//! writable disks come only from there, and no other customer can reach a
//! file under it, even through a shared root that contains it. Host block
//! devices are usable only when the operator listed them.
//!
//! A missing file and a forbidden one answer exactly alike, so the answer
//! tells a caller nothing about the host. The VMM is handed the resolved
//! paths, checked again right before every spawn, never the client's.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::vm::{CustomerId, VmSpec};

/// The placeholder a root template may contain once, as a whole path
/// component.
pub const CUSTOMER_PLACEHOLDER: &str = "{customer}";

/// The one answer for a path the caller may not use, whatever the reason.
pub const DENIED: &str = "must name a file in one of this host's asset roots \
     (a writable disk: in the customer's own root); no such file is available to this customer";

/// One asset root as the operator configured it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Root {
    /// The part before `{customer}` (the whole path for a shared root).
    prefix: PathBuf,
    /// The part after `{customer}`, for a private root.
    suffix: Option<PathBuf>,
}

impl Root {
    fn private(&self) -> bool {
        self.suffix.is_some()
    }

    /// The root's directory for `customer`, unresolved; `None` for a
    /// private root when the customer id is not a safe path component.
    fn dir_for(&self, customer: &CustomerId) -> Option<PathBuf> {
        match &self.suffix {
            None => Some(self.prefix.clone()),
            Some(suffix) => {
                let c = customer.as_str();
                safe_component(c).then(|| self.prefix.join(c).join(suffix))
            }
        }
    }
}

/// A customer id that can stand as one path component: letters, digits,
/// `.`, `_`, `-`, not starting with `.`.
fn safe_component(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A host block device the operator allows: for every customer read-only,
/// or for one customer (then also writable).
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockDevice {
    path: PathBuf,
    customer: Option<String>,
}

/// The operator's rules for client-supplied paths. The default has no
/// roots and so allows no file at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssetPolicy {
    roots: Vec<Root>,
    devices: Vec<BlockDevice>,
}

/// What kind of file a field names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// A kernel or initrd: a regular file, read only.
    Boot,
    /// A disk, read-only or writable.
    Disk { writable: bool },
}

/// A file a VM will use, as resolved: what the VMM is given, and its
/// identity on the host for the one-writer rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedFile {
    /// The wire field that named it (`config.storage[1].path`).
    pub field: String,
    /// The real path, every link resolved.
    pub path: PathBuf,
    /// Device and inode: the same file under any name.
    pub identity: (u64, u64),
    /// Whether the VM may write to it.
    pub writable: bool,
}

/// A spec whose every path was checked, with the paths the VMM must use.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The spec with resolved paths, for the VMM only (the stored spec
    /// keeps the client's paths).
    pub spec: VmSpec,
    /// Every disk, in spec order.
    pub disks: Vec<ResolvedFile>,
}

impl AssetPolicy {
    /// Parses `UNKEY_METALD_ASSET_DIRS` entries and
    /// `UNKEY_METALD_ALLOWED_BLOCK_DEVICES` entries (`/dev/x` for every
    /// customer read-only, `/dev/x=<customer>` for one customer).
    pub fn new(roots: &[String], devices: &[String]) -> std::result::Result<Self, String> {
        let mut parsed = Vec::new();
        for raw in roots.iter().filter(|r| !r.is_empty()) {
            parsed.push(parse_root(raw)?);
        }
        let mut devs = Vec::new();
        for raw in devices.iter().filter(|r| !r.is_empty()) {
            let (path, customer) = match raw.split_once('=') {
                Some((p, c)) if !c.is_empty() => (p, Some(c.to_owned())),
                Some(_) => return Err(format!("block device {raw:?}: empty customer after '='")),
                None => (raw.as_str(), None),
            };
            if !Path::new(path).is_absolute() {
                return Err(format!("block device {raw:?} must be an absolute path"));
            }
            devs.push(BlockDevice {
                path: PathBuf::from(path),
                customer,
            });
        }
        Ok(AssetPolicy {
            roots: parsed,
            devices: devs,
        })
    }

    /// Checks every path of `spec` for `customer` and returns the spec the
    /// VMM must be given. Touches the filesystem: call it off the async
    /// runtime ([`tokio::task::spawn_blocking`]).
    pub fn resolve(&self, customer: &CustomerId, spec: &VmSpec) -> Result<Resolved> {
        let kernel = self.check(
            customer,
            spec.kernel(),
            "config.boot.kernel_path",
            Use::Boot,
        )?;
        let initrd = match spec.initrd() {
            Some(initrd) => {
                let f = self.check(customer, initrd, "config.boot.initrd_path", Use::Boot)?;
                Some(f.path)
            }
            None => None,
        };
        let mut disks = Vec::with_capacity(spec.disks().len());
        for (i, d) in spec.disks().iter().enumerate() {
            // Disk fields are named by their position in the stored spec
            // (root device first), which is how GetVmInfo shows them.
            let field = format!("config.storage[{i}].path");
            let f = self.check(
                customer,
                &d.path,
                &field,
                Use::Disk {
                    writable: !d.read_only,
                },
            )?;
            disks.push(f);
        }
        let paths = disks.iter().map(|f| f.path.clone());
        let out = spec.at_host_paths(kernel.path, initrd, paths);
        Ok(Resolved { spec: out, disks })
    }

    fn check(
        &self,
        customer: &CustomerId,
        raw: &Path,
        field: &str,
        usage: Use,
    ) -> Result<ResolvedFile> {
        let denied = || Error::denied(field, DENIED);
        // Resolves every symlink and `..`; a missing file is refused with
        // the same answer as a forbidden one.
        let real = std::fs::canonicalize(raw).map_err(|_| denied())?;
        let meta = std::fs::metadata(&real).map_err(|_| denied())?;
        let ft = meta.file_type();
        let writable = matches!(usage, Use::Disk { writable: true });
        let allowed = if ft.is_block_device() {
            matches!(usage, Use::Disk { .. }) && self.device_allowed(customer, &real, writable)
        } else if ft.is_file() {
            self.file_allowed(customer, &real, writable)
        } else {
            false
        };
        if !allowed {
            return Err(denied());
        }
        Ok(ResolvedFile {
            field: field.to_owned(),
            path: real,
            identity: (meta.dev(), meta.ino()),
            writable,
        })
    }

    fn device_allowed(&self, customer: &CustomerId, real: &Path, writable: bool) -> bool {
        self.devices.iter().any(|d| {
            std::fs::canonicalize(&d.path).is_ok_and(|p| p == real)
                && match &d.customer {
                    Some(c) => c == customer.as_str(),
                    None => !writable,
                }
        })
    }

    fn file_allowed(&self, customer: &CustomerId, real: &Path, writable: bool) -> bool {
        // Under another customer's private root: never, whatever shared
        // root also contains it.
        for root in self.roots.iter().filter(|r| r.private()) {
            let Ok(prefix) = std::fs::canonicalize(&root.prefix) else {
                continue;
            };
            if let Ok(rest) = real.strip_prefix(&prefix)
                && let Some(Component::Normal(first)) = rest.components().next()
                && first != customer.as_str()
            {
                return false;
            }
        }
        self.roots.iter().any(|root| {
            if writable && !root.private() {
                return false;
            }
            root.dir_for(customer)
                .and_then(|d| std::fs::canonicalize(d).ok())
                .is_some_and(|dir| real.starts_with(dir))
        })
    }
}

fn parse_root(raw: &str) -> std::result::Result<Root, String> {
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(format!("asset root {raw:?} must be an absolute path"));
    }
    let mut prefix = PathBuf::new();
    let mut suffix: Option<PathBuf> = None;
    for c in path.components() {
        let part = c.as_os_str();
        if part == CUSTOMER_PLACEHOLDER {
            if suffix.is_some() {
                return Err(format!(
                    "asset root {raw:?} names {CUSTOMER_PLACEHOLDER} more than once"
                ));
            }
            suffix = Some(PathBuf::new());
            continue;
        }
        if part.to_string_lossy().contains(CUSTOMER_PLACEHOLDER) {
            return Err(format!(
                "asset root {raw:?}: {CUSTOMER_PLACEHOLDER} must be a whole path component"
            ));
        }
        if matches!(c, Component::ParentDir) {
            return Err(format!("asset root {raw:?} must not contain '..'"));
        }
        match &mut suffix {
            Some(s) => s.push(part),
            None => prefix.push(part),
        }
    }
    Ok(Root { prefix, suffix })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::DiskSpec;
    use crate::vm::VmSpecRow;
    use std::collections::BTreeMap;

    /// A spec with `kernel` and disks given as (path, writable).
    fn spec(kernel: &Path, disks: &[(&Path, bool)]) -> VmSpec {
        VmSpec::try_from(VmSpecRow {
            vcpus: 1,
            topology: None,
            memory_bytes: 128 << 20,
            kernel: kernel.to_path_buf(),
            initrd: None,
            kernel_args: String::new(),
            boot_options: BTreeMap::new(),
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, (p, writable))| DiskSpec {
                    id: format!("d{i}"),
                    path: p.to_path_buf(),
                    read_only: !*writable,
                    is_root: false,
                    interface_type: String::new(),
                    options: BTreeMap::new(),
                })
                .collect(),
            nics: Vec::new(),
            console_enabled: true,
            metadata: BTreeMap::new(),
        })
        .unwrap()
    }

    fn cust(s: &str) -> CustomerId {
        CustomerId::parse(s).unwrap()
    }

    struct World {
        _tmp: tempfile::TempDir,
        base: PathBuf,
        policy: AssetPolicy,
    }

    /// shared/ (kernel, image), private/<customer>/ (disks), outside/.
    fn world() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        for d in ["shared", "private/acme", "private/other", "outside"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        for f in [
            "shared/vmlinux",
            "private/acme/disk.img",
            "private/other/disk.img",
            "outside/secret",
        ] {
            std::fs::write(base.join(f), b"x").unwrap();
        }
        let roots = vec![
            base.join("shared").display().to_string(),
            base.join("private/{customer}").display().to_string(),
        ];
        let policy = AssetPolicy::new(&roots, &[]).unwrap();
        World {
            _tmp: tmp,
            base,
            policy,
        }
    }

    fn denied_field(e: Error) -> String {
        match e {
            Error::PermissionDenied { field, reason } => {
                assert_eq!(reason, DENIED);
                field
            }
            other => panic!("expected permission denied, got {other:?}"),
        }
    }

    #[test]
    fn shared_kernel_and_own_writable_disk_resolve() {
        let w = world();
        let s = spec(
            &w.base.join("shared/../shared/vmlinux"),
            &[(&w.base.join("private/acme/disk.img"), true)],
        );
        let r = w.policy.resolve(&cust("acme"), &s).unwrap();
        assert_eq!(r.spec.kernel(), w.base.join("shared/vmlinux"));
        assert!(r.disks[0].writable);
        assert_eq!(r.spec.disks()[0].path, w.base.join("private/acme/disk.img"));
    }

    #[test]
    fn outside_missing_escapes_and_links_answer_alike() {
        let w = world();
        std::os::unix::fs::symlink(w.base.join("outside/secret"), w.base.join("shared/link"))
            .unwrap();
        let k = w.base.join("shared/vmlinux");
        let bad: Vec<PathBuf> = vec![
            w.base.join("outside/secret"),
            w.base.join("shared/../outside/secret"),
            w.base.join("shared/link"),
            w.base.join("shared/missing"),
            w.base.join("shared"),
            PathBuf::from("/etc/passwd"),
        ];
        for p in bad {
            let e = w.policy.resolve(&cust("acme"), &spec(&p, &[])).unwrap_err();
            assert_eq!(denied_field(e), "config.boot.kernel_path", "{p:?}");
            let e = w
                .policy
                .resolve(&cust("acme"), &spec(&k, &[(&p, true)]))
                .unwrap_err();
            assert_eq!(denied_field(e), "config.storage[0].path", "{p:?}");
        }
    }

    #[test]
    fn writable_only_from_the_customers_own_root() {
        let w = world();
        let k = w.base.join("shared/vmlinux");
        // A shared image may be read, not written.
        assert!(
            w.policy
                .resolve(&cust("acme"), &spec(&k, &[(&k, true)]))
                .is_err()
        );
        assert!(
            w.policy
                .resolve(&cust("acme"), &spec(&k, &[(&k, false)]))
                .is_ok()
        );
        // Another customer's disk: neither.
        let theirs = w.base.join("private/other/disk.img");
        for ro in [true, false] {
            let e = w
                .policy
                .resolve(&cust("acme"), &spec(&k, &[(&theirs, ro)]))
                .unwrap_err();
            assert_eq!(denied_field(e), "config.storage[0].path");
        }
    }

    #[test]
    fn a_shared_root_containing_private_ones_does_not_open_them() {
        let w = world();
        let roots = vec![
            w.base.display().to_string(),
            w.base.join("private/{customer}").display().to_string(),
        ];
        let p = AssetPolicy::new(&roots, &[]).unwrap();
        let k = w.base.join("shared/vmlinux");
        let theirs = w.base.join("private/other/disk.img");
        assert!(
            p.resolve(&cust("acme"), &spec(&k, &[(&theirs, true)]))
                .is_err()
        );
        let mine = w.base.join("private/acme/disk.img");
        assert!(
            p.resolve(&cust("acme"), &spec(&k, &[(&mine, true)]))
                .is_ok()
        );
    }

    #[test]
    fn unsafe_customer_ids_have_no_private_root() {
        let w = world();
        let k = w.base.join("shared/vmlinux");
        let escape = w.base.join("private/../outside/secret");
        for c in ["..", "../outside", ".hidden", "a/b"] {
            let c = cust(c);
            assert!(w.policy.resolve(&c, &spec(&k, &[(&escape, true)])).is_err());
        }
    }

    #[test]
    fn block_devices_only_when_listed() {
        let w = world();
        let k = w.base.join("shared/vmlinux");
        // A block device node (loop major 7) inside a shared root: being
        // inside a root is not enough for a device.
        let dev = w.base.join("shared/blk");
        let made = std::process::Command::new("mknod")
            .arg(&dev)
            .args(["b", "7", "250"])
            .status()
            .expect("mknod runs");
        assert!(made.success(), "mknod needs root, as metald's tests do");
        let d = dev.display().to_string();
        assert!(
            w.policy
                .resolve(&cust("acme"), &spec(&k, &[(&dev, false)]))
                .is_err()
        );
        let roots = vec![w.base.join("shared").display().to_string()];
        let shared = AssetPolicy::new(&roots, std::slice::from_ref(&d)).unwrap();
        assert!(
            shared
                .resolve(&cust("acme"), &spec(&k, &[(&dev, false)]))
                .is_ok()
        );
        assert!(
            shared
                .resolve(&cust("acme"), &spec(&k, &[(&dev, true)]))
                .is_err()
        );
        // Never as a kernel.
        assert!(shared.resolve(&cust("acme"), &spec(&dev, &[])).is_err());
        let own = AssetPolicy::new(&roots, &[format!("{d}=acme")]).unwrap();
        assert!(
            own.resolve(&cust("acme"), &spec(&k, &[(&dev, true)]))
                .is_ok()
        );
        assert!(
            own.resolve(&cust("other"), &spec(&k, &[(&dev, false)]))
                .is_err()
        );
        // Character devices never.
        let null = Path::new("/dev/null");
        assert!(
            shared
                .resolve(&cust("acme"), &spec(&k, &[(null, false)]))
                .is_err()
        );
    }

    #[test]
    fn root_templates_are_checked() {
        for bad in [
            "relative",
            "/a/{customer}/{customer}",
            "/a/x{customer}",
            "/a/../b",
        ] {
            assert!(AssetPolicy::new(&[bad.into()], &[]).is_err(), "{bad}");
        }
        assert!(AssetPolicy::new(&[], &["dev/x".into()]).is_err());
    }
}
