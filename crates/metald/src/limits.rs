//! Process limits metald sets for itself at start-up.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tracing::{info, warn};

/// Raises the soft limit on open files to the hard one. Every VM holds a
/// few descriptors in metald (its logs, its usage files, its pidfd, its
/// API socket while a call is made), and the soft limit most hosts give a
/// process outside systemd (1,024) would end a host at a few hundred VMs;
/// the unit in `deploy/systemd` sets it itself. Returns the limit now.
pub fn raise_open_files() -> Option<u64> {
    let lim = getrlimit(Resource::Nofile);
    let (Some(current), Some(max)) = (lim.current, lim.maximum) else {
        return lim.current;
    };
    if current >= max {
        return Some(current);
    }
    let raised = Rlimit {
        current: Some(max),
        maximum: Some(max),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            info!(from = current, to = max, "raised the open-files limit");
            Some(max)
        }
        Err(e) => {
            warn!(limit = current, error = %e, "cannot raise the open-files limit");
            Some(current)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        let before = getrlimit(Resource::Nofile);
        let max = before.maximum.expect("a finite hard limit");
        let lowered = Rlimit {
            current: Some((max / 2).max(256)),
            maximum: Some(max),
        };
        setrlimit(Resource::Nofile, lowered).unwrap();
        assert_eq!(raise_open_files(), Some(max));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(max));
    }
}
