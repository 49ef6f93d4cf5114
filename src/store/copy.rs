//! Whole-store reads and removals for `admin backup`, `admin restore` and `admin prune`:
//! reading tasks in bounded chunks while the daemon keeps writing (each chunk's records and
//! their notifications in one transaction, so a task and its outbox entries are read at one
//! moment), writing them into a fresh store with their derived indexes and notification
//! counters, copying the trees this module does not know, and forgetting finished tasks
//! with their outbox entries. Keys are paged as raw bytes: a crafted store's keys need not
//! be task ids, nor UTF-8. Must not touch image files (the caller copies and removes them)
//! and must not change a task's state.

use std::ops::Bound;

use sled::Transactional;
use sled::transaction::ConflictableTransactionError;

use super::error::{StoreError, TxResult};
use super::keys::{bump_key, u32_from};
use super::outbox::{
    drop_notifications, head_key, notify_count_key, notify_due_key, record_key, write_notification,
};
use super::record::{decode, decode_notification};
use super::{MAX_EVENTS_PER_TASK, Store, stats};
use crate::model::{Millis, Task, valid_task_id};

/// Trees whose content is the tasks' (records, history) or derived from the task records;
/// [`Store::put_copies`] rebuilds them. Every other tree is copied as it is. (`by_created`
/// is schema 1's, gone after the migration.)
/// `outbox` is copied with its tasks (read in the same transaction as their records).
const TASK_TREES: [&str; 8] = [
    "tasks",
    "events",
    "due_download",
    "due_poll",
    "by_state",
    "by_created",
    "by_music",
    "outbox",
];
/// sled's own default tree (unused by coverd).
const SLED_DEFAULT_TREE: &[u8] = b"__sled__default";
/// `meta` keys that belong to the store they are in: written by `open`, or derived.
fn own_meta_key(key: &[u8]) -> bool {
    key == b"format"
        || key == b"schema_version"
        || key == b"health"
        || key.starts_with(b"count/")
        || key.starts_with(b"notify/")
        || key.starts_with(b"recent/")
        || stats::own_meta_key(key)
}

/// One task as read at one moment: its record (with its history, schema 2), its
/// notifications (outbox records and latest seq, read in the same transaction as the
/// record) and any schema-1 history entries still under its id (see the store's module doc).
#[derive(Debug, Clone)]
pub struct TaskCopy {
    /// The record's key as text (lossy: see [`TaskCopy::key`] for the bytes).
    pub task_id: String,
    key: sled::IVec,
    /// `None` when the record cannot be decoded (quarantined: damaged, or written by a newer
    /// coverd): it is copied byte for byte, with its schema-1 history entries, and without
    /// index entries (the workers skip it anyway).
    pub task: Option<Task>,
    record: sled::IVec,
    events: Vec<(sled::IVec, sled::IVec)>,
    notifications: Notifications,
}

/// A task's outbox entries as read with its record: the latest seq (`h`) and the records
/// (`n`) of the last [`MAX_EVENTS_PER_TASK`] seqs up to it.
#[derive(Debug, Clone, Default)]
struct Notifications {
    head: Option<sled::IVec>,
    records: Vec<(u32, sled::IVec)>,
}

impl TaskCopy {
    /// The record's key in the store, as bytes.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Why this copy's notifications do not belong to it (a crafted or damaged store): a
    /// notification whose task id or seq differs from its key, a seq past the latest, or a
    /// latest seq past what a task can reach.
    pub fn notification_problem(&self) -> Option<String> {
        let head = self.notifications.head.as_ref().map(|h| u32_from(h));
        // One per settle; more would make every later look at them (prune's, each a point
        // read per seq) as long as the number says.
        if let Some(h) = head
            && h > MAX_EVENTS_PER_TASK
        {
            return Some(format!(
                "claims {h} notifications (a task has at most {MAX_EVENTS_PER_TASK})"
            ));
        }
        for (seq, bytes) in &self.notifications.records {
            if head.is_none_or(|h| *seq > h) {
                return Some(format!("notification {seq} is past the task's latest"));
            }
            // An undecodable one is copied as it is and shown as damaged, like a record.
            if let Ok(n) = decode_notification(bytes, &self.task_id)
                && (n.task_id != self.task_id || n.seq != *seq)
            {
                return Some(format!(
                    "notification {seq} is stored for task {:?}, seq {}",
                    n.task_id, n.seq
                ));
            }
        }
        None
    }
}

