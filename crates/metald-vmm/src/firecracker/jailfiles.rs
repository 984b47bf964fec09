//! Putting the guest's files (kernel, initrd, drives) into a jail without
//! touching the host's originals: metald never changes the owner or mode
//! of a file it did not create.
//!
//! - A read-only file the jail's uid may already read (world-readable) is
//!   hard-linked in. Otherwise metald makes its own copy, readable by all
//!   (mode 0444, owned by root): a reflink clone (`FICLONE`) where the
//!   filesystem has them, else a plain copy.
//! - A writable drive is a reflink clone made for this VMM process and
//!   handed to the VM's uid; the guest writes to the clone, the original is
//!   never written. Where no clone can be made (a filesystem without
//!   reflinks such as ext4, or the drive on another filesystem than the
//!   jail), the boot is refused naming the drive.
//!
//! Files are created in the jail with `O_EXCL` through a handle on the jail
//! directory, before the jailer hands that directory to the VM's uid.
//! Blocking (a copy may be large): call it off the async runtime.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use metald_core::ports::VmmError;
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Uid};
use tracing::warn;

use crate::beneath;

/// How a file got into the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// A hard link to the original (read-only, world-readable).
    Linked,
    /// A reflink clone owned by metald (read-only) or the VM (writable).
    Cloned,
    /// A copy owned by metald (read-only only).
    Copied,
}

/// The jail's root directory, held open while files are placed.
pub struct JailDir {
    fd: OwnedFd,
    root: PathBuf,
}

impl JailDir {
    /// Opens the jail root metald just created.
    pub fn open(root: &Path) -> Result<JailDir, VmmError> {
        let fd =
            beneath::open_dir(root).map_err(|e| host_failure("open the VM's jail", root, &e))?;
        Ok(JailDir {
            fd,
            root: root.to_path_buf(),
        })
    }

    /// Puts the read-only `src` (the request's `field`) into the jail as
    /// `name`.
    pub fn place_read_only(&self, src: &Path, name: &str, field: &str) -> Result<How, VmmError> {
        let f = open_source(src, field)?;
        let mode = rustix::fs::fstat(&f).map(|st| st.st_mode).unwrap_or(0);
        if mode & 0o004 != 0 {
            // The very inode opened above, not whatever the path names now.
            match rustix::fs::linkat(&f, "", &self.fd, name, AtFlags::EMPTY_PATH) {
                Ok(()) => return Ok(How::Linked),
                // Another filesystem (EXDEV) or a link refused: copy below.
                Err(e) => {
                    tracing::debug!(src = %src.display(), error = %e, "no hard link; copying")
                }
            }
        }
        let dst = self.create(name, 0o444)?;
        let how = match rustix::fs::ioctl_ficlone(&dst, &f) {
            Ok(()) => How::Cloned,
            Err(_) => match io::copy(&mut &f, &mut &dst) {
                Ok(_) => How::Copied,
                Err(e) => {
                    self.unlink(name);
                    return Err(host_failure(
                        &format!("copy {field} into the jail"),
                        src,
                        &e,
                    ));
                }
            },
        };
        Ok(how)
    }

    /// Puts a reflink clone of the writable drive `src` (the request's
    /// `field`) into the jail as `name` (mode 0600, for [`Self::hand_over`]
    /// to give to the VM's uid); refuses where no clone can be made.
    pub fn place_writable(&self, src: &Path, name: &str, field: &str) -> Result<How, VmmError> {
        let f = open_source(src, field)?;
        let dst = self.create(name, 0o600)?;
        if let Err(e) = rustix::fs::ioctl_ficlone(&dst, &f) {
            self.unlink(name);
            warn!(src = %src.display(), jail = %self.root.display(), error = %e,
                "no reflink clone of a writable drive for the jail");
            return Err(VmmError::Refused(format!(
                "{field}: a writable drive needs a reflink (copy-on-write) clone for the jailed VMM, \
                 and the host cannot make one for it (reflinks unsupported, or the drive is not on \
                 the filesystem of UNKEY_METALD_JAILER_CHROOT_DIR); make the drive read-only, or \
                 keep writable drives on that filesystem with reflinks (XFS, Btrfs)"
            )));
        }
        Ok(How::Cloned)
    }

