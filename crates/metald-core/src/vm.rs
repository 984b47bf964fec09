//! What a VM is: identifiers and the validated machine specification.
//!
//! Every entry point (API, reconciler, tests) builds a [`VmSpec`] through
//! [`VmSpec::new`], so the rules below are the only place input is judged;
//! a stored spec ([`VmSpecRow`], `vm/row.rs`) is judged by them again on
//! its way back. The spec's fields are private (`vm/access.rs` reads them).
//! Field names in errors are the wire names, prefixed the way a client
//! wrote them (`config.cpu.vcpu_count`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::net::{NicInput, NicSpec, check_nics};

/// Smallest guest memory metald accepts (64 MiB).
pub const MIN_MEMORY_BYTES: u64 = 64 << 20;
/// Largest guest memory metald accepts (1 TiB); the backend may refuse less.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;
/// Most block devices per VM.
pub const MAX_DISKS: usize = 16;
/// Longest VM id; keeps derived names (sockets, devices) within OS limits.
pub const MAX_VM_ID_LEN: usize = 64;

/// A VM's identifier: 1..=64 characters of `[A-Za-z0-9_-]`, starting with a
/// letter or digit, so it is safe in paths, process names and device names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(String);

impl TryFrom<String> for VmId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        VmId::parse(&s, "vm_id")
    }
}

impl From<VmId> for String {
    fn from(id: VmId) -> String {
        id.0
    }
}

impl VmId {
    /// Validates a client-supplied id; `field` names it in the error.
    pub fn parse(raw: &str, field: &str) -> Result<Self> {
        if raw.is_empty() {
            return Err(Error::invalid(field, "must not be empty"));
        }
        if raw.len() > MAX_VM_ID_LEN {
            return Err(Error::invalid(
                field,
                format!(
                    "must be at most {MAX_VM_ID_LEN} characters, got {}",
                    raw.len()
                ),
            ));
        }
        if !raw.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(Error::invalid(field, "must start with a letter or digit"));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(Error::invalid(
                field,
                format!("may contain only letters, digits, '-' and '_', found {bad:?}"),
            ));
        }
        Ok(VmId(raw.to_owned()))
    }

    /// A fresh random id (`vm-` and 20 hex digits).
    pub fn generate() -> Self {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        VmId(format!("vm-{}", &hex[..20]))
    }

    /// A fresh host-wide key for a VM the customer calls `name`: the
    /// name's first 24 characters (so operators recognise it in `ps` and
    /// file names), `-`, and 16 random hex digits (so two customers' VMs of
    /// one name never share a file, socket or namespace).
    pub fn host_key(name: &VmId) -> Self {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        let head: String = name.0.chars().take(24).collect();
        VmId(format!("{head}-{}", &hex[..16]))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tenant a VM belongs to, as established by authentication.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CustomerId(String);

impl TryFrom<String> for CustomerId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        CustomerId::parse(&s)
    }
}

impl From<CustomerId> for String {
    fn from(id: CustomerId) -> String {
        id.0
    }
}

