//! Persistent TAP devices through `/dev/net/tun` (the kernel refuses to make
//! them over netlink).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

const TUN_IOC_MAGIC: u8 = b'T';

nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(TUN_IOC_MAGIC, 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_int_bad!(
    tunsetpersist,
    nix::request_code_write!(TUN_IOC_MAGIC, 203, std::mem::size_of::<libc::c_int>())
);

/// Creates the persistent TAP `name` (`IFF_TAP | IFF_NO_PI`, single queue) in
/// the calling thread's network namespace. QEMU attaching later may set its
/// own per-attach flags such as `IFF_VNET_HDR`.
pub(crate) fn create_persistent(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(format!("invalid TAP name {name:?}"));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("opening /dev/net/tun: {e}"))?;
    // SAFETY: ifreq is a plain C struct (a name array and a union of plain
    // integers/structs) for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: the fd is an open /dev/net/tun and `req` is a valid, initialised
    // ifreq that outlives the call; TUNSETIFF only reads (and may write back
    // the name into) it.
    unsafe { tunsetiff(tun.as_raw_fd(), &req) }.map_err(|e| format!("TUNSETIFF {name}: {e}"))?;
    // SAFETY: the fd is attached to the TAP just created; TUNSETPERSIST takes
    // an integer argument, no memory.
    unsafe { tunsetpersist(tun.as_raw_fd(), 1) }
        .map_err(|e| format!("TUNSETPERSIST {name}: {e}"))?;
    Ok(())
}
