//! How a guest ended, from its own console, for a VMM metald could not
//! reap (one adopted after a restart: not metald's child, so its exit
//! status is lost to metald).
//!
//! A Linux guest that powers off prints `reboot: Power down` as its last
//! kernel message. The console is written by the guest, so this only ever
//! decides whether that guest's own VM is reported `shutdown` or `failed`.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of the console's end is read.
const TAIL: u64 = 4096;

/// What the kernel prints when it powers the machine off.
const POWER_DOWN: &str = "reboot: Power down";

/// Whether the last line of `console` that the kernel could have written
/// says the guest powered off.
pub fn powered_off(console: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(console) else {
        return false;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).is_err() {
        return false;
    }
    let mut tail = Vec::with_capacity(TAIL as usize);
    if f.take(TAIL).read_to_end(&mut tail).is_err() {
        return false;
    }
    String::from_utf8_lossy(&tail)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .is_some_and(|l| l.ends_with(POWER_DOWN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(text: &str) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        std::fs::write(&p, text).unwrap();
        powered_off(&p)
    }

    #[test]
    fn only_a_power_off_as_the_last_words_counts() {
        assert!(with("[    1.0] booted\n[    9.1] reboot: Power down\n"));
        assert!(with("[    9.1] reboot: Power down\r\n\r\n"));
        assert!(!with(
            "[    9.1] reboot: Power down\n[    9.2] Kernel panic - not syncing\n"
        ));
        assert!(!with("[    9.1] reboot: Restarting system\n"));
        assert!(!with(""));
        assert!(!powered_off(Path::new("/nonexistent/console.log")));
        // Only the end is read, however long the log.
        let long = format!("{}\nreboot: Power down\n", "x".repeat(1 << 20));
        assert!(with(&long));
    }
}