/// Reads a task's notifications in a transaction (bounded, whatever its head says).
fn read_notifications(
    outbox: &sled::transaction::TransactionalTree,
    task_id: &[u8],
) -> TxResult<Notifications> {
    let id = String::from_utf8_lossy(task_id);
    let Some(head) = outbox.get(head_key(&id))? else {
        return Ok(Notifications::default());
    };
    let latest = u32_from(&head);
    let first = latest
        .saturating_sub(MAX_EVENTS_PER_TASK)
        .saturating_add(1)
        .max(1);
    let mut records = Vec::new();
    for seq in first..=latest {
        if let Some(bytes) = outbox.get(record_key(&id, seq))? {
            records.push((seq, bytes));
        }
    }
    Ok(Notifications {
        head: Some(head),
        records,
    })
}

/// Replaces a task's notifications in this store with `notes` (copied from another store):
/// removes what is here (due entries and counters included), writes the copies, and derives
/// their due entries and counters anew. A notification that cannot be decoded is copied as
/// it is (it is shown as damaged, and never sent).
fn put_notifications(
    outbox: &sled::transaction::TransactionalTree,
    meta: &sled::transaction::TransactionalTree,
    task_id: &str,
    notes: &Notifications,
) -> TxResult<()> {
    if let Some(old) = outbox.get(head_key(task_id))? {
        let latest = u32_from(&old);
        let first = latest
            .saturating_sub(MAX_EVENTS_PER_TASK)
            .saturating_add(1)
            .max(1);
        for seq in first..=latest {
            let key = record_key(task_id, seq);
            let Some(bytes) = outbox.get(&key)? else {
                continue;
            };
            if let Ok(n) = decode_notification(&bytes, task_id) {
                if let Some(at) = n.due() {
                    outbox.remove(notify_due_key(at, &key))?;
                }
                bump_key(meta, notify_count_key(n.state), -1)?;
            }
            outbox.remove(key)?;
        }
        outbox.remove(head_key(task_id))?;
    }
    let Some(head) = &notes.head else {
        return Ok(());
    };
    outbox.insert(head_key(task_id), head.clone())?;
    for (seq, bytes) in &notes.records {
        match decode_notification(bytes, task_id) {
            Ok(n) => write_notification(outbox, meta, None, &n)?,
            Err(_) => {
                outbox.insert(record_key(task_id, *seq), bytes.clone())?;
            }
        }
    }
    Ok(())
}

impl Store {
    /// Up to `limit` tasks whose key is after `after` (exclusive, raw bytes: see
    /// [`TaskCopy::key`]) in key order. The chunk's records and their notifications are read
    /// in one transaction: each copy is a state the task had at one moment, with the
    /// notifications it had then, even while writes continue (a task that settles after its
    /// record was read is copied unsettled and without that settle's notification, so a
    /// restored copy settles once and announces it once). (Schema-1 entries left in `events`
    /// belong to records that do not change: undecodable ones, or entries that could not be
    /// decoded.)
    pub fn read_tasks(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<TaskCopy>, StoreError> {
        let start = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Unbounded,
        };
        let keys = self
            .inner
            .tasks
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .keys()
            .take(limit)
            .collect::<Result<Vec<_>, _>>()?;
        let i = &*self.inner;
        // Reads only (sled transactions allow no scans): the writer's transactions and this
        // one exclude each other, so every pair is as one transaction left it.
        let read = (&i.tasks, &i.outbox)
            .transaction(|(tasks, outbox)| {
                let mut out = Vec::with_capacity(keys.len());
                for key in &keys {
                    // Gone since the scan (pruned): not copied.
                    let Some(record) = tasks.get(key)? else {
                        continue;
                    };
                    out.push((key.clone(), record, read_notifications(outbox, key)?));
                }
                Ok(out)
            })
            .map_err(|e| self.tx_error(e))?;
        read.into_iter()
            .map(|(key, record, notes)| self.copy_of(key, record, notes))
            .collect()
    }

