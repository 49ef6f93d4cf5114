//! `admin backup`, `admin restore` and `admin prune`: copying a store and its images into a
//! fresh data directory (with `backup.json`), rebuilding a data directory from such a copy,
//! and forgetting old finished tasks with their images. Blocking code, run off the async
//! runtime in bounded chunks so the daemon keeps answering callbacks meanwhile. Owns the
//! manifest, the image copies and the one rule that names an image's file
//! ([`image_name`]: built from a valid task id, never read from a record); must not change
//! a task except through the store's copy/forget functions (never a state transition).
//!
//! A backup is untrusted input (SPEC "Data directory"): restore opens SRC once (the path
//! the operator named) and reaches everything under it with `openat` and `O_NOFOLLOW`
//! (a symbolic link anywhere under SRC is refused, never followed), copies SRC's `db/`
//! (regular files and `blobs/` only, each at most its size when opened) into scratch space
//! inside the target and opens that copy (so SRC is never written, a schema-1 backup is
//! migrated in the copy), checks every record before it writes anything else, and removes
//! what it wrote on any failure.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AdminError;
use super::access::shown;
use crate::download::{IMAGES_DIR, image_path};
use crate::fetch::Ext;
use crate::model::{
    Image, ImageState, MAX_IMAGES, Millis, Task, format_time, now_millis, valid_task_id,
};
use crate::store::{Store, TaskCopy, UNFINISHED_RESTORE};

/// The manifest's file name in a backup.
pub const MANIFEST: &str = "backup.json";
/// The manifest's `format`.
pub const FORMAT: &str = "coverd-backup/1";
/// Tasks read, copied and written per step: bounds both memory and the time the store's
/// write lock is taken by one transaction in the copy.
const CHUNK: usize = 64;
/// Task records looked at per step of `prune`.
const PRUNE_CHUNK: usize = 512;
/// Times a task whose images changed under the copy (retry, prune) is read again.
const REREADS: u32 = 3;
/// Where restore puts its copy of SRC's `db/` (inside the target; removed when done).
const SCRATCH: &str = ".restore-src";
/// Entries of SRC's `db/` restore copies at most (sled: `conf`, `db`, `snap.*`, `blobs/*`).
const MAX_DB_ENTRIES: usize = 1_000_000;
/// `backup.json` is a few hundred bytes.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// The file name of a stored image in its task's directory (`<index>.<ext>`, so its path is
/// `images/<task_id>/<index>.<ext>`), checked against what the record says: `Ok(None)` when
/// the record names no file; `Err` (why) unless `task_id` is a valid task id and the
/// recorded path is exactly that path for one of the image types. Every path to an image
/// file is built from this, never taken from a record.
pub(super) fn image_name(task_id: &str, img: &Image) -> Result<Option<String>, String> {
    if !valid_task_id(task_id) {
        return Err(format!("{task_id:?} is not a valid task id"));
    }
    let Some(path) = &img.path else {
        return Ok(None);
    };
    for ext in Ext::ALL {
        if *path == image_path(task_id, img.index, ext) {
            return Ok(Some(format!("{}.{}", img.index, ext.as_str())));
        }
    }
    Err(format!(
        "image {} names {path:?}, not {IMAGES_DIR}/{task_id}/{}.<png|jpg|webp|gif>",
        img.index, img.index
    ))
}

/// Why a task copied from a backup cannot be trusted, if it cannot: its key is not a valid
/// task id, the record inside holds another id, an image names anything but its own file
/// (or is stored without its size and hash), or a notification belongs to something else.
fn distrust(copy: &TaskCopy) -> Option<String> {
    let Some(id) = std::str::from_utf8(copy.key())
        .ok()
        .filter(|id| valid_task_id(id))
    else {
        return Some("its key is not a valid task id (1 to 128 of A-Z, a-z, 0-9, '-', '_')".into());
    };
    if let Some(why) = copy.notification_problem() {
        return Some(why);
    }
    // Undecodable (quarantined): copied byte for byte, names no file restore would write.
    let Some(task) = &copy.task else {
        return None;
    };
    if task.task_id != id {
        return Some(format!("its record holds task id {:?}", task.task_id));
    }
    if task.images.len() > MAX_IMAGES {
        return Some(format!(
            "its record has {} images (at most {MAX_IMAGES})",
            task.images.len()
        ));
    }
    let mut seen = [false; MAX_IMAGES];
    for img in &task.images {
        match seen.get_mut(img.index as usize) {
            Some(s) if !*s => *s = true,
            _ => {
                return Some(format!(
                    "its record has an image numbered {} twice or out of range",
                    img.index
                ));
            }
        }
        let name = match image_name(id, img) {
            Ok(name) => name,
            Err(why) => return Some(why),
        };
        if img.state == ImageState::Downloaded {
            if name.is_none() {
                return Some(format!(
                    "image {} is downloaded but names no file",
                    img.index
                ));
            }
            let hash_ok = img.sha256.as_ref().is_some_and(|h| {
                h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            });
            if !hash_ok || img.bytes.is_none() {
                return Some(format!("image {} has no size or sha256", img.index));
            }
        }
    }
    None
}