impl CustomerId {
    /// Validates a customer id taken from a token: 1..=128 printable ASCII
    /// characters without spaces.
    pub fn parse(raw: &str) -> Result<Self> {
        let ok = !raw.is_empty() && raw.len() <= 128 && raw.chars().all(|c| c.is_ascii_graphic());
        if ok {
            Ok(CustomerId(raw.to_owned()))
        } else {
            Err(Error::Unauthenticated(
                "token names an invalid customer id (1..=128 printable ASCII characters)".into(),
            ))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CustomerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A block device as the client described it, not yet validated.
#[derive(Debug, Clone, Default)]
pub struct DiskInput {
    pub id: String,
    pub path: String,
    pub read_only: bool,
    pub is_root_device: bool,
    pub interface_type: String,
    pub options: BTreeMap<String, String>,
}

/// A VM configuration as the client sent it, in wire units, not yet
/// validated. The API layer fills it from the protobuf message.
#[derive(Debug, Clone, Default)]
pub struct VmSpecInput {
    pub vcpu_count: i32,
    pub max_vcpu_count: i32,
    /// sockets, cores per socket, threads per core; all zero when absent.
    pub topology: (i32, i32, i32),
    pub memory_bytes: i64,
    pub memory_hotplug: bool,
    pub kernel_path: String,
    pub initrd_path: String,
    pub kernel_args: String,
    pub boot_options: BTreeMap<String, String>,
    pub disks: Vec<DiskInput>,
    pub network: Vec<NicInput>,
    pub console_enabled: bool,
    pub metadata: BTreeMap<String, String>,
}

/// A validated block device. Only metald-core makes one (from a client's
/// [`DiskInput`], judged), so a [`VmSpec`] never holds a disk nobody
/// checked; other crates read it.
///
/// ```compile_fail
/// // Outside metald-core a disk cannot be written down directly.
/// let _ = metald_core::vm::DiskSpec {
///     id: "root".into(),
///     path: "/etc/shadow".into(),
///     read_only: false,
///     is_root: true,
///     interface_type: String::new(),
///     options: Default::default(),
/// };
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DiskSpec {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub is_root: bool,
    pub interface_type: String,
    pub options: BTreeMap<String, String>,
}

/// A validated VM specification. Its fields are private: only
/// [`VmSpec::new`] (a client's configuration, judged) and
/// `TryFrom<`[`VmSpecRow`]`>` (a stored spec, judged again) create one, and
/// what changes after validation (resolved host paths, the network
/// attachment) changes through a narrow method each.
///
/// Cloning one is cheap: the fields are shared (a reference count), and a
/// change copies them first. A VM's spec is read on every GetVmInfo and
/// ListVms row and almost never changed, so reads never copy its strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec(Arc<SpecFields>);

/// A [`VmSpec`]'s fields, private to this module; read them through
/// [`VmSpec`]'s methods.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecFields {
    vcpus: u32,
    topology: Option<(u32, u32, u32)>,
    memory_bytes: u64,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    kernel_args: String,
    boot_options: BTreeMap<String, String>,
    disks: Vec<DiskSpec>,
    /// Network interfaces; empty for a VM without network.
    nics: Vec<NicSpec>,
    console_enabled: bool,
    metadata: BTreeMap<String, String>,
}

impl VmSpec {
    /// Judges a client's configuration. Checks run in field order and stop
    /// at the first failure, whose message names the field.
    pub fn new(input: VmSpecInput) -> Result<Self> {
        let vcpus = check_vcpus(&input)?;
        let topology = check_topology(&input, vcpus)?;
        let memory_bytes = check_memory(&input)?;
        let kernel = check_file(&input.kernel_path, "config.boot.kernel_path")?;
        let initrd = if input.initrd_path.is_empty() {
            None
        } else {
            Some(check_file(&input.initrd_path, "config.boot.initrd_path")?)
        };
        check_kernel_args(&input.kernel_args)?;
        let disks = check_disks(&input.disks)?;
        let nics = check_nics(&input.network)?;
        check_metadata(&input.metadata)?;
        Ok(VmSpec(Arc::new(SpecFields {
            vcpus,
            topology,
            memory_bytes,
            kernel,
            initrd,
            kernel_args: input.kernel_args,
            boot_options: input.boot_options,
            disks,
            nics,
            console_enabled: input.console_enabled,
            metadata: input.metadata,
        })))
    }
}

impl std::ops::Deref for VmSpec {
    type Target = SpecFields;

    fn deref(&self) -> &SpecFields {
        &self.0
    }
}

impl VmSpec {
    /// The fields to change, copied first if another copy shares them.
    /// Private: a validated spec changes only through this module's
    /// narrow methods.
    fn fields_mut(&mut self) -> &mut SpecFields {
        Arc::make_mut(&mut self.0)
    }
}

fn check_vcpus(input: &VmSpecInput) -> Result<u32> {
    let field = "config.cpu.vcpu_count";
    let n = input.vcpu_count;
    if !(1..=MAX_VCPUS as i32).contains(&n) {
        return Err(Error::invalid(
            field,
            format!("must be between 1 and {MAX_VCPUS}, got {n}"),
        ));
    }
    if input.max_vcpu_count != 0 && input.max_vcpu_count != n {
        if input.max_vcpu_count < n {
            return Err(Error::invalid(
                "config.cpu.max_vcpu_count",
                format!(
                    "must not be below vcpu_count ({n}), got {}",
                    input.max_vcpu_count
                ),
            ));
        }
        return Err(Error::Unimplemented(
            "config.cpu.max_vcpu_count: vCPU hotplug is not supported; leave it 0 or equal to vcpu_count".into(),
        ));
    }
    Ok(n as u32)
}

fn check_topology(input: &VmSpecInput, vcpus: u32) -> Result<Option<(u32, u32, u32)>> {
    let (s, c, t) = input.topology;
    if (s, c, t) == (0, 0, 0) {
        return Ok(None);
    }
    if s < 1 || c < 1 || t < 1 {
        return Err(Error::invalid(
            "config.cpu.topology",
            "sockets, cores_per_socket and threads_per_core must all be at least 1",
        ));
    }
    let product = s as i64 * c as i64 * t as i64;
    if product != vcpus as i64 {
        return Err(Error::invalid(
            "config.cpu.topology",
            format!("sockets × cores × threads = {product} must equal vcpu_count {vcpus}"),
        ));
    }
    Ok(Some((s as u32, c as u32, t as u32)))
}

fn check_memory(input: &VmSpecInput) -> Result<u64> {
    let field = "config.memory.size_bytes";
    let m = input.memory_bytes;
    if m < MIN_MEMORY_BYTES as i64 {
        return Err(Error::invalid(
            field,
            format!("must be at least 64 MiB ({MIN_MEMORY_BYTES}), got {m}"),
        ));
    }
    if m > MAX_MEMORY_BYTES as i64 {
        return Err(Error::invalid(
            field,
            format!("must be at most 1 TiB ({MAX_MEMORY_BYTES}), got {m}"),
        ));
    }
    if m % (1 << 20) != 0 {
        return Err(Error::invalid(
            field,
            format!("must be a multiple of 1 MiB (1048576), got {m}"),
        ));
    }
    if input.memory_hotplug {
        return Err(Error::Unimplemented(
            "config.memory.hotplug_enabled: memory hotplug is not supported".into(),
        ));
    }
    Ok(m as u64)
}

/// Longest path metald accepts in a request (the kernel's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// The form of a client-supplied path: absolute, bounded, no NUL. Whether
/// the caller may use the file is the asset policy's question
/// ([`crate::assets::AssetPolicy`]), asked by the service, so this
/// validation never touches the filesystem.
fn check_file(raw: &str, field: &str) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if raw.len() > MAX_PATH_LEN {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_PATH_LEN} bytes"),
        ));
    }
    if raw.contains('\0') {
        return Err(Error::invalid(field, "must not contain NUL"));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(Error::invalid(field, "must be an absolute path"));
    }
    Ok(path.to_path_buf())
}

