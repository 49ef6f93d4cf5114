//! Reading task records and their history, and quarantine: a record that cannot be decoded
//! is an error to its reader, remembered by id (logged once, skipped by the due queues, named
//! by `admin status`), and whole-store scans go on past it. Must not write a record.

use std::sync::atomic::Ordering;

use super::codec;
use super::error::{StoreError, quarantine_reason};
use super::record::{codec_reason, decode, decode_record};
use super::{Core, MAX_EVENTS_PER_TASK, Quarantined, Scanned, Store};
use crate::model::{EventRecord, Task};

impl Store {
    /// One task. A record that cannot be decoded is an error, and is quarantined.
    pub fn get(&self, task_id: &str) -> Result<Option<Task>, StoreError> {
        match self.inner.tasks.get(task_id.as_bytes())? {
            Some(bytes) => self.decode_checked(&bytes, task_id).map(Some),
            None => Ok(None),
        }
    }

    /// Decodes a task record; a failure quarantines the task.
    pub(super) fn decode_checked(&self, bytes: &[u8], task_id: &str) -> Result<Task, StoreError> {
        self.decode_at(task_id.as_bytes(), bytes, task_id)
    }

    /// [`Store::decode_checked`] of the record at `key` (raw: a crafted key need not be
    /// UTF-8; `task_id` is its text).
    pub(super) fn decode_at(
        &self,
        key: &[u8],
        bytes: &[u8],
        task_id: &str,
    ) -> Result<Task, StoreError> {
        decode(bytes, task_id).inspect_err(|e| {
            self.inner.undecodable_reads.fetch_add(1, Ordering::SeqCst);
            self.inner.quarantine_task(task_id, key, e);
        })
    }

    pub(super) fn is_quarantined(&self, task_id: &[u8]) -> bool {
        let map = self.inner.quarantined_ids();
        !map.is_empty() && map.contains_key(String::from_utf8_lossy(task_id).as_ref())
    }

    /// The whole history of one task, oldest first. An error if the record (or a schema-1
    /// history entry left beside it) cannot be decoded.
    pub fn events(&self, task_id: &str) -> Result<Vec<EventRecord>, StoreError> {
        if let Some(bytes) = self.inner.tasks.get(task_id.as_bytes())? {
            decode_record(&bytes, task_id)?;
        }
        let (events, damaged) = self.history(task_id)?;
        match damaged.into_iter().next() {
            None => Ok(events),
            Some(reason) => Err(StoreError::Corrupt {
                what: format!("history of task {task_id}"),
                reason,
            }),
        }
    }

    /// The history of one task that can be decoded, oldest first, and a description of each
    /// entry that cannot (for `admin export`, which goes on past damage): the record's own
    /// history, after any schema-1 entries still in `events` (those of a record the
    /// migration could not decode, and entries it could not decode).
    pub fn history(&self, task_id: &str) -> Result<(Vec<EventRecord>, Vec<String>), StoreError> {
        let mut prefix = task_id.as_bytes().to_vec();
        prefix.push(0);
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for kv in self
            .inner
            .events
            .scan_prefix(prefix)
            .take(MAX_EVENTS_PER_TASK as usize)
        {
            let (k, v) = kv?;
            match codec::decode_event(&v) {
                Ok(event) => good.push(event),
                Err(e) => {
                    let seq = k
                        .len()
                        .checked_sub(4)
                        .and_then(|at| k.get(at..))
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_be_bytes)
                        .unwrap_or(0);
                    bad.push(format!("history entry {seq}: {}", codec_reason(e)));
                }
            }
        }
        if let Some(bytes) = self.inner.tasks.get(task_id.as_bytes())?
            && let Ok((_, Some(inline))) = codec::decode_record(&bytes)
        {
            good.extend(inline);
        }
        Ok((good, bad))
    }

    /// Every task record in id order, for export and verify: a record that cannot be
    /// decoded is quarantined and yielded as such, and the scan goes on. Stops only at an
    /// I/O error.
    pub fn all_tasks(&self) -> impl Iterator<Item = Result<Scanned, StoreError>> + '_ {
        self.inner.tasks.iter().map(|kv| {
            let (k, v) = kv?;
            let task_id = String::from_utf8_lossy(&k).into_owned();
            Ok(match self.decode_at(&k, &v, &task_id) {
                Ok(task) => Scanned::Task(Box::new(task)),
                Err(e) => Scanned::Quarantined(Quarantined {
                    reason: quarantine_reason(&e),
                    task_id,
                    key: k.to_vec(),
                }),
            })
        })
    }
}

impl Core {
    pub(super) fn quarantined_ids(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Quarantined>> {
        // A poisoned map is still a valid map.
        self.quarantine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers that `task_id`'s record (at `key`) cannot be decoded, logging it the first
    /// time: the due queues skip it from now on, so no worker picks it again, and the
    /// store's quarantine index names it to `admin status`.
    pub(super) fn quarantine_task(&self, task_id: &str, key: &[u8], err: &StoreError) {
        let reason = quarantine_reason(err);
        let mut map = self.quarantined_ids();
        if map.contains_key(task_id) {
            return;
        }
        self.persist_quarantined(key);
        tracing::warn!(
            task_id,
            "task {task_id} quarantined: its record is {reason}; the workers skip it, `coverd admin status` lists it"
        );
        map.insert(
            task_id.to_string(),
            Quarantined {
                task_id: task_id.to_string(),
                reason,
                key: key.to_vec(),
            },
        );
    }
}