/// Reports progress: (tasks done, tasks in all). Called from the blocking thread.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// `backup.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    /// The coverd version that wrote the backup.
    pub version: String,
    pub created_at: String,
    pub tasks: u64,
    /// Stored images copied (and verified against their sha256).
    pub images: u64,
    /// Bytes of those images.
    pub bytes: u64,
}

/// `admin prune`'s answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PruneJson {
    pub dry_run: bool,
    /// Tasks removed (or, with `dry_run`, that would be).
    pub tasks: u64,
    /// Bytes of their image files.
    pub bytes: u64,
    /// Tasks finished before this time were (would be) removed.
    pub before: String,
}

/// What one copy wrote.
#[derive(Debug, Default, Clone, Copy)]
struct Copied {
    tasks: u64,
    images: u64,
    bytes: u64,
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> AdminError {
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
fn unlinked(path: &Path) -> PathBuf {
    match std::fs::read_link(path) {
        Ok(link) if !path.exists() => path.parent().unwrap_or(Path::new("/")).join(link),
        _ => path.to_path_buf(),
    }
}

fn private_dir(path: &Path) -> Result<(), AdminError> {
    let target = unlinked(path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&target)
        .map_err(|e| io_error("create", path, &e))
}

/// `admin backup DEST`: a consistent copy of the store and its images into `dest` (absent
/// or empty), plus `backup.json`, written last (a directory without it is not a backup).
pub fn backup(
    store: &Store,
    data_dir: &Path,
    dest: &Path,
    progress: Option<Progress>,
) -> Result<Manifest, AdminError> {
    check_empty_target(dest, "the backup destination")?;
    let created_at = format_time(now_millis());
    let copied = copy_store(store, data_dir, dest, progress)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        created_at,
        tasks: copied.tasks,
        images: copied.images,
        bytes: copied.bytes,
    };
    let mut body = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| AdminError::failed(format!("cannot encode the manifest: {e}")))?;
    body.push(b'\n');
    write_private(&dest.join(MANIFEST), &body)?;
    sync_dir(dest)?;
    // The entry of `dest` itself: without it a power cut takes the whole backup.
    sync_parent(dest)?;
    tracing::info!(dest = %shown(dest).display(), tasks = manifest.tasks, images = manifest.images, "backup written");
    Ok(manifest)
}

/// Reads and checks `src/backup.json`.
pub fn read_manifest(src: &Path) -> Result<Manifest, AdminError> {
    read_manifest_at(&open_src(src)?, src)
}

/// Opens SRC itself, following the path the operator named (it may be a link they chose,
/// or the `/proc/self/fd/N` alias of `access::act_as_owner`); nothing under it is reached
/// by path again.
fn open_src(src: &Path) -> Result<OwnedFd, AdminError> {
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
fn open_under(
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

/// Reads and checks `backup.json` in the opened SRC.
fn read_manifest_at(src_dir: &OwnedFd, src: &Path) -> Result<Manifest, AdminError> {
    let path = src.join(MANIFEST);
    let opened = match rustix::fs::statat(src_dir, MANIFEST, AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => {
            return Err(AdminError::missing(format!(
                "{} has no {MANIFEST}: it is not a coverd backup, or an incomplete one; use a directory written by `coverd admin backup`",
                shown(src).display()
            )));
        }
        _ => open_under(src_dir, OsStr::new(MANIFEST), &path, false)?,
    };
    let (fd, size) = opened;
    if size > MAX_MANIFEST_BYTES {
        return Err(AdminError::failed(format!(
            "{} is {size} bytes, not a manifest coverd wrote; use another backup",
            shown(&path).display()
        )));
    }
    let mut text = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut text)
        .map_err(|e| io_error("read", &path, &e))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| {
        AdminError::failed(format!(
            "{} is damaged ({e}); use another backup",
            shown(&path).display()
        ))
    })?;
    if manifest.format != FORMAT {
        return Err(AdminError::failed(format!(
            "{} has format {:?}, which this coverd does not read ({FORMAT}); use a matching coverd version",
            shown(&path).display(),
            manifest.format
        )));
    }
    Ok(manifest)
}

