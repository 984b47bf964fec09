//! Deterministic names and MACs.

use crate::NetNames;

/// Prefix of every namespace name.
pub(crate) const NETNS_PREFIX: &str = "mtd-";
/// Prefix of every host veth name.
pub(crate) const VETH_PREFIX: &str = "mv";
/// Prefix of the ownership mark (ifalias).
pub(crate) const MARK_PREFIX: &str = "metald:";

pub(crate) const GUEST_VETH: &str = "veth0";
pub(crate) const TAP: &str = "tap0";
pub(crate) const NS_BRIDGE: &str = "br0";
pub(crate) const IFB: &str = "ifb0";

/// FNV-1a 64 followed by the murmur3 64-bit finaliser (so that the low bits,
/// which the veth name uses, are as well mixed as the high ones).
fn hash(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

pub(crate) fn names(vm_id: &str, index: usize) -> NetNames {
    let h = hash(format!("{vm_id}/{index}").as_bytes());
    NetNames {
        netns: format!("{NETNS_PREFIX}{:012x}", h >> 16),
        host_veth: format!("{VETH_PREFIX}{:010x}", h & 0xff_ffff_ffff),
        guest_veth: GUEST_VETH.to_string(),
        tap: TAP.to_string(),
        ns_bridge: NS_BRIDGE.to_string(),
    }
}

/// Generates a stable locally-administered unicast MAC from (vm_id, index):
/// first byte 0x02, the other five from a hash of `"mac/<vm_id>/<index>"`.
pub fn mac_for(vm_id: &str, index: usize) -> [u8; 6] {
    let h = hash(format!("mac/{vm_id}/{index}").as_bytes()).to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// The ownership mark put in `ifalias`.
pub(crate) fn mark(vm_id: &str, index: usize) -> String {
    format!("{MARK_PREFIX}{vm_id}:{index}")
}

/// Parses a mark; `None` unless it is well formed.
pub(crate) fn parse_mark(alias: &str) -> Option<(String, usize)> {
    let rest = alias.strip_prefix(MARK_PREFIX)?;
    let (vm_id, index) = rest.rsplit_once(':')?;
    validate_vm_id(vm_id).ok()?;
    let index: usize = index.parse().ok()?;
    // Only the canonical spelling (no "+1", "01") is ours.
    (mark(vm_id, index) == alias).then(|| (vm_id.to_string(), index))
}

pub(crate) fn validate_vm_id(vm_id: &str) -> Result<(), String> {
    if vm_id.is_empty() || vm_id.len() > 64 {
        return Err(format!("vm_id {vm_id:?}: must be 1 to 64 characters long"));
    }
    if !vm_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!("vm_id {vm_id:?}: only [A-Za-z0-9_-] are allowed"));
    }
    Ok(())
}

/// Whether `name` has the shape of one of our namespace names.
pub(crate) fn is_netns_name(name: &str) -> bool {
    name.strip_prefix(NETNS_PREFIX)
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `name` has the shape of one of our host veth names.
pub(crate) fn is_veth_name(name: &str) -> bool {
    name.strip_prefix(VETH_PREFIX)
        .is_some_and(|h| h.len() == 10 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_stable() {
        let n = names("vm-1", 0);
        assert_eq!(n, names("vm-1", 0));
        // Device names must fit IFNAMSIZ; the namespace name is a file name.
        assert!(n.host_veth.len() <= 15);
        assert!(is_netns_name(&n.netns) && is_veth_name(&n.host_veth));
        assert_ne!(n, names("vm-1", 1));
    }

    #[test]
    fn marks_round_trip() {
        assert_eq!(parse_mark(&mark("a_b-C", 3)), Some(("a_b-C".into(), 3)));
        assert_eq!(parse_mark("metald:x:y"), None);
        assert_eq!(parse_mark("metald:a b:1"), None);
        assert_eq!(parse_mark("other"), None);
    }

    #[test]
    fn macs_are_local_unicast() {
        let m = mac_for("vm", 0);
        assert_eq!(m[0], 0x02);
        assert_eq!(m, mac_for("vm", 0));
        assert_ne!(m, mac_for("vm", 1));
    }
}
