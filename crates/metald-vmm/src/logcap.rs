//! Console and VMM logs with a size cap (`UNKEY_METALD_CONSOLE_LOG_MAX`).
//!
//! A guest writes to its serial console as fast as the VMM lets it, and the
//! VMM writes it to a file in the VM's directory. Every such file is opened
//! with `O_APPEND` (by metald before spawning, or by QEMU with
//! `append=on`), so each write lands at the current end however the file
//! was shortened. One thread per metald looks at every watched file every
//! [`CHECK_EVERY`] (an `fstat` of each file it keeps open that inotify
//! says was written since); a file over the cap is cut to its
//! newest `cap / 2` bytes: `fallocate(FALLOC_FL_COLLAPSE_RANGE)` where the
//! filesystem has it (ext4, XFS: the VMM's writes are serialised with it,
//! nothing is lost), else by copying the tail to the front with a bounded
//! buffer and truncating. metald never reads a whole log.
//!
//! A file therefore holds at most the cap plus what the VMM writes in one
//! interval; `docs/backends.md` gives the numbers and what happens while no
//! metald runs.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use metald_core::vm::VmId;
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{FallocateFlags, FileType};
use tracing::{debug, warn};

/// The cap when `UNKEY_METALD_CONSOLE_LOG_MAX` is not set: 1 MiB.
pub const DEFAULT_MAX: u64 = 1 << 20;

/// The smallest cap accepted: 64 KiB.
pub const MIN_MAX: u64 = 64 << 10;

/// How often every watched file's size is checked.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// Copy buffer of the fallback trim; all the memory a trim uses.
const COPY_BUF: usize = 64 << 10;

/// Opens `path` for a VMM to write its console or log to: created empty,
/// append-only, never through a symlink. Hand it to the child as stdout or
/// stderr.
pub fn create_append(path: &Path) -> io::Result<File> {
    let f = open_append(path)?;
    f.set_len(0)?;
    Ok(f)
}

/// Like [`create_append`], but keeps what the file already holds (a log
/// metald itself appends to across restarts).
pub fn open_append(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc_o_nofollow())
        .open(path)
}

fn libc_o_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// How a file was brought under the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trimmed {
    /// Under the cap already.
    No,
    /// The oldest bytes were collapsed away in place.
    Collapsed,
    /// The newest bytes were copied to the front and the rest truncated.
    Copied,
}

/// Brings the open file `f` to at most `max` bytes, keeping its newest
/// `max / 2` (rounded up to a filesystem block when collapsing).
pub fn trim_file(f: &File, max: u64) -> io::Result<Trimmed> {
    let st = rustix::fs::fstat(f)?;
    let size = st.st_size as u64;
    if size <= max {
        return Ok(Trimmed::No);
    }
    let keep = (max / 2).max(1);
    let block = (st.st_blksize as u64).max(512);
    let cut = (size - keep) / block * block;
    if cut > 0 && rustix::fs::fallocate(f, FallocateFlags::COLLAPSE_RANGE, 0, cut).is_ok() {
        return Ok(Trimmed::Collapsed);
    }
    copy_tail(f, keep)?;
    Ok(Trimmed::Copied)
}

/// The fallback trim: copies the newest `keep` bytes to the front, then
/// whatever the VMM appended meanwhile (a few rounds at most), and
/// truncates after them. Output written between the last size check and
/// the truncate (microseconds) is lost.
pub fn copy_tail(f: &File, keep: u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    let size = rustix::fs::fstat(f)?.st_size as u64;
    let mut src = size.saturating_sub(keep);
    let mut end = size;
    let mut dst = 0u64;
    for _ in 0..4 {
        while src < end {
            let n = (end - src).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], src)?;
            f.write_all_at(&buf[..n], dst)?;
            src += n as u64;
            dst += n as u64;
        }
        let now = rustix::fs::fstat(f)?.st_size as u64;
        if now <= end {
            break;
        }
        end = now;
    }
    f.set_len(dst)
}

/// Trims the log at `path` if it is over `max`. Only a regular file with
/// one link is touched, opened without following a symlink (a VMM that
/// can write its directory cannot point metald at another file).
pub fn trim_path(path: &Path, max: u64) -> io::Result<Trimmed> {
    match open_watched(path)? {
        Opened::File(f) => trim_file(&f, max),
        Opened::Missing | Opened::NotRegular => Ok(Trimmed::No),
    }
}

/// What is at a log's path.
enum Opened {
    /// Nothing yet.
    Missing,
    /// A symlink, FIFO or directory: never trimmed.
    NotRegular,
    File(File),
}