/// `admin restore SRC`: checks the manifest, copies SRC's `db/` into scratch space inside
/// `target` (absent or empty) and opens that copy, checks every task record in it (see
/// [`distrust`]) before writing anything else, then copies the tasks and their images (each
/// read from SRC without following links and verified) into `target` and checks the counts
/// against the manifest. SRC is only read. On failure, removes what it wrote, so `target` is
/// as it was.
pub fn restore(
    src: &Path,
    target: &Path,
    progress: Option<Progress>,
) -> Result<Manifest, AdminError> {
    let src_dir = open_src(src)?;
    let manifest = read_manifest_at(&src_dir, src)?;
    clear_unfinished_restore(target)?;
    check_empty_target(target, "the data directory")?;
    let existed = target.exists();
    let created = unlinked(target);
    let marker = target.join(UNFINISHED_RESTORE);
    let result = (|| {
        private_dir(target)?;
        // Durable before anything else is written, removed after everything is: a power
        // cut in between leaves a directory `Store::open` refuses and a rerun starts over.
        write_private(&marker, UNFINISHED_TEXT.as_bytes())?;
        sync_dir(target)?;
        let scratch = target.join(SCRATCH);
        copy_src_db(&src_dir, src, &scratch)?;
        let source = Store::open(&scratch).map_err(|e| {
            AdminError::failed(format!(
                "cannot open the backup's store (copied from {} into {}): {e}; use another backup",
                shown(&src.join("db")).display(),
                shown(&scratch).display()
            ))
        })?;
        check_backup(&source, src)?;
        let copied = copy_restored(&source, &src_dir, src, target, progress)?;
        drop(source);
        std::fs::remove_dir_all(&scratch).map_err(|e| io_error("remove", &scratch, &e))?;
        if (copied.tasks, copied.images, copied.bytes)
            != (manifest.tasks, manifest.images, manifest.bytes)
        {
            return Err(AdminError::failed(format!(
                "the backup in {} holds {} tasks and {} images ({} bytes) but its manifest says {}, {} ({} bytes); it is damaged, use another backup",
                shown(src).display(),
                copied.tasks,
                copied.images,
                copied.bytes,
                manifest.tasks,
                manifest.images,
                manifest.bytes
            )));
        }
        sync_dir(target)?;
        // The entry of `target` itself, before the marker goes: a power cut then leaves the
        // complete restore, or the marker, or no target at all. A target that existed was
        // made by the operator, or by root in [`give_target_to_src_owner`], which synced its
        // entry then; as its owner this may not reach the parent at all (root's view of it
        // is `/proc/self/fd/N`, whose parent is procfs; `/var/lib/private` is root's only).
        if existed {
            let _ = sync_parent(target);
        } else {
            sync_parent(target)?;
        }
        std::fs::remove_file(&marker).map_err(|e| io_error("remove", &marker, &e))?;
        sync_dir(target)
    })();
    if let Err(e) = result {
        // Undo: the target was absent or empty.
        if existed {
            if let Ok(entries) = std::fs::read_dir(target) {
                for entry in entries.flatten() {
                    let _ = std::fs::remove_dir_all(entry.path())
                        .or_else(|_| std::fs::remove_file(entry.path()));
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&created);
        }
        return Err(e);
    }
    tracing::info!(src = %shown(src).display(), target = %shown(target).display(), tasks = manifest.tasks, "backup restored");
    Ok(manifest)
}

/// What the [`UNFINISHED_RESTORE`] marker says to whoever finds it.
const UNFINISHED_TEXT: &str = "coverd admin restore is writing this directory, or was cut short while it did (a crash, a power loss): the store here is incomplete and coverd refuses to open it. Run `coverd admin restore SRC` into it again: it starts over.\n";

/// A target that holds a restore cut short (its [`UNFINISHED_RESTORE`] marker): its content
/// is restore's own, incomplete; removed, so the restore starts over in an empty directory.
fn clear_unfinished_restore(target: &Path) -> Result<(), AdminError> {
    let marker = target.join(UNFINISHED_RESTORE);
    match std::fs::symlink_metadata(&marker) {
        Ok(m) if m.is_file() => {}
        _ => return Ok(()),
    }
    tracing::warn!(
        target = %shown(target).display(),
        "{} holds a restore that did not finish; removing what it wrote and starting over",
        shown(target).display()
    );
    let entries = std::fs::read_dir(target).map_err(|e| io_error("read", target, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("read", target, &e))?;
        if entry.file_name() == UNFINISHED_RESTORE {
            continue;
        }
        let path = entry.path();
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        removed.map_err(|e| io_error("remove", &path, &e))?;
    }
    // The marker last: until the removals are durable it still says what they are.
    sync_dir(target)?;
    std::fs::remove_file(&marker).map_err(|e| io_error("remove", &marker, &e))?;
    sync_dir(target)
}

/// Restore run as root on a backup owned by another user: creates the target if it is
/// absent (0700) and gives the (absent or empty) target to SRC's owner, so that `access::act_as_owner`
/// then does everything else as that user (whoever could write the backup gains nothing by
/// crafting it). Nothing when not root, or when root owns SRC.
pub fn give_target_to_src_owner(target: &Path, src: &Path) -> Result<(), AdminError> {
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let Ok(meta) = std::fs::metadata(src) else {
        // Restore itself says what is wrong with SRC, before it writes anything.
        return Ok(());
    };
    // A target that is not empty (a running daemon's, say) is refused by the restore itself,
    // with the reason (stop the daemon, move the directory aside): nothing to give here.
    if meta.uid() == 0 || !meta.is_dir() || check_empty_target(target, "").is_err() {
        return Ok(());
    }
    let dir = unlinked(target);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error("create", target, &e)),
    }
    std::os::unix::fs::chown(&dir, Some(meta.uid()), Some(meta.gid())).map_err(|e| {
        AdminError::failed(format!(
            "cannot give {} to the backup's owner (uid {}, gid {}): {e}; create it as that user, then restore again",
            shown(target).display(),
            meta.uid(),
            meta.gid()
        ))
    })?;
    // Its entry, while root can still open the parent (the owner may not: the restore
    // then does not sync it again).
    sync_parent(target)
}

