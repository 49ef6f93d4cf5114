//! `admin prune --older-than`: forgets finished tasks whose last change is older than the
//! cutoff (the store checks the state again in the transaction that removes the record) and
//! removes their objects (before the record) and image directories (after it), places
//! built from valid task ids; `--dry-run` counts.
//! Owns the pruning walk and [`PruneJson`]; must not forget an unfinished task or remove
//! anything outside `images/`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Progress;
use crate::admin::AdminError;
use crate::admin::access::shown;
use crate::download::task_dir;
use crate::model::{Millis, format_time, is_object_location, valid_task_id};
use crate::storage::local::dir_bytes;
use crate::store::Store;

/// Task records looked at per step of `prune`.
const PRUNE_CHUNK: usize = 512;

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

/// `admin prune --older-than`: forgets `downloaded` and `failed` tasks whose last change is
/// before `cutoff`, and removes their images. Never an unfinished task: the store checks
/// the state again in the transaction that removes the record.
pub fn prune(
    store: &Store,
    data_dir: &Path,
    objects: &super::Objects<'_>,
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
            let dir = data_dir.join(task_dir(task.kind, &task.task_id));
            let in_objects: u64 = task
                .images
                .iter()
                .filter(|i| i.path.as_deref().is_some_and(is_object_location))
                .filter_map(|i| i.bytes)
                .sum();
            let bytes = dir_bytes(&dir) + in_objects;
            if dry_run {
                out.tasks += 1;
                out.bytes += bytes;
                continue;
            }
            // Objects before the record (SPEC "Object storage"): a crash between leaves a
            // record that the next prune finishes, never an object no record names.
            objects
                .runtime
                .block_on(objects.files.remove_objects(task.kind, &task.task_id))
                .map_err(|e| {
                    AdminError::failed(format!(
                        "cannot remove the objects of task {}: {e}; run prune again once the object store answers",
                        task.task_id
                    ))
                })?;
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
