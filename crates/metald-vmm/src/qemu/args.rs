//! The `qemu-system-x86_64` command line for one VM: a pure function of the
//! VM's spec and where its files live, so it can be checked without QEMU.

use std::ffi::OsString;
use std::path::Path;

use metald_core::vm::VmSpec;

use super::Accel;

/// Kernel arguments used when a VM gives none: a serial console metald
/// captures, and a reboot instead of a hang on panic.
pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1";

/// Where a VM's files live inside its directory.
pub struct VmFiles<'a> {
    pub console_log: &'a Path,
    pub qmp_socket: &'a Path,
}

/// QEMU splits option values at commas; a literal comma is written twice.
fn escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// MiB of TCG's translation cache.
pub const TCG_CACHE_MIB: u32 = 32;

/// The arguments after the binary name. The guest starts paused (`-S`);
/// metald lets it run over QMP once it is attached, so a VM is never
/// running without metald knowing it.
pub fn command_line(id: &str, spec: &VmSpec, accel: Accel, files: &VmFiles<'_>) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: String| a.push(s.into());
    push("-name".into());
    push(format!("metald-{id}"));
    push("-machine".into());
    push("microvm".into());
    push("-accel".into());
    push(match accel {
        Accel::Kvm => "kvm".into(),
        // TCG's translation cache is bounded so that it fits, with the
        // rest of QEMU, in the memory the VM's cgroup allows besides the
        // guest's (`cgroup::limits`); QEMU's default is up to 1 GiB.
        Accel::Tcg => format!("tcg,tb-size={TCG_CACHE_MIB}"),
    });
    push("-cpu".into());
    push(match accel {
        Accel::Kvm => "host".into(),
        Accel::Tcg => "max".into(),
    });
    push("-smp".into());
    push(match spec.topology() {
        Some((s, c, t)) => format!("cpus={},sockets={s},cores={c},threads={t}", spec.vcpus()),
        None => format!("cpus={}", spec.vcpus()),
    });
    push("-m".into());
    push(format!("{}M", spec.memory_bytes() >> 20));
    for flag in ["-nodefaults", "-no-user-config", "-nographic", "-S"] {
        push(flag.into());
    }
    // Appending (O_APPEND): every write lands at the end however metald
    // shortens the file to keep it under its cap (see logcap.rs).
    push("-chardev".into());
    push(format!(
        "file,id=console,path={},append=on",
        escape(files.console_log)
    ));
    push("-serial".into());
    push("chardev:console".into());
    push("-qmp".into());
    push(format!(
        "unix:{},server=on,wait=off",
        escape(files.qmp_socket)
    ));
    push("-kernel".into());
    a.push(spec.kernel().as_os_str().to_owned());
    if let Some(initrd) = &spec.initrd() {
        a.push("-initrd".into());
        a.push(initrd.as_os_str().to_owned());
    }
    a.push("-append".into());
    a.push(crate::launch::kernel_cmdline(spec, DEFAULT_KERNEL_ARGS).into());
    // Interfaces: the TAP inside the VM's namespace (QEMU runs there).
    for (i, att) in spec
        .nics()
        .iter()
        .filter_map(|n| n.attachment.as_ref())
        .enumerate()
    {
        a.push("-netdev".into());
        a.push(format!("tap,id=net{i},ifname={},script=no,downscript=no", att.tap).into());
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net{i},mac={}", att.mac).into());
    } // Drives are named by position: client ids may hold characters QEMU
    // ids do not allow. The root device is first (VmSpec sorts it so), so
    // the guest sees it as /dev/vda.
    for (i, disk) in spec.disks().iter().enumerate() {
        a.push("-drive".into());
        a.push(
            format!(
                "id=disk{i},file={},format=raw,if=none,readonly={}",
                escape(&disk.path),
                if disk.read_only { "on" } else { "off" }
            )
            .into(),
        );
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=disk{i}").into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use metald_core::vm::{DiskInput, VmSpecInput, VmSpecRow};

    fn spec() -> VmSpec {
        let disk = |id: &str, path: &str, read_only: bool| DiskInput {
            id: id.into(),
            path: path.into(),
            read_only,
            is_root_device: id == "root",
            ..Default::default()
        };
        VmSpec::new(VmSpecInput {
            vcpu_count: 2,
            memory_bytes: 256 << 20,
            kernel_path: "/k/vmlinux".into(),
            initrd_path: "/k/initrd".into(),
            disks: vec![
                disk("root", "/d/a,b.img", true),
                disk("data", "/d/data.img", false),
            ],
            console_enabled: true,
            ..Default::default()
        })
        .unwrap()
    }

    fn line(spec: &VmSpec, accel: Accel) -> String {
        let files = VmFiles {
            console_log: Path::new("/v/console.log"),
            qmp_socket: Path::new("/v/qmp.sock"),
        };
        command_line("vm-1", spec, accel, &files)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn microvm_paused_with_qmp_console_and_drives() {
        let l = line(&spec(), Accel::Tcg);
        assert!(
            l.starts_with("-name metald-vm-1 -machine microvm -accel tcg,tb-size=32 -cpu max"),
            "{l}"
        );
        assert!(l.contains("-smp cpus=2 -m 256M"), "{l}");
        assert!(l.contains(" -S "), "guest starts paused: {l}");
        assert!(
            l.contains(
                "-chardev file,id=console,path=/v/console.log,append=on -serial chardev:console"
            ),
            "the console is appended to, so it can be trimmed: {l}"
        );
        assert!(
            l.contains("-qmp unix:/v/qmp.sock,server=on,wait=off"),
            "{l}"
        );
        assert!(l.contains("-kernel /k/vmlinux -initrd /k/initrd"), "{l}");
        assert!(l.contains(&format!("-append {DEFAULT_KERNEL_ARGS}")), "{l}");
        assert!(
            l.contains("-drive id=disk0,file=/d/a,,b.img,format=raw,if=none,readonly=on -device virtio-blk-device,drive=disk0"),
            "commas escaped, read-only honoured: {l}"
        );
        assert!(
            l.contains("id=disk1,file=/d/data.img,format=raw,if=none,readonly=off"),
            "{l}"
        );
    }

    #[test]
    fn kvm_topology_and_client_kernel_args() {
        let mut row = VmSpecRow::from(&spec());
        row.topology = Some((1, 2, 1));
        row.kernel_args = "console=ttyS0 quiet".into();
        row.initrd = None;
        let s = VmSpec::try_from(row).unwrap();
        let l = line(&s, Accel::Kvm);
        assert!(l.contains("-accel kvm -cpu host"), "{l}");
        assert!(l.contains("-smp cpus=2,sockets=1,cores=2,threads=1"), "{l}");
        assert!(!l.contains("-initrd"), "{l}");
        assert!(
            l.ends_with("drive=disk1") && l.contains("-append console=ttyS0 quiet"),
            "{l}"
        );
    }
}
