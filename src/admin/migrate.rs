//! `admin migrate-files --to s3 [--dry-run]`: moves every stored file from the data
//! directory to the object store, one file at a time: checked against its sha256, uploaded
//! (verified as every upload is), recorded (`Event::FileMoved`, durable), and only then
//! removed from the data directory. Resumable and idempotent: a file already recorded in the
//! object store is skipped (its leftover copy in the data directory, from a run stopped
//! between record and removal, is removed), and a run stopped before the record uploads the
//! same object again. Owns [`MigrateJson`]; must not change a task except through
//! `store::apply`, or remove a file before its object is recorded.

use serde::{Deserialize, Serialize};

use super::{AdminError, Exec};
use crate::download::TMP_DIR;
use crate::machine::Event;
use crate::model::ImageState;
use crate::storage::{FileStore as _, Files, recorded_place};
use crate::store::{IfMissing, Scanned};

/// `admin migrate-files`'s answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrateJson {
    pub dry_run: bool,
    /// Where the files went (`s3://bucket/prefix`).
    pub to: String,
    /// Files moved (with `dry_run`: that would be).
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files already in the object store (a run before this one moved them).
    pub already: u64,
    /// Files in the data directory that do not match their record (missing or damaged):
    /// left where they are; `coverd admin retry TASK_ID` fetches them again.
    pub skipped: Vec<String>,
}

impl Exec {
    /// Runs `migrate-files` over every task (see the module's doc).
    pub(super) async fn migrate_files(&self, dry_run: bool) -> Result<MigrateJson, AdminError> {
        let files = Files::new(&self.config).map_err(|e| AdminError::usage(e.to_string()))?;
        let Some(object) = files.object().cloned() else {
            return Err(AdminError::usage(
                "storage.kind is \"local\": set [storage] kind = \"s3\" with the bucket's settings (`man coverd`, CONFIGURATION), then run migrate-files again",
            ));
        };
        object.probe().await.map_err(|e| {
            AdminError::failed(format!("nothing was moved: {e}; check the [storage] keys"))
        })?;
        let mut out = MigrateJson {
            dry_run,
            to: object.describe(),
            ..MigrateJson::default()
        };
        let total = super::exec::total_tasks(&self.store)?;
        // Task ids first (a read of the store), then one task at a time: a task changed in
        // between is read again by `apply`, which drops a move that no longer fits.
        let store = self.store.clone();
        let ids = tokio::task::spawn_blocking(move || -> Result<Vec<String>, AdminError> {
            let mut ids = Vec::new();
            for scanned in store.all_tasks() {
                if let Scanned::Task(task) = scanned? {
                    let stored = task
                        .images
                        .iter()
                        .any(|i| i.state == ImageState::Downloaded);
                    if stored {
                        ids.push(task.task_id.clone());
                    }
                }
            }
            Ok(ids)
        })
        .await
        .map_err(|e| AdminError::failed(format!("migrate-files failed: {e}")))??;
        let tmp = self.config.data_dir.join(TMP_DIR);
        for (done, id) in (1..).zip(&ids) {
            if let Some(p) = &self.progress {
                p(done, total.max(done));
            }
            let Some(task) = self.store.get(id)? else {
                continue;
            };
            for img in task
                .images
                .iter()
                .filter(|i| i.state == ImageState::Downloaded)
            {
                let place = recorded_place(task.kind, &task.task_id, img, Some(&object))
                    .map_err(|why| {
                        AdminError::failed(format!(
                            "the record of task {id} is damaged ({why}); run `coverd admin verify`, then `coverd admin retry {id}`; nothing else was changed"
                        ))
                    })?;
                let Some(place) = place else { continue };
                if place.object {
                    out.already += 1;
                    if !dry_run {
                        // A run stopped between the record and the removal left this copy.
                        files.local().discard(&place.slot).await.map_err(|e| {
                            AdminError::failed(format!(
                                "cannot remove the moved file {} of task {id}: {e}",
                                img.index
                            ))
                        })?;
                    }
                    continue;
                }
                let local = files.local();
                let back = local.read(&place.place).await.ok().flatten();
                let matches = back
                    .as_ref()
                    .is_some_and(|b| Some(b.sha256.as_str()) == img.sha256.as_deref());
                if !matches {
                    out.skipped.push(place.place.clone());
                    continue;
                }
                let bytes = back.map(|b| b.bytes).unwrap_or(0);
                if dry_run {
                    out.files += 1;
                    out.bytes += bytes;
                    continue;
                }
                // The upload consumes its temporary file: hand it a link to the stored one,
                // which stays until the move is recorded.
                let link = tmp.join(format!("migrate-{id}-{}", img.index));
                let _ = std::fs::remove_file(&link);
                std::fs::hard_link(local.data_dir().join(&place.place), &link).map_err(|e| {
                    AdminError::failed(format!(
                        "cannot link {} into {}: {e}; check the data directory's permissions",
                        place.place,
                        tmp.display()
                    ))
                })?;
                let sha256 = img.sha256.clone().unwrap_or_default();
                let location = object
                    .put(&link, &place.slot, place.ext, bytes, &sha256)
                    .await
                    .map_err(|e| {
                        AdminError::failed(format!(
                            "file {} of task {id} not moved: {e}; run migrate-files again (it resumes)",
                            img.index
                        ))
                    })?;
                let event = Event::FileMoved {
                    index: img.index,
                    path: location,
                    sha256,
                };
                self.apply(id, event, IfMissing::Reject).await?;
                local.discard(&place.slot).await.map_err(|e| {
                    AdminError::failed(format!(
                        "moved file {} of task {id} but cannot remove {}: {e}; remove it by hand",
                        img.index, place.place
                    ))
                })?;
                out.files += 1;
                out.bytes += bytes;
            }
            if !dry_run {
                // The task's directory, once empty.
                let dir = self
                    .config
                    .data_dir
                    .join(crate::download::task_dir(task.kind, &task.task_id));
                let _ = std::fs::remove_dir(dir);
            }
        }
        if !dry_run {
            tracing::info!(
                files = out.files,
                bytes = out.bytes,
                "migrate-files moved {} file(s), {} bytes, to {}",
                out.files,
                out.bytes,
                out.to
            );
        }
        Ok(out)
    }
}
