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
//! migrations; `stats`, `copy`, `parked`, `codec` and `writer` as their own docs say. Unit
//! tests are in `tests/`, by topic.
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
//! - `kind_intents`: `<kind>/<source>` → `codec::StoredIntent` — submissions of the other
//!   kinds, never resent when their outcome is unknown (`admin intents` lists those);
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
pub use parked::{MAX_PARKED, MAX_PARKED_PER_TASK};
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

/// One delivery kept aside (`store::parked`): here, beside the store's other public types,
/// so that `codec` (which writes it) and `parked` (which keeps it) both look up to it
/// rather than at each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    /// Its key in the `parked` tree (task id, 0x00, arrival order); seen only inside `store`.
    key: Vec<u8>,
    pub task_id: String,
    /// The task kind of the route it came on (`cover`, `music`, …).
    pub route: String,
    pub received_at: crate::model::Millis,
    /// The body exactly as it arrived.
    pub body: Vec<u8>,
}

/// Where a submission of a kind other than cover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntentState {
    /// Recorded; the create request is being sent (or was, by a process that stopped before
    /// it knew the answer: then the outcome is unknown too).
    Sending,
    /// The create request's outcome is unknown (timeout, connection lost after sending, a
    /// 5xx): never sent again, listed by `admin intents` until dropped.
    Unknown,
    /// KIE made the task (`task_id`), and it is recorded: a repeat answers it.
    Done,
}

impl IntentState {
    pub fn as_str(self) -> &'static str {
        match self {
            IntentState::Sending | IntentState::Unknown => "unknown",
            IntentState::Done => "done",
        }
    }
}

/// A submission of a kind other than cover (`submit wav|video|stems|music`; kept by
/// `store::intent`, written by `codec`: here so that neither looks at the other for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindIntent {
    /// `<kind>/<music task id>/<audio id>`, or for music `music/<hash of the request>`.
    pub key: String,
    pub kind: crate::model::Kind,
    pub music_task_id: Option<String>,
    pub audio_id: Option<String>,
    pub recorded_at: crate::model::Millis,
    pub state: IntentState,
    pub task_id: Option<String>,
    /// What is known of the outcome (KIE's error, when unknown).
    pub detail: String,
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
    /// Submissions of the kinds other than cover (`store::intent`), keyed by kind and source.
    kind_intents: sled::Tree,
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
pub(crate) mod tests;