/// Opens the log at `path` for trimming. An error if it is a regular file
/// with more than one link. Opening without following a symlink, and
/// checking the open file, means a VMM that can write its directory cannot
/// point metald at another file.
fn open_watched(path: &Path) -> io::Result<Opened> {
    let st = match rustix::fs::lstat(path) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(Opened::Missing),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(Opened::NotRegular);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc_o_nofollow() | rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let st = rustix::fs::fstat(&f)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_nlink != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file with a single link; left alone",
        ));
    }
    Ok(Opened::File(f))
}

/// One watched log. Once open, the file is kept open and watched with
/// inotify, so an idle log costs nothing: only a file written since the
/// last look is `fstat`ed (every open file is, where inotify is not to be
/// had). The open file follows the file the VMM was given, even renamed;
/// one unlinked or linked twice is let go and its path looked at again.
struct Watched {
    path: PathBuf,
    state: State,
}

enum State {
    /// Not there yet: its path is looked at every tick.
    Pending,
    /// Not a regular file (the log FIFO): nothing to trim.
    Never,
    Open {
        file: File,
        wd: Option<i32>,
    },
}

/// What inotify said since the last tick.
#[derive(Default)]
struct Changes {
    /// Watch descriptors with any event.
    wds: HashSet<i32>,
    /// Events were lost (the queue overflowed): look at every file.
    all: bool,
}

impl Watched {
    fn new(path: PathBuf) -> Self {
        Watched {
            path,
            state: State::Pending,
        }
    }

    /// Whether the file is over `max` now; opens it first if need be.
    fn over(&mut self, max: u64, notify: Option<&OwnedFd>, changes: &Changes) -> io::Result<bool> {
        if let State::Open { file, wd } = &self.state {
            if let Some(wd) = wd
                && !changes.all
                && !changes.wds.contains(wd)
            {
                return Ok(false);
            }
            match rustix::fs::fstat(file) {
                Ok(st) if st.st_nlink == 1 => return Ok(st.st_size as u64 > max),
                // Unlinked, or linked again elsewhere: look at the path.
                _ => self.forget(notify),
            }
        }
        if !matches!(self.state, State::Pending) {
            return Ok(false);
        }
        match open_watched(&self.path)? {
            Opened::Missing => Ok(false),
            Opened::NotRegular => {
                self.state = State::Never;
                Ok(false)
            }
            Opened::File(file) => {
                let over = rustix::fs::fstat(&file)?.st_size as u64 > max;
                // Watched through the open file, so it is this inode.
                let wd = notify.and_then(|n| {
                    let at = format!("/proc/self/fd/{}", file.as_raw_fd());
                    let on = WatchFlags::MODIFY | WatchFlags::ATTRIB | WatchFlags::DELETE_SELF;
                    inotify::add_watch(n, at, on).ok()
                });
                self.state = State::Open { file, wd };
                Ok(over)
            }
        }
    }

    /// Lets the file and its inotify watch go; its path is looked at again.
    fn forget(&mut self, notify: Option<&OwnedFd>) {
        if let State::Open { wd: Some(wd), .. } = self.state
            && let Some(n) = notify
        {
            let _ = inotify::remove_watch(n, wd);
        }
        self.state = State::Pending;
    }
}