/// Copies SRC's `db/` into `scratch/db`: regular files, and the directories directly in it
/// (sled's `blobs/`), each file at most the size it had when opened; a symbolic link or any
/// other kind of entry is refused, never followed.
fn copy_src_db(src_dir: &OwnedFd, src: &Path, scratch: &Path) -> Result<(), AdminError> {
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

/// A new file, 0600, never through a link.
fn create_new_private(path: &Path) -> Result<std::fs::File, AdminError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| io_error("write", path, &e))
}

/// Refuses the backup if any task record in it cannot be trusted, naming the task. Runs
/// before restore writes anything but its scratch copy.
fn check_backup(source: &Store, src: &Path) -> Result<(), AdminError> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = source.read_tasks(after.as_deref(), CHUNK)?;
        let Some(last) = chunk.last() else {
            return Ok(());
        };
        after = Some(last.key().to_vec());
        for copy in &chunk {
            if let Some(why) = distrust(copy) {
                return Err(refused(src, copy, &why));
            }
        }
    }
}

fn refused(src: &Path, copy: &TaskCopy, why: &str) -> AdminError {
    AdminError::failed(format!(
        "restore refuses the backup in {}: task {:?}: {why}; a backup is untrusted input, and this one is damaged or was not written by coverd as it is: use another backup (nothing was restored)",
        shown(src).display(),
        String::from_utf8_lossy(copy.key())
    ))
}

