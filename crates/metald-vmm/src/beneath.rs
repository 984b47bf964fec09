//! Opening what a VMM can write without letting the VMM steer metald.
//!
//! A jailed Firecracker owns its chroot (the jailer hands the directory to
//! the VM's uid), so it can replace any entry there with a symlink, for
//! instance its API socket with a link to another VM's socket. metald
//! therefore resolves such paths with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` from a
//! handle on the directory it created itself, checks the file type (and for
//! sockets the owner) on the handle it got, and then uses that very inode
//! through `/proc/self/fd/<n>`, so nothing can be swapped in between.
//! Needs Linux 5.6 or newer (`openat2`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use tokio::net::UnixStream;

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// An `O_PATH` handle on `dir`, which must itself be a directory (not a
/// symlink to one). Its parents are metald's own directories.
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// An `O_PATH` handle on `rel` below `dir`, refusing symlinks anywhere on
/// the way, the last component included (`ELOOP`), `..` out of `dir`, and
/// mount crossings.
pub fn path_beneath(dir: impl AsFd, rel: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(
        dir,
        rel,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// The path through which `fd`'s inode is reached again, whatever happened
/// to the names leading to it since.
pub fn proc_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn kind_of(fd: &OwnedFd) -> io::Result<(FileType, u32)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((FileType::from_raw_mode(st.st_mode), st.st_uid))
}

fn not(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("not a {what}"))
}

/// A handle on the Unix socket `rel` below `dir`, owned by `uid`.
pub fn socket_beneath(dir: &Path, rel: &Path, uid: u32) -> io::Result<OwnedFd> {
    let fd = path_beneath(open_dir(dir)?, rel)?;
    match kind_of(&fd)? {
        (FileType::Socket, owner) if owner == uid => Ok(fd),
        (FileType::Socket, owner) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("socket owned by uid {owner}, expected {uid}"),
        )),
        _ => Err(not("socket")),
    }
}

/// The FIFO `rel` below `dir`, opened for reading and writing without
/// blocking (a FIFO opened so never reads as end-of-file).
pub fn fifo_beneath(dir: &Path, rel: &Path) -> io::Result<std::fs::File> {
    let fd = path_beneath(open_dir(dir)?, rel)?;
    if kind_of(&fd)?.0 != FileType::Fifo {
        return Err(not("FIFO"));
    }
    let f = rustix::fs::open(
        proc_path(&fd),
        OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(f.into())
}

/// Where a VMM's control socket is, and how far metald trusts the way
/// there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A socket in a directory only metald can write.
    Path(PathBuf),
    /// `rel` below `dir`, a directory the VMM can write: reached without
    /// following symlinks, and only if it is a socket owned by `uid` (the
    /// VM's own uid; `None` when metald cannot tell it, which refuses).
    Beneath {
        dir: PathBuf,
        rel: PathBuf,
        uid: Option<u32>,
    },
}

impl Endpoint {
    /// Connects to the socket.
    pub async fn connect(&self) -> io::Result<UnixStream> {
        match self {
            Endpoint::Path(p) => UnixStream::connect(p).await,
            Endpoint::Beneath { dir, rel, uid } => {
                let uid = uid.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "the VM's uid is not recorded")
                })?;
                let fd = socket_beneath(dir, rel, uid)?;
                // `fd` stays open until the connection is made: the path
                // names exactly the inode checked above.
                UnixStream::connect(proc_path(&fd)).await
            }
        }
    }

    /// The socket's path as seen from the host, for logs.
    pub fn display(&self) -> String {
        match self {
            Endpoint::Path(p) => p.display().to_string(),
            Endpoint::Beneath { dir, rel, .. } => dir.join(rel).display().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn me() -> u32 {
        rustix::process::geteuid().as_raw()
    }

    #[tokio::test]
    async fn connects_to_a_real_socket_but_never_through_a_symlink() {
        let base = tempfile::tempdir().unwrap();
        let jail = base.path().join("jail");
        let other = base.path().join("other");
        std::fs::create_dir_all(jail.join("run")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let _mine = std::os::unix::net::UnixListener::bind(jail.join("run/api.sock")).unwrap();
        let _theirs = std::os::unix::net::UnixListener::bind(other.join("api.sock")).unwrap();
        let ep = |rel: &str, uid: Option<u32>| Endpoint::Beneath {
            dir: jail.clone(),
            rel: rel.into(),
            uid,
        };
        ep("run/api.sock", Some(me())).connect().await.unwrap();

        // A socket replaced by a symlink to another VM's socket.
        std::os::unix::fs::symlink(other.join("api.sock"), jail.join("run/evil.sock")).unwrap();
        let e = ep("run/evil.sock", Some(me())).connect().await.unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::LOOP.raw_os_error()),
            "{e}"
        );
        // A directory on the way replaced by a symlink.
        std::os::unix::fs::symlink(&other, jail.join("run2")).unwrap();
        assert!(ep("run2/api.sock", Some(me())).connect().await.is_err());
        // Climbing out.
        assert!(ep("../other/api.sock", Some(me())).connect().await.is_err());
        // The jail directory itself a symlink.
        std::os::unix::fs::symlink(&other, base.path().join("jail-link")).unwrap();
        let via_link = Endpoint::Beneath {
            dir: base.path().join("jail-link"),
            rel: "api.sock".into(),
            uid: Some(me()),
        };
        assert!(via_link.connect().await.is_err());
        // Wrong owner, unknown owner, not a socket.
        let e = ep("run/api.sock", Some(me() + 1))
            .connect()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(ep("run/api.sock", None).connect().await.is_err());
        std::fs::write(jail.join("run/file"), b"x").unwrap();
        let e = ep("run/file", Some(me())).connect().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[test]
    fn opens_a_fifo_only_if_it_is_one_and_not_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            dir.path().join("m.fifo"),
            Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let f = fifo_beneath(dir.path(), Path::new("m.fifo")).unwrap();
        assert_eq!(
            f.metadata().unwrap().ino(),
            std::fs::metadata(dir.path().join("m.fifo")).unwrap().ino()
        );
        std::os::unix::fs::symlink(dir.path().join("m.fifo"), dir.path().join("l.fifo")).unwrap();
        assert!(fifo_beneath(dir.path(), Path::new("l.fifo")).is_err());
        std::fs::write(dir.path().join("plain"), b"").unwrap();
        assert!(fifo_beneath(dir.path(), Path::new("plain")).is_err());
    }
}
