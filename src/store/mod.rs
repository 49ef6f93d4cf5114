//! The store: the only module that touches sled. Owns the trees, their keys, atomic multi-tree
//! updates (one update, or a batch of them in one transaction: `apply_one` inside
//! `Core::apply_batch`), the due-indexes, and group commit (`writer`: many writers share one
//! transaction and one flush). Must not do network or image-file I/O; the rules of what may
//! change live in `machine`, not here.
//!
//! Trees of schema 3 (`SCHEMA_VERSION`; a schema-1 store is migrated in `open`, see
//! `Inner::migrate_v1`, then a schema-2 one by deriving `stats`), all keys' numbers
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

pub mod codec;
mod copy;
mod parked;
mod stats;
pub mod summary;
mod writer;

pub use copy::TaskCopy;
pub use parked::{MAX_PARKED, MAX_PARKED_PER_TASK, Parked};
pub use stats::{MAX_QUARANTINED_SHOWN, StatsCheck, StatsVerdict};
pub use writer::StoreThread;
#[cfg(any(test, feature = "testing"))]
pub use writer::WritesPaused;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use crate::machine::{self, Ctx, Delivery, Event, Outcome};
use crate::model::{EventKind, EventRecord, Millis, Notification, NotifyState, State, Task};

/// The schema this build writes and understands. Bump with a migration in `open`.
pub const SCHEMA_VERSION: u32 = 3;
const FORMAT_MARKER: &[u8] = b"coverd store";
/// The reason given while a test injects write failures.
const INJECTED: &str = "write failure injected by a test";
/// sled's page cache; its default is 1 GiB. 8 MiB: peak RSS while ingesting 100k callbacks
/// fell from 145 to ~85 MiB against 64 MiB, with no measurable change in ingest or restart
/// (docs/benchmarks.md).
const CACHE_BYTES: u64 = 8 * 1024 * 1024;
/// Past this many history entries, repetitive notes (duplicates, polls, retries) are dropped;
/// state changes are always kept.
pub const MAX_EVENTS_PER_TASK: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the data directory {path} is in use by another coverd process; stop that process, or use `coverd admin`, which talks to a running daemon"
    )]
    Locked { path: PathBuf },
    #[error(
        "cannot open the store at {path}: {}; check the directory's permissions and free space",
        describe(.source)
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "the store at {path} has schema version {found}, newer than this coverd supports ({SCHEMA_VERSION}); run a newer coverd"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error(
        "{path} holds a database that coverd did not write; point --data-dir at a coverd data directory or an empty one"
    )]
    Foreign { path: PathBuf },
    /// `admin restore` was cut short (a crash, a power loss) while writing this directory.
    #[error(
        "{path} holds a restore that did not finish (cut short by a crash or a power loss), so its store is incomplete; run `coverd admin restore SRC` into it again (it starts over), or move it aside"
    )]
    UnfinishedRestore { path: PathBuf },
    #[error("store I/O failed: {}; check disk space and permissions", describe(.0))]
    Io(#[from] sled::Error),
    #[error("cannot make the store's writes durable: {0}; check disk space and the disk's health")]
    Flush(String),
    #[error(
        "the store cannot take writes since an earlier failure ({0}); free disk space or fix the disk, coverd then restarts to reopen the store"
    )]
    Unwritable(String),
    /// No room left to keep another callback for a quarantined task aside.
    #[error(
        "cannot keep the callback for task {task_id} aside: {why}; repair or restore its record (`coverd admin status` names it)"
    )]
    ParkFull { task_id: String, why: String },
    /// The store's writer or flusher thread stopped: nothing can be written until a restart.
    #[error("the store cannot take writes: {0}; coverd exits (status 70) and is restarted")]
    Stopped(String),
    /// The writer's queue is full: the store takes updates more slowly than they come.
    #[error(
        "the store's write queue is full ({queued} updates waiting); retry later, or spread the load"
    )]
    Busy { queued: usize },
    #[error(
        "an update of {what} panicked ({reason}) and was not applied; this is a bug in coverd: please report it with the log"
    )]
    Panicked { what: String, reason: String },
    #[error(
        "corrupt record for {what}: {reason}; run `coverd admin verify` and restore from a backup if needed"
    )]
    Corrupt { what: String, reason: String },
    /// The record is an envelope version this build does not know.
    #[error(
        "the record of {what} was written by a newer coverd (record format v{found}; this build reads up to v{known}); run that newer coverd, or restore a backup made by this version"
    )]
    Newer {
        what: String,
        found: u32,
        known: u32,
    },
}

/// An error of sled's as people read it: an I/O error by its Display ("No space left on
/// device (os error 28)"), never a Rust `Debug` dump. sled keeps the first I/O error and
/// hands out copies of it made from its `Debug` text (`Os { code: 28, kind: StorageFull, …
/// }`, sled 0.34 `result.rs`); the OS error code is read back from that text.
pub fn describe(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) => describe_io(io),
        sled::Error::Corruption { at, .. } => match at {
            Some(at) => format!("corrupt data in the store at {at}"),
            None => "corrupt data in the store".to_string(),
        },
        other => other.to_string(),
    }
}

/// An I/O error by its Display; a copy sled made from `Debug` text is turned back into it.
pub fn describe_io(e: &std::io::Error) -> String {
    if e.raw_os_error().is_some() {
        return e.to_string();
    }
    let text = e.to_string();
    if let Some(code) = text
        .split_once("code: ")
        .and_then(|(_, rest)| rest.split([',', ' ', '}']).next())
        .and_then(|code| code.parse::<i32>().ok())
    {
        return std::io::Error::from_raw_os_error(code).to_string();
    }
    if text.contains(" kind: ") || text.starts_with("Kind(") {
        return e.kind().to_string();
    }
    text
}

impl StoreError {
    /// A stored record could not be decoded (damaged, or written by a newer coverd): the
    /// record is quarantined, and trying again cannot help.
    pub fn is_undecodable(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. } | StoreError::Newer { .. })
    }
}

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
    _closed: ReleaseOnDrop,
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
    health: Arc<Health>,
}

/// Whether the store can take writes. sled 0.34 keeps an I/O error (a full disk) until the
/// process restarts, so a real failure is sticky; the test injection is not.
#[derive(Debug)]
struct Health {
    /// The first write or flush failure's reason, if one happened.
    failed: tokio::sync::watch::Sender<Option<String>>,
    /// Fault injection for tests: every update fails as if the disk were gone.
    injected: AtomicBool,
}

impl Health {
    /// Whether an update may be applied: not after a write or flush failed (a failed flush is
    /// final: the kernel may have dropped the pages it could not write and reports that only
    /// once, so a later write that seems to succeed proves nothing), nor while a test injects
    /// failures.
    fn check(&self) -> Result<(), StoreError> {
        if self.injected.load(Ordering::SeqCst) {
            return Err(injected());
        }
        match &*self.failed.borrow() {
            Some(reason) => Err(StoreError::Unwritable(reason.clone())),
            None => Ok(()),
        }
    }

    fn mark(&self, reason: &str) {
        self.failed.send_modify(|f| {
            if f.is_none() {
                tracing::error!(
                    reason,
                    "the store cannot take writes; callbacks get 503, downloads and polls pause"
                );
                *f = Some(reason.to_string());
            }
        });
    }
}

/// Waits, when the store's last handle is gone, until sled has let go of its lock, so the
/// directory can be opened again at once (in this process too). `None`: nothing to wait for.
struct ReleaseOnDrop(Option<PathBuf>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            writer::wait_for_lock_release(&path.join("db"), LOCK_RELEASE_LIMIT);
        }
    }
}

