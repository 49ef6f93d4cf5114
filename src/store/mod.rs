//! The store: the only module that touches sled. Owns the trees, their keys, atomic multi-tree
//! updates (one update, or a batch of them in one transaction: `apply_one` inside
//! `Core::apply_batch`), the due-indexes, and group commit (`writer`: many writers share one
//! transaction and one flush). Must not do network or image-file I/O; the rules of what may
//! change live in `machine`, not here.
//!
//! One role per file, each saying in its first line what it owns and must not touch: this
//! file holds the design notes, the wiring (`Store` → `Inner` → `Core`) and the write path's
//! surface; `open` and `health` the handle's lifecycle, `hooks` its test hooks; `error` and
//! `record` the errors (a record's codec result as a store error); `keys` the encodings of
//! keys and counters; `apply` the batch transaction, with `history` (a record's history),
//! `index` (what is derived from a record) and `outbox` (notifications); `read` (records,
//! quarantine), `due`, `intent` and `list` the reads; `migrate` the schema check and
//! migrations; `stats`, `copy`, `parked`, `codec` and `writer` as their own docs say.
//!
//! Trees of schema 3 (`SCHEMA_VERSION`; a schema-1 store is migrated in `open`, see
//! `migrate`, then a schema-2 one by deriving `stats`), all keys' numbers
//! big-endian so byte order is numeric order:
//! - `meta`: `format` marker, `schema_version` (u32), per-state counters `count/<code>` (u64);
//!   the bytes of stored files `stats/bytes` (u64) and the quarantine index
//!   `quarantine/<record key>` → () (`stats`: what `admin status` reads without a scan);
//! - `tasks`: task id → `StoredTask` (see `codec`): the record with its whole history
//!   inline (at most `MAX_EVENTS_PER_TASK` entries past which repetitive notes are dropped);
//! - `due_download`, `due_poll`: due ms (u64), task id → () — what is due when; derived from
//!   the task record in the same transaction, so it can never disagree with it;
//! - `by_state`, in two key spaces (first byte):
//!   - state code (u8), created ms (u64), task id → () — unfinished tasks only
//!     (`submitted`, `received`): their listings and "oldest". Finished tasks have no entry
//!     (a key per task costs sled ~120 B on disk and ~33 MiB of RSS per million,
//!     docs/benchmarks.md);
//!   - `RECENT` (0xff), seq (u64) → task id: the last `RECENT_TASKS` tasks created, a ring
//!     (`meta`'s `recent/seq` is the next seq), from which `list` answers newest-first
//!     listings without a scan; rebuilt from the records after a migration or a restore;
//! - `events`: schema 1's history, task id, 0x00, seq (u32) → `StoredEvent`: empty after the
//!   migration except for the history of records it could not decode (quarantined), which
//!   stays readable (`history`) and is copied with them;
//! - `by_music`: music task id → cover task id — idempotent `submit`;
//! - `intents`: music task id → ms — covers requested from KIE whose answer is not stored yet;
//! - `outbox`: outbound notifications, written in the same transaction as the settle they
//!   announce, in three key spaces (first byte):
//!   - `n`, task id, 0x00, seq (u32) → `StoredNotification`, one per settle;
//!   - `h`, task id → latest seq (u32): the next settle's seq and the latest notification
//!     are point reads;
//!   - `d`, due ms (u64), task id, 0x00, seq → () — the due-index of pending notifications
//!     (`due_notify`), derived from the record in the same transaction. (One tree, not two:
//!     `apply` already spans sled's largest transactional tuple.)
//!
//! - `parked`: task id, 0x00, id (u64) → `StoredParked`: callbacks for task records that
//!   cannot be decoded, kept as they arrived until the record can be read (`parked`).
//!
//! `meta` also holds notification counters `notify/<code>` (u64) per `NotifyState`.
//!
//! Blocking: every method here is synchronous except the writer's. From async code, an update
//! goes through [`Store::apply_async`] (or [`Store::try_apply_async`], which refuses when the
//! writer's queue is full): the writer thread applies it in its next batch, off the runtime.
//! A scan whose size grows with the store (`all_tasks` and what is built on it: status,
//! verify, export, backup, prune in `admin`; `list` of finished tasks) runs off the runtime's
//! worker threads, with `spawn_blocking`. Single-key reads and writes (`get`, `counts`, one
//! task's history, intents, the health stamp) and range reads bounded by a small limit
//! (`due_*`/`*_queue`/`next_*_due`, `list` of an unfinished state with the caller's limit)
//! may run inline: they land in sled's cache and in-memory log, and never wait for the disk.
//! The disk waits are the flusher thread's; [`Store::durable`] only awaits its result.
//! [`Store::apply`] (tests, offline tools) runs its own transaction on the calling thread;
//! sled serializes it with the writer's.
//!
//! A task record that cannot be decoded is quarantined (in memory, logged once): the due
//! queues skip it, so workers never pick it again, and scans go on past it.

mod apply;
pub mod codec;
mod copy;
mod due;
mod error;
mod health;
mod history;
#[cfg(any(test, feature = "testing"))]
mod hooks;
mod index;
mod intent;
mod keys;
mod list;
mod migrate;
mod open;
mod outbox;
mod parked;
mod read;
mod record;
mod stats;
pub mod summary;
mod writer;

pub use copy::TaskCopy;
pub use error::{StoreError, describe, describe_io};
pub use list::RECENT_TASKS;
pub use migrate::MIGRATION_PROGRESS_EVERY;
pub use open::UNFINISHED_RESTORE;
pub use parked::{MAX_PARKED, MAX_PARKED_PER_TASK, Parked};
pub use stats::{MAX_QUARANTINED_SHOWN, StatsCheck, StatsVerdict};
pub use writer::StoreThread;
#[cfg(any(test, feature = "testing"))]
pub use writer::WritesPaused;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::machine::{Ctx, Event, Outcome};
use crate::model::{State, Task};

/// The schema this build writes and understands. Bump with a migration in `migrate`.
pub const SCHEMA_VERSION: u32 = 3;

/// Past this many history entries, repetitive notes (duplicates, polls, retries) are dropped;
/// state changes are always kept.
pub const MAX_EVENTS_PER_TASK: u32 = 1000;

/// A task record that cannot be decoded: the workers skip it and `admin status`, `verify`
/// and `export` name it (SPEC "Signals, failures, exit status").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub task_id: String,
    /// "corrupt record (…)" or "written by a newer coverd (…)".
    pub reason: String,
    /// The record's key as stored (`task_id` is its lossy text).
    pub key: Vec<u8>,
}

/// One record of a whole-store scan.
#[derive(Debug)]
pub enum Scanned {
    Task(Box<Task>),
    Quarantined(Quarantined),
}

