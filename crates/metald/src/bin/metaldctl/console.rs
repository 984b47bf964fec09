//! `console`: follows a VM's serial console log. The log is a file on
//! metald's host, so this works only there; a remote console needs an RPC
//! metald does not have yet.

use std::fs::File;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use metald_proto::vmprovisioner::v1 as pb;

use crate::args::ConsoleArgs;
use crate::client::{Api, rpc};
use crate::error::CliError;

/// How often the log is checked for new output.
const POLL: Duration = Duration::from_millis(200);
/// Bytes read and written at a time.
const CHUNK: usize = 64 << 10;

pub async fn run(api: &Api, args: &ConsoleArgs) -> Result<(), CliError> {
    let info = rpc!(
        api,
        get_vm_info,
        pb::GetVmInfoRequest {
            vm_id: args.vm.clone(),
            ..Default::default()
        }
    )?;
    let path = locate(&info, args.data_dir.as_deref()).ok_or_else(|| {
        CliError::unavailable(format!(
            "no console log of vm {:?} on this host: a remote console is not available; \
             run metaldctl on metald's host (with --data-dir if needed) after the VM has booted",
            args.vm
        ))
    })?;
    let clean = !args.raw && std::io::stdout().is_terminal();
    let mut log = Follower::new(path);
    log.copy_new(clean)?;
    if args.no_follow {
        return Ok(());
    }
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tokio::time::sleep(POLL) => log.copy_new(clean)?,
        }
    }
}

/// The console log metald reports (`backend_info.console_log`), else the
/// one under `data_dir` for the VM's key; only a file that exists here.
fn locate(info: &pb::GetVmInfoResponse, data_dir: Option<&Path>) -> Option<PathBuf> {
    let reported = info.backend_info.get("console_log").map(PathBuf::from);
    let under_data_dir = data_dir.and_then(|dir| {
        let key = info.backend_info.get("vm_key")?;
        // The key names a directory; anything else is not followed.
        let safe = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        safe.then(|| dir.join("vms").join(key).join("console.log"))
    });
    under_data_dir
        .into_iter()
        .chain(reported)
        .find(|p| p.is_file())
}

/// A log file read from where it was left, like `tail -F`: a file cut
/// shorter (metald caps logs) or replaced (a new boot) is read again from
/// its start.
struct Follower {
    path: PathBuf,
    file: Option<File>,
    inode: u64,
    pos: u64,
}

impl Follower {
    fn new(path: PathBuf) -> Follower {
        Follower {
            path,
            file: None,
            inode: 0,
            pos: 0,
        }
    }

    /// Writes whatever was added since the last call to stdout.
    fn copy_new(&mut self, clean: bool) -> Result<(), CliError> {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            // Gone for now (the VM is between boots or deleted).
            self.file = None;
            return Ok(());
        };
        if self.file.is_none() || meta.ino() != self.inode || meta.len() < self.pos {
            if self.file.is_some() {
                eprintln!("metaldctl: console log restarted");
            }
            self.file = File::open(&self.path).ok();
            self.inode = meta.ino();
            self.pos = 0;
        }
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.pos))
            .map_err(|e| CliError::unavailable(format!("reading the console log: {e}")))?;
        let mut buf = vec![0u8; CHUNK];
        let mut out = std::io::stdout().lock();
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| CliError::unavailable(format!("reading the console log: {e}")))?;
            if n == 0 {
                break;
            }
            self.pos += n as u64;
            let chunk = &mut buf[..n];
            if clean {
                neutralise(chunk);
            }
            if out.write_all(chunk).is_err() {
                // stdout closed (a pager quit): nothing more to do.
                std::process::exit(0);
            }
        }
        let _ = out.flush();
        Ok(())
    }
}

/// Replaces control bytes other than newline and tab with `?`, so a
/// guest cannot drive the operator's terminal with escape sequences.
fn neutralise(bytes: &mut [u8]) {
    for b in bytes {
        if (*b < 0x20 && *b != b'\n' && *b != b'\t') || *b == 0x7f {
            *b = b'?';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_neutralised() {
        let mut b = b"ok\x1b[2J\r\n\tx\x7f".to_vec();
        neutralise(&mut b);
        assert_eq!(b, b"ok?[2J?\n\tx?");
    }

    #[test]
    fn a_key_that_is_not_a_name_is_not_joined() {
        let dir = tempfile::tempdir().unwrap();
        let mut info = pb::GetVmInfoResponse::default();
        info.backend_info.insert("vm_key".into(), "../x".into());
        assert_eq!(locate(&info, Some(dir.path())), None);
        std::fs::create_dir_all(dir.path().join("vms/web-01")).unwrap();
        std::fs::write(dir.path().join("vms/web-01/console.log"), "hi").unwrap();
        info.backend_info.insert("vm_key".into(), "web-01".into());
        assert_eq!(
            locate(&info, Some(dir.path())),
            Some(dir.path().join("vms/web-01/console.log"))
        );
    }
}