/// Copies the checked tasks of `source` (the scratch copy of SRC's store), the other trees,
/// and the images their records name, read from SRC without following links and verified,
/// into a fresh store in `dest`.
fn copy_restored(
    source: &Store,
    src_dir: &OwnedFd,
    src: &Path,
    dest: &Path,
    progress: Option<Progress>,
) -> Result<Copied, AdminError> {
    let target = Store::open_for_restore(dest).map_err(|e| {
        AdminError::failed(format!(
            "cannot create a store in {}: {e}",
            shown(dest).display()
        ))
    })?;
    let c = source.counts()?;
    let total = c.submitted + c.received + c.downloaded + c.failed;
    let mut copied = Copied::default();
    let mut images_dir = None;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = source.read_tasks(after.as_deref(), CHUNK)?;
        let Some(last) = chunk.last() else { break };
        after = Some(last.key().to_vec());
        for copy in &chunk {
            // Checked before anything was written; checked again as it is written.
            if let Some(why) = distrust(copy) {
                return Err(refused(src, copy, &why));
            }
            if let Some(task) = &copy.task {
                let (images, bytes) =
                    restore_task_images(src_dir, &mut images_dir, src, dest, task)
                        .map_err(|e| refused(src, copy, &e))?;
                copied.images += images;
                copied.bytes += bytes;
            }
        }
        target.put_copies(&chunk)?;
        copied.tasks += chunk.len() as u64;
        if let Some(p) = &progress {
            p(copied.tasks, total.max(copied.tasks));
        }
    }
    source.copy_other_trees(&target)?;
    target.rebuild_recent()?;
    target.flush_now()?;
    Ok(copied)
}

/// Copies the stored images of one checked task from SRC into `dest`, each at the path
/// built from its id ([`image_name`]), verified against its size and sha256. `Err` says why
/// (the caller names the task).
fn restore_task_images(
    src_dir: &OwnedFd,
    images_dir: &mut Option<OwnedFd>,
    src: &Path,
    dest: &Path,
    task: &Task,
) -> Result<(u64, u64), String> {
    let (mut images, mut bytes) = (0, 0);
    let mut task_dir: Option<OwnedFd> = None;
    let rel_dir = Path::new(IMAGES_DIR).join(&task.task_id);
    for img in task
        .images
        .iter()
        .filter(|i| i.state == ImageState::Downloaded)
    {
        let Some(name) = image_name(&task.task_id, img)? else {
            return Err(format!("image {} names no file", img.index));
        };
        let message = |e: AdminError| format!("image {}: {}", img.index, e.message);
        if images_dir.is_none() {
            let (fd, _) = open_under(src_dir, OsStr::new(IMAGES_DIR), &src.join(IMAGES_DIR), true)
                .map_err(message)?;
            *images_dir = Some(fd);
        }
        if task_dir.is_none() {
            let dir = images_dir.as_ref().expect("opened above");
            let (fd, _) = open_under(dir, OsStr::new(&task.task_id), &src.join(&rel_dir), true)
                .map_err(message)?;
            task_dir = Some(fd);
            private_dir(&dest.join(&rel_dir)).map_err(message)?;
        }
        let dir = task_dir.as_ref().expect("opened above");
        let from = src.join(&rel_dir).join(&name);
        let (fd, size) = open_under(dir, OsStr::new(&name), &from, false).map_err(message)?;
        if Some(size) != img.bytes {
            return Err(format!(
                "image {} does not match its recorded size and sha256 ({size} bytes in the backup, {} in the record)",
                img.index,
                img.bytes.unwrap_or(0)
            ));
        }
        let to = dest.join(&rel_dir).join(&name);
        let mut out = create_new_private(&to).map_err(message)?;
        let mut hasher = Sha256::new();
        let mut input = std::fs::File::from(fd).take(size);
        let mut buf = vec![0u8; 128 * 1024];
        let mut total = 0u64;
        loop {
            let n = input
                .read(&mut buf)
                .map_err(|e| format!("image {} cannot be read: {e}", img.index))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| message(io_error("write", &to, &e)))?;
            total += n as u64;
        }
        if total != size || Some(hex::encode(hasher.finalize())) != img.sha256 {
            return Err(format!(
                "image {} does not match its recorded size and sha256",
                img.index
            ));
        }
        out.sync_all()
            .map_err(|e| message(io_error("write", &to, &e)))?;
        images += 1;
        bytes += size;
    }
    if task_dir.is_some() {
        sync_dir(&dest.join(&rel_dir)).map_err(|e| e.message)?;
        sync_dir(&dest.join(IMAGES_DIR)).map_err(|e| e.message)?;
    }
    Ok((images, bytes))
}