    /// Gives `name`, a file metald made in the jail, to the VM's uid and
    /// gid (never following a link).
    pub fn hand_over(&self, name: &str, owner: (u32, u32)) -> Result<(), VmmError> {
        rustix::fs::chownat(
            &self.fd,
            name,
            Some(Uid::from_raw(owner.0)),
            Some(Gid::from_raw(owner.1)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| {
            host_failure(
                "hand a file to the VM's uid",
                &self.root.join(name),
                &e.into(),
            )
        })
    }

    /// A new FIFO `name` in the jail (mode 0600).
    pub fn make_fifo(&self, name: &str) -> Result<(), VmmError> {
        rustix::fs::mkfifoat(&self.fd, name, Mode::from_raw_mode(0o600)).map_err(|e| {
            host_failure(
                "create a FIFO in the VM's jail",
                &self.root.join(name),
                &e.into(),
            )
        })
    }

    /// A new directory `name` in the jail (mode 0755).
    pub fn make_dir(&self, name: &str) -> Result<(), VmmError> {
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755)).map_err(|e| {
            host_failure(
                "create a directory in the VM's jail",
                &self.root.join(name),
                &e.into(),
            )
        })
    }

    /// A new file `name` in the jail, never an existing one or a link.
    fn create(&self, name: &str, mode: u32) -> Result<File, VmmError> {
        rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .and_then(|fd| {
            // Whatever the umask took away.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
            Ok(File::from(fd))
        })
        .map_err(|e| host_failure("create a file in the VM's jail", &self.root, &e.into()))
    }

    fn unlink(&self, name: &str) {
        let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::empty());
    }
}

