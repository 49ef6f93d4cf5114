//! `admin backup`, `admin restore` and `admin prune`: copying a store and its images into a
//! fresh data directory (with `backup.json`), rebuilding a data directory from such a copy,
//! and forgetting old finished tasks with their images. Blocking code, run off the async
//! runtime in bounded chunks so the daemon keeps answering callbacks meanwhile. Owns the
//! manifest, the image copies and the one rule that names an image's file
//! ([`stored_file`]: built from a valid task id and the kind's file names, never read from a record); must not change
//! a task except through the store's copy/forget functions (never a state transition).
//!
//! A backup is untrusted input (SPEC "Data directory"): restore opens SRC once (the path
//! the operator named) and reaches everything under it with `openat` and `O_NOFOLLOW`
//! (a symbolic link anywhere under SRC is refused, never followed), copies SRC's `db/`
//! (regular files and `blobs/` only, each at most its size when opened) into scratch space
//! inside the target and opens that copy (so SRC is never written, a schema-1 backup is
//! migrated in the copy), checks every record before it writes anything else, and removes
//! what it wrote on any failure.
//!
//! Its parts: `manifest` (`backup.json`), `restore` (restore and the checks of a backup's
//! records), `source` (reading SRC without following links), `prune`, `files` (the private
//! files and directories both write). This file holds `backup` itself and what the parts
//! share: the chunk size, progress, and [`stored_file`].

mod files;
mod manifest;
mod prune;
mod restore;
mod source;

pub use files::check_empty_target;
pub use manifest::{FORMAT, MANIFEST, Manifest, read_manifest};
pub use prune::{PruneJson, prune};
pub use restore::{give_target_to_src_owner, restore};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use self::files::{CopyFailed, copy_hashing, private_dir, sync_dir, sync_parent, write_private};
use super::AdminError;
use super::access::shown;
use crate::download::{STORED_DIRS, Slot};
use crate::fetch::Ext;
use crate::model::{Image, ImageState, Kind, Task, format_time, now_millis};
use crate::storage::{ObjectStore, recorded_place};
use crate::store::{Store, TaskCopy};

/// Tasks read, copied and written per step: bounds both memory and the time the store's
/// write lock is taken by one transaction in the copy.
const CHUNK: usize = 64;
/// Times a task whose images changed under the copy (retry, prune) is read again.
const REREADS: u32 = 3;

/// Where a stored file of a task of `kind` is in the data directory (its [`Slot`] and the
/// extension its record names: `images/<task_id>/<index>.<ext>` for a cover image,
/// `files/<task_id>/<name>.<ext>` for the others), checked against what the record says
/// (`storage::recorded_place` without an object store): `Ok(None)` when the record names no
/// file; `Err` (why) unless `task_id` is a valid task id, the file's name is one its kind
/// gives, and the recorded path is exactly the slot's path for one of its type's
/// extensions. Every path to a stored file is built from this, never taken from a record.
pub(super) fn stored_file(
    kind: Kind,
    task_id: &str,
    img: &Image,
) -> Result<Option<(Slot, Ext)>, String> {
    Ok(recorded_place(kind, task_id, img, None)?.map(|p| (p.slot, p.ext)))
}

/// The object store side of a whole-store command that runs on a blocking thread: the file
/// stores and the runtime to wait on them with.
pub struct Objects<'a> {
    pub files: &'a crate::storage::Files,
    pub runtime: &'a tokio::runtime::Handle,
}

/// Reports progress: (tasks done, tasks in all). Called from the blocking thread.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// What one copy wrote.
#[derive(Debug, Default, Clone, Copy)]
struct Copied {
    tasks: u64,
    images: u64,
    bytes: u64,
    /// Files in the object store (counted, not copied).
    objects: u64,
}