/// Copies every task (record, history, indexes rebuilt), the other trees, and the images
/// that downloaded records name (verified against their sha256) from `store` in `data_dir`
/// into a fresh store in `dest`.
fn copy_store(
    store: &Store,
    data_dir: &Path,
    dest: &Path,
    progress: Option<Progress>,
) -> Result<Copied, AdminError> {
    private_dir(dest)?;
    let target = Store::open(dest).map_err(|e| {
        AdminError::failed(format!(
            "cannot create a store in {}: {e}",
            shown(dest).display()
        ))
    })?;
    let c = store.counts()?;
    let total = c.submitted + c.received + c.downloaded + c.failed;
    let mut copied = Copied::default();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = store.read_tasks(after.as_deref(), CHUNK)?;
        let Some(last) = chunk.last() else { break };
        after = Some(last.key().to_vec());
        let mut keep = Vec::with_capacity(chunk.len());
        for copy in chunk {
            if let Some((copy, images, bytes)) = copy_images(store, data_dir, dest, copy)? {
                copied.images += images;
                copied.bytes += bytes;
                keep.push(copy);
            }
        }
        target.put_copies(&keep)?;
        copied.tasks += keep.len() as u64;
        if let Some(p) = &progress {
            p(copied.tasks, total.max(copied.tasks));
        }
    }
    store.copy_other_trees(&target)?;
    // The copies went in id order: the ring of recent tasks is rebuilt from them.
    target.rebuild_recent()?;
    target.flush_now()?;
    // The entries of the task directories, once for all of them (each task's directory
    // was synced after its images; `backup` syncs `dest`, which holds `images`).
    let images = dest.join(IMAGES_DIR);
    if images.exists() {
        sync_dir(&images)?;
    }
    Ok(copied)
}

/// Copies the stored images of one task. When one is missing or does not verify (an
/// `admin retry` or `prune` changed the task meanwhile), reads the task again and retries;
/// `None` when the task is gone.
fn copy_images(
    store: &Store,
    data_dir: &Path,
    dest: &Path,
    mut copy: TaskCopy,
) -> Result<Option<(TaskCopy, u64, u64)>, AdminError> {
    let mut last_error = None;
    for _ in 0..REREADS {
        // A quarantined record names no images that could be checked.
        let Some(task) = &copy.task else {
            return Ok(Some((copy, 0, 0)));
        };
        match copy_task_images(data_dir, dest, task) {
            Ok((images, bytes)) => return Ok(Some((copy, images, bytes))),
            Err(e) => last_error = Some(e),
        }
        match store.read_task(&copy.task_id)? {
            Some(again) => copy = again,
            None => return Ok(None),
        }
    }
    Err(last_error.unwrap_or_else(|| AdminError::failed("image copy failed")))
}