    /// One task as [`Store::read_tasks`] reads it, or `None` if it is not (any more) here.
    pub fn read_task(&self, task_id: &str) -> Result<Option<TaskCopy>, StoreError> {
        let key = task_id.as_bytes();
        let i = &*self.inner;
        let read = (&i.tasks, &i.outbox)
            .transaction(|(tasks, outbox)| match tasks.get(key)? {
                Some(record) => Ok(Some((record, read_notifications(outbox, key)?))),
                None => Ok(None),
            })
            .map_err(|e| self.tx_error(e))?;
        read.map(|(record, notes)| self.copy_of(sled::IVec::from(key), record, notes))
            .transpose()
    }

    fn copy_of(
        &self,
        key: sled::IVec,
        record: sled::IVec,
        notifications: Notifications,
    ) -> Result<TaskCopy, StoreError> {
        let id = &*String::from_utf8_lossy(&key).into_owned();
        let task = match self.decode_at(&key, &record, id) {
            Ok(task) => Some(task),
            Err(e) if e.is_undecodable() => None,
            Err(e) => return Err(e),
        };
        let mut prefix = key.to_vec();
        prefix.push(0);
        let events = self
            .inner
            .events
            .scan_prefix(prefix)
            .take(MAX_EVENTS_PER_TASK as usize)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TaskCopy {
            task_id: id.to_string(),
            key,
            task,
            record,
            events,
            notifications,
        })
    }

    /// Writes tasks read by [`Store::read_tasks`] (from another store) into this one, in one
    /// transaction, with their history, their notifications, every index derived from the
    /// record, the notification counters and the statistics `admin status` reads (stored
    /// bytes, the quarantine index: `stats`), never the source's. A task already here is
    /// replaced, indexes and notifications included.
    pub fn put_copies(&self, copies: &[TaskCopy]) -> Result<(), StoreError> {
        let i = &*self.inner;
        let _changing = i.stats_gate.hold();
        let result = i.records_transaction(|trees| {
            let indexes = trees.indexes();
            for copy in copies {
                let id = copy.task_id.as_str();
                put_notifications(trees.outbox, trees.meta, id, &copy.notifications)?;
                let Some(task) = &copy.task else {
                    for (k, v) in &copy.events {
                        trees.events.insert(k.clone(), v.clone())?;
                    }
                    trees.tasks.insert(id.as_bytes(), copy.record.clone())?;
                    stats::note_record(trees.meta, id.as_bytes(), false)?;
                    continue;
                };
                let old = match trees.tasks.get(id.as_bytes())? {
                    Some(bytes) => {
                        Some(decode(&bytes, id).map_err(ConflictableTransactionError::Abort)?)
                    }
                    None => None,
                };
                indexes.derive(id, old.as_ref(), Some(task))?;
                if let Some(music) = &task.music_task_id
                    && task.kind == crate::model::Kind::Cover
                {
                    trees.by_music.insert(music.as_bytes(), id.as_bytes())?;
                }
                for (k, v) in &copy.events {
                    trees.events.insert(k.clone(), v.clone())?;
                }
                trees.tasks.insert(id.as_bytes(), copy.record.clone())?;
                stats::note_record(trees.meta, id.as_bytes(), true)?;
            }
            Ok(())
        });
        result.map_err(|e| self.tx_error(e))
    }

    /// Copies every tree that is neither task data nor derived from it (`intents`, and
    /// whatever trees later versions add), and `meta`'s entries other than its own, into
    /// `dest`. Entry by entry: each entry as it was when read.
    pub fn copy_other_trees(&self, dest: &Store) -> Result<u64, StoreError> {
        let mut copied = 0u64;
        for name in self.inner.db.tree_names() {
            if name.as_ref() == SLED_DEFAULT_TREE
                || TASK_TREES.iter().any(|t| t.as_bytes() == name.as_ref())
            {
                continue;
            }
            let meta = name.as_ref() == b"meta";
            let from = self.inner.db.open_tree(&name)?;
            let to = dest.inner.db.open_tree(&name)?;
            for kv in from.iter() {
                let (k, v) = kv?;
                if meta && own_meta_key(&k) {
                    continue;
                }
                to.insert(k, v)?;
                copied += 1;
            }
        }
        Ok(copied)
    }

    /// Flushes synchronously (a store written by backup or restore, not the daemon's).
    pub fn flush_now(&self) -> Result<(), StoreError> {
        self.inner.db.flush()?;
        Ok(())
    }

    /// Finished tasks (`downloaded`, `failed`) whose last change is before `cutoff`, among
    /// the next `limit` task records after key `after` (exclusive, raw bytes) in key order.
    /// Returns them and the last key looked at (`None` at the end of the store). A task with
    /// a notification still pending is left out, and so is a record whose key is not a valid
    /// task id or differs from the id inside it (damage, or a crafted record: nothing is
    /// removed for it, no path is built from it).
    pub fn finished_before(
        &self,
        cutoff: Millis,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<Task>, Option<Vec<u8>>), StoreError> {
        let start = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Unbounded,
        };
        let mut found = Vec::new();
        let mut last = None;
        for kv in self
            .inner
            .tasks
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take(limit)
        {
            let (k, v) = kv?;
            last = Some(k.to_vec());
            let Some(id) = std::str::from_utf8(&k).ok().filter(|id| valid_task_id(id)) else {
                tracing::warn!(key = %String::from_utf8_lossy(&k), "a task record's key is not a valid task id; left alone");
                continue;
            };
            match self.decode_checked(&v, id) {
                Ok(task) if task.task_id != id => {
                    tracing::warn!(key = id, task_id = %task.task_id, "a task record's id differs from its key; left alone");
                }
                Ok(task)
                    if task.state.is_finished()
                        && task.updated_at < cutoff
                        && !self.has_pending_notification(id)? =>
                {
                    found.push(task)
                }
                Ok(_) => {}
                // A quarantined record is never pruned: what it holds is unknown.
                Err(e) if e.is_undecodable() => {}
                Err(e) => return Err(e),
            }
        }
        Ok((found, last))
    }

    /// Forgets a finished task: record, history, indexes and notifications (outbox entries
    /// and their counters), in one transaction. Only if it is still finished and unchanged
    /// since `updated_at` (a task that moved meanwhile, e.g. by `admin retry`, is kept) and
    /// none of its notifications is still pending (it is not done for the operator yet).
    /// Returns whether it was removed. The caller removes its
    /// images afterwards. Blocking.
    pub fn forget(&self, task_id: &str, updated_at: Millis) -> Result<bool, StoreError> {
        self.forget_task(task_id, updated_at, false)
    }

    /// [`Store::forget`]; with `force` (`admin forget --force`) also an unfinished task, and
    /// its notifications even if one is still pending.
    pub fn forget_task(
        &self,
        task_id: &str,
        updated_at: Millis,
        force: bool,
    ) -> Result<bool, StoreError> {
        // Only a task id names a task (its images' directory is built from it).
        if !valid_task_id(task_id) {
            return Ok(false);
        }
        let i = &*self.inner;
        let _changing = i.stats_gate.hold();
        // Schema-1 history entries still under its id (normally none).
        let mut prefix = task_id.as_bytes().to_vec();
        prefix.push(0);
        let legacy = i
            .events
            .scan_prefix(prefix)
            .keys()
            .collect::<Result<Vec<_>, _>>()?;
        let result = i.records_transaction(|trees| {
            let Some(bytes) = trees.tasks.get(task_id.as_bytes())? else {
                return Ok(false);
            };
            let task = decode(&bytes, task_id).map_err(ConflictableTransactionError::Abort)?;
            if task.task_id != task_id
                || !(force || task.state.is_finished())
                || task.updated_at != updated_at
            {
                return Ok(false);
            }
            // Its notifications go with it; one still pending keeps the task (unless forced).
            if !drop_notifications(trees.outbox, trees.meta, task_id, force)? {
                return Ok(false);
            }
            trees.indexes().derive(task_id, Some(&task), None)?;
            if let Some(music) = &task.music_task_id
                && trees.by_music.get(music.as_bytes())?.as_deref() == Some(task_id.as_bytes())
            {
                trees.by_music.remove(music.as_bytes())?;
            }
            for key in &legacy {
                trees.events.remove(key.clone())?;
            }
            trees.tasks.remove(task_id.as_bytes())?;
            stats::note_record(trees.meta, task_id.as_bytes(), true)?;
            Ok(true)
        });
        result.map_err(|e| self.tx_error(e))
    }
}
