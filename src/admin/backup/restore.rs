//! `admin restore SRC`: a data directory rebuilt from a backup it does not trust. The
//! manifest first, then SRC's `db/` copied into scratch space inside the target and opened
//! there (SRC is never written; a schema-1 backup is migrated in the copy), every record
//! checked (`distrust`) before anything else is written, then the tasks and their images
//! (each at the path built from its id, verified against its size and sha256), the counts
//! checked against the manifest; the unfinished-restore marker while it writes, and what it
//! wrote removed on any failure; as root, the target given to SRC's owner first. Owns the
//! restore and the checks of a backup's records; must not change a task's state, follow a
//! link in SRC or write SRC.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use super::files::{
    CopyFailed, check_empty_target, copy_hashing, create_new_private, io_error, private_dir,
    sync_dir, sync_parent, unlinked, write_private,
};
use super::manifest::{Manifest, read_manifest_at};
use super::source::{copy_src_db, open_src, open_under};
use super::{CHUNK, Copied, Objects, Progress, stored_file};
use crate::admin::AdminError;
use crate::admin::access::shown;
use crate::kind::read::MAX_FILES;
use crate::model::{ImageState, Task, is_object_location, valid_task_id};
use crate::storage::{FileStore as _, ObjectStore, recorded_place};
use crate::store::{Store, TaskCopy, UNFINISHED_RESTORE};

/// Where restore puts its copy of SRC's `db/` (inside the target; removed when done).
const SCRATCH: &str = ".restore-src";

