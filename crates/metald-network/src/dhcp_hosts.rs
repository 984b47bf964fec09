//! The DHCP hosts file dnsmasq serves from (`--dhcp-hostsfile`): one line
//! per VM interface with an IPv4 lease, `<mac>,<ipv4> # <vm_id>/<index>`.
//! dnsmasq reads the `<mac>,<ipv4>` part (the rest is a comment to it);
//! metald reads the comment back to know whose line it is, so a restarted
//! metald and the reconciler find every line's owner in the file itself.
//!
//! The file is replaced whole (write a temporary file, then rename), so
//! dnsmasq never reads half of it.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

use crate::names;

/// One VM interface's line: its MAC and leased IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostEntry {
    /// The guest NIC's MAC.
    pub mac: [u8; 6],
    /// The address IPAM leased to it.
    pub ipv4: Ipv4Addr,
}

/// Every line, by owner (VM id, interface index).
pub(crate) type Hosts = BTreeMap<(String, usize), HostEntry>;

fn mac_text(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The file's text: lines sorted by owner, so equal maps give equal files.
pub(crate) fn render(hosts: &Hosts) -> String {
    hosts
        .iter()
        .map(|((vm, index), e)| format!("{},{} # {vm}/{index}\n", mac_text(e.mac), e.ipv4))
        .collect()
}

/// One line of [`render`]'s form; `None` for anything else.
fn parse_line(line: &str) -> Option<((String, usize), HostEntry)> {
    let (host, owner) = line.split_once(" # ")?;
    let (mac, ipv4) = host.split_once(',')?;
    let (vm, index_text) = owner.trim_end().rsplit_once('/')?;
    names::validate_vm_id(vm).ok()?;
    let index: usize = index_text.parse().ok()?;
    // Only the canonical spelling (no "+1", "01") is metald's.
    if index.to_string() != index_text {
        return None;
    }
    Some((
        (vm.to_string(), index),
        HostEntry {
            mac: parse_mac(mac)?,
            ipv4: ipv4.parse().ok()?,
        },
    ))
}

/// Parses a file written by [`render`]; lines of another form are skipped
/// and returned for a warning.
pub(crate) fn parse(text: &str) -> (Hosts, Vec<String>) {
    let mut hosts = Hosts::new();
    let mut skipped = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match parse_line(line) {
            Some((owner, entry)) => {
                hosts.insert(owner, entry);
            }
            None => skipped.push(line.chars().take(120).collect()),
        }
    }
    (hosts, skipped)
}

/// Reads the file; a missing file is an empty map.
pub(crate) fn load(path: &Path) -> Result<(Hosts, Vec<String>), String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Hosts::new(), Vec::new())),
        Err(e) => Err(format!("reading the DHCP hosts file: {e}")),
    }
}

/// Replaces the file with `hosts`: written to `<path>.tmp`, then renamed
/// over it. Not synced: metald rebuilds it from its own records at start.
pub(crate) fn store(path: &Path, hosts: &Hosts) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(render(hosts).as_bytes())?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("writing the DHCP hosts file: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(last: u8, ip: &str) -> HostEntry {
        HostEntry {
            mac: [0x02, 0, 0, 0, 0, last],
            ipv4: ip.parse().unwrap(),
        }
    }

    #[test]
    fn lines_are_mac_comma_address_with_the_owner_as_a_comment() {
        let mut hosts = Hosts::new();
        hosts.insert(("vm-b".into(), 0), entry(0x0b, "10.9.0.3"));
        hosts.insert(("vm-a".into(), 1), entry(0xa1, "10.9.0.2"));
        assert_eq!(
            render(&hosts),
            "02:00:00:00:00:a1,10.9.0.2 # vm-a/1\n02:00:00:00:00:0b,10.9.0.3 # vm-b/0\n"
        );
    }

    #[test]
    fn a_rendered_file_parses_back_and_foreign_lines_are_skipped() {
        let mut hosts = Hosts::new();
        hosts.insert(("a_b-C".into(), 0), entry(1, "10.9.0.2"));
        hosts.insert(("x".into(), 3), entry(2, "10.9.0.9"));
        let mut text = render(&hosts);
        for bad in [
            "02:00:00:00:00:03,10.9.0.4",
            "02:00:00:00:00:03,10.9.0.4 # bad id!/0",
            "02:00:00:00:00:03,10.9.0.4 # vm/+1",
            "02:00:00:00:00:3,10.9.0.4 # vm/0",
            "02:00:00:00:00:03,10.9.0.400 # vm/0",
        ] {
            text.push_str(bad);
            text.push('\n');
        }
        let (parsed, skipped) = parse(&text);
        assert_eq!(parsed, hosts);
        assert_eq!(skipped.len(), 5, "{skipped:?}");
    }

    #[test]
    fn store_replaces_the_file_and_load_reads_it() {
        let dir = std::env::temp_dir().join(format!("metald-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        assert!(load(&path).unwrap().0.is_empty(), "missing is empty");
        let mut hosts = Hosts::new();
        hosts.insert(("vm".into(), 0), entry(1, "10.9.0.2"));
        store(&path, &hosts).unwrap();
        assert_eq!(load(&path).unwrap().0, hosts);
        hosts.clear();
        store(&path, &hosts).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        assert!(!path.with_extension("tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