fn copy_task_images(data_dir: &Path, dest: &Path, task: &Task) -> Result<(u64, u64), AdminError> {
    let mut images = 0;
    let mut bytes = 0;
    let mut dir_made = false;
    for img in task
        .images
        .iter()
        .filter(|i| i.state == ImageState::Downloaded)
    {
        // The path is built from the id, never taken from the record.
        let name = image_name(&task.task_id, img).map_err(|why| {
            AdminError::failed(format!(
                "the record of task {} is damaged ({why}); run `coverd admin verify`, then `coverd admin retry {}`",
                task.task_id, task.task_id
            ))
        })?;
        let Some(name) = name else { continue };
        let rel = format!("{IMAGES_DIR}/{}/{name}", task.task_id);
        let from = data_dir.join(&rel);
        let data = std::fs::read(&from).map_err(|e| {
            AdminError::failed(format!(
                "image {} of task {} cannot be read ({e}); run `coverd admin verify`, then `coverd admin retry {}`",
                rel, task.task_id, task.task_id
            ))
        })?;
        if Some(hex::encode(Sha256::digest(&data))) != img.sha256 {
            return Err(AdminError::failed(format!(
                "image {} of task {} does not match its sha256; run `coverd admin retry {}` and back up again",
                rel, task.task_id, task.task_id
            )));
        }
        let to = dest.join(&rel);
        if !dir_made {
            private_dir(&dest.join(IMAGES_DIR).join(&task.task_id))?;
            dir_made = true;
        }
        if let Some(parent) = to.parent() {
            private_dir(parent)?;
        }
        write_private(&to, &data)?;
        images += 1;
        bytes += data.len() as u64;
    }
    if dir_made {
        sync_dir(&dest.join(IMAGES_DIR).join(&task.task_id))?;
    }
    Ok((images, bytes))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), AdminError> {
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

/// Syncs the directory that holds the entry of `path` (created where a dangling link
/// pointed, see [`unlinked`]).
fn sync_parent(path: &Path) -> Result<(), AdminError> {
    let created = unlinked(path);
    match created.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

fn sync_dir(path: &Path) -> Result<(), AdminError> {
    crate::dirsync::sync_dir(path).map_err(|e| io_error("sync", path, &e))
}

/// `admin prune --older-than`: forgets `downloaded` and `failed` tasks whose last change is
/// before `cutoff`, and removes their images. Never an unfinished task: the store checks
/// the state again in the transaction that removes the record.
pub fn prune(
    store: &Store,
    data_dir: &Path,
    cutoff: Millis,
    dry_run: bool,
    progress: Option<Progress>,
) -> Result<PruneJson, AdminError> {
    let c = store.counts()?;
    let total = c.submitted + c.received + c.downloaded + c.failed;
    let mut out = PruneJson {
        dry_run,
        tasks: 0,
        bytes: 0,
        before: format_time(cutoff),
    };
    let mut after: Option<Vec<u8>> = None;
    let mut seen = 0u64;
    loop {
        let (found, last) = store.finished_before(cutoff, after.as_deref(), PRUNE_CHUNK)?;
        let Some(last) = last else { break };
        seen += PRUNE_CHUNK as u64;
        for task in found {
            // `finished_before` returns only tasks keyed by their own valid id; the path is
            // built from it, so nothing outside images/ can be named.
            if !valid_task_id(&task.task_id) {
                continue;
            }
            let dir = data_dir.join(IMAGES_DIR).join(&task.task_id);
            let bytes = dir_bytes(&dir);
            if dry_run {
                out.tasks += 1;
                out.bytes += bytes;
                continue;
            }
            if !store.forget(&task.task_id, task.updated_at)? {
                continue;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(AdminError::failed(format!(
                        "forgot task {} but cannot remove {}: {e}; remove it by hand",
                        task.task_id,
                        shown(&dir).display()
                    )));
                }
            }
            tracing::info!(task_id = %task.task_id, bytes, "task pruned");
            out.tasks += 1;
            out.bytes += bytes;
        }
        if let Some(p) = &progress {
            p(seen.min(total), total);
        }
        after = Some(last);
    }
    Ok(out)
}

/// Bytes of the files directly in `dir` (an image directory has no subdirectories).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Makes `path` absolute against the working directory (before anything changes it).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{
        ids, reference, schema_1_trees_gone, schema_of, scripted, write_v1_tasks,
    };

    /// A backup written by a schema-1 coverd restores: the backup's store is migrated
    /// when restore opens it, and the restored store is of the current schema with every
    /// task and its history.
    #[test]
    fn a_schema_1_backup_restores() {
        let (_r, want) = reference();
        let src = tempfile::tempdir().unwrap();
        // No `downloaded` task: its image file would have to be in the backup too.
        let script: Vec<_> = scripted().into_iter().filter(|t| t.0 != "d").collect();
        write_v1_tasks(src.path(), 1, &[], &[], script);
        let manifest = Manifest {
            format: FORMAT.into(),
            version: "0.1.0".into(),
            created_at: "2026-11-30T05:00:00Z".into(),
            tasks: 4,
            images: 0,
            bytes: 0,
        };
        std::fs::write(
            src.path().join(MANIFEST),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let target = tempfile::tempdir().unwrap();
        let data = target.path().join("data");
        restore(src.path(), &data, None).unwrap();
        let store = Store::open(&data).unwrap();
        assert_eq!(schema_of(&store), crate::store::SCHEMA_VERSION);
        for id in ["a", "b", "c", "e"] {
            assert_eq!(store.get(id).unwrap(), want.get(id).unwrap(), "{id}");
            assert_eq!(store.events(id).unwrap(), want.events(id).unwrap(), "{id}");
        }
        assert_eq!(ids(store.list(None, 10).unwrap()), ["e", "c", "b", "a"]);
        assert_eq!(store.counts().unwrap().failed, 1);
        assert!(schema_1_trees_gone(&store));
    }
}