fn open_source(src: &Path, field: &str) -> Result<File, VmmError> {
    let f = File::open(src).map_err(|e| {
        warn!(src = %src.display(), error = %e, "cannot open a guest file");
        VmmError::Refused(format!("{field}: the file cannot be opened on the host"))
    })?;
    let st = rustix::fs::fstat(&f).map_err(|e| host_failure("read the file", src, &e.into()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(VmmError::Refused(format!("{field}: not a regular file")));
    }
    Ok(f)
}

/// A host-side failure: the details (path, OS error) to metald's log, a
/// path-free sentence to the caller.
fn host_failure(what: &str, path: &Path, e: &io::Error) -> VmmError {
    VmmError::Io(crate::launch::host_failure(
        what,
        format_args!("{}: {e}", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const OWNER: (u32, u32) = (4242, 4343);

    fn jail() -> (tempfile::TempDir, PathBuf, JailDir) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let j = JailDir::open(&root).unwrap();
        (dir, root, j)
    }

    /// A file like a tenant's disk: owned by someone else, mode `mode`.
    fn original(dir: &Path, name: &str, mode: u32) -> (PathBuf, std::fs::Metadata) {
        let p = dir.join(name);
        std::fs::write(&p, b"disk data").unwrap();
        std::os::unix::fs::chown(&p, Some(1234), Some(1234)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        (p, m)
    }

    fn unchanged(p: &Path, before: &std::fs::Metadata) {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode()),
            (before.uid(), before.gid(), before.mode()),
            "the original's owner and mode are untouched"
        );
        assert_eq!(std::fs::read(p).unwrap(), b"disk data");
    }

    #[test]
    fn a_world_readable_read_only_file_is_linked_unchanged() {
        let (dir, root, j) = jail();
        let (src, before) = original(dir.path(), "k", 0o644);
        assert_eq!(
            j.place_read_only(&src, "vmlinux", "config.boot.kernel_path")
                .unwrap(),
            How::Linked
        );
        assert_eq!(
            std::fs::metadata(root.join("vmlinux")).unwrap().ino(),
            before.ino()
        );
        unchanged(&src, &before);
    }

    #[test]
    fn a_private_read_only_file_is_copied_readable_and_the_original_untouched() {
        let (dir, root, j) = jail();
        let (src, before) = original(dir.path(), "initrd", 0o600);
        let how = j
            .place_read_only(&src, "initrd", "config.boot.initrd_path")
            .unwrap();
        assert!(matches!(how, How::Cloned | How::Copied), "{how:?}");
        let m = std::fs::metadata(root.join("initrd")).unwrap();
        assert_ne!(m.ino(), before.ino(), "metald's own file");
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o444));
        assert_eq!(std::fs::read(root.join("initrd")).unwrap(), b"disk data");
        unchanged(&src, &before);
    }

    #[test]
    fn a_writable_drive_without_reflinks_is_refused_naming_the_field_only() {
        // tmpfs has no FICLONE (EOPNOTSUPP); a drive on another filesystem
        // than the jail cannot be cloned either (EXDEV).
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for jail_base in [shm.path(), tmp.path()] {
            let root = jail_base.join("root");
            std::fs::create_dir(&root).unwrap();
            let j = JailDir::open(&root).unwrap();
            let (src, before) = original(shm.path(), "data.img", 0o600);
            let field = "config.storage[id=data]";
            match j.place_writable(&src, "drive1", field) {
                Err(VmmError::Refused(m)) => {
                    assert!(m.starts_with(field) && m.contains("reflink"), "{m}");
                    assert!(!m.contains('/'), "no host path: {m}");
                }
                other => panic!("{other:?}"),
            }
            assert!(!root.join("drive1").exists(), "no half-made clone left");
            unchanged(&src, &before);
        }
    }

    #[test]
    fn hand_over_changes_only_metalds_file_never_a_link_target() {
        let (dir, root, j) = jail();
        let (src, before) = original(dir.path(), "k", 0o644);
        std::fs::write(root.join("log.fifo"), b"").unwrap();
        j.hand_over("log.fifo", OWNER).unwrap();
        let m = std::fs::metadata(root.join("log.fifo")).unwrap();
        assert_eq!((m.uid(), m.gid()), OWNER);
        // A symlink in the jail: the link itself at most, never its target.
        std::os::unix::fs::symlink(&src, root.join("evil")).unwrap();
        let _ = j.hand_over("evil", OWNER);
        unchanged(&src, &before);
    }

    #[test]
    fn an_existing_name_in_the_jail_is_never_reused() {
        let (dir, root, j) = jail();
        let (src, _) = original(dir.path(), "initrd", 0o600);
        std::os::unix::fs::symlink("/etc/passwd", root.join("initrd")).unwrap();
        assert!(j.place_read_only(&src, "initrd", "f").is_err());
        assert!(
            std::fs::symlink_metadata(root.join("initrd"))
                .unwrap()
                .is_symlink()
        );
    }

    /// Needs a reflink-capable filesystem (XFS, Btrfs): set
    /// `METALD_REFLINK_DIR` to a directory on one.
    #[test]
    #[ignore = "needs METALD_REFLINK_DIR on a filesystem with reflinks (XFS, Btrfs)"]
    fn a_writable_drive_is_a_clone_owned_by_the_vm() {
        let base = std::env::var_os("METALD_REFLINK_DIR")
            .expect("METALD_REFLINK_DIR: a directory on XFS or Btrfs");
        let dir = tempfile::tempdir_in(base).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let j = JailDir::open(&root).unwrap();
        let (src, before) = original(dir.path(), "data.img", 0o600);
        assert_eq!(
            j.place_writable(&src, "drive1", "config.storage[id=data]")
                .unwrap(),
            How::Cloned
        );
        j.hand_over("drive1", OWNER).unwrap();
        let m = std::fs::metadata(root.join("drive1")).unwrap();
        assert_ne!(m.ino(), before.ino());
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o777),
            (OWNER.0, OWNER.1, 0o600)
        );
        std::fs::write(root.join("drive1"), b"guest wrote").unwrap();
        unchanged(&src, &before);
        // A private read-only file is cloned too.
        let (ro, ro_before) = original(dir.path(), "initrd", 0o600);
        assert_eq!(j.place_read_only(&ro, "initrd", "f").unwrap(), How::Cloned);
        unchanged(&ro, &ro_before);
    }
}
