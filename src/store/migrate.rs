//! The schema check at open and the migrations: a new store gets its marker and version, a
//! newer or foreign one is refused, schema 1 → 2 (histories inlined into their records,
//! `by_created` dropped), then schema 2 → 3 (`stats` derived). Each step can stop anywhere
//! and run again. Must not run after open (nothing else reads the store while it runs).

use std::time::Duration;

use sled::Transactional;
use sled::transaction::TransactionError;

use super::error::StoreError;
use super::history::{fit_history, read_record};
use super::keys::state_key;
use super::list::{RECENT_TASKS, TopN};
use super::record::encode;
use super::{Core, SCHEMA_VERSION, codec};

pub(super) const FORMAT_MARKER: &[u8] = b"coverd store";

/// Task records rewritten per transaction by the schema migration.
const MIGRATION_CHUNK: usize = 256;

/// How often a migration reports progress (see [`Store::open_with_progress`]).
///
/// [`Store::open_with_progress`]: super::Store::open_with_progress
pub const MIGRATION_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Schema 1's newest-first index, dropped by the migration (after the version flip).
pub(super) const V1_BY_CREATED: &str = "by_created";

impl Core {
    pub(super) fn check_schema(&self, progress: &dyn Fn(u64)) -> Result<(), StoreError> {
        match (self.meta.get("format")?, self.meta.get("schema_version")?) {
            (Some(f), Some(v)) if f.as_ref() == FORMAT_MARKER => {
                let found =
                    u32::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                        what: "schema version".into(),
                        reason: format!("{} bytes instead of 4", v.len()),
                    })?);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::TooNew {
                        path: self.path.clone(),
                        found,
                    });
                }
                // Migrations from older schema versions, one step at a time.
                if found < 2 {
                    self.migrate_v1(progress)?;
                }
                // Schema 3 adds the statistics `admin status` reads without a scan,
                // derived from the records here (`stats`); an older coverd, which would
                // not keep them, refuses the store from now on.
                let derived = self.check_stats(found < 3, progress)?;
                if found < 3 {
                    self.meta
                        .insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
                    self.db.flush()?;
                    tracing::info!(
                        derived,
                        "store migrated from schema {} to {SCHEMA_VERSION}: statistics derived from the task records",
                        found.max(2)
                    );
                }
                // Left by a migration that stopped after its version flip.
                if self
                    .db
                    .tree_names()
                    .iter()
                    .any(|n| n.as_ref() == V1_BY_CREATED.as_bytes())
                {
                    self.db.drop_tree(V1_BY_CREATED)?;
                }
                Ok(())
            }
            (None, None) if self.tasks.is_empty() && self.events.is_empty() => {
                self.meta.insert("format", FORMAT_MARKER)?;
                self.meta
                    .insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
                self.init_stats()?;
                self.db.flush()?;
                Ok(())
            }
            _ => Err(StoreError::Foreign {
                path: self.path.clone(),
            }),
        }
    }

    /// Schema 1 → 2: every task record gets its history inline (moved out of `events`) and
    /// finished tasks lose their `by_state` entry, one transaction per chunk of records;
    /// then `schema_version` is set to 2, and last `by_created` is dropped. Safe to stop at
    /// any point and run again: a record already in the schema-2 envelope is skipped, and
    /// each record moves with its history and index entry in one transaction. A record that
    /// cannot be decoded is left as it is, with its history in `events` (quarantined as
    /// before). Blocking; at open, before anything else reads the store.
    fn migrate_v1(&self, progress: &dyn Fn(u64)) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let mut reported = started;
        let (mut migrated, mut undecodable, mut done_before, mut trimmed) =
            (0u64, 0u64, 0u64, 0u64);
        // The newest tasks, for the ring of recently created tasks.
        let mut newest = TopN::new(RECENT_TASKS as usize);
        let mut after: Option<sled::IVec> = None;
        loop {
            let start = match &after {
                Some(a) => std::ops::Bound::Excluded(a.clone()),
                None => std::ops::Bound::Unbounded,
            };
            let ids = self
                .tasks
                .range::<sled::IVec, _>((start, std::ops::Bound::Unbounded))
                .keys()
                .take(MIGRATION_CHUNK)
                .collect::<Result<Vec<_>, _>>()?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            for id in &ids {
                if let Some(v) = self.tasks.get(id)?
                    && let Ok(task) = codec::decode_task(&v)
                {
                    newest.push((task.created_at, task.task_id));
                }
            }
            let counted = (&self.tasks, &self.events, &self.by_state)
                .transaction(|(tasks, events, by_state)| {
                    let mut counted = (0u64, 0u64, 0u64, 0u64);
                    for id in &ids {
                        let task_id = String::from_utf8_lossy(id);
                        let Some(bytes) = tasks.get(id)? else {
                            continue;
                        };
                        match codec::decode_record(&bytes) {
                            Ok((_, Some(_))) => counted.2 += 1,
                            Ok((_, None)) => {
                                let (task, mut history) =
                                    read_record(&bytes, &task_id, events)?;
                                // Schema 1 kept details whole: inlined, a long history
                                // could pass the record's limit and block the migration.
                                let dropped = fit_history(&mut history);
                                if dropped > 0 {
                                    counted.3 += 1;
                                    tracing::warn!(
                                        task_id = %task_id,
                                        dropped,
                                        "task {task_id}: history too large for one record; its {dropped} oldest entries were dropped and long details cut during the migration"
                                    );
                                }
                                if task.state.is_finished() {
                                    by_state.remove(state_key(
                                        task.state,
                                        task.created_at,
                                        &task_id,
                                    ))?;
                                }
                                tasks.insert(
                                    id.clone(),
                                    encode(codec::encode_task(&task, &history), &task_id)?,
                                )?;
                                counted.0 += 1;
                            }
                            Err(_) => counted.1 += 1,
                        }
                    }
                    Ok(counted)
                })
                .map_err(|e| match e {
                    TransactionError::Abort(e) => e,
                    TransactionError::Storage(e) => StoreError::Io(e),
                })?;
            migrated += counted.0;
            undecodable += counted.1;
            done_before += counted.2;
            trimmed += counted.3;
            after = Some(last);
            if reported.elapsed() >= MIGRATION_PROGRESS_EVERY {
                reported = std::time::Instant::now();
                progress(migrated);
            }
        }
        self.write_recent(newest)?;
        // The flip, after every record it covers (sled's log is written in order).
        self.meta.insert("schema_version", &2u32.to_be_bytes())?;
        self.db.flush()?;
        self.db.drop_tree(V1_BY_CREATED)?;
        self.db.flush()?;
        tracing::info!(
            migrated,
            undecodable,
            done_before,
            trimmed,
            took_ms = started.elapsed().as_millis() as u64,
            "store migrated from schema 1 to 2: {migrated} task records now hold their history ({trimmed} of them trimmed to fit, {undecodable} undecodable left as they were, {done_before} done by an earlier run)"
        );
        Ok(())
    }
}