/// `admin backup DEST`: a consistent copy of the store and its images into `dest` (absent
/// or empty), plus `backup.json`, written last (a directory without it is not a backup).
pub fn backup(
    store: &Store,
    data_dir: &Path,
    dest: &Path,
    object: Option<&ObjectStore>,
    progress: Option<Progress>,
) -> Result<Manifest, AdminError> {
    check_empty_target(dest, "the backup destination")?;
    let created_at = format_time(now_millis());
    let copied = copy_store(store, data_dir, dest, object, progress)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        created_at,
        tasks: copied.tasks,
        images: copied.images,
        bytes: copied.bytes,
        objects: copied.objects,
        storage: object.map(|o| manifest::ObjectsAt {
            endpoint: o.endpoint().to_string(),
            bucket: o.bucket().to_string(),
            prefix: o.prefix().to_string(),
        }),
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

/// Copies every task (record, history, indexes rebuilt), the other trees, and the images
/// that downloaded records name (verified against their sha256) from `store` in `data_dir`
/// into a fresh store in `dest`.
fn copy_store(
    store: &Store,
    data_dir: &Path,
    dest: &Path,
    object: Option<&ObjectStore>,
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
            if let Some((copy, n)) = copy_images(store, data_dir, dest, object, copy)? {
                copied.images += n.images;
                copied.bytes += n.bytes;
                copied.objects += n.objects;
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
    // was synced after its files; `backup` syncs `dest`, which holds `images` and `files`).
    for dir in STORED_DIRS {
        let dir = dest.join(dir);
        if dir.exists() {
            sync_dir(&dir)?;
        }
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
    object: Option<&ObjectStore>,
    mut copy: TaskCopy,
) -> Result<Option<(TaskCopy, Copied)>, AdminError> {
    let mut last_error = None;
    for _ in 0..REREADS {
        // A quarantined record names no images that could be checked.
        let Some(task) = &copy.task else {
            return Ok(Some((copy, Copied::default())));
        };
        match copy_task_images(data_dir, dest, object, task) {
            Ok(n) => return Ok(Some((copy, n))),
            Err(e) => last_error = Some(e),
        }
        match store.read_task(&copy.task_id)? {
            Some(again) => copy = again,
            None => return Ok(None),
        }
    }
    Err(last_error.unwrap_or_else(|| AdminError::failed("image copy failed")))
}

/// Copies the files of `task` stored in the data directory; those in the object store stay
/// there (the store's to replicate) and are only counted.
fn copy_task_images(
    data_dir: &Path,
    dest: &Path,
    object: Option<&ObjectStore>,
    task: &Task,
) -> Result<Copied, AdminError> {
    let mut images = 0;
    let mut bytes = 0;
    let mut objects = 0;
    // The task's directory in `dest`, once made (at its first file).
    let mut task_dir: Option<PathBuf> = None;
    for img in task
        .images
        .iter()
        .filter(|i| i.state == ImageState::Downloaded)
    {
        // The place is built from the id and the kind's names, never taken from the record;
        // an object stays in its store and is only counted.
        let place = recorded_place(task.kind, &task.task_id, img, object).map_err(|why| {
            AdminError::failed(format!(
                "the record of task {} is damaged ({why}); run `coverd admin verify`, then `coverd admin retry {}`",
                task.task_id, task.task_id
            ))
        })?;
        let Some(place) = place else { continue };
        if place.object {
            objects += 1;
            continue;
        }
        let (slot, ext) = (place.slot, place.ext);
        if task_dir.is_none() {
            let dir = dest.join(slot.dir());
            private_dir(&dir)?;
            task_dir = Some(dir);
        }
        let rel = slot.path(ext);
        let to = dest.join(&rel);
        let cannot_copy = |e: &dyn std::fmt::Display| {
            AdminError::failed(format!(
                "file {} of task {} cannot be copied ({e}); run `coverd admin verify`, then `coverd admin retry {}`",
                rel, task.task_id, task.task_id
            ))
        };
        let (size, sha256) =
            copy_private(&data_dir.join(&rel), &to).map_err(|e| cannot_copy(&e))?;
        if Some(sha256) != img.sha256 {
            let _ = std::fs::remove_file(&to);
            return Err(AdminError::failed(format!(
                "file {} of task {} does not match its sha256; run `coverd admin retry {}` and back up again",
                rel, task.task_id, task.task_id
            )));
        }
        images += 1;
        bytes += size;
    }
    if let Some(dir) = task_dir {
        sync_dir(&dir)?;
    }
    Ok(Copied {
        tasks: 0,
        images,
        bytes,
        objects,
    })
}

/// Copies `from` to the private file `to` (0600, replaced if there, synced), streamed and
/// hashed ([`copy_hashing`]): its size and sha256.
fn copy_private(from: &Path, to: &Path) -> std::io::Result<(u64, String)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut input = std::fs::File::open(from)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(to)?;
    let copied = copy_hashing(&mut input, &mut out).map_err(|e| match e {
        CopyFailed::Read(e) | CopyFailed::Write(e) => e,
    })?;
    out.sync_all()?;
    Ok(copied)
}

/// Makes `path` absolute against the working directory (before anything changes it).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
