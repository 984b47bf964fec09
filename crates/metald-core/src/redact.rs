//! What a caller may see of metald's own trouble: an error id that ties an
//! answer to the log line with the details, and VMM output cleaned of
//! host paths.

use crate::assets::Resolved;
use crate::vm::VmSpec;

/// A short id that ties an answer or a `last_error` to the log line with
/// the details.
pub fn error_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Longest VMM reason passed on to a caller.
const MAX_REASON: usize = 240;

/// A VMM's reason as a caller may see it: one line, bounded, every path the
/// VMM was given shown as the client wrote it and every other absolute
/// path (metald's data dir, jail, sockets, logs) replaced by `<path>`.
pub fn scrub(reason: &str, resolved: &Resolved, client: &VmSpec) -> String {
    let mut known: Vec<(String, String)> = Vec::new();
    let pairs = [(resolved.spec.kernel(), client.kernel())]
        .into_iter()
        .chain(resolved.spec.initrd().zip(client.initrd()))
        .chain(
            resolved
                .spec
                .disks()
                .iter()
                .zip(client.disks())
                .map(|(r, c)| (r.path.as_path(), c.path.as_path())),
        );
    for (r, c) in pairs {
        known.push((r.display().to_string(), c.display().to_string()));
    }
    let line = reason.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut out = String::with_capacity(line.len().min(MAX_REASON));
    let mut rest = line;
    while let Some(start) = rest.find('/') {
        // A path starts at a `/` that begins a word.
        let before = &rest[..start];
        let starts_word = before
            .chars()
            .last()
            .is_none_or(|c| c.is_whitespace() || "'\"(=:,[".contains(c));
        if !starts_word {
            out.push_str(&rest[..start + 1]);
            rest = &rest[start + 1..];
            continue;
        }
        out.push_str(before);
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| c.is_whitespace() || "'\"),;]".contains(c))
            .unwrap_or(tail.len());
        let token = tail[..end].trim_end_matches([':', '.']);
        match known.iter().find(|(r, _)| r == token) {
            Some((_, c)) => out.push_str(c),
            None => out.push_str("<path>"),
        }
        rest = &tail[token.len()..];
    }
    out.push_str(rest);
    if out.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::DiskSpec;
    use crate::vm::VmSpecRow;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    fn spec(kernel: &str, disk: &str) -> VmSpec {
        VmSpec::try_from(VmSpecRow {
            vcpus: 1,
            topology: None,
            memory_bytes: 128 << 20,
            kernel: PathBuf::from(kernel),
            initrd: None,
            kernel_args: String::new(),
            boot_options: BTreeMap::new(),
            disks: vec![DiskSpec {
                id: "root".into(),
                path: PathBuf::from(disk),
                read_only: false,
                is_root: true,
                interface_type: String::new(),
                options: BTreeMap::new(),
            }],
            nics: Vec::new(),
            console_enabled: true,
            metadata: BTreeMap::new(),
        })
        .unwrap()
    }

    #[test]
    fn host_paths_go_and_the_clients_own_stay() {
        let client = spec("/assets/link/vmlinux", "/assets/acme/disk.img");
        let resolved = Resolved {
            spec: spec("/srv/images/vmlinux-6.1", "/srv/acme/disk.img"),
            disks: Vec::new(),
        };
        let reason = "qemu exited with status 1 while starting: qemu.log: \
            qemu-system-x86_64: -kernel /srv/images/vmlinux-6.1: could not load; \
            socket '/var/lib/metald/vms/web-1-ab12/qmp.sock', file=/srv/acme/disk.img,\n\
            second line with /etc/shadow";
        let out = scrub(reason, &resolved, &client);
        assert!(
            out.contains("-kernel /assets/link/vmlinux: could not load"),
            "{out}"
        );
        assert!(out.contains("file=/assets/acme/disk.img"), "{out}");
        assert!(out.contains("'<path>'"), "{out}");
        for gone in ["/var/lib/metald", "/srv/", "/etc/shadow", "second line"] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        // Slashes inside words are not paths.
        let out = scrub("bad value 1/2 for and/or", &resolved, &client);
        assert_eq!(out, "bad value 1/2 for and/or");
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let s = spec("/k", "/d");
        let resolved = Resolved {
            spec: s.clone(),
            disks: Vec::new(),
        };
        let out = scrub(&"é".repeat(500), &resolved, &s);
        assert!(out.len() <= MAX_REASON + '…'.len_utf8(), "{}", out.len());
        assert!(out.ends_with('…'));
    }

    #[test]
    fn error_ids_are_short_and_distinct() {
        let (a, b) = (error_id(), error_id());
        assert_eq!(a.len(), 12);
        assert_ne!(a, b);
    }
}