/// Reads every inotify event waiting, without blocking.
fn drain(notify: &OwnedFd, buf: &mut [MaybeUninit<u8>], changes: &mut Changes) {
    let mut reader = inotify::Reader::new(notify, buf);
    loop {
        match reader.next() {
            Ok(ev) => {
                if ev.events().contains(ReadFlags::QUEUE_OVERFLOW) {
                    changes.all = true;
                } else {
                    changes.wds.insert(ev.wd());
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            // AGAIN: nothing more waiting. Anything else: look at all.
            Err(rustix::io::Errno::AGAIN) => return,
            Err(_) => {
                changes.all = true;
                return;
            }
        }
    }
}

struct Inner {
    max: u64,
    files: Mutex<HashMap<VmId, Vec<Watched>>>,
    /// The inotify instance watching every open log; without one (inotify
    /// unavailable) every open log is `fstat`ed each tick.
    notify: Option<OwnedFd>,
    started: Mutex<bool>,
}

/// The files of every VM whose VMM may be writing, and the thread that
/// keeps them under the cap. Cheap to clone.
#[derive(Clone)]
pub struct LogCap {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LogCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogCap")
            .field("max", &self.inner.max)
            .finish()
    }
}

impl LogCap {
    /// A cap of `max` bytes per file (at least [`MIN_MAX`]).
    pub fn new(max: u64) -> Self {
        LogCap {
            inner: Arc::new(Inner {
                max: max.max(MIN_MAX),
                files: Mutex::new(HashMap::new()),
                notify: inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).ok(),
                started: Mutex::new(false),
            }),
        }
    }

    /// The cap in bytes.
    pub fn max(&self) -> u64 {
        self.inner.max
    }

    /// Keeps `files` (the logs `vm`'s VMM writes) under the cap from now on,
    /// in place of what was watched for `vm` before. Files already over it
    /// (written while no metald ran) are trimmed at once.
    pub fn watch(&self, vm: &VmId, files: Vec<PathBuf>) {
        for f in &files {
            if let Err(e) = trim_path(f, self.inner.max) {
                warn!(vm_id = %vm, file = %f.display(), error = %e, "cannot trim a VMM log");
            }
        }
        let files = files.into_iter().map(Watched::new).collect();
        let mut watched = self.lock();
        // The old watches go first: a file watched again has the same
        // watch descriptor, which removing after would end.
        if let Some(old) = watched.remove(vm) {
            self.forget(old);
        }
        watched.insert(vm.clone(), files);
        drop(watched);
        self.start();
    }

    /// Stops watching `vm`'s files (its VMM is gone).
    pub fn unwatch(&self, vm: &VmId) {
        let old = self.lock().remove(vm);
        if let Some(old) = old {
            self.forget(old);
        }
    }

    fn forget(&self, files: Vec<Watched>) {
        for mut w in files {
            w.forget(self.inner.notify.as_ref());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Vec<Watched>>> {
        self.inner.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self) {
        let mut started = self.inner.started.lock().unwrap_or_else(|p| p.into_inner());
        if *started {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        match std::thread::Builder::new()
            .name("metald-logcap".into())
            .spawn(move || run(weak))
        {
            Ok(_) => *started = true,
            Err(e) => warn!(error = %e, "cannot start the log trimmer; retrying at the next watch"),
        }
    }
}

/// The trimmer: every [`CHECK_EVERY`], every watched file inotify says
/// was written (an `fstat` each, under the lock); files over the cap are
/// trimmed after the lock is let go. Ends when the [`LogCap`] is dropped.
fn run(weak: Weak<Inner>) {
    let mut failing: HashSet<PathBuf> = HashSet::new();
    let mut over: Vec<(VmId, PathBuf, io::Result<File>)> = Vec::new();
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 4096];
    let mut changes = Changes::default();
    loop {
        std::thread::sleep(CHECK_EVERY);
        let Some(inner) = weak.upgrade() else { return };
        let max = inner.max;
        let notify = inner.notify.as_ref();
        {
            let mut files = inner.files.lock().unwrap_or_else(|p| p.into_inner());
            // Read under the lock: a watch added after this read has its
            // file looked at when it is opened.
            changes.wds.clear();
            changes.all = false;
            if let Some(n) = notify {
                drain(n, &mut buf, &mut changes);
            }
            for (vm, watched) in files.iter_mut() {
                for w in watched {
                    match w.over(max, notify, &changes) {
                        Ok(false) => {}
                        Ok(true) => {
                            let f = match &w.state {
                                State::Open { file, .. } => file.try_clone(),
                                _ => Err(io::ErrorKind::NotFound.into()),
                            };
                            over.push((vm.clone(), w.path.clone(), f));
                        }
                        // Once per file, not every tick.
                        Err(e) => {
                            if failing.insert(w.path.clone()) {
                                warn!(vm_id = %vm, file = %w.path.display(), error = %e, "cannot trim a VMM log");
                            }
                        }
                    }
                }
            }
            if !failing.is_empty() {
                failing.retain(|p| files.values().flatten().any(|w| &w.path == p));
            }
        }
        drop(inner);
        for (vm, f, file) in over.drain(..) {
            match file.and_then(|file| trim_file(&file, max)) {
                Ok(Trimmed::No) => {}
                Ok(how) => debug!(vm_id = %vm, file = %f.display(), ?how, "trimmed a VMM log"),
                Err(e) => {
                    if failing.insert(f.clone()) {
                        warn!(vm_id = %vm, file = %f.display(), error = %e, "cannot trim a VMM log");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn numbered(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("{i:08}\n").into_bytes())
            .collect()
    }

    fn check_tail(path: &Path, all: &[u8], max: u64) {
        let kept = std::fs::read(path).unwrap();
        assert!(kept.len() as u64 <= max, "{} > {max}", kept.len());
        assert!(kept.len() as u64 >= max / 2, "keeps at least half the cap");
        assert!(all.ends_with(&kept), "the newest bytes, in order");
    }

    #[test]
    fn collapses_or_copies_to_the_newest_half_of_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut w = create_append(&path).unwrap();
        let all = numbered(50_000); // 450 kB
        w.write_all(&all).unwrap();
        let max = 100_000;
        let how = trim_path(&path, max).unwrap();
        assert_ne!(how, Trimmed::No);
        check_tail(&path, &all, max);
        // The writer's next line lands at the new end.
        w.write_all(b"after\n").unwrap();
        let kept = std::fs::read(&path).unwrap();
        assert!(kept.ends_with(b"00049999\nafter\n"));
        assert_eq!(trim_path(&path, max).unwrap(), Trimmed::No);
    }

    #[test]
    fn the_copying_fallback_keeps_the_tail_on_filesystems_without_collapse() {
        // tmpfs has no FALLOC_FL_COLLAPSE_RANGE.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("console.log");
        let mut w = create_append(&path).unwrap();
        let all = numbered(30_000);
        w.write_all(&all).unwrap();
        let max = 64 << 10;
        assert_eq!(trim_path(&path, max).unwrap(), Trimmed::Copied);
        check_tail(&path, &all, max);
        w.write_all(b"next\n").unwrap();
        assert!(std::fs::read(&path).unwrap().ends_with(b"00029999\nnext\n"));
    }

    #[test]
    fn symlinks_and_hard_links_are_never_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("precious");
        std::fs::write(&victim, vec![b'x'; 200_000]).unwrap();
        let link = dir.path().join("console.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert_eq!(trim_path(&link, 100_000).unwrap(), Trimmed::No);
        std::fs::remove_file(&link).unwrap();
        std::fs::hard_link(&victim, &link).unwrap();
        assert!(trim_path(&link, 100_000).is_err());
        assert_eq!(std::fs::metadata(&victim).unwrap().len(), 200_000);
    }

    #[test]
    fn create_append_refuses_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("precious");
        std::fs::write(&victim, b"keep").unwrap();
        let link = dir.path().join("console.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(create_append(&link).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn the_trimmer_thread_keeps_watched_files_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut w = create_append(&path).unwrap();
        let cap = LogCap::new(MIN_MAX);
        let vm = VmId::parse("vm-1", "t").unwrap();
        cap.watch(&vm, vec![path.clone()]);
        let line = [b'y'; 1023];
        let mut max_seen = 0;
        for _ in 0..2000 {
            w.write_all(&line).unwrap();
            w.write_all(b"\n").unwrap();
            max_seen = max_seen.max(std::fs::metadata(&path).unwrap().len());
        }
        w.write_all(b"DONE\n").unwrap();
        // Polled with a deadline: the thread trims within one interval.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&path).unwrap().len() > MIN_MAX {
            assert!(std::time::Instant::now() < deadline, "never trimmed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(std::fs::read(&path).unwrap().ends_with(b"DONE\n"));
        cap.unwatch(&vm);
        assert!(max_seen > MIN_MAX, "the writer outran one interval");
    }

    /// Waits (with a deadline) until the trimmer brings `path` under `max`.
    fn await_trim(path: &Path, max: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(path).unwrap().len() > max {
            assert!(std::time::Instant::now() < deadline, "never trimmed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_log_made_after_the_watch_and_a_log_watched_again_are_kept_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cap = LogCap::new(MIN_MAX);
        let vm = VmId::parse("vm-1", "t").unwrap();
        let later = dir.path().join("later.log");
        let again = dir.path().join("again.log");
        let mut a = create_append(&again).unwrap();
        cap.watch(&vm, vec![later.clone(), again.clone()]);
        // Let the trimmer open and watch `again`, then watch it anew (a
        // reboot): the second watch of the same file must not be lost.
        std::thread::sleep(CHECK_EVERY * 3);
        cap.watch(&vm, vec![later.clone(), again.clone()]);
        let mut l = create_append(&later).unwrap();
        let chunk = vec![b'z'; 4096];
        for _ in 0..(3 * MIN_MAX as usize / chunk.len()) {
            l.write_all(&chunk).unwrap();
            a.write_all(&chunk).unwrap();
        }
        await_trim(&later, MIN_MAX);
        await_trim(&again, MIN_MAX);
        // And once trimmed, written again, trimmed again.
        for _ in 0..(3 * MIN_MAX as usize / chunk.len()) {
            a.write_all(&chunk).unwrap();
        }
        await_trim(&again, MIN_MAX);
        cap.unwatch(&vm);
    }
}
