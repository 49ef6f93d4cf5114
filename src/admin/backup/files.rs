//! The files and directories backup and restore write, and their error messages: a target
//! that must be absent or empty, private (0700) directories created where a dangling link
//! points, private (0600) files written and synced, the streamed and hashed copy of a stored
//! file, directory syncs, and the hint an I/O
//! error gets (permissions, a read-only system). Owns those helpers; must not read SRC
//! (`source` does) or touch the store.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

use crate::admin::AdminError;
use crate::admin::access::shown;

/// Which side of [`copy_hashing`] failed.
pub(super) enum CopyFailed {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copies `input` into `out` in 128 KiB steps, hashing on the way (bounded memory for a file
/// of any size, a video included): its size and sha256 (hex). The caller syncs `out`.
pub(super) fn copy_hashing(
    input: &mut impl std::io::Read,
    out: &mut impl Write,
) -> Result<(u64, String), CopyFailed> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(CopyFailed::Read)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(CopyFailed::Write)?;
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

pub(super) fn io_error(what: &str, path: &Path, e: &std::io::Error) -> AdminError {
    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
        "; choose a place the service's user can write (see `man coverd`, FILES)"
    } else if e.raw_os_error() == Some(30) {
        // EROFS: under the unit's ProtectSystem=strict only its state directories are writable.
        "; with the service running, back up under /var/lib/coverd-backup (see `man coverd`, FILES)"
    } else {
        ""
    };
    AdminError::failed(format!(
        "cannot {what} {}: {e}{hint}",
        shown(path).display()
    ))
}

/// Refuses a target that exists and is not an empty directory.
pub fn check_empty_target(dir: &Path, what: &str) -> Result<(), AdminError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                let fix = if what == "the data directory" {
                    "move the data directory aside first (`mv DIR DIR.old`), then restore into the new, empty one"
                } else {
                    "give a new or empty directory"
                };
                Err(AdminError::usage(format!(
                    "{what} {} is not empty; {fix}",
                    shown(dir).display()
                )))
            } else {
                Ok(())
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(AdminError::usage(format!(
            "{what} {} is a file; give a directory",
            shown(dir).display()
        ))),
        Err(e) => Err(io_error("read", dir, &e)),
    }
}

/// Where a directory is to be created: `path`, or where it points if it is a dangling
/// symlink (systemd's /var/lib/coverd → private/coverd after the directory was moved aside).
pub(super) fn unlinked(path: &Path) -> PathBuf {
    match std::fs::read_link(path) {
        Ok(link) if !path.exists() => path.parent().unwrap_or(Path::new("/")).join(link),
        _ => path.to_path_buf(),
    }
}

pub(super) fn private_dir(path: &Path) -> Result<(), AdminError> {
    let target = unlinked(path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&target)
        .map_err(|e| io_error("create", path, &e))
}

pub(super) fn write_private(path: &Path, data: &[u8]) -> Result<(), AdminError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_error("write", path, &e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_error("write", path, &e))
}

/// A new file, 0600, never through a link.
pub(super) fn create_new_private(path: &Path) -> Result<std::fs::File, AdminError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| io_error("write", path, &e))
}

/// Syncs the directory that holds the entry of `path` (created where a dangling link
/// pointed, see [`unlinked`]).
pub(super) fn sync_parent(path: &Path) -> Result<(), AdminError> {
    let created = unlinked(path);
    match created.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

pub(super) fn sync_dir(path: &Path) -> Result<(), AdminError> {
    crate::dirsync::sync_dir(path).map_err(|e| io_error("sync", path, &e))
}
