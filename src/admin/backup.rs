//! `admin backup`, `admin restore` and `admin prune`: copying a store and its images into a
//! fresh data directory (with `backup.json`), rebuilding a data directory from such a copy,
//! and forgetting old finished tasks with their images. Blocking code, run off the async
//! runtime in bounded chunks so the daemon keeps answering callbacks meanwhile. Owns the
//! manifest and the image copies; must not change a task except through the store's
//! copy/forget functions (never a state transition).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AdminError;
use super::access::shown;
use crate::download::IMAGES_DIR;
use crate::model::{ImageState, Millis, Task, format_time, now_millis};
use crate::store::{Store, TaskCopy};

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
        "; choose a place the service's user can write (see docs/operations.md, \"Backup\")"
    } else if e.raw_os_error() == Some(30) {
        // EROFS: under the unit's ProtectSystem=strict only its state directories are writable.
        "; with the service running, back up under /var/lib/coverd-backup (see docs/operations.md, \"Backup\")"
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
                Err(AdminError::usage(format!(
                    "{what} {} is not empty; give a new or empty directory",
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
    tracing::info!(dest = %shown(dest).display(), tasks = manifest.tasks, images = manifest.images, "backup written");
    Ok(manifest)
}

/// Reads and checks `src/backup.json`.
pub fn read_manifest(src: &Path) -> Result<Manifest, AdminError> {
    let path = src.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            AdminError::missing(format!(
                "{} has no {MANIFEST}: it is not a coverd backup, or an incomplete one; use a directory written by `coverd admin backup`",
                shown(src).display()
            ))
        } else {
            io_error("read", &path, &e)
        }
    })?;
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

/// `admin restore SRC`: checks the manifest, copies the backup's store and images (each
/// image verified) into `target` (absent or empty) and checks the counts against the
/// manifest. On failure, removes what it wrote, so `target` is as it was.
pub fn restore(
    src: &Path,
    target: &Path,
    progress: Option<Progress>,
) -> Result<Manifest, AdminError> {
    let manifest = read_manifest(src)?;
    check_empty_target(target, "the data directory")?;
    let existed = target.exists();
    let created = unlinked(target);
    let result = (|| {
        let source = Store::open(src).map_err(|e| {
            AdminError::failed(format!(
                "cannot open the backup's store in {}: {e}",
                shown(src).display()
            ))
        })?;
        let copied = copy_store(&source, src, target, progress)?;
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
        Ok(())
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
    let mut after: Option<String> = None;
    loop {
        let chunk = store.read_tasks(after.as_deref(), CHUNK)?;
        let Some(last) = chunk.last() else { break };
        after = Some(last.task_id.clone());
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
        let Some(rel) = &img.path else { continue };
        let from = data_dir.join(rel);
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
        let to = dest.join(rel);
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

fn sync_dir(path: &Path) -> Result<(), AdminError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error("sync", path, &e))
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
    let mut after: Option<String> = None;
    let mut seen = 0u64;
    loop {
        let (found, last) = store.finished_before(cutoff, after.as_deref(), PRUNE_CHUNK)?;
        let Some(last) = last else { break };
        seen += PRUNE_CHUNK as u64;
        for task in found {
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