/// What to do when an event names a task the store does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMissing {
    Create,
    Reject,
}

/// The result of one atomic update.
#[derive(Debug)]
pub struct Applied {
    pub before: Option<State>,
    pub task: Task,
    pub outcome: Outcome,
    /// Pass to [`Store::durable`] to wait until this update is on disk.
    pub ticket: u64,
}

/// Notifications per delivery state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NotifyCounts {
    pub pending: u64,
    pub delivered: u64,
    pub undeliverable: u64,
}

/// Per-state task counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub submitted: u64,
    pub received: u64,
    pub downloaded: u64,
    pub failed: u64,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

// Why three levels, `Store` → `Inner` → `Core`: `Store` is the handle every part clones (an
// `Arc`); the last clone dropped closes the store. `Core` is what the writer's threads need to
// apply batches (sled, the trees, health), so they hold an `Arc<Core>`. `Inner` is the one
// owner of both, and of the order they close in: it cannot be `Core` itself, because the
// threads would then hold the handle whose drop joins them (a cycle of `Arc`s: the store
// never closes), and it cannot be `Store`, which must stay cheap to clone. `Deref` to `Core`
// lets store code read `self.inner.tasks` without naming the level.
//
// Field order is drop order: the writer's threads (which hold the `Core`, with its `sled::Db`
// and trees) are joined first, then the `Core` (sled's handles) is dropped, and `closed` last
// waits until sled's lock is free. (`open_with` keeps the same order for its locals.)
struct Inner {
    writer: writer::Writer,
    core: Arc<Core>,
    _closed: open::ReleaseOnDrop,
}