/// Why a task copied from a backup cannot be trusted, if it cannot: its key is not a valid
/// task id, the record inside holds another id, an image names anything but its own file
/// (or is stored without its size and hash), or a notification belongs to something else.
fn distrust(copy: &TaskCopy, object: Option<&ObjectStore>) -> Option<String> {
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
    if task.images.len() > MAX_FILES {
        return Some(format!(
            "its record has {} files (at most {MAX_FILES})",
            task.images.len()
        ));
    }
    let mut seen = [false; MAX_FILES];
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
        let name = match recorded_place(task.kind, id, img, object) {
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

/// `admin restore SRC`: checks the manifest, copies SRC's `db/` into scratch space inside
/// `target` (absent or empty) and opens that copy, checks every task record in it (see
/// [`distrust`]) before writing anything else, then copies the tasks and their images (each
/// read from SRC without following links and verified) into `target` and checks the counts
/// against the manifest. SRC is only read. On failure, removes what it wrote, so `target` is
/// as it was.
pub fn restore(
    src: &Path,
    target: &Path,
    objects: Option<&Objects<'_>>,
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
        check_backup(&source, src, objects)?;
        let copied = copy_restored(&source, &src_dir, src, target, objects, progress)?;
        drop(source);
        std::fs::remove_dir_all(&scratch).map_err(|e| io_error("remove", &scratch, &e))?;
        if (copied.tasks, copied.images, copied.bytes, copied.objects)
            != (
                manifest.tasks,
                manifest.images,
                manifest.bytes,
                manifest.objects,
            )
        {
            return Err(AdminError::failed(format!(
                "the backup in {} holds {} tasks and {} images ({} bytes) and names {} objects but its manifest says {}, {} ({} bytes) and {}; it is damaged, use another backup",
                shown(src).display(),
                copied.tasks,
                copied.images,
                copied.bytes,
                copied.objects,
                manifest.tasks,
                manifest.images,
                manifest.bytes,
                manifest.objects
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

/// Refuses the backup if any task record in it cannot be trusted, naming the task. Runs
/// before restore writes anything but its scratch copy.
fn check_backup(
    source: &Store,
    src: &Path,
    objects: Option<&Objects<'_>>,
) -> Result<(), AdminError> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = source.read_tasks(after.as_deref(), CHUNK)?;
        let Some(last) = chunk.last() else {
            return Ok(());
        };
        after = Some(last.key().to_vec());
        for copy in &chunk {
            if let Some(why) = distrust(copy, object_store(objects)) {
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
    objects: Option<&Objects<'_>>,
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
    let mut kind_dirs = BTreeMap::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = source.read_tasks(after.as_deref(), CHUNK)?;
        let Some(last) = chunk.last() else { break };
        after = Some(last.key().to_vec());
        for copy in &chunk {
            // Checked before anything was written; checked again as it is written.
            if let Some(why) = distrust(copy, object_store(objects)) {
                return Err(refused(src, copy, &why));
            }
            if let Some(task) = &copy.task {
                copied.objects +=
                    check_objects(objects, task).map_err(|e| refused(src, copy, &e))?;
                let (images, bytes) = restore_task_images(src_dir, &mut kind_dirs, src, dest, task)
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

fn object_store<'a>(objects: Option<&'a Objects<'_>>) -> Option<&'a ObjectStore> {
    objects.and_then(|o| o.files.object()).map(|o| o.as_ref())
}

/// Checks that every object a downloaded file of `task` is stored as exists in the object
/// store with its recorded size (SPEC: restore checks the objects, which stay where they
/// are); how many it checked. `Err` says which and why.
fn check_objects(objects: Option<&Objects<'_>>, task: &Task) -> Result<u64, String> {
    let (Some(object), Some(objects)) = (object_store(objects), objects) else {
        return Ok(0);
    };
    let mut checked = 0;
    for img in task
        .images
        .iter()
        .filter(|i| i.state == ImageState::Downloaded)
    {
        let Some(place) = recorded_place(task.kind, &task.task_id, img, Some(object))? else {
            continue;
        };
        if !place.object {
            continue;
        }
        match objects.runtime.block_on(object.size(&place.place)) {
            Ok(Some(size)) if Some(size) == img.bytes => checked += 1,
            Ok(Some(size)) => {
                return Err(format!(
                    "file {} is the object {} of {size} bytes, not the recorded {}",
                    img.index,
                    place.place,
                    img.bytes.unwrap_or(0)
                ));
            }
            Ok(None) => {
                return Err(format!(
                    "file {} is the object {}, which the object store does not have",
                    img.index, place.place
                ));
            }
            Err(e) => return Err(format!("file {}: {e}", img.index)),
        }
    }
    Ok(checked)
}

/// Copies the stored images of one checked task from SRC into `dest`, each at the path
/// built from its id ([`image_name`]), verified against its size and sha256. `Err` says why
/// (the caller names the task).
fn restore_task_images(
    src_dir: &OwnedFd,
    kind_dirs: &mut BTreeMap<&'static str, OwnedFd>,
    src: &Path,
    dest: &Path,
    task: &Task,
) -> Result<(u64, u64), String> {
    let (mut images, mut bytes) = (0, 0);
    let mut task_dir: Option<OwnedFd> = None;
    let kind_dir = task.kind.describe().dir;
    let rel_dir = Path::new(kind_dir).join(&task.task_id);
    for img in task
        .images
        .iter()
        .filter(|i| i.state == ImageState::Downloaded)
    {
        if img.path.as_deref().is_some_and(is_object_location) {
            // An object stays where it is (`check_objects` found it).
            continue;
        }
        let Some((slot, ext)) = stored_file(task.kind, &task.task_id, img)? else {
            return Err(format!("image {} names no file", img.index));
        };
        let name = slot.file_name(ext);
        let message = |e: AdminError| format!("image {}: {}", img.index, e.message);
        if !kind_dirs.contains_key(kind_dir) {
            let (fd, _) = open_under(src_dir, OsStr::new(kind_dir), &src.join(kind_dir), true)
                .map_err(message)?;
            kind_dirs.insert(kind_dir, fd);
        }
        if task_dir.is_none() {
            let dir = &kind_dirs[kind_dir];
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
        let mut input = std::fs::File::from(fd).take(size);
        let (total, sha256) = copy_hashing(&mut input, &mut out).map_err(|e| match e {
            CopyFailed::Read(e) => format!("image {} cannot be read: {e}", img.index),
            CopyFailed::Write(e) => message(io_error("write", &to, &e)),
        })?;
        if total != size || Some(sha256) != img.sha256 {
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
        sync_dir(&dest.join(kind_dir)).map_err(|e| e.message)?;
    }
    Ok((images, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::backup::{FORMAT, MANIFEST};
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
            objects: 0,
            storage: None,
        };
        std::fs::write(
            src.path().join(MANIFEST),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let target = tempfile::tempdir().unwrap();
        let data = target.path().join("data");
        restore(src.path(), &data, None, None).unwrap();
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
