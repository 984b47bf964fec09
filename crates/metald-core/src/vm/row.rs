//! A [`VmSpec`] as the store keeps it (`spec_json`), and the way back: a
//! stored spec is judged again before metald uses it, so a row edited by
//! hand or written by a buggy build cannot become a spec no client could
//! have sent.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{DiskInput, DiskSpec, VmSpec, VmSpecInput};
use crate::error::{Error, Result};
use crate::net::{MAX_NICS, NicSpec};

/// The stored form of a [`VmSpec`]: public fields, the exact JSON shape
/// metald has always written to `spec_json`, and no invariants of its own.
/// Only `VmSpec::try_from` turns it into a spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpecRow {
    pub vcpus: u32,
    pub topology: Option<(u32, u32, u32)>,
    pub memory_bytes: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub kernel_args: String,
    pub boot_options: BTreeMap<String, String>,
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    pub console_enabled: bool,
    pub metadata: BTreeMap<String, String>,
}

impl From<&VmSpec> for VmSpecRow {
    fn from(s: &VmSpec) -> Self {
        VmSpecRow {
            vcpus: s.vcpus,
            topology: s.topology,
            memory_bytes: s.memory_bytes,
            kernel: s.kernel.clone(),
            initrd: s.initrd.clone(),
            kernel_args: s.kernel_args.clone(),
            boot_options: s.boot_options.clone(),
            disks: s.disks.clone(),
            nics: s.nics.clone(),
            console_enabled: s.console_enabled,
            metadata: s.metadata.clone(),
        }
    }
}

impl TryFrom<VmSpecRow> for VmSpec {
    type Error = Error;

    /// Judges a stored spec with the rules of [`VmSpec::new`]: the row, put
    /// back into a client's terms, must pass them and come out as stored
    /// (disks included, root first). Interfaces are checked for their count
    /// and ids; their attachment is metald's own record. Whether the files
    /// may be used needs the asset roots, and stays the service's check
    /// before every boot.
    fn try_from(row: VmSpecRow) -> Result<Self> {
        let input = VmSpecInput {
            vcpu_count: i32::try_from(row.vcpus).unwrap_or(i32::MAX),
            topology: row.topology.map_or((0, 0, 0), |(s, c, t)| {
                let n = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
                (n(s), n(c), n(t))
            }),
            memory_bytes: i64::try_from(row.memory_bytes).unwrap_or(i64::MAX),
            kernel_path: row.kernel.to_string_lossy().into_owned(),
            initrd_path: row
                .initrd
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            kernel_args: row.kernel_args.clone(),
            boot_options: row.boot_options.clone(),
            disks: row.disks.iter().map(disk_input).collect(),
            console_enabled: row.console_enabled,
            metadata: row.metadata.clone(),
            ..VmSpecInput::default()
        };
        let mut spec = VmSpec::new(input)?;
        check_stored_nics(&row.nics)?;
        spec.fields_mut().nics = row.nics.clone();
        if VmSpecRow::from(&spec) != row {
            return Err(Error::invalid(
                "spec",
                "the stored spec is not one validation produces",
            ));
        }
        Ok(spec)
    }
}

/// A stored disk in a client's terms.
fn disk_input(d: &DiskSpec) -> DiskInput {
    DiskInput {
        id: d.id.clone(),
        path: d.path.to_string_lossy().into_owned(),
        read_only: d.read_only,
        is_root_device: d.is_root,
        interface_type: d.interface_type.clone(),
        options: d.options.clone(),
    }
}