impl std::ops::Deref for Inner {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

/// Everything but the writer: shared by the store's handles and the writer's threads.
struct Core {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    tasks: sled::Tree,
    events: sled::Tree,
    due_download: sled::Tree,
    due_poll: sled::Tree,
    by_state: sled::Tree,
    by_music: sled::Tree,
    intents: sled::Tree,
    outbox: sled::Tree,
    parked: sled::Tree,
    /// Woken after a transaction that made a notification due (new settle, redeliver).
    outbox_wake: Arc<tokio::sync::Notify>,
    /// Reads of a task record that could not be decoded, for tests: proves that workers
    /// skip a quarantined record instead of reading it again and again.
    undecodable_reads: AtomicU64,
    /// Task records found undecodable since open, by id. The due queues skip them, so the
    /// workers never pick them again. At most one entry per record in `tasks`.
    quarantine: std::sync::Mutex<std::collections::BTreeMap<String, Quarantined>>,
    /// Held by every transaction that changes task records, and by `admin verify`'s repair
    /// of the statistics derived from them (`stats`).
    stats_gate: stats::Gate,
    /// Tickets handed out: one per update, taken after the update (group commit).
    written: Arc<AtomicU64>,
    health: Arc<health::Health>,
}

impl Store {
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.size_on_disk()?)
    }

    /// Applies `event` to task `task_id` through the state machine, atomically with its
    /// history and indexes. Returns `None` for an unknown task with [`IfMissing::Reject`].
    /// Blocking (sled), on the calling thread, in a transaction of its own; in async code use
    /// [`Store::apply_async`], which goes through the writer's batches.
    pub fn apply(
        &self,
        task_id: &str,
        event: &Event,
        ctx: &Ctx,
        if_missing: IfMissing,
    ) -> Result<Option<Applied>, StoreError> {
        let write = writer::Write::new(task_id, event.clone(), *ctx, if_missing);
        self.inner
            .apply_batch(std::slice::from_ref(&write))
            .into_iter()
            .next()
            .unwrap_or(Ok(None))
    }

    /// [`Store::apply`] through the store's writer thread: waits for room in its queue, then
    /// until the batch holding this update is applied and flushed, so [`Store::durable`]
    /// answers at once for its ticket (an error there if that flush failed). Dropping the
    /// future only stops waiting: the update is applied anyway if it was queued.
    pub async fn apply_async(
        &self,
        task_id: &str,
        event: Event,
        ctx: Ctx,
        if_missing: IfMissing,
    ) -> Result<Option<Applied>, StoreError> {
        let write = writer::Write::new(task_id, event, ctx, if_missing);
        self.inner.writer.apply(write).await
    }

    /// [`Store::apply_async`], but a full queue is [`StoreError::Busy`] at once instead of a
    /// wait: the callback intake answers 503 then, so KIE retries.
    pub async fn try_apply_async(
        &self,
        task_id: &str,
        event: Event,
        ctx: Ctx,
        if_missing: IfMissing,
    ) -> Result<Option<Applied>, StoreError> {
        let write = writer::Write::new(task_id, event, ctx, if_missing);
        self.inner.writer.try_apply(write).await
    }

    /// Waits until the update with `ticket` (and every one before it) is durable, against
    /// power loss too (see `writer`): at once for a ticket of [`Store::apply_async`], whose
    /// batch was flushed before it answered. Concurrent callers share one flush round; the
    /// round is run by the store's flusher thread, so dropping this future (a client gone)
    /// cannot start a second flush or leave one half done.
    pub async fn durable(&self, ticket: u64) -> Result<(), StoreError> {
        self.inner
            .writer
            .durable(ticket)
            .await
            .map_err(StoreError::Flush)
    }

    /// Flushes everything written so far (shutdown, admin writes, writes outside `apply`
    /// such as submit intents). Shares the group commit: a fresh ticket is covered only by
    /// a round that starts after this call. (Only the flusher thread flushes: unbounded
    /// concurrent `flush_async` calls deadlock sled 0.34, each blocking one of its global
    /// I/O threads until the log is written while the log write is queued behind them.)
    pub async fn flush(&self) -> Result<(), StoreError> {
        let ticket = self.inner.written.fetch_add(1, Ordering::SeqCst) + 1;
        self.durable(ticket).await
    }

    /// Flush rounds run since open; fewer than the callers of [`Store::durable`] when group
    /// commit shares them.
    pub fn group_flushes(&self) -> u64 {
        self.inner.writer.rounds()
    }

    /// Batches the writer applied since open, one transaction each; fewer than the updates
    /// of [`Store::apply_async`] ([`Store::batched_writes`]) when they share batches.
    pub fn write_batches(&self) -> u64 {
        self.inner.writer.batches()
    }

    /// Updates applied through the writer since open.
    pub fn batched_writes(&self) -> u64 {
        self.inner.writer.applied()
    }

    /// Updates waiting in the writer's queue (not yet taken into a batch).
    pub fn queued_writes(&self) -> usize {
        self.inner.writer.queued()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::history::{
        ENTRY_OVERHEAD, MAX_DETAIL_BYTES, MAX_HISTORY_BYTES, append_history, fit_history,
    };
    use super::keys::{event_key, state_key, time_key, u32_from};
    use super::list::RECENT;
    use super::migrate::{FORMAT_MARKER, V1_BY_CREATED};
    use super::open::LOCK_RELEASE_LIMIT;
    use super::*;
    use crate::machine::{self, Delivery, Report};
    use crate::model::{EventKind, EventRecord, Millis, NotifyState};

    fn ctx(now: Millis) -> Ctx {
        Ctx {
            now,
            max_attempts: 3,
            poll_after_ms: 1000,
            notify: true,
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn track(store: &Store, id: &str, now: Millis) -> Applied {
        store
            .apply(
                id,
                &Event::Track {
                    music_task_id: Some(format!("m-{id}")),
                },
                &ctx(now),
                IfMissing::Create,
            )
            .unwrap()
            .unwrap()
    }

    fn callback(n: usize) -> Event {
        Event::Callback(Report::Success {
            images: (0..n).map(|i| format!("https://h/{i}.png")).collect(),
        })
    }

    fn stored(index: u32) -> Event {
        Event::ImageStored {
            index,
            path: format!("images/a/{index}.png"),
            bytes: 1,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn a_settle_enqueues_its_notification_in_the_same_write() {
        let (_d, store) = open();
        track(&store, "a", 1);
        store
            .apply("a", &callback(1), &ctx(2), IfMissing::Reject)
            .unwrap();
        assert_eq!(store.latest_notification("a").unwrap(), None);
        assert_eq!(store.next_notification_due().unwrap(), None);
        store
            .apply("a", &stored(0), &ctx(3), IfMissing::Reject)
            .unwrap();

        let n = store.latest_notification("a").unwrap().unwrap();
        assert_eq!((n.seq, n.webhook_id.as_str()), (1, "msg_a_1_3"));
        assert_eq!(n.kind, crate::model::NotifyType::Downloaded);
        assert_eq!(n.state, NotifyState::Pending);
        let body: serde_json::Value = serde_json::from_str(&n.body).unwrap();
        assert_eq!(body["type"], "cover.downloaded");
        assert_eq!(body["data"]["state"], "downloaded");
        assert!(body["data"].get("events").is_none() && body["data"].get("notify").is_none());
        assert_eq!(
            store.due_notifications(3, 10).unwrap(),
            vec![("a".to_string(), 1)]
        );
        assert!(store.due_notifications(2, 10).unwrap().is_empty());
        assert_eq!(store.notify_counts().unwrap().pending, 1);

        // A duplicate callback on the settled task enqueues nothing.
        store
            .apply("a", &callback(1), &ctx(4), IfMissing::Reject)
            .unwrap();
        assert_eq!(store.latest_notification("a").unwrap().unwrap().seq, 1);

        // A failed attempt: still pending, due later; then delivered: out of the index.
        let failed = Delivery::Failed {
            reason: "HTTP 500".into(),
            retry_at: 100,
        };
        let n = store
            .record_delivery("a", 1, &failed, 3, 5)
            .unwrap()
            .unwrap();
        assert_eq!((n.state, n.attempts), (NotifyState::Pending, 1));
        assert!(store.due_notifications(99, 10).unwrap().is_empty());
        assert_eq!(store.next_notification_due().unwrap(), Some(100));
        let ok = Delivery::Delivered {
            detail: "HTTP 200".into(),
        };
        let n = store.record_delivery("a", 1, &ok, 3, 100).unwrap().unwrap();
        assert_eq!((n.state, n.attempts), (NotifyState::Delivered, 2));
        assert_eq!(store.next_notification_due().unwrap(), None);
        let c = store.notify_counts().unwrap();
        assert_eq!((c.pending, c.delivered, c.undeliverable), (0, 1, 0));

        // Redeliver: the same message is due again.
        let n = store.redeliver("a", 200).unwrap().unwrap();
        assert_eq!(
            (n.webhook_id.as_str(), n.state),
            ("msg_a_1_3", NotifyState::Pending)
        );
        assert_eq!(
            store.due_notifications(200, 10).unwrap(),
            vec![("a".to_string(), 1)]
        );
        assert_eq!(store.redeliver("nope", 200).unwrap(), None);

        // A second settle (retry of a damaged image, stored again) is a new message.
        store
            .apply(
                "a",
                &Event::Retry { damaged: vec![0] },
                &ctx(300),
                IfMissing::Reject,
            )
            .unwrap();
        store
            .apply("a", &stored(0), &ctx(301), IfMissing::Reject)
            .unwrap();
        let n = store.latest_notification("a").unwrap().unwrap();
        assert_eq!((n.seq, n.webhook_id.as_str()), (2, "msg_a_2_301"));
        assert_eq!(store.notify_counts().unwrap().pending, 2);
        assert_eq!(
            store.notification("a", 1).unwrap().unwrap().webhook_id,
            "msg_a_1_3"
        );
    }

    #[test]
    fn notifications_off_enqueue_nothing() {
        let (_d, store) = open();
        let off = Ctx {
            notify: false,
            ..ctx(1)
        };
        store
            .apply(
                "a",
                &Event::Callback(Report::Failure { reason: "x".into() }),
                &off,
                IfMissing::Create,
            )
            .unwrap();
        assert_eq!(store.get("a").unwrap().unwrap().state, State::Failed);
        assert_eq!(store.latest_notification("a").unwrap(), None);
        assert_eq!(store.next_notification_due().unwrap(), None);
        assert_eq!(store.notify_counts().unwrap(), NotifyCounts::default());
    }

    #[test]
    fn apply_keeps_record_history_and_indexes_together() {
        let (_d, store) = open();
        track(&store, "a", 10);
        assert_eq!(store.due_polls(1010, 10).unwrap(), vec!["a"]);
        assert!(store.due_polls(1009, 10).unwrap().is_empty());
        assert_eq!(store.task_for_music("m-a").unwrap().as_deref(), Some("a"));

        let applied = store
            .apply("a", &callback(2), &ctx(20), IfMissing::Reject)
            .unwrap()
            .unwrap();
        assert_eq!(applied.task.state, State::Received);
        assert!(
            store.due_polls(i64::MAX - 1, 10).unwrap().is_empty(),
            "poll entry removed"
        );
        assert_eq!(store.due_downloads(20, 10).unwrap(), vec!["a"]);
        assert_eq!(store.next_download_due().unwrap(), Some(20));

        let kinds: Vec<_> = store.events("a").unwrap().iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::Submitted,
                EventKind::Callback,
                EventKind::Received
            ]
        );
        assert_eq!(
            store.counts().unwrap(),
            Counts {
                received: 1,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn unknown_tasks_are_rejected_or_created() {
        let (_d, store) = open();
        assert!(
            store
                .apply("x", &callback(1), &ctx(1), IfMissing::Reject)
                .unwrap()
                .is_none()
        );
        assert!(store.get("x").unwrap().is_none());
        let a = store
            .apply("x", &callback(1), &ctx(1), IfMissing::Create)
            .unwrap()
            .unwrap();
        assert_eq!(a.before, None);
        assert_eq!(a.task.state, State::Received);
        assert_eq!(store.counts().unwrap().received, 1);
    }

    #[test]
    fn listing_counts_and_oldest() {
        let (_d, store) = open();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            track(&store, id, 100 + i as i64);
        }
        store
            .apply("b", &callback(1), &ctx(200), IfMissing::Reject)
            .unwrap();
        let ids = |v: Vec<Task>| v.into_iter().map(|t| t.task_id).collect::<Vec<_>>();
        assert_eq!(ids(store.list(None, 10).unwrap()), vec!["c", "b", "a"]);
        assert_eq!(ids(store.list(None, 2).unwrap()), vec!["c", "b"]);
        assert_eq!(
            ids(store.list(Some(State::Submitted), 10).unwrap()),
            vec!["c", "a"]
        );
        assert_eq!(
            ids(store.list(Some(State::Received), 10).unwrap()),
            vec!["b"]
        );
        assert_eq!(store.oldest_unfinished().unwrap().unwrap().task_id, "a");
        let c = store.counts().unwrap();
        assert_eq!((c.submitted, c.received), (2, 1));
    }

    #[test]
    fn history_of_repetitive_events_is_bounded() {
        let (_d, store) = open();
        track(&store, "a", 1);
        store
            .apply("a", &callback(1), &ctx(2), IfMissing::Reject)
            .unwrap();
        for i in 0..(MAX_EVENTS_PER_TASK + 50) {
            store
                .apply("a", &callback(1), &ctx(3 + i64::from(i)), IfMissing::Reject)
                .unwrap();
        }
        let t = store.get("a").unwrap().unwrap();
        assert_eq!(t.callbacks, MAX_EVENTS_PER_TASK + 51);
        assert_eq!(
            store.events("a").unwrap().len(),
            MAX_EVENTS_PER_TASK as usize
        );
    }

    #[test]
    fn repeated_track_does_not_grow_history_without_bound() {
        let (_d, store) = open();
        for i in 0..(MAX_EVENTS_PER_TASK + 50) {
            track(&store, "a", 1 + i64::from(i));
        }
        let kinds: Vec<EventKind> = store.events("a").unwrap().iter().map(|e| e.kind).collect();
        assert_eq!(kinds.len(), MAX_EVENTS_PER_TASK as usize);
        assert_eq!(kinds[0], EventKind::Submitted);
        // State changes are still recorded past the bound.
        store
            .apply("a", &callback(1), &ctx(5000), IfMissing::Reject)
            .unwrap();
        let after = store.events("a").unwrap();
        assert_eq!(after.last().unwrap().kind, EventKind::Received);
    }

    #[test]
    fn undecodable_records_are_quarantined_and_skipped() {
        let (_d, store) = open();
        for (i, id) in ["bad", "newer", "good"].iter().enumerate() {
            track(&store, id, 10 + i as i64);
            store
                .apply(id, &callback(1), &ctx(20 + i as i64), IfMissing::Reject)
                .unwrap();
        }
        store.put_raw_task("bad", b"\xff\xff garbage").unwrap();
        let mut newer = codec::encode_task(&store.get("newer").unwrap().unwrap(), &[]).unwrap();
        // The envelope index of the next version: what a newer coverd writes.
        newer[..4].copy_from_slice(&codec::ENVELOPE_VERSION.to_le_bytes());
        store.put_raw_task("newer", &newer).unwrap();
        let ids = |q: Vec<(Millis, String)>| q.into_iter().map(|e| e.1).collect::<Vec<_>>();
        // Not known yet: the queue still offers them; a read quarantines them.
        assert_eq!(
            ids(store.download_queue(10).unwrap()),
            ["bad", "newer", "good"]
        );
        let err = store.get("bad").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }) && err.is_undecodable());
        let err = store.get("newer").unwrap_err();
        assert!(matches!(err, StoreError::Newer { found: 3, .. }), "{err}");
        assert!(
            err.to_string().contains("written by a newer coverd"),
            "{err}"
        );
        assert_eq!(ids(store.download_queue(10).unwrap()), ["good"]);
        assert_eq!(ids(store.download_queue(1).unwrap()), ["good"]);
        assert_eq!(store.next_download_due().unwrap(), Some(22));
        assert_eq!(store.due_downloads(100, 10).unwrap(), ["good"]);
        // An update of a quarantined task fails the same way, and changes nothing.
        let err = store
            .apply("newer", &callback(1), &ctx(30), IfMissing::Reject)
            .unwrap_err();
        assert!(matches!(err, StoreError::Newer { .. }), "{err}");

        // Scans go on past them.
        let names: Vec<String> = store
            .quarantined(100)
            .unwrap()
            .0
            .into_iter()
            .map(|q| format!("{}: {}", q.task_id, q.reason))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].starts_with("bad: corrupt ("), "{names:?}");
        assert!(
            names[1].starts_with("newer: written by a newer coverd"),
            "{names:?}"
        );
        let listed: Vec<String> = store
            .list(None, 10)
            .unwrap()
            .into_iter()
            .map(|t| t.task_id)
            .collect();
        assert_eq!(listed, ["good"]);
        assert_eq!(store.oldest_unfinished().unwrap().unwrap().task_id, "good");

        // A damaged history entry (one schema 1 left beside the record, which the migration
        // could not decode): the rest of the history is still read.
        store
            .inner
            .events
            .insert(event_key("good", 1), b"\x05\x00\x00".to_vec())
            .unwrap();
        assert!(store.events("good").unwrap_err().is_undecodable());
        let (events, damaged) = store.history("good").unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(damaged.len(), 1);
        assert!(
            damaged[0].starts_with("history entry 1: corrupt"),
            "{damaged:?}"
        );
    }

    #[tokio::test]
    async fn group_commit_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let tickets: Vec<u64> = (0..20)
                .map(|i| track(&store, &format!("t{i}"), 1).ticket)
                .collect();
            let mut waits = tokio::task::JoinSet::new();
            for t in tickets {
                let store = store.clone();
                waits.spawn(async move { store.durable(t).await });
            }
            while let Some(r) = waits.join_next().await {
                r.unwrap().unwrap();
            }
            // The store is locked while open, in this process too.
            assert!(matches!(
                Store::open(dir.path()),
                Err(StoreError::Locked { .. })
            ));
        }
        // sled releases its lock when its background threads let go of the db, which can
        // be a moment after the last handle is dropped on a loaded machine.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let store = loop {
            match Store::open(dir.path()) {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                other => break other.unwrap(),
            }
        };
        assert_eq!(store.counts().unwrap().submitted, 20);
        store.check_health().await.unwrap();
    }

    /// Ingest throughput with group commit: 64 concurrent writers, each writing one task and
    /// waiting until it is durable, for 3 s. Run by hand to measure the cost of durability:
    /// `cargo test --release --lib ingest_throughput -- --ignored --nocapture`
    /// (in a directory on the disk to measure: `TMPDIR=/var/tmp`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a test"]
    async fn ingest_throughput() {
        let (_d, store) = open();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..64 {
            let store = store.clone();
            writers.spawn(async move {
                let mut n = 0u64;
                while std::time::Instant::now() < deadline {
                    let id = format!("w{w}-{n}");
                    let applied = store
                        .apply_async(
                            &id,
                            Event::Track {
                                music_task_id: None,
                            },
                            ctx(1),
                            IfMissing::Create,
                        )
                        .await
                        .unwrap()
                        .unwrap();
                    store.durable(applied.ticket).await.unwrap();
                    n += 1;
                }
                n
            });
        }
        let mut total = 0;
        while let Some(n) = writers.join_next().await {
            total += n.unwrap();
        }
        println!(
            "ingest: {} durable writes/s, {} flushes",
            total / 3,
            store.group_flushes()
        );
    }

    /// Waiters dropped mid-wait (a client reset, a timeout) never start a second flush: the
    /// flusher thread owns every flush, one at a time, and the store stays usable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_waiters_never_start_a_second_flush() {
        let (_d, store) = open();
        let mut waiters = tokio::task::JoinSet::new();
        for i in 0..200 {
            let store = store.clone();
            waiters.spawn(async move {
                let ticket = track(&store, &format!("c{i}"), 1).ticket;
                // Polled once or a few times, then dropped while its flush runs.
                let wait = store.durable(ticket);
                tokio::pin!(wait);
                for _ in 0..(i % 4) {
                    if futures_poll_once(wait.as_mut()).await.is_some() {
                        return;
                    }
                }
            });
        }
        while let Some(r) = waiters.join_next().await {
            r.unwrap();
        }
        // Still working (no deadlock), everything durable, and never two flushes at once.
        tokio::time::timeout(std::time::Duration::from_secs(60), store.flush())
            .await
            .expect("a flush after cancelled waiters finishes")
            .unwrap();
        assert_eq!(store.max_concurrent_flushes(), 1);
        assert_eq!(store.counts().unwrap().submitted, 200);
    }

    /// Polls `fut` once; `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(fut: F) -> Option<F::Output> {
        let mut fut = fut;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    /// Dropping the last handle (or `close`) releases sled's lock before it returns, even
    /// with waiters dropped mid-flush just before: the directory opens again at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_directory_reopens_at_once_after_close_or_drop() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..100 {
            let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("round {round}: {e}"));
            let tickets: Vec<u64> = (0..8)
                .map(|i| track(&store, &format!("r{round}-{i}"), 1).ticket)
                .collect();
            // Some waiters finish, some are dropped while their flush runs.
            let last = *tickets.last().unwrap();
            {
                let abandoned = store.durable(last);
                tokio::pin!(abandoned);
                let _ = futures_poll_once(abandoned.as_mut()).await;
            }
            if round % 2 == 0 {
                store.durable(tickets[0]).await.unwrap();
                drop(store);
            } else {
                store.close().await.unwrap();
            }
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.counts().unwrap().submitted, 100 * 8);
    }

    fn write(id: &str, event: Event, now: Millis, if_missing: IfMissing) -> writer::Write {
        writer::Write::new(id, event, ctx(now), if_missing)
    }

    /// One batch, one transaction: an update whose record cannot be decoded and one for an
    /// unknown task refused change nothing and stop nothing; two updates of one task see each
    /// other; the counters end where one update at a time would have left them.
    #[test]
    fn a_batch_goes_on_past_a_quarantined_record_and_a_refused_task() {
        let (_d, store) = open();
        track(&store, "bad", 1);
        store.put_raw_task("bad", b"\xff\xff garbage").unwrap();
        let failure = Event::Callback(Report::Failure { reason: "x".into() });
        let out = store.inner.apply_batch(&[
            write("a", callback(1), 2, IfMissing::Create),
            write("bad", callback(1), 2, IfMissing::Reject),
            write("unknown", callback(1), 2, IfMissing::Reject),
            write("a", stored(0), 3, IfMissing::Reject),
            write("b", failure, 4, IfMissing::Create),
        ]);
        let applied = |n: usize| match &out[n] {
            Ok(Some(a)) => (a.before, a.task.state, a.ticket),
            other => panic!("update {n}: {other:?}"),
        };
        let (a1, a2, b) = (applied(0), applied(3), applied(4));
        assert_eq!((a1.0, a1.1), (None, State::Received));
        assert_eq!((a2.0, a2.1), (Some(State::Received), State::Downloaded));
        assert_eq!((b.0, b.1), (None, State::Failed));
        assert!(a1.2 < a2.2 && a2.2 < b.2, "tickets in order: {out:?}");
        assert!(matches!(&out[1], Err(e) if e.is_undecodable()), "{out:?}");
        assert!(matches!(&out[2], Ok(None)), "{out:?}");

        assert_eq!(store.get("unknown").unwrap(), None);
        assert_eq!(store.undecodable_reads(), 1);
        assert_eq!(store.quarantined(100).unwrap().0[0].task_id, "bad");
        let kinds: Vec<_> = store.events("a").unwrap().iter().map(|e| e.kind).collect();
        assert_eq!(kinds.first(), Some(&EventKind::Callback));
        assert_eq!(kinds.last(), Some(&EventKind::Downloaded));
        assert_eq!(
            store.counts().unwrap(),
            Counts {
                submitted: 1,
                received: 0,
                downloaded: 1,
                failed: 1
            }
        );
        assert_eq!(store.notify_counts().unwrap().pending, 2);
        assert!(store.due_polls(i64::MAX - 1, 10).unwrap().is_empty());
    }

    /// Updates queued while the writer is busy are applied as one batch: one transaction and
    /// one flush round for all of them, each answered only after that round, so their
    /// tickets are durable at once. The writer is held (test hook) while they queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_updates_share_one_transaction_and_one_round() {
        let (_d, store) = open();
        track(&store, "bad", 1);
        store.put_raw_task("bad", b"\xff\xff garbage").unwrap();
        store.flush().await.unwrap();
        let (batches, rounds) = (store.write_batches(), store.group_flushes());
        let paused = store.pause_writes();
        let mut set = tokio::task::JoinSet::new();
        let updates = [
            ("w0", IfMissing::Create),
            ("bad", IfMissing::Reject),
            ("nope", IfMissing::Reject),
            ("w1", IfMissing::Create),
            ("w2", IfMissing::Create),
        ];
        for (id, if_missing) in updates {
            let store = store.clone();
            set.spawn(async move {
                let r = store.apply_async(id, callback(1), ctx(5), if_missing).await;
                (id, r)
            });
        }
        // The held writer took one update; the other four wait in its queue.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while store.queued_writes() < updates.len() - 1 {
            assert!(std::time::Instant::now() < deadline, "updates never queued");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(store.write_batches(), batches, "nothing applied while held");
        drop(paused);
        while let Some(r) = set.join_next().await {
            match r.unwrap() {
                ("bad", r) => assert!(r.unwrap_err().is_undecodable()),
                ("nope", r) => assert!(r.unwrap().is_none()),
                (id, r) => {
                    let applied = r.unwrap().unwrap_or_else(|| panic!("{id} applied"));
                    let durable = store.durable(applied.ticket);
                    tokio::pin!(durable);
                    let ready = futures_poll_once(durable.as_mut()).await;
                    assert!(matches!(ready, Some(Ok(()))), "{id}: durable at once");
                }
            }
        }
        assert_eq!(store.write_batches() - batches, 1, "one transaction");
        assert_eq!(store.group_flushes() - rounds, 1, "one flush round");
        assert_eq!(store.counts().unwrap().received, 3);
    }

    /// sled hands out copies of its stored I/O error made from `Debug` text; they reach
    /// `/healthz` and the logs in words.
    #[test]
    fn io_errors_are_described_in_words() {
        let original = sled::Error::Io(std::io::Error::from_raw_os_error(28));
        let copy = original.clone();
        assert!(copy.to_string().contains("Os {"), "sled's copy: {copy}");
        for e in [original, copy] {
            assert_eq!(describe(&e), "No space left on device (os error 28)");
            let text = StoreError::Io(e).to_string();
            assert!(!text.contains("Os {") && !text.contains("kind:"), "{text}");
        }
        let plain = std::io::Error::other("a message of our own");
        assert_eq!(describe_io(&plain), "a message of our own");
    }

    #[tokio::test]
    async fn a_write_failure_is_reported_until_it_is_gone() {
        let (_d, store) = open();
        assert_eq!(store.write_failure(), None);
        store.inject_write_failures(true);
        assert!(store.write_failure().unwrap().contains("injected"));
        assert!(store.check_health().await.is_err());
        let woken = {
            let store = store.clone();
            tokio::spawn(async move { store.writable().await })
        };
        store.inject_write_failures(false);
        woken.await.unwrap();
        assert_eq!(store.write_failure(), None);
        assert!(!store.needs_reopen());
        store.check_health().await.unwrap();
    }

    fn quiet(now: Millis) -> Ctx {
        Ctx {
            notify: false,
            ..ctx(now)
        }
    }

    /// Tasks in every state (with a tie on `created_at` between states), each a list of
    /// events applied one ms apart from its creation.
    pub(crate) fn scripted() -> Vec<(&'static str, Millis, Vec<Event>)> {
        let track = |m: &str| Event::Track {
            music_task_id: Some(m.to_string()),
        };
        let failure = Event::Callback(Report::Failure {
            reason: "KIE code 501: no".into(),
        });
        vec![
            ("a", 100, vec![track("m-a")]),
            ("b", 101, vec![track("m-b"), callback(2)]),
            ("c", 102, vec![failure.clone(), failure]),
            ("d", 102, vec![track("m-d"), callback(1), stored(0)]),
            ("e", 103, vec![track("m-e"), callback(1)]),
        ]
    }

    /// What coverd wrote before schema 2 for `tasks`, from its `apply`: records in the `V1`
    /// envelope, the history in `events`, `by_state` for every task, `by_created`, due
    /// indexes, `by_music`, counters, then `schema_version` = `version`. Ids in `as_v2`
    /// are written as the migration writes them (a run stopped half way); `raw` records
    /// are written as given, with one history entry each. A test-only writer rather than a
    /// directory written by a schema-1 binary: sled's files are large and opaque, while these
    /// few lines state the schema-1 layout (keys and envelopes) the migration reads.
    fn write_v1_store(dir: &Path, version: u32, as_v2: &[&str], raw: &[(&str, &[u8])]) {
        write_v1_tasks(dir, version, as_v2, raw, scripted());
    }

    pub(crate) fn write_v1_tasks(
        dir: &Path,
        version: u32,
        as_v2: &[&str],
        raw: &[(&str, &[u8])],
        script: Vec<(&str, Millis, Vec<Event>)>,
    ) {
        let path = dir.join("db");
        {
            let db = sled::open(&path).unwrap();
            let t = |name: &str| db.open_tree(name).unwrap();
            let (meta, tasks, events) = (t("meta"), t("tasks"), t("events"));
            let (due_dl, due_poll, by_state, by_created, by_music) = (
                t("due_download"),
                t("due_poll"),
                t("by_state"),
                t("by_created"),
                t("by_music"),
            );
            let mut counts = std::collections::BTreeMap::<u8, u64>::new();
            for (id, created, script) in script {
                let mut task = Task::new(id.to_string(), None, created);
                let mut history = Vec::new();
                for (i, event) in script.into_iter().enumerate() {
                    let now = created + i as Millis;
                    let outcome = machine::apply(&mut task, event, &quiet(now));
                    append_history(&mut task, &mut history, &outcome.notes, now);
                }
                if as_v2.contains(&id) {
                    tasks
                        .insert(id, codec::encode_task(&task, &history).unwrap())
                        .unwrap();
                } else {
                    tasks
                        .insert(id, codec::encode_task_v1(&task).unwrap())
                        .unwrap();
                    for (seq, e) in history.iter().enumerate() {
                        events
                            .insert(event_key(id, seq as u32), codec::encode_event(e).unwrap())
                            .unwrap();
                    }
                }
                if !(as_v2.contains(&id) && task.state.is_finished()) {
                    by_state
                        .insert(state_key(task.state, task.created_at, id), &[])
                        .unwrap();
                }
                by_created
                    .insert(time_key(task.created_at, id), &[])
                    .unwrap();
                if let Some(at) = task.download_due() {
                    due_dl.insert(time_key(at, id), &[]).unwrap();
                }
                if let Some(at) = task.poll_due() {
                    due_poll.insert(time_key(at, id), &[]).unwrap();
                }
                if let Some(m) = &task.music_task_id {
                    by_music.insert(m.as_bytes(), id.as_bytes()).unwrap();
                }
                *counts.entry(task.state.code()).or_default() += 1;
            }
            for (id, bytes) in raw {
                tasks.insert(id.as_bytes(), *bytes).unwrap();
                let e = EventRecord {
                    at: 1,
                    kind: EventKind::Tracked,
                    detail: format!("{id} tracked"),
                };
                events
                    .insert(event_key(id, 0), codec::encode_event(&e).unwrap())
                    .unwrap();
            }
            for (code, n) in counts {
                meta.insert([b"count/".as_slice(), &[code]].concat(), &n.to_be_bytes())
                    .unwrap();
            }
            meta.insert("format", FORMAT_MARKER).unwrap();
            meta.insert("schema_version", &version.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        writer::wait_for_lock_release(&path.join("db"), LOCK_RELEASE_LIMIT);
    }

    /// The same tasks written by this build's `apply`.
    pub(crate) fn reference() -> (tempfile::TempDir, Store) {
        let (dir, store) = open();
        for (id, created, script) in scripted() {
            for (i, event) in script.into_iter().enumerate() {
                store
                    .apply(id, &event, &quiet(created + i as Millis), IfMissing::Create)
                    .unwrap();
            }
        }
        (dir, store)
    }

    pub(crate) fn ids(tasks: Vec<Task>) -> Vec<String> {
        tasks.into_iter().map(|t| t.task_id).collect()
    }

    /// `store` reads exactly like `want` (tasks, histories, listings, counts, queues).
    fn assert_same(store: &Store, want: &Store) {
        for (id, _, _) in scripted() {
            assert_eq!(store.get(id).unwrap(), want.get(id).unwrap(), "task {id}");
            assert_eq!(store.events(id).unwrap(), want.events(id).unwrap(), "{id}");
            assert!(!store.events(id).unwrap().is_empty(), "{id}");
        }
        for limit in [1, 2, 3, 10] {
            assert_eq!(
                ids(store.list(None, limit).unwrap()),
                ids(want.list(None, limit).unwrap())
            );
            for s in State::ALL {
                assert_eq!(
                    ids(store.list(Some(s), limit).unwrap()),
                    ids(want.list(Some(s), limit).unwrap()),
                    "{s:?}"
                );
            }
        }
        assert_eq!(store.counts().unwrap(), want.counts().unwrap());
        assert_eq!(store.stored_bytes().unwrap(), want.stored_bytes().unwrap());
        assert_eq!(
            store.download_queue(10).unwrap(),
            want.download_queue(10).unwrap()
        );
        assert_eq!(store.poll_queue(10).unwrap(), want.poll_queue(10).unwrap());
        assert_eq!(
            store.oldest_unfinished().unwrap().map(|t| t.task_id),
            want.oldest_unfinished().unwrap().map(|t| t.task_id)
        );
        assert_eq!(store.task_for_music("m-d").unwrap().as_deref(), Some("d"));
    }

    /// `by_state` entries that index a state (not the ring of recent tasks).
    fn state_entries(store: &Store) -> usize {
        store
            .inner
            .by_state
            .iter()
            .keys()
            .filter(|k| k.as_ref().unwrap()[0] != RECENT)
            .count()
    }

    pub(crate) fn schema_of(store: &Store) -> u32 {
        u32_from(&store.inner.meta.get("schema_version").unwrap().unwrap())
    }

    /// Schema 1's `events` tree is empty and its `by_created` index gone.
    pub(crate) fn schema_1_trees_gone(store: &Store) -> bool {
        store.inner.events.is_empty() && !has_tree(store, V1_BY_CREATED)
    }

    fn has_tree(store: &Store, name: &str) -> bool {
        store
            .inner
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes())
    }

    #[test]
    fn a_schema_1_store_is_migrated_at_open() {
        let (_r, want) = reference();
        let dir = tempfile::tempdir().unwrap();
        let garbage: &[u8] = b"\xff\xff not a record";
        write_v1_store(dir.path(), 1, &[], &[("zz", garbage)]);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(schema_of(&store), SCHEMA_VERSION);
        assert!(!has_tree(&store, V1_BY_CREATED));
        assert_same(&store, &want);
        // Every record now holds its history; finished tasks lost their `by_state` entry.
        for kv in store.inner.tasks.iter() {
            let (k, v) = kv.unwrap();
            if k.as_ref() != b"zz" {
                assert!(matches!(codec::decode_record(&v), Ok((_, Some(_)))));
            }
        }
        assert_eq!(state_entries(&store), 3, "a, b and e");
        // The undecodable record stays as it was, quarantined, its history still read.
        assert!(store.get("zz").unwrap_err().is_undecodable());
        assert_eq!(store.inner.events.len(), 1);
        let (history, damaged) = store.history("zz").unwrap();
        assert_eq!(
            (history[0].detail.as_str(), damaged.len()),
            ("zz tracked", 0)
        );
        assert_eq!(store.quarantined(100).unwrap().0.len(), 1);

        // Reopened: nothing to do; then the tasks go on as usual.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_same(&store, &want);
        store
            .apply("b", &stored(0), &quiet(500), IfMissing::Reject)
            .unwrap();
        let kinds: Vec<_> = store.events("b").unwrap().iter().map(|e| e.kind).collect();
        assert_eq!(kinds.last(), Some(&EventKind::ImageStored));
        assert_eq!(kinds.len(), want.events("b").unwrap().len() + 1);
    }

    /// Issue 14 item 3: schema 1 kept history details whole, so one task's history inlined
    /// could pass the codec's 1 MiB limit and make the migration (and so every start) fail.
    #[test]
    fn a_schema_1_record_with_a_huge_history_is_migrated_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let script = vec![(
            "big1",
            100,
            vec![Event::Track {
                music_task_id: Some("m-big".into()),
            }],
        )];
        write_v1_tasks(dir.path(), 1, &[], &[], script);
        // 20 history entries of 60 KB each beside the record, as schema 1 wrote them.
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            let (tasks, events) = (
                db.open_tree("tasks").unwrap(),
                db.open_tree("events").unwrap(),
            );
            let mut task = codec::decode_task(&tasks.get("big1").unwrap().unwrap()).unwrap();
            for seq in 0..20u32 {
                let e = EventRecord {
                    at: 100 + Millis::from(seq),
                    kind: if seq == 0 {
                        EventKind::Tracked
                    } else {
                        EventKind::Polled
                    },
                    detail: format!("{seq:02}{}", "é".repeat(30_000)),
                };
                events
                    .insert(event_key("big1", seq), codec::encode_event(&e).unwrap())
                    .unwrap();
            }
            task.event_count = 20;
            tasks
                .insert("big1", codec::encode_task_v1(&task).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        writer::wait_for_lock_release(&dir.path().join("db"), LOCK_RELEASE_LIMIT);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(schema_of(&store), SCHEMA_VERSION);
        let history = store.events("big1").unwrap();
        assert_eq!(history.len(), 20, "every entry kept, its detail cut");
        for (seq, e) in history.iter().enumerate() {
            assert!(e.detail.len() <= MAX_DETAIL_BYTES, "entry {seq}");
            assert!(e.detail.starts_with(&format!("{seq:02}é")), "entry {seq}");
        }
        // The task goes on as usual.
        store
            .apply("big1", &callback(1), &quiet(500), IfMissing::Reject)
            .unwrap();
        assert!(store.events("big1").unwrap().len() > 20);
    }

    #[test]
    fn a_history_past_the_record_budget_loses_its_oldest_repetitive_entries_first() {
        let entry = |kind, detail: &str| EventRecord {
            at: 1,
            kind,
            detail: detail.to_string(),
        };
        let long = "x".repeat(MAX_DETAIL_BYTES);
        let mut history = vec![entry(EventKind::Tracked, "first")];
        for _ in 0..1200 {
            history.push(entry(EventKind::Polled, &long));
        }
        history.push(entry(EventKind::Failed, &long));
        let dropped = fit_history(&mut history);
        assert!(dropped > 0);
        assert_eq!(history[0].detail, "first", "how the task began stays");
        assert_eq!(history.last().unwrap().kind, EventKind::Failed);
        let bytes: usize = history
            .iter()
            .map(|e| e.detail.len() + ENTRY_OVERHEAD)
            .sum();
        assert!(bytes <= MAX_HISTORY_BYTES);
        let task = Task::new("t".into(), None, 1);
        assert!(codec::encode_task(&task, &history).is_ok());
        // Small histories are left alone.
        let mut small = vec![
            entry(EventKind::Tracked, "a"),
            entry(EventKind::Polled, "b"),
        ];
        assert_eq!(fit_history(&mut small), 0);
        assert_eq!(small.len(), 2);
    }

    #[test]
    fn a_migration_stopped_half_way_runs_again() {
        let (_r, want) = reference();
        // Stopped before the version flip: some records already in schema 2.
        let dir = tempfile::tempdir().unwrap();
        write_v1_store(dir.path(), 1, &["a", "c"], &[]);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(schema_of(&store), SCHEMA_VERSION);
        assert_same(&store, &want);
        assert!(store.inner.events.is_empty());
        assert!(!has_tree(&store, V1_BY_CREATED));

        // Stopped after the flip, before `by_created` was dropped.
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<&str> = scripted().iter().map(|t| t.0).collect();
        write_v1_store(dir.path(), 2, &all, &[]);
        let store = Store::open(dir.path()).unwrap();
        assert!(!has_tree(&store, V1_BY_CREATED));
        assert_same(&store, &want);
    }

    /// The migration's speed: a schema-1 store of `COVERD_MIGRATE_TASKS` (default 100,000)
    /// failed tasks, opened. A measurement, not a test:
    /// `COVERD_MIGRATE_TASKS=100000 cargo test --release --lib migration_throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a test"]
    fn migration_throughput() {
        let n: usize = std::env::var("COVERD_MIGRATE_TASKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let ids: Vec<String> = (0..n).map(|i| format!("f-{i}")).collect();
        let failure = Event::Callback(Report::Failure {
            reason: "KIE code 501: Cover generation failed".into(),
        });
        let script = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), 1_000 + i as Millis, vec![failure.clone()]))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        write_v1_tasks(dir.path(), 1, &[], &[], script);
        let started = std::time::Instant::now();
        let store = Store::open(dir.path()).unwrap();
        let took = started.elapsed();
        assert_eq!(store.counts().unwrap().failed, n as u64);
        println!(
            "migrated {n} tasks in {:.2} s ({:.0} tasks/s)",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64()
        );
        // What listing finished tasks costs now that it scans.
        let started = std::time::Instant::now();
        assert_eq!(store.list(None, 20).unwrap().len(), 20.min(n));
        println!(
            "list of the newest 20 of {n}: {:.2} s",
            started.elapsed().as_secs_f64()
        );
    }

    /// Newest first across states, ties on `created_at` broken by id (descending), cut at
    /// the limit: what schema 1's `by_created` index gave.
    #[test]
    fn listing_all_states_is_newest_first_with_the_limit() {
        let (_d, store) = open();
        let mut want = Vec::new();
        for i in 0..40i64 {
            let id = format!("t{:02}", (i * 7) % 40);
            let created = 1000 + i / 3;
            let event = match i % 4 {
                0 => Event::Track {
                    music_task_id: None,
                },
                1 => callback(1),
                _ => Event::Callback(Report::Failure { reason: "x".into() }),
            };
            store
                .apply(&id, &event, &quiet(created), IfMissing::Create)
                .unwrap();
            want.push((created, id));
        }
        want.sort();
        want.reverse();
        let want: Vec<String> = want.into_iter().map(|(_, id)| id).collect();
        for limit in [1, 5, 13, 40, 100] {
            let got = ids(store.list(None, limit).unwrap());
            assert_eq!(got, want[..limit.min(40)], "limit {limit}");
        }
        let failed = ids(store.list(Some(State::Failed), 100).unwrap());
        assert_eq!(failed.len(), 20);
        let mut sorted = failed.clone();
        sorted.sort_by_key(|id| {
            let t = store.get(id).unwrap().unwrap();
            std::cmp::Reverse((t.created_at, t.task_id))
        });
        assert_eq!(failed, sorted);
        assert_eq!(state_entries(&store), 20, "only unfinished tasks indexed");
        // A task gone from the ring's newest end (pruned): the next ones fill in.
        let gone = &want[0];
        let t = store.get(gone).unwrap().unwrap();
        assert!(t.state.is_finished(), "{t:?}");
        assert!(store.forget(gone, t.updated_at).unwrap());
        assert_eq!(ids(store.list(None, 5).unwrap()), want[1..6]);
        assert_eq!(ids(store.list(None, 100).unwrap()), want[1..]);
    }

    #[test]
    fn foreign_and_newer_databases_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            db.open_tree("tasks").unwrap().insert("x", "y").unwrap();
            db.flush().unwrap();
        }
        // sled's I/O threads let go of the lock a moment after the handle: wait, or the
        // open below may find the directory locked rather than foreign.
        writer::wait_for_lock_release(&dir.path().join("db"), LOCK_RELEASE_LIMIT);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Foreign { .. })
        ));

        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .inner
                .meta
                .insert("schema_version", &99u32.to_be_bytes())
                .unwrap();
            store.inner.db.flush().unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    }
}