/// Longest a closing store waits for sled's I/O threads to let go of the lock.
const LOCK_RELEASE_LIMIT: Duration = Duration::from_secs(10);

/// The file `admin restore` keeps in the data directory it writes, created (and synced)
/// before anything else and removed last: a store beside it is a restore cut short, which
/// [`Store::open`] refuses rather than serve as if it were complete.
pub const UNFINISHED_RESTORE: &str = ".restore-unfinished";

impl Store {
    /// Opens (or creates) the store in `<data_dir>/db`, migrating an older schema first.
    /// Refuses a data directory that a restore did not finish ([`UNFINISHED_RESTORE`]).
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(data_dir, writer::QUEUE, &|_| {})
    }

    /// [`Store::open`] for `admin restore` itself, which writes the store beside its
    /// [`UNFINISHED_RESTORE`] marker.
    pub fn open_for_restore(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_unchecked(data_dir, writer::QUEUE, &|_| {})
    }

    /// [`Store::open`], calling `progress` with the number of task records migrated so far
    /// every [`MIGRATION_PROGRESS_EVERY`] while a migration runs (the daemon tells systemd
    /// that its start is taking longer).
    pub fn open_with_progress(
        data_dir: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<Store, StoreError> {
        Store::open_with(data_dir, writer::QUEUE, progress)
    }

    /// [`Store::open`] with room for `queue` updates waiting for the writer (tests: a tiny
    /// queue shows what a full one does). Not used by coverd itself.
    #[cfg(any(test, feature = "testing"))]
    pub fn open_with_queue(data_dir: &Path, queue: usize) -> Result<Store, StoreError> {
        Store::open_with(data_dir, queue, &|_| {})
    }

    fn open_with(
        data_dir: &Path,
        queue: usize,
        progress: &dyn Fn(u64),
    ) -> Result<Store, StoreError> {
        // Not followed: the marker is a plain file restore made.
        if std::fs::symlink_metadata(data_dir.join(UNFINISHED_RESTORE)).is_ok() {
            return Err(StoreError::UnfinishedRestore {
                path: data_dir.to_path_buf(),
            });
        }
        Store::open_unchecked(data_dir, queue, progress)
    }

    fn open_unchecked(
        data_dir: &Path,
        queue: usize,
        progress: &dyn Fn(u64),
    ) -> Result<Store, StoreError> {
        let path = data_dir.join("db");
        // Declared before `db` so it is dropped after it (locals drop in reverse order) on
        // every path out of here: it waits until sled has let go of its lock, which sled does
        // only once its last handle is gone. Dropped before `db`, it waited in vain for its
        // whole limit (10 s) on every failed open. Armed only once sled has opened: a lock
        // held by another process is not ours to wait for.
        let mut closed = ReleaseOnDrop(None);
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|source| {
                if source.to_string().contains("could not acquire lock") {
                    StoreError::Locked {
                        path: data_dir.to_path_buf(),
                    }
                } else {
                    StoreError::Open {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
        closed.0 = Some(path.clone());
        // Before anything is written: the status summary of the last clean close no longer
        // describes this store once it is open.
        summary::forget(&path).map_err(|e| StoreError::Open {
            path: path.clone(),
            source: sled::Error::Io(e),
        })?;
        let tree = |name: &str| db.open_tree(name);
        let (failed, _) = tokio::sync::watch::channel(None);
        let health = Arc::new(Health {
            failed,
            injected: AtomicBool::new(false),
        });
        let core = Arc::new(Core {
            meta: tree("meta")?,
            tasks: tree("tasks")?,
            events: tree("events")?,
            due_download: tree("due_download")?,
            due_poll: tree("due_poll")?,
            by_state: tree("by_state")?,
            by_music: tree("by_music")?,
            intents: tree("intents")?,
            outbox: tree("outbox")?,
            parked: tree("parked")?,
            outbox_wake: Arc::new(tokio::sync::Notify::new()),
            path: path.clone(),
            db: db.clone(),
            undecodable_reads: AtomicU64::new(0),
            quarantine: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            stats_gate: stats::Gate::default(),
            written: Arc::new(AtomicU64::new(0)),
            health: health.clone(),
        });
        core.check_schema(progress)?;
        let on_failure = Box::new(move |reason: &str| health.mark(reason));
        let apply = {
            let core = core.clone();
            Box::new(move |writes: &[writer::Write]| core.apply_batch(writes))
        };
        // Its first round makes what sled wrote at open (the schema marker of a new store,
        // `conf`, the directories) durable before the store is used.
        let writer =
            writer::Writer::start(db, &path, core.written.clone(), queue, apply, on_failure)
                .map_err(|e| StoreError::Open {
                    path: path.clone(),
                    source: sled::Error::Io(e),
                })?;
        Ok(Store {
            inner: Arc::new(Inner {
                writer,
                core,
                _closed: closed,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
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

    /// A failed transaction's error; a storage failure marks the store as unable to take
    /// writes ([`Store::write_failure`]), whichever transaction met it.
    fn tx_error(&self, e: TransactionError<StoreError>) -> StoreError {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => {
                self.inner.health.mark(&describe(&e));
                StoreError::Io(e)
            }
        }
    }

    /// Makes every later update fail (`on = true`) until called with `false`: lets tests
    /// prove what callers do when the store is unavailable. Not used by coverd itself.
    #[cfg(any(test, feature = "testing"))]
    pub fn inject_write_failures(&self, on: bool) {
        self.inner.health.injected.store(on, Ordering::SeqCst);
        // Wakes whoever waits in `writable`.
        self.inner.health.failed.send_modify(|_| {});
    }

    /// Why the store cannot take writes now, if it cannot: a write or flush failed (sticky:
    /// sled keeps the error until the process restarts), or a test injects failures.
    pub fn write_failure(&self) -> Option<String> {
        if self.inner.health.injected.load(Ordering::SeqCst) {
            return Some(INJECTED.to_string());
        }
        if let Some(failed) = self.inner.health.failed.borrow().clone() {
            return Some(failed);
        }
        self.stopped_thread()
    }

    /// Which of the store's threads (writer, flusher) stopped or panicked, and how, if one
    /// did: the store then takes no write until the process restarts.
    pub fn stopped_thread(&self) -> Option<String> {
        self.inner.writer.stopped()
    }

    /// Waits until one of the store's threads stops or panics (never, while they run);
    /// returns what [`Store::stopped_thread`] says then.
    pub async fn thread_stopped(&self) -> String {
        self.inner.writer.wait_stopped().await
    }

    /// Makes the store's writer or flusher thread panic at once, as a bug would (tests of
    /// what the daemon does when one dies). Not used by coverd itself.
    #[cfg(any(test, feature = "testing"))]
    pub fn stop_thread_for_test(&self, which: StoreThread) {
        self.inner.writer.stop_for_test(which);
    }

    /// Makes the next flush round fail as if `fdatasync` had returned EIO (tests; the
    /// process tests inject real syscall errors with strace). Not used by coverd itself.
    #[cfg(any(test, feature = "testing"))]
    pub fn fail_next_flush_for_test(&self) {
        self.inner.writer.fail_next_round();
    }

    /// Whether a real write or flush failed: only reopening the store (a restart) clears it.
    pub fn needs_reopen(&self) -> bool {
        self.inner.health.failed.borrow().is_some()
    }

    /// Waits until [`Store::write_failure`] is `None`: at once when the store is fine,
    /// never in this process after a real failure (see [`Store::needs_reopen`]).
    pub async fn writable(&self) {
        let mut rx = self.inner.health.failed.subscribe();
        while self.write_failure().is_some() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Closes the store: makes every write durable, then drops this handle; when it is the
    /// last one, sled is closed and its lock released before this returns, so the directory
    /// can be opened again at once. In-process users (`submit`, offline `admin`) call it
    /// before they return.
    ///
    /// A clean close of the last handle also leaves the status summary that `admin status`
    /// reads while no daemon runs ([`summary`]); a close after a failed write does not.
    pub async fn close(self) -> Result<(), StoreError> {
        let flushed = self.flush().await;
        let clean = flushed.is_ok();
        // Joining the writer's threads and waiting for sled's lock block: off the runtime.
        let _ = tokio::task::spawn_blocking(move || {
            // Only the last handle: no one can write after the summary is taken.
            let summary = (clean
                && self.write_failure().is_none()
                && Arc::strong_count(&self.inner) == 1)
                .then(|| self.summary());
            let dir = self.path().to_path_buf();
            drop(self);
            match summary {
                Some(Ok(summary)) => match summary::write(&dir, &summary) {
                    Ok(true) => {}
                    Ok(false) => tracing::debug!(
                        "no status summary: the store was opened again as it closed"
                    ),
                    Err(e) => tracing::warn!(
                        "could not write the status summary in {}: {e}; `coverd admin status` opens the store instead while the daemon is stopped",
                        dir.display()
                    ),
                },
                Some(Err(e)) => tracing::warn!("could not read the status summary: {e}"),
                None => {}
            }
        })
        .await;
        flushed
    }

    /// Stores `bytes` as the record of `task_id`, bypassing the codec and the indexes: lets
    /// tests plant a damaged record, or one written by a newer coverd. Not used by coverd.
    #[cfg(any(test, feature = "testing"))]
    pub fn put_raw_task(&self, task_id: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.put_raw_record(task_id.as_bytes(), bytes)
    }

    /// [`Store::put_raw_task`] under any key, UTF-8 or not: lets tests plant records keyed
    /// by what no task id can be (a crafted backup). Not used by coverd.
    /// Like damage, an undecodable record is not added to the quarantine index (a read
    /// finds it); a readable one leaves it (a repair).
    #[cfg(any(test, feature = "testing"))]
    pub fn put_raw_record(&self, key: &[u8], bytes: &[u8]) -> Result<(), StoreError> {
        self.inner
            .stats_gate
            .changing(|| -> Result<(), StoreError> {
                self.inner.tasks.insert(key, bytes)?;
                if codec::decode_task(bytes).is_ok() {
                    self.inner.meta.remove(stats::quarantine_key(key))?;
                }
                Ok(())
            })?;
        self.inner.db.flush()?;
        Ok(())
    }

    /// How many times a task record could not be decoded since open (tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn undecodable_reads(&self) -> u64 {
        self.inner.undecodable_reads.load(Ordering::SeqCst)
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

    /// Stops the writer from taking updates until the guard is dropped (it finishes the
    /// batch it is in, and holds at most one update it took): lets tests fill its queue or
    /// form one batch from many updates. Not used by coverd itself.
    #[cfg(any(test, feature = "testing"))]
    pub fn pause_writes(&self) -> WritesPaused {
        self.inner.writer.pause()
    }

    /// The most flush rounds ever running at once (one flusher thread: at most 1).
    #[cfg(any(test, feature = "testing"))]
    pub fn max_concurrent_flushes(&self) -> u32 {
        self.inner.writer.max_concurrent_rounds()
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

    /// One task. A record that cannot be decoded is an error, and is quarantined.
    pub fn get(&self, task_id: &str) -> Result<Option<Task>, StoreError> {
        match self.inner.tasks.get(task_id.as_bytes())? {
            Some(bytes) => self.decode_checked(&bytes, task_id).map(Some),
            None => Ok(None),
        }
    }

    /// Decodes a task record; a failure quarantines the task.
    fn decode_checked(&self, bytes: &[u8], task_id: &str) -> Result<Task, StoreError> {
        self.decode_at(task_id.as_bytes(), bytes, task_id)
    }

    /// [`Store::decode_checked`] of the record at `key` (raw: a crafted key need not be
    /// UTF-8; `task_id` is its text).
    fn decode_at(&self, key: &[u8], bytes: &[u8], task_id: &str) -> Result<Task, StoreError> {
        decode(bytes, task_id).inspect_err(|e| {
            self.inner.undecodable_reads.fetch_add(1, Ordering::SeqCst);
            self.inner.quarantine_task(task_id, key, e);
        })
    }

    fn is_quarantined(&self, task_id: &[u8]) -> bool {
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
                    bad.push(format!("history entry {seq}: {}", codec_reason(&e)));
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

    /// Task ids whose download is due at or before `now`, earliest first, at most `limit`.
    pub fn due_downloads(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        self.due(&self.inner.due_download, now, limit)
    }

    /// Task ids whose poll is due at or before `now`, earliest first, at most `limit`.
    pub fn due_polls(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        self.due(&self.inner.due_poll, now, limit)
    }

    /// The first `limit` entries of the download index, earliest first, due or not;
    /// quarantined tasks left out.
    pub fn download_queue(&self, limit: usize) -> Result<Vec<(Millis, String)>, StoreError> {
        self.queue(&self.inner.due_download, limit)
    }

    /// The first `limit` entries of the poll index, earliest first, due or not; quarantined
    /// tasks left out.
    pub fn poll_queue(&self, limit: usize) -> Result<Vec<(Millis, String)>, StoreError> {
        self.queue(&self.inner.due_poll, limit)
    }

    /// The earliest due time of any download, if one is scheduled.
    pub fn next_download_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self
            .queue(&self.inner.due_download, 1)?
            .first()
            .map(|e| e.0))
    }

    /// The earliest due time of any poll, if one is scheduled.
    pub fn next_poll_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self.queue(&self.inner.due_poll, 1)?.first().map(|e| e.0))
    }

    /// The first `limit` entries of a due index that are not quarantined. Looks past at
    /// most as many entries as there are quarantined tasks.
    fn queue(&self, tree: &sled::Tree, limit: usize) -> Result<Vec<(Millis, String)>, StoreError> {
        let mut out = Vec::new();
        for kv in tree.iter() {
            if out.len() >= limit {
                break;
            }
            let (k, _) = kv?;
            let id = k.get(8..).unwrap_or_default();
            if self.is_quarantined(id) {
                continue;
            }
            let at = i64::try_from(u64_from(&k)).unwrap_or(i64::MAX);
            out.push((at, String::from_utf8_lossy(id).into_owned()));
        }
        Ok(out)
    }

    fn due(&self, tree: &sled::Tree, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self
            .queue(tree, limit)?
            .into_iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, id)| id)
            .collect())
    }

    /// The cover task recorded for a music task, if any.
    pub fn task_for_music(&self, music_task_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .inner
            .by_music
            .get(music_task_id.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records that a cover for `music_task_id` is about to be requested from KIE, so a crash
    /// before KIE's answer is stored can be resolved later (see `submit`). Returns the cover
    /// task already recorded for that song instead, if there is one.
    pub fn record_intent(
        &self,
        music_task_id: &str,
        now: Millis,
    ) -> Result<Option<String>, StoreError> {
        if let Some(existing) = self.task_for_music(music_task_id)? {
            return Ok(Some(existing));
        }
        self.inner
            .intents
            .insert(music_task_id.as_bytes(), &codec::encode_intent(now))?;
        Ok(None)
    }

    /// Records an intent even though the song has a (failed) cover task: a new request.
    pub fn force_intent(&self, music_task_id: &str, now: Millis) -> Result<(), StoreError> {
        self.inner
            .intents
            .insert(music_task_id.as_bytes(), &codec::encode_intent(now))?;
        Ok(())
    }

    /// Forgets an intent whose request KIE refused for good (nothing was created).
    pub fn drop_intent(&self, music_task_id: &str) -> Result<(), StoreError> {
        self.inner.intents.remove(music_task_id.as_bytes())?;
        Ok(())
    }

    /// Unresolved intents (music task id, recorded at), at most `limit`.
    pub fn intents(&self, limit: usize) -> Result<Vec<(String, Millis)>, StoreError> {
        self.inner
            .intents
            .iter()
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    codec::decode_intent(&v),
                ))
            })
            .collect()
    }

    /// Newest first (created, then id, descending), optionally only in one state, at most
    /// `limit`. Quarantined tasks are left out (`admin status` names them). Unfinished
    /// states read their `by_state` range; finished states and all tasks scan `tasks`
    /// (finished tasks have no index entry), keeping the newest `limit`: blocking, with a
    /// time that grows with the store.
    pub fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Task>, StoreError> {
        if let Some(s) = state
            && !s.is_finished()
        {
            let mut out = Vec::new();
            for kv in self.inner.by_state.scan_prefix([s.code()]).rev() {
                if out.len() >= limit {
                    break;
                }
                let (k, _) = kv?;
                let id = String::from_utf8_lossy(&k[9..]).into_owned();
                match self.get(&id) {
                    Ok(Some(task)) => out.push(task),
                    Ok(None) => {}
                    Err(e) if e.is_undecodable() => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(out);
        }
        if let Some(out) = self.list_recent(state, limit)? {
            return Ok(out);
        }
        let mut newest = TopN::new(limit);
        for scanned in self.all_tasks() {
            let Scanned::Task(task) = scanned? else {
                continue;
            };
            if state.is_some_and(|s| s != task.state) {
                continue;
            }
            newest.push(Newest(task));
        }
        Ok(newest
            .into_greatest_first()
            .into_iter()
            .map(|Newest(t)| *t)
            .collect())
    }

    /// `list` from the ring of recently created tasks: `None` when it holds fewer than
    /// `limit` of them (in `state`), and the caller scans. The ring is in creation order,
    /// which is `created_at` order (one clock); it is read newest first until `limit` tasks
    /// are found and the next one is older than all of them, so ties are ordered by id as
    /// a scan orders them.
    fn list_recent(
        &self,
        state: Option<State>,
        limit: usize,
    ) -> Result<Option<Vec<Task>>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut found: Vec<Task> = Vec::new();
        let mut oldest_found = Millis::MAX;
        for kv in self.inner.by_state.scan_prefix([RECENT]).rev() {
            let (_, id) = kv?;
            let id = String::from_utf8_lossy(&id).into_owned();
            if !seen.insert(id.clone()) {
                continue;
            }
            let task = match self.get(&id) {
                Ok(Some(task)) => task,
                Ok(None) => continue,
                Err(e) if e.is_undecodable() => continue,
                Err(e) => return Err(e),
            };
            if state.is_some_and(|s| s != task.state) {
                continue;
            }
            if found.len() >= limit && task.created_at < oldest_found {
                break;
            }
            oldest_found = oldest_found.min(task.created_at);
            found.push(task);
        }
        if found.len() < limit {
            return Ok(None);
        }
        found.sort_by(|a, b| (b.created_at, &b.task_id).cmp(&(a.created_at, &a.task_id)));
        found.truncate(limit);
        Ok(Some(found))
    }

    /// Rewrites the ring of recently created tasks from the records (the newest
    /// `RECENT_TASKS` by created, id): after a restore wrote tasks in id order. Reads the
    /// whole store; blocking.
    pub fn rebuild_recent(&self) -> Result<(), StoreError> {
        let mut newest = TopN::new(RECENT_TASKS as usize);
        for kv in self.inner.tasks.iter() {
            let (k, v) = kv?;
            if let Ok(task) = codec::decode_task(&v) {
                newest.push((task.created_at, String::from_utf8_lossy(&k).into_owned()));
            }
        }
        self.inner.write_recent(newest)
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

    pub fn counts(&self) -> Result<Counts, StoreError> {
        let get = |s: State| -> Result<u64, StoreError> {
            Ok(self
                .inner
                .meta
                .get(count_key(s))?
                .map(|v| u64_from(&v))
                .unwrap_or(0))
        };
        Ok(Counts {
            submitted: get(State::Submitted)?,
            received: get(State::Received)?,
            downloaded: get(State::Downloaded)?,
            failed: get(State::Failed)?,
        })
    }

    /// The oldest task still submitted or received (quarantined tasks left out).
    pub fn oldest_unfinished(&self) -> Result<Option<Task>, StoreError> {
        let mut oldest: Option<Task> = None;
        for s in [State::Submitted, State::Received] {
            for kv in self.inner.by_state.scan_prefix([s.code()]) {
                let (k, _) = kv?;
                let id = String::from_utf8_lossy(&k[9..]).into_owned();
                match self.get(&id) {
                    Ok(Some(task)) => {
                        if oldest
                            .as_ref()
                            .is_none_or(|o| task.created_at < o.created_at)
                        {
                            oldest = Some(task);
                        }
                        break;
                    }
                    Ok(None) => break,
                    Err(e) if e.is_undecodable() => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(oldest)
    }

    // ---- the outbox ----

    /// Woken whenever a notification becomes due (a settle, a redeliver); the notifier
    /// waits on it.
    pub fn outbox_waker(&self) -> Arc<tokio::sync::Notify> {
        self.inner.outbox_wake.clone()
    }

    /// Notifications due at or before `now` as (task id, seq), earliest first, at most `limit`.
    pub fn due_notifications(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        let start = [OUTBOX_DUE].to_vec();
        let mut end = start.clone();
        end.extend_from_slice(&ms_bytes(now.saturating_add(1)));
        let mut out = Vec::new();
        for kv in self.inner.outbox.range(start..end).take(limit) {
            let (k, _) = kv?;
            if let Some(key) = k.get(9..).and_then(split_record_key) {
                out.push(key);
            }
        }
        Ok(out)
    }

    /// The earliest due time of any pending notification.
    pub fn next_notification_due(&self) -> Result<Option<Millis>, StoreError> {
        match self.inner.outbox.scan_prefix([OUTBOX_DUE]).next() {
            Some(kv) => {
                let (k, _) = kv?;
                Ok(Some(i64::try_from(u64_from(&k[1..])).unwrap_or(i64::MAX)))
            }
            None => Ok(None),
        }
    }

    /// One notification of a task.
    pub fn notification(
        &self,
        task_id: &str,
        seq: u32,
    ) -> Result<Option<Notification>, StoreError> {
        match self.inner.outbox.get(record_key(task_id, seq))? {
            Some(v) => Ok(Some(decode_notification(&v, task_id)?)),
            None => Ok(None),
        }
    }

    /// The notification of the task's latest settle, if one was made.
    pub fn latest_notification(&self, task_id: &str) -> Result<Option<Notification>, StoreError> {
        match self.inner.outbox.get(head_key(task_id))? {
            Some(v) => self.notification(task_id, u32_from(&v)),
            None => Ok(None),
        }
    }

    /// Records one delivery attempt of notification (`task_id`, `seq`) through
    /// `machine::notify_attempted`, atomically with its due-index entry and the counters.
    /// Returns the updated notification (`None` if it is gone).
    pub fn record_delivery(
        &self,
        task_id: &str,
        seq: u32,
        result: &Delivery,
        max_attempts: u32,
        now: Millis,
    ) -> Result<Option<Notification>, StoreError> {
        self.update_notification(task_id, Some(seq), |n| {
            machine::notify_attempted(n, result.clone(), max_attempts, now)
        })
    }

    /// `admin redeliver`: the task's latest notification is due again now (same webhook-id).
    /// `None` when the task has no notification.
    pub fn redeliver(
        &self,
        task_id: &str,
        now: Millis,
    ) -> Result<Option<Notification>, StoreError> {
        let n = self.update_notification(task_id, None, |n| machine::notify_redeliver(n, now))?;
        if n.is_some() {
            self.inner.outbox_wake.notify_one();
        }
        Ok(n)
    }

    /// Whether one of the task's notifications is still `pending` (or cannot be read):
    /// `admin prune` keeps such a task.
    pub fn has_pending_notification(&self, task_id: &str) -> Result<bool, StoreError> {
        let Some(latest) = self
            .inner
            .outbox
            .get(head_key(task_id))?
            .map(|v| u32_from(&v))
        else {
            return Ok(false);
        };
        for seq in 1..=latest {
            if let Some(bytes) = self.inner.outbox.get(record_key(task_id, seq))? {
                match decode_notification(&bytes, task_id) {
                    Ok(n) if n.state != NotifyState::Pending => {}
                    _ => return Ok(true),
                }
            }
        }
        Ok(false)
    }

    /// Notifications per delivery state.
    pub fn notify_counts(&self) -> Result<NotifyCounts, StoreError> {
        let get = |s: NotifyState| -> Result<u64, StoreError> {
            Ok(self
                .inner
                .meta
                .get(notify_count_key(s))?
                .map(|v| u64_from(&v))
                .unwrap_or(0))
        };
        Ok(NotifyCounts {
            pending: get(NotifyState::Pending)?,
            delivered: get(NotifyState::Delivered)?,
            undeliverable: get(NotifyState::Undeliverable)?,
        })
    }

    /// Read–change–write of one notification (`seq`, or the latest) in one transaction.
    fn update_notification(
        &self,
        task_id: &str,
        seq: Option<u32>,
        change: impl Fn(&mut Notification),
    ) -> Result<Option<Notification>, StoreError> {
        let i = &*self.inner;
        i.health.check()?;
        let result = (&i.meta, &i.outbox).transaction(|(meta, outbox)| {
            let seq = match seq {
                Some(s) => s,
                None => match outbox.get(head_key(task_id))? {
                    Some(v) => u32_from(&v),
                    None => return Ok(None),
                },
            };
            let Some(bytes) = outbox.get(record_key(task_id, seq))? else {
                return Ok(None);
            };
            let old = decode_notification(&bytes, task_id)
                .map_err(ConflictableTransactionError::Abort)?;
            let mut n = old.clone();
            change(&mut n);
            write_notification(outbox, meta, Some(&old), &n)?;
            Ok(Some(n))
        });
        let n = result.map_err(|e| self.tx_error(e))?;
        if n.is_some() {
            self.inner.written.fetch_add(1, Ordering::SeqCst);
        }
        Ok(n)
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.size_on_disk()?)
    }

    /// Health: a write, a flush and a read-back succeed.
    pub async fn check_health(&self) -> Result<(), StoreError> {
        if let Some(reason) = self.write_failure() {
            return Err(StoreError::Unwritable(reason));
        }
        let stamp = crate::model::now_millis().to_be_bytes();
        if let Err(e) = self.inner.meta.insert("health", &stamp) {
            self.inner.health.mark(&describe(&e));
            return Err(e.into());
        }
        self.flush().await?;
        match self.inner.meta.get("health")? {
            Some(v) if v.as_ref() == stamp => Ok(()),
            _ => Err(StoreError::Corrupt {
                what: "health check".into(),
                reason: "read-back differs from what was written".into(),
            }),
        }
    }
}

/// The `limit` greatest items pushed into it: a bounded min-heap, so keeping the newest N
/// of a scan holds N items, not the scan.
struct TopN<T: Ord> {
    heap: std::collections::BinaryHeap<std::cmp::Reverse<T>>,
    limit: usize,
}

impl<T: Ord> TopN<T> {
    fn new(limit: usize) -> TopN<T> {
        TopN {
            heap: std::collections::BinaryHeap::new(),
            limit,
        }
    }

    fn push(&mut self, item: T) {
        self.heap.push(std::cmp::Reverse(item));
        if self.heap.len() > self.limit {
            self.heap.pop();
        }
    }

    fn into_greatest_first(self) -> Vec<T> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|std::cmp::Reverse(t)| t)
            .collect()
    }
}

/// A task ordered by (created, id), as `list` orders them.
struct Newest(Box<Task>);

impl Newest {
    fn key(&self) -> (Millis, &str) {
        (self.0.created_at, self.0.task_id.as_str())
    }
}

impl PartialEq for Newest {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Newest {}

impl PartialOrd for Newest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Newest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// Task records rewritten per transaction by the schema migration.
const MIGRATION_CHUNK: usize = 256;
/// How often a migration reports progress (see [`Store::open_with_progress`]).
pub const MIGRATION_PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Schema 1's newest-first index, dropped by the migration (after the version flip).
const V1_BY_CREATED: &str = "by_created";
/// First byte of the ring of recently created tasks in `by_state` (see the module doc).
const RECENT: u8 = 0xff;
/// Tasks the ring remembers: `admin list`'s largest `--limit`.
pub const RECENT_TASKS: u64 = 10_000;
/// `meta` key: the ring's next seq.
const RECENT_SEQ: &str = "recent/seq";

fn recent_key(seq: u64) -> [u8; 9] {
    let mut k = [RECENT; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl Core {
    fn quarantined_ids(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Quarantined>> {
        // A poisoned map is still a valid map.
        self.quarantine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers that `task_id`'s record (at `key`) cannot be decoded, logging it the first
    /// time: the due queues skip it from now on, so no worker picks it again, and the
    /// store's quarantine index names it to `admin status`.
    fn quarantine_task(&self, task_id: &str, key: &[u8], err: &StoreError) {
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

    /// Applies `writes` in one transaction (a batch of the writer; [`Store::apply`] is a
    /// batch of one), each update seeing the ones before it, and the per-state counters
    /// written once. Per-update isolation: one whose record cannot be decoded (it is
    /// quarantined) or that names an unknown task with [`IfMissing::Reject`] changes nothing
    /// and does not stop the others; one that fails after it began to write, or panics, is
    /// left out and the transaction runs again without it. A storage error fails them all
    /// (and marks the store's health).
    fn apply_batch(&self, writes: &[writer::Write]) -> Vec<writer::Outcome> {
        if let Err(e) = self.health.check() {
            return writes.iter().map(|_| Err(e.clone_failure())).collect();
        }
        let trees = (
            &self.meta,
            &self.tasks,
            &self.events,
            &self.due_download,
            &self.due_poll,
            &self.by_state,
            &self.by_music,
            &self.outbox,
        );
        // Statistics derived from the records change with them (`stats`).
        let _changing = self.stats_gate.hold();
        // Updates left out, with why; decided between runs of the transaction.
        let mut left_out: Vec<Option<StoreError>> = writes.iter().map(|_| None).collect();
        loop {
            let result = trees.transaction(|trees| {
                // sled may run this closure again: everything it accumulates starts here.
                let mut batch = BatchState::default();
                let mut out = Vec::with_capacity(writes.len());
                for (n, w) in writes.iter().enumerate() {
                    if left_out[n].is_some() {
                        out.push(Ok(None));
                        continue;
                    }
                    batch.undecodable = false;
                    let one = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        apply_one(
                            trees,
                            &w.task_id,
                            &w.event,
                            &w.ctx,
                            w.if_missing,
                            &mut batch,
                        )
                    }));
                    match one {
                        Ok(Ok(applied)) => out.push(Ok(applied)),
                        // Found at its first read, before it wrote anything.
                        Ok(Err(ConflictableTransactionError::Abort(e))) if batch.undecodable => {
                            out.push(Err(e))
                        }
                        Ok(Err(ConflictableTransactionError::Abort(e))) => {
                            return Err(ConflictableTransactionError::Abort((n, e)));
                        }
                        Ok(Err(ConflictableTransactionError::Conflict)) => {
                            return Err(ConflictableTransactionError::Conflict);
                        }
                        Ok(Err(ConflictableTransactionError::Storage(e))) => {
                            return Err(ConflictableTransactionError::Storage(e));
                        }
                        Err(panic) => {
                            let reason = panic
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "a panic".to_string());
                            let what = format!("task {}", w.task_id);
                            return Err(ConflictableTransactionError::Abort((
                                n,
                                StoreError::Panicked { what, reason },
                            )));
                        }
                    }
                }
                batch.counts.write(&trees.0)?;
                Ok(out)
            });
            match result {
                Ok(out) => return self.applied(writes, out, left_out),
                Err(TransactionError::Abort((n, e))) => left_out[n] = Some(e),
                Err(TransactionError::Storage(e)) => {
                    self.health.mark(&describe(&e));
                    return writes
                        .iter()
                        .map(|_| Err(StoreError::Io(e.clone())))
                        .collect();
                }
            }
        }
    }

    /// The outcomes of a committed batch: tickets for what was applied (taken after the
    /// commit, so a round that starts later covers them), quarantine for what could not be
    /// decoded, the notifier woken for a settle.
    fn applied(
        &self,
        writes: &[writer::Write],
        out: Vec<Result<AppliedOne, StoreError>>,
        left_out: Vec<Option<StoreError>>,
    ) -> Vec<writer::Outcome> {
        let mut settled = false;
        let mut outcomes = Vec::with_capacity(writes.len());
        for ((one, w), left) in out.into_iter().zip(writes).zip(left_out) {
            outcomes.push(match (left, one) {
                (Some(e), _) => Err(e),
                (None, Ok(Some((before, task, outcome)))) => {
                    settled |= w.ctx.notify && machine::settle_notice(before, &task).is_some();
                    Ok(Some(Applied {
                        before,
                        task,
                        outcome,
                        ticket: self.written.fetch_add(1, Ordering::SeqCst) + 1,
                    }))
                }
                (None, Ok(None)) => Ok(None),
                (None, Err(e)) => {
                    self.undecodable_reads.fetch_add(1, Ordering::SeqCst);
                    self.quarantine_task(&w.task_id, w.task_id.as_bytes(), &e);
                    Err(e)
                }
            });
        }
        if settled {
            self.outbox_wake.notify_one();
        }
        outcomes
    }

    fn check_schema(&self, progress: &dyn Fn(u64)) -> Result<(), StoreError> {
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
}

impl Core {
    /// Replaces the ring with the tasks in `newest` (written oldest first).
    fn write_recent(&self, newest: TopN<(Millis, String)>) -> Result<(), StoreError> {
        for k in self.by_state.scan_prefix([RECENT]).keys() {
            self.by_state.remove(k?)?;
        }
        let mut seq = 0u64;
        for (_, id) in newest.into_greatest_first().into_iter().rev() {
            self.by_state.insert(recent_key(seq), id.as_bytes())?;
            seq += 1;
        }
        self.meta.insert(RECENT_SEQ, &seq.to_be_bytes())?;
        Ok(())
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

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// A task record and its history, in a transaction. A schema-1 record's history is moved
/// out of `events` (its entries removed there: the caller writes the record back in the
/// same transaction); entries that cannot be decoded stay there, where `history` names
/// them. A record that cannot be decoded aborts with the reason.
fn read_record(
    bytes: &[u8],
    task_id: &str,
    events: &TransactionalTree,
) -> TxResult<(Task, Vec<EventRecord>)> {
    let (task, history) =
        decode_record(bytes, task_id).map_err(ConflictableTransactionError::Abort)?;
    if let Some(history) = history {
        return Ok((task, history));
    }
    let mut history = Vec::new();
    for seq in 0..task.event_count {
        let key = event_key(task_id, seq);
        if let Some(v) = events.get(&key)?
            && let Ok(event) = codec::decode_event(&v)
        {
            history.push(event);
            events.remove(key)?;
        }
    }
    Ok((task, history))
}

/// Longest detail kept in a history entry, in bytes (cut at a character boundary): with
/// `MAX_EVENTS_PER_TASK`, bounds a record with its history (`codec`'s value limit).
const MAX_DETAIL_BYTES: usize = 1024;

/// Appends `notes` to a task's history. Past [`MAX_EVENTS_PER_TASK`] entries, repetitive
/// notes are dropped; state changes are always kept.
fn append_history(
    task: &mut Task,
    history: &mut Vec<EventRecord>,
    notes: &[(EventKind, String)],
    now: Millis,
) {
    for (kind, detail) in notes {
        if task.event_count >= MAX_EVENTS_PER_TASK && is_repetitive(*kind) {
            continue;
        }
        let mut end = detail.len().min(MAX_DETAIL_BYTES);
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        history.push(EventRecord {
            at: now,
            kind: *kind,
            detail: detail[..end].to_string(),
        });
        task.event_count += 1;
    }
}

/// Bytes a record's history may take: the codec's value limit (1 MiB) less room for the
/// task itself (at most 16 images with 4 KiB URLs, a few KiB of error and ids).
const MAX_HISTORY_BYTES: usize = 768 * 1024;
/// What a history entry costs in the record besides its detail: time, kind, detail tag and
/// length (bincode, fixed-width integers), rounded up.
const ENTRY_OVERHEAD: usize = 24;

/// Keeps a history within [`MAX_HISTORY_BYTES`], so that its record can always be written:
/// details longer than [`MAX_DETAIL_BYTES`] are cut (schema 1 did not cut them, so a
/// migrated record may carry them); past the budget the oldest repetitive entries go first,
/// then the oldest of any kind but the first (how the task began). Returns how many entries
/// were dropped. Costs one pass over the entries' lengths while the history is small.
fn fit_history(history: &mut Vec<EventRecord>) -> usize {
    for entry in history.iter_mut() {
        if entry.detail.len() > MAX_DETAIL_BYTES {
            let mut end = MAX_DETAIL_BYTES;
            while !entry.detail.is_char_boundary(end) {
                end -= 1;
            }
            entry.detail.truncate(end);
        }
    }
    let cost = |e: &EventRecord| e.detail.len() + ENTRY_OVERHEAD;
    let mut total: usize = history.iter().map(cost).sum();
    if total <= MAX_HISTORY_BYTES {
        return 0;
    }
    let before = history.len();
    let mut keep = vec![true; history.len()];
    for pass_repetitive_only in [true, false] {
        for (i, entry) in history.iter().enumerate().skip(1) {
            if total <= MAX_HISTORY_BYTES {
                break;
            }
            if keep[i] && (!pass_repetitive_only || is_repetitive(entry.kind)) {
                keep[i] = false;
                total -= cost(entry);
            }
        }
    }
    let mut flags = keep.into_iter();
    history.retain(|_| flags.next().unwrap_or(true));
    before - history.len()
}

/// The trees an update writes, as its transaction sees them.
type TxTrees = (
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
);

/// What one update did: the state before, the new record, the machine's outcome; `None` for
/// an unknown task refused.
type AppliedOne = Option<(Option<State>, Task, Outcome)>;

/// What a run of a batch's transaction accumulates; reset when sled runs it again.
#[derive(Default)]
struct BatchState {
    /// Changes of the per-state counters, written once at the end of the batch.
    counts: Deltas,
    /// Set when the update being applied found its record undecodable (at its first read,
    /// before it wrote anything).
    undecodable: bool,
}

/// One update inside a batch's transaction: the record, its history, the indexes derived
/// from it, `by_music`, the outbox. Sees the writes of the updates before it in the batch.
fn apply_one(
    trees: &TxTrees,
    task_id: &str,
    event: &Event,
    ctx: &Ctx,
    if_missing: IfMissing,
    batch: &mut BatchState,
) -> TxResult<AppliedOne> {
    let (meta, tasks, events, due_dl, due_poll, by_state, by_music, outbox) = trees;
    let (before, mut history) = match tasks.get(task_id.as_bytes())? {
        Some(bytes) => {
            let (task, history) = read_record(&bytes, task_id, events).map_err(|e| {
                if let ConflictableTransactionError::Abort(_) = e {
                    batch.undecodable = true;
                }
                e
            })?;
            (Some(task), history)
        }
        None => (None, Vec::new()),
    };
    let mut task = match (&before, if_missing) {
        (Some(t), _) => t.clone(),
        (None, IfMissing::Create) => Task::new(task_id.to_string(), None, ctx.now),
        (None, IfMissing::Reject) => return Ok(None),
    };
    let outcome = machine::apply(&mut task, event.clone(), ctx);

    // History, kept in the record, within the record's limit.
    append_history(&mut task, &mut history, &outcome.notes, ctx.now);
    fit_history(&mut history);

    // Indexes, derived from the old and new record.
    let old = before.as_ref();
    let indexes = Indexes {
        meta,
        due_download: due_dl,
        due_poll,
        by_state,
    };
    indexes.derive_into(task_id, old, Some(&task), &mut batch.counts)?;
    if let Some(music) = &task.music_task_id
        && old.and_then(|t| t.music_task_id.as_ref()) != Some(music)
    {
        by_music.insert(music.as_bytes(), task_id.as_bytes())?;
    }

    // The outbox: a settle and its notification are one write.
    if ctx.notify
        && let Some(kind) = machine::settle_notice(old.map(|t| t.state), &task)
    {
        enqueue(outbox, meta, &task, kind, ctx.now)?;
    }

    tasks.insert(
        task_id.as_bytes(),
        encode(codec::encode_task(&task, &history), task_id)?,
    )?;
    Ok(Some((before.map(|t| t.state), task, outcome)))
}

impl StoreError {
    /// The same failure again, for each update of a refused batch.
    fn clone_failure(&self) -> StoreError {
        match self {
            StoreError::Unwritable(r) => StoreError::Unwritable(r.clone()),
            StoreError::Io(e) => StoreError::Io(e.clone()),
            other => StoreError::Unwritable(other.to_string()),
        }
    }
}

fn injected() -> StoreError {
    StoreError::Io(sled::Error::Io(std::io::Error::other(INJECTED)))
}

fn encode(bytes: Result<Vec<u8>, codec::CodecError>, task_id: &str) -> TxResult<Vec<u8>> {
    bytes.map_err(|e| {
        ConflictableTransactionError::Abort(StoreError::Corrupt {
            what: format!("task {task_id}"),
            reason: e.to_string(),
        })
    })
}

fn decode(bytes: &[u8], task_id: &str) -> Result<Task, StoreError> {
    decode_record(bytes, task_id).map(|(task, _)| task)
}

/// A task record and its inline history (`None`: a schema-1 record).
fn decode_record(
    bytes: &[u8],
    task_id: &str,
) -> Result<(Task, Option<Vec<EventRecord>>), StoreError> {
    codec::decode_record(bytes).map_err(|e| match e {
        codec::CodecError::Newer { found, known, .. } => StoreError::Newer {
            what: format!("task {task_id}"),
            found,
            known,
        },
        other => StoreError::Corrupt {
            what: format!("task {task_id}"),
            reason: other.to_string(),
        },
    })
}

/// The short reason a quarantined record is listed with.
fn quarantine_reason(err: &StoreError) -> String {
    match err {
        StoreError::Newer { found, known, .. } => format!(
            "written by a newer coverd (record format v{found}; this build reads up to v{known})"
        ),
        StoreError::Corrupt { reason, .. } => format!("corrupt ({reason})"),
        other => other.to_string(),
    }
}

fn codec_reason(err: &codec::CodecError) -> String {
    match err {
        codec::CodecError::Newer { found, known, .. } => format!(
            "written by a newer coverd (record format v{found}; this build reads up to v{known})"
        ),
        other => format!("corrupt ({other})"),
    }
}

/// Notes that may be dropped past [`MAX_EVENTS_PER_TASK`]: they change nothing (duplicates,
/// polls, ignored events, retries, a repeated `admin track`).
fn is_repetitive(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Tracked
            | EventKind::DuplicateCallback
            | EventKind::Polled
            | EventKind::Ignored
            | EventKind::ImageRetry
    )
}

/// The trees derived from a task record: `due_download`, `due_poll`, and `by_state` (for
/// unfinished tasks) with the per-state counters in `meta`. (`by_music` is each caller's:
/// `apply`, copying and forgetting a task each have their own rule for it.)
pub(super) struct Indexes<'a> {
    pub meta: &'a TransactionalTree,
    pub due_download: &'a TransactionalTree,
    pub due_poll: &'a TransactionalTree,
    pub by_state: &'a TransactionalTree,
}

impl Indexes<'_> {
    /// Moves task `id`'s entries from what record `old` implied to what `new` implies (`None`:
    /// no record); writes only what changed.
    pub(super) fn derive(&self, id: &str, old: Option<&Task>, new: Option<&Task>) -> TxResult<()> {
        let mut counts = Deltas::default();
        self.derive_into(id, old, new, &mut counts)?;
        counts.write(self.meta)?;
        Ok(())
    }

    /// [`Indexes::derive`], but the counter changes are added to `counts` (a batch writes
    /// each counter once, at its end).
    fn derive_into(
        &self,
        id: &str,
        old: Option<&Task>,
        new: Option<&Task>,
        counts: &mut Deltas,
    ) -> TxResult<()> {
        reindex(
            self.due_download,
            old.and_then(Task::download_due),
            new.and_then(Task::download_due),
            id,
        )?;
        reindex(
            self.due_poll,
            old.and_then(Task::poll_due),
            new.and_then(Task::poll_due),
            id,
        )?;
        // Finished tasks have no `by_state` entry (see the module doc).
        let entry =
            |t: &Task| (!t.state.is_finished()).then(|| state_key(t.state, t.created_at, id));
        let (old_entry, new_entry) = (old.and_then(entry), new.and_then(entry));
        if old_entry != new_entry {
            if let Some(k) = old_entry {
                self.by_state.remove(k)?;
            }
            if let Some(k) = new_entry {
                self.by_state.insert(k, &[])?;
            }
        }
        if old.is_none() && new.is_some() {
            let seq = self
                .meta
                .get(RECENT_SEQ)?
                .map(|v| u64_from(&v))
                .unwrap_or(0);
            self.by_state.insert(&recent_key(seq), id.as_bytes())?;
            if let Some(gone) = seq.checked_sub(RECENT_TASKS) {
                self.by_state.remove(&recent_key(gone))?;
            }
            self.meta.insert(RECENT_SEQ, &(seq + 1).to_be_bytes())?;
        }
        counts.bytes = counts.bytes.saturating_add(stats::bytes_delta(old, new));
        let (old_state, new_state) = (old.map(|t| t.state), new.map(|t| t.state));
        if old_state != new_state {
            if let Some(s) = old_state {
                counts.add(s, -1);
            }
            if let Some(s) = new_state {
                counts.add(s, 1);
            }
        }
        Ok(())
    }
}

fn reindex(
    tree: &TransactionalTree,
    old: Option<Millis>,
    new: Option<Millis>,
    task_id: &str,
) -> TxResult<()> {
    if old == new {
        return Ok(());
    }
    if let Some(at) = old {
        tree.remove(time_key(at, task_id))?;
    }
    if let Some(at) = new {
        tree.insert(time_key(at, task_id), &[])?;
    }
    Ok(())
}

/// Changes of the per-state counters (`count/<code>` in `meta`) and of the stored bytes
/// (`stats`) not written yet.
#[derive(Default)]
pub(super) struct Deltas {
    states: Vec<(State, i64)>,
    bytes: i64,
}

impl Deltas {
    fn add(&mut self, state: State, delta: i64) {
        match self.states.iter_mut().find(|(s, _)| *s == state) {
            Some((_, d)) => *d += delta,
            None => self.states.push((state, delta)),
        }
    }

    /// Writes each counter that changed, once.
    fn write(&self, meta: &TransactionalTree) -> Result<(), UnabortableTransactionError> {
        for &(state, delta) in &self.states {
            if delta != 0 {
                bump_key(meta, count_key(state), delta)?;
            }
        }
        if self.bytes != 0 {
            bump_key(meta, stats::BYTES_KEY.to_vec(), self.bytes)?;
        }
        Ok(())
    }
}

/// Adds `delta` to the u64 counter at `key` in `meta` (saturating; absent reads as 0).
fn bump_key(
    meta: &TransactionalTree,
    key: Vec<u8>,
    delta: i64,
) -> Result<(), UnabortableTransactionError> {
    let current = meta.get(&key)?.map(|v| u64_from(&v)).unwrap_or(0);
    let next = current.saturating_add_signed(delta);
    meta.insert(key, &next.to_be_bytes())?;
    Ok(())
}

/// First bytes of the outbox's key spaces (see the module doc).
const OUTBOX_RECORD: u8 = b'n';
const OUTBOX_HEAD: u8 = b'h';
const OUTBOX_DUE: u8 = b'd';

/// Enqueues the notification of `task`'s settle: the next seq, the record, its due entry.
fn enqueue(
    outbox: &TransactionalTree,
    meta: &TransactionalTree,
    task: &Task,
    kind: crate::model::NotifyType,
    now: Millis,
) -> TxResult<()> {
    let head = head_key(&task.task_id);
    let seq = outbox
        .get(&head)?
        .map(|v| u32_from(&v))
        .unwrap_or(0)
        .saturating_add(1);
    outbox.insert(head, &seq.to_be_bytes())?;
    write_notification(outbox, meta, None, &Notification::new(task, seq, kind, now))
}

/// Writes notification `n` (replacing `old`), keeping its due entry and the per-state
/// counters in step.
fn write_notification(
    outbox: &TransactionalTree,
    meta: &TransactionalTree,
    old: Option<&Notification>,
    n: &Notification,
) -> TxResult<()> {
    let key = record_key(&n.task_id, n.seq);
    let due_key = |at: Millis| notify_due_key(at, &key);
    let (old_due, new_due) = (old.and_then(Notification::due), n.due());
    if old_due != new_due {
        if let Some(at) = old_due {
            outbox.remove(due_key(at))?;
        }
        if let Some(at) = new_due {
            outbox.insert(due_key(at), &[])?;
        }
    }
    if old.map(|o| o.state) != Some(n.state) {
        if let Some(o) = old {
            bump_key(meta, notify_count_key(o.state), -1)?;
        }
        bump_key(meta, notify_count_key(n.state), 1)?;
    }
    outbox.insert(key, encode(codec::encode_notification(n), &n.task_id)?)?;
    Ok(())
}

/// Removes all of a task's notifications (records, head, due entries) and takes them off
/// the counters, for `admin prune`. Removes nothing and returns `false` if one of them is
/// still `pending` or cannot be read: the task is not finished for the operator yet.
fn drop_notifications(
    outbox: &TransactionalTree,
    meta: &TransactionalTree,
    task_id: &str,
) -> TxResult<bool> {
    let head = head_key(task_id);
    let Some(latest) = outbox.get(&head)?.map(|v| u32_from(&v)) else {
        return Ok(true);
    };
    let mut found = Vec::new();
    for seq in 1..=latest {
        let Some(bytes) = outbox.get(record_key(task_id, seq))? else {
            continue;
        };
        match decode_notification(&bytes, task_id) {
            Ok(n) if n.state != NotifyState::Pending => found.push(n),
            _ => return Ok(false),
        }
    }
    for n in found {
        let key = record_key(task_id, n.seq);
        if let Some(at) = n.due() {
            outbox.remove(notify_due_key(at, &key))?;
        }
        bump_key(meta, notify_count_key(n.state), -1)?;
        outbox.remove(key)?;
    }
    outbox.remove(head)?;
    Ok(true)
}

/// The `due_notify` entry of the notification whose record key is `record_key`, due at
/// `at`: `d`, due ms, then the record key without its `n`.
fn notify_due_key(at: Millis, record_key: &[u8]) -> Vec<u8> {
    let mut k = vec![OUTBOX_DUE];
    k.extend_from_slice(&ms_bytes(at));
    k.extend_from_slice(&record_key[1..]);
    k
}

fn record_key(task_id: &str, seq: u32) -> Vec<u8> {
    let mut k = vec![OUTBOX_RECORD];
    k.extend_from_slice(&event_key(task_id, seq));
    k
}

fn head_key(task_id: &str) -> Vec<u8> {
    let mut k = vec![OUTBOX_HEAD];
    k.extend_from_slice(task_id.as_bytes());
    k
}

/// (task id, seq) from the part of a key after its tag (and due time): task id, 0x00, seq.
fn split_record_key(k: &[u8]) -> Option<(String, u32)> {
    let (rest, seq) = k.split_last_chunk::<4>()?;
    let (0, id) = rest.split_last()? else {
        return None;
    };
    Some((
        String::from_utf8_lossy(id).into_owned(),
        u32::from_be_bytes(*seq),
    ))
}

fn notify_count_key(state: NotifyState) -> Vec<u8> {
    let mut k = b"notify/".to_vec();
    k.push(state.code());
    k
}

fn decode_notification(bytes: &[u8], task_id: &str) -> Result<Notification, StoreError> {
    codec::decode_notification(bytes).map_err(|e| match e {
        codec::CodecError::Newer { found, known, .. } => StoreError::Newer {
            what: format!("notification of task {task_id}"),
            found,
            known,
        },
        other => StoreError::Corrupt {
            what: format!("notification of task {task_id}"),
            reason: other.to_string(),
        },
    })
}

fn u32_from(bytes: &[u8]) -> u32 {
    bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

fn count_key(state: State) -> Vec<u8> {
    let mut k = b"count/".to_vec();
    k.push(state.code());
    k
}

fn ms_bytes(ms: Millis) -> [u8; 8] {
    u64::try_from(ms).unwrap_or(0).to_be_bytes()
}

fn u64_from(bytes: &[u8]) -> u64 {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn time_key(at: Millis, task_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + task_id.len());
    k.extend_from_slice(&ms_bytes(at));
    k.extend_from_slice(task_id.as_bytes());
    k
}

fn state_key(state: State, created: Millis, task_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + task_id.len());
    k.push(state.code());
    k.extend_from_slice(&time_key(created, task_id));
    k
}

fn event_key(task_id: &str, seq: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(task_id.len() + 5);
    k.extend_from_slice(task_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::machine::Report;

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