fn check_stored_nics(nics: &[NicSpec]) -> Result<()> {
    if nics.len() > MAX_NICS {
        return Err(Error::invalid(
            "spec.nics",
            format!("at most {MAX_NICS} interface, got {}", nics.len()),
        ));
    }
    for (i, n) in nics.iter().enumerate() {
        let ok_id = !n.id.is_empty()
            && n.id.len() <= 32
            && n.id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok_id || nics[..i].iter().any(|o| o.id == n.id) {
            return Err(Error::invalid(
                format!("spec.nics[{i}].id"),
                format!("{:?} is not a valid, unique interface id", n.id),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `spec_json` exactly as metald wrote it before the row type
    /// existed: a VM with a wired interface.
    const STORED: &str = r#"{"vcpus":2,"topology":[1,2,1],"memory_bytes":134217728,"kernel":"/images/vmlinux","initrd":"/images/initramfs.cpio.gz","kernel_args":"console=ttyS0 reboot=k panic=1","boot_options":{},"disks":[{"id":"root","path":"/images/disk.ext4","read_only":true,"is_root":true,"interface_type":"","options":{}}],"nics":[{"id":"eth0","mac":null,"ipv4":null,"ipv6":null,"want_v4":true,"want_v6":true,"rx_bytes_per_sec":0,"tx_bytes_per_sec":0,"attachment":{"mac":"02:1a:b4:bf:f1:92","ipv4":["10.215.193.2",24],"gateway4":"10.215.193.1","ipv6":["fd00:6d74:f:d001:1a:b4ff:febf:f192",64],"gateway6":"fd00:6d74:f:d001::1","netns":"mtd-dfc8f6a69828","tap":"tap0","host_veth":"mva69828a55f"}}],"console_enabled":true,"metadata":{}}"#;

    /// The same from before interfaces existed: no `nics` at all.
    const STORED_WITHOUT_NICS: &str = r#"{"vcpus":1,"topology":null,"memory_bytes":134217728,"kernel":"/images/vmlinux","initrd":null,"kernel_args":"","boot_options":{"a":"b"},"disks":[],"console_enabled":false,"metadata":{"team":"blue"}}"#;

    fn load(json: &str) -> Result<VmSpec> {
        VmSpec::try_from(serde_json::from_str::<VmSpecRow>(json).unwrap())
    }

    #[test]
    fn specs_stored_by_earlier_metalds_load_and_are_written_back_alike() {
        let spec = load(STORED).unwrap();
        assert_eq!(spec.vcpus(), 2);
        assert_eq!(spec.topology(), Some((1, 2, 1)));
        assert_eq!(spec.disks()[0].path, PathBuf::from("/images/disk.ext4"));
        let att = spec.nics()[0].attachment.as_ref().expect("the attachment");
        assert_eq!(att.tap, "tap0");
        // Written back, it reads as the same spec, in the same shape: only
        // fields added since (with their defaults) join it.
        let again = serde_json::to_string(&VmSpecRow::from(&spec)).unwrap();
        assert_eq!(load(&again).unwrap(), spec);
        let mut want: serde_json::Value = serde_json::from_str(STORED).unwrap();
        want["nics"][0]["attachment"]["cmdline"] = true.into();
        let got: serde_json::Value = serde_json::from_str(&again).unwrap();
        assert_eq!(got, want, "the stored shape is unchanged");
        let old = load(STORED_WITHOUT_NICS).unwrap();
        assert!(old.nics().is_empty() && !old.console_enabled());
        assert_eq!(old.metadata()["team"], "blue");
    }

    #[test]
    fn a_stored_spec_that_breaks_an_invariant_is_refused() {
        let row = || serde_json::from_str::<VmSpecRow>(STORED).unwrap();
        let field = |r: VmSpecRow| match VmSpec::try_from(r) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let mut r = row();
        r.vcpus = 0;
        assert_eq!(field(r), "config.cpu.vcpu_count");
        let mut r = row();
        r.topology = Some((1, 1, 1));
        assert_eq!(field(r), "config.cpu.topology");
        let mut r = row();
        r.memory_bytes = (128 << 20) + 1;
        assert_eq!(field(r), "config.memory.size_bytes");
        let mut r = row();
        r.kernel = PathBuf::from("vmlinux");
        assert_eq!(field(r), "config.boot.kernel_path");
        let mut r = row();
        r.disks.push(r.disks[0].clone());
        assert_eq!(field(r), "config.storage[1].id");
        let mut r = row();
        r.nics.push(r.nics[0].clone());
        assert_eq!(field(r), "spec.nics");
        let mut r = row();
        r.nics[0].id = "eth 0".into();
        assert_eq!(field(r), "spec.nics[0].id");
        // A root device stored after another disk: validation would have
        // put it first, so the row is not one it produced.
        let mut r = row();
        let mut data = r.disks[0].clone();
        (data.id, data.is_root) = ("data".into(), false);
        r.disks.insert(0, data);
        assert_eq!(field(r), "spec");
    }
}
