//! Reading SRC, a backup restore does not trust: SRC opened once by the path the operator
//! named, everything under it reached with `openat` and `O_NOFOLLOW` (a symbolic link, a
//! FIFO or a device is refused, never followed or opened; an entry swapped between look and
//! open too), and its `db/` copied into scratch space, each file at most its size when
//! opened. Owns those reads; must not write SRC or decide whether a record is trusted
//! (`restore` does).

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::files::{create_new_private, io_error, private_dir, sync_dir};
use crate::admin::AdminError;
use crate::admin::access::shown;

/// Entries of SRC's `db/` restore copies at most (sled: `conf`, `db`, `snap.*`, `blobs/*`).
const MAX_DB_ENTRIES: usize = 1_000_000;

/// Opens SRC itself, following the path the operator named (it may be a link they chose,
/// or the `/proc/self/fd/N` alias of `access::act_as_owner`); nothing under it is reached
/// by path again.
pub(super) fn open_src(src: &Path) -> Result<OwnedFd, AdminError> {
    rustix::fs::open(
        src,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        let e = std::io::Error::from(e);
        if e.kind() == std::io::ErrorKind::NotFound {
            AdminError::missing(format!(
                "the backup {} does not exist; name a directory written by `coverd admin backup`",
                shown(src).display()
            ))
        } else {
            io_error("open the backup", src, &e)
        }
    })
}

/// What an entry under SRC is, when it is not what restore reads.
fn untrusted_entry(path: &Path, what: &str) -> AdminError {
    AdminError::failed(format!(
        "the backup's {} is {what}, which restore never follows or reads: a backup is untrusted input; use a directory written by `coverd admin backup`",
        shown(path).display()
    ))
}

/// Opens `name` in the directory `dir` of SRC without following a symbolic link, and
/// checks its type: a directory when `want_dir`, else a regular file (with its size).
pub(super) fn open_under(
    dir: &OwnedFd,
    name: &OsStr,
    shown_path: &Path,
    want_dir: bool,
) -> Result<(OwnedFd, u64), AdminError> {
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    // Looked at before it is opened: opening a FIFO or a device could block or act.
    let before = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| not_readable(shown_path, e))?;
    let kind = |st: &rustix::fs::Stat| FileType::from_raw_mode(st.st_mode);
    let expected = if want_dir {
        FileType::Directory
    } else {
        FileType::RegularFile
    };
    match kind(&before) {
        FileType::Symlink => return Err(untrusted_entry(shown_path, "a symbolic link")),
        k if k != expected => {
            return Err(untrusted_entry(
                shown_path,
                if want_dir {
                    "not a directory"
                } else {
                    "not a regular file"
                },
            ));
        }
        _ => {}
    }
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(|e| {
        if e == rustix::io::Errno::LOOP {
            untrusted_entry(shown_path, "a symbolic link")
        } else {
            not_readable(shown_path, e)
        }
    })?;
    // Swapped between the look and the open: refused too.
    let st = rustix::fs::fstat(&fd).map_err(|e| not_readable(shown_path, e))?;
    if kind(&st) != expected || st.st_ino != before.st_ino || st.st_dev != before.st_dev {
        return Err(untrusted_entry(
            shown_path,
            "changing while restore reads it",
        ));
    }
    Ok((fd, u64::try_from(st.st_size).unwrap_or(0)))
}

fn not_readable(path: &Path, e: rustix::io::Errno) -> AdminError {
    let e = std::io::Error::from(e);
    if e.kind() == std::io::ErrorKind::NotFound {
        AdminError::failed(format!(
            "the backup has no {}: it is incomplete; use another backup",
            shown(path).display()
        ))
    } else {
        io_error("read", path, &e)
    }
}

/// Copies SRC's `db/` into `scratch/db`: regular files, and the directories directly in it
/// (sled's `blobs/`), each file at most the size it had when opened; a symbolic link or any
/// other kind of entry is refused, never followed.
pub(super) fn copy_src_db(src_dir: &OwnedFd, src: &Path, scratch: &Path) -> Result<(), AdminError> {
    let db = src.join("db");
    let (fd, _) = open_under(src_dir, OsStr::new("db"), &db, true)?;
    private_dir(&scratch.join("db"))?;
    let mut entries = 0;
    copy_dir_at(&fd, &db, &scratch.join("db"), 0, &mut entries)?;
    sync_dir(&scratch.join("db"))
}

fn copy_dir_at(
    dir: &OwnedFd,
    shown_dir: &Path,
    to: &Path,
    depth: u32,
    entries: &mut usize,
) -> Result<(), AdminError> {
    let list = rustix::fs::Dir::read_from(dir).map_err(|e| not_readable(shown_dir, e))?;
    for entry in list {
        let entry = entry.map_err(|e| not_readable(shown_dir, e))?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        *entries += 1;
        if *entries > MAX_DB_ENTRIES {
            return Err(AdminError::failed(format!(
                "the backup's {} holds more than {MAX_DB_ENTRIES} files, more than a coverd store has; use another backup",
                shown(shown_dir).display()
            )));
        }
        let from = shown_dir.join(name);
        let is_dir = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
            .unwrap_or(false);
        if is_dir && depth == 0 {
            let (sub, _) = open_under(dir, name, &from, true)?;
            private_dir(&to.join(name))?;
            copy_dir_at(&sub, &from, &to.join(name), depth + 1, entries)?;
            sync_dir(&to.join(name))?;
            continue;
        }
        let (file, size) = open_under(dir, name, &from, false)?;
        let dest = to.join(name);
        let mut out = create_new_private(&dest)?;
        let copied = std::io::copy(&mut std::fs::File::from(file).take(size), &mut out)
            .map_err(|e| io_error("copy", &from, &e))?;
        if copied != size {
            return Err(untrusted_entry(&from, "changing while restore reads it"));
        }
        out.sync_all().map_err(|e| io_error("write", &dest, &e))?;
    }
    Ok(())
}