/// Kernel parameters metald sets itself for a VM's network; a client may
/// not pass them, so it cannot override the addresses metald leased.
pub const RESERVED_KERNEL_ARGS: [&str; 3] = ["ip", "metald.ip6", "metald.gw6"];

fn check_kernel_args(args: &str) -> Result<()> {
    let field = "config.boot.kernel_args";
    if args.len() > 4096 {
        return Err(Error::invalid(
            field,
            format!("must be at most 4096 bytes, got {}", args.len()),
        ));
    }
    if args.chars().any(|c| c.is_control()) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    for word in args.split_whitespace() {
        let key = word.split_once('=').map_or(word, |(k, _)| k);
        if RESERVED_KERNEL_ARGS.contains(&key) {
            return Err(Error::invalid(
                field,
                format!("{key}= is set by metald for the VM's network and may not be passed"),
            ));
        }
    }
    Ok(())
}

/// Storage options that set a device's rate limit (bytes and operations
/// per second; Firecracker and Cloud Hypervisor apply them).
pub const DISK_RATE_OPTIONS: [&str; 2] = ["rate_limit_bytes_per_sec", "rate_limit_ops_per_sec"];

fn check_disks(disks: &[DiskInput]) -> Result<Vec<DiskSpec>> {
    if disks.len() > MAX_DISKS {
        return Err(Error::invalid(
            "config.storage",
            format!("at most {MAX_DISKS} devices, got {}", disks.len()),
        ));
    }
    let mut out: Vec<DiskSpec> = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter().enumerate() {
        let id = if d.id.is_empty() {
            format!("disk{i}")
        } else {
            d.id.clone()
        };
        let id_field = format!("config.storage[{i}].id");
        if id.len() > 32
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::invalid(
                id_field,
                "must be 1..=32 characters of letters, digits, '-' and '_'",
            ));
        }
        if out.iter().any(|o| o.id == id) {
            return Err(Error::invalid(
                id_field,
                format!("duplicate device id {id:?}"),
            ));
        }
        let path = check_file(&d.path, &format!("config.storage[{i}].path"))?;
        if d.is_root_device && out.iter().any(|o| o.is_root) {
            return Err(Error::invalid(
                format!("config.storage[{i}].is_root_device"),
                "only one device may be the root device",
            ));
        }
        // Options backends act on must parse (the rest pass through).
        for key in DISK_RATE_OPTIONS {
            if let Some(v) = d.options.get(key)
                && v.parse::<u64>().is_err()
            {
                return Err(Error::invalid(
                    format!("config.storage[{i}].options.{key}"),
                    format!("must be a whole number, got {v:?}"),
                ));
            }
        }
        out.push(DiskSpec {
            id,
            path,
            read_only: d.read_only,
            is_root: d.is_root_device,
            interface_type: d.interface_type.clone(),
            options: d.options.clone(),
        });
    }
    // The root device goes first so backends can rely on it being vda.
    out.sort_by_key(|d| !d.is_root);
    Ok(out)
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<()> {
    if metadata.len() > 64 {
        return Err(Error::invalid(
            "config.metadata",
            format!("at most 64 entries, got {}", metadata.len()),
        ));
    }
    for (k, v) in metadata {
        if k.is_empty() || k.len() > 128 {
            return Err(Error::invalid(
                "config.metadata",
                format!("key {k:?} must be 1..=128 bytes"),
            ));
        }
        if v.len() > 1024 {
            return Err(Error::invalid(
                format!("config.metadata[{k}]"),
                "value must be at most 1024 bytes",
            ));
        }
    }
    Ok(())
}

mod access;
mod row;

pub use row::VmSpecRow;

#[cfg(test)]
mod tests;
