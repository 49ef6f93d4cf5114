//! The store's writer: the one place that applies the updates of `Store::apply_async` and
//! the one owner of every flush, on two threads. Updates arrive over a bounded queue. The
//! writer thread (`coverd-writer`) takes the first, drains what else is queued (at most
//! [`MAX_BATCH`]), has the store apply them all in one sled transaction, and hands the batch's
//! answers to the flusher thread (`coverd-flusher`, at most one batch waiting between them),
//! then goes on with the next batch. The flusher runs one round covering every ticket handed
//! out so far, publishes the durable ticket on a `watch`, and only then answers every update
//! of the batches it took. So N concurrent writers share one transaction and one round
//! (group commit) instead of N blocking-pool hops, N transactions and N rewrites of the
//! shared counter keys, and the transaction of one batch overlaps the fsync of the one
//! before. A full queue is refused at once to whoever uses [`Writer::try_apply`] (the callback
//! intake answers 503), never queued without bound. Flush requests (writes made outside
//! `apply`: intents, notification updates, the health stamp, `Store::flush`) go through the
//! same queue, so no waiter ever flushes by itself, and one that goes away (client reset,
//! timeout) cannot start or stop anything.
//!
//! A round makes the writes durable against power loss, not only against a crash: sled 0.34
//! flushes its log with `sync_file_range`, which neither writes the file's metadata nor
//! flushes the disk's cache, so after sled's own flush the round `fdatasync`s the log file
//! (`db/db`), `fsync`s every file sled created since the last round (blobs, snapshots, `conf`)
//! and the directories whose names changed. Owns these threads, the queue, the batching and
//! those fsyncs; must not touch trees or keys (the batch is applied by the closure the store
//! gives it: `Core::apply_batch` in `store`).
//!
//! A failed round is final ("fsyncgate"): the kernel reports a writeback error once, so a
//! later round that succeeds proves nothing about the pages it dropped. The flusher keeps the
//! first failure's reason and fails every later round with it, without I/O; the store marks
//! itself unable to take writes (`OnFailure`) and refuses every later update. A thread that
//! stops or panics before the store closes is reported (`Writer::stopped`), so the daemon
//! can say so and exit rather than answer 503 forever behind a healthy `/healthz`.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::{Applied, IfMissing, StoreError};
use crate::dirsync::sync_dir;
use crate::machine::{Ctx, Event};

/// Most updates applied in one transaction. Bounds the time the transaction holds sled's
/// (process-wide) transaction lock and the memory of one batch.
pub(super) const MAX_BATCH: usize = 256;
/// Updates that may wait for the writer; past this, [`Writer::try_apply`] refuses at once.
pub(super) const QUEUE: usize = 1024;

/// One update: the arguments of `Store::apply`.
pub(super) struct Write {
    pub task_id: String,
    pub event: Event,
    pub ctx: Ctx,
    pub if_missing: IfMissing,
}

impl Write {
    pub fn new(task_id: &str, event: Event, ctx: Ctx, if_missing: IfMissing) -> Write {
        Write {
            task_id: task_id.to_string(),
            event,
            ctx,
            if_missing,
        }
    }
}

/// What `Store::apply` returns for one update.
pub(super) type Outcome = Result<Option<Applied>, StoreError>;

/// Applies a batch in one transaction: one outcome per update, in order. Given by the store.
pub(super) type ApplyBatch = Box<dyn FnMut(&[Write]) -> Vec<Outcome> + Send + 'static>;

/// Called with the reason when a round fails (the store's health).
pub(super) type OnFailure = Box<dyn Fn(&str) + Send + 'static>;

enum Request {
    Apply(Write, oneshot::Sender<Outcome>),
    /// A round covering every ticket handed out so far.
    Flush,
}

/// What the writer has done so far; published after every round.
#[derive(Debug, Clone, Default)]
pub(super) struct Progress {
    /// Every ticket up to this one is on stable storage.
    pub durable: u64,
    /// The last round that failed was to cover the tickets up to this one.
    pub failed_upto: u64,
    /// Why that round failed.
    pub error: Option<String>,
}

/// The store's two threads, as `/healthz` and the logs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreThread {
    Writer,
    Flusher,
}

impl StoreThread {
    pub fn name(self) -> &'static str {
        match self {
            StoreThread::Writer => "store writer thread",
            StoreThread::Flusher => "store flusher thread",
        }
    }

    fn bit(self) -> u8 {
        match self {
            StoreThread::Writer => 1,
            StoreThread::Flusher => 2,
        }
    }
}

struct Shared {
    /// Rounds run since open, for tests and metrics.
    rounds: AtomicU64,
    /// Batches applied (one transaction each) since open.
    batches: AtomicU64,
    /// Updates applied through the writer since open.
    applied: AtomicU64,
    /// Rounds running right now, and the most ever seen at once (tests: never above 1).
    running: AtomicU32,
    max_running: AtomicU32,
    /// Test hook: while set, the writer holds the update it took and takes no other.
    paused: Mutex<bool>,
    resume: Condvar,
    /// Test hook: the next round fails as if `fdatasync` had.
    fail_next: AtomicBool,
    /// Test hook: the threads ([`StoreThread::bit`]) that panic when they next wake up.
    stop: AtomicU8,
    /// Set when the store closes: a thread that ends then has not stopped early.
    closing: AtomicBool,
    /// The first thread that stopped while the store was open, and how.
    stopped: watch::Sender<Option<String>>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            rounds: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            running: AtomicU32::new(0),
            max_running: AtomicU32::new(0),
            paused: Mutex::new(false),
            resume: Condvar::new(),
            fail_next: AtomicBool::new(false),
            stop: AtomicU8::new(0),
            closing: AtomicBool::new(false),
            stopped: watch::channel(None).0,
        }
    }

    /// Panics if a test asked `thread` to stop (a bug's panic, on demand).
    fn stop_if_asked(&self, thread: StoreThread) {
        if self.stop.load(Ordering::SeqCst) & thread.bit() != 0 {
            panic!("{} stopped by a test hook", thread.name());
        }
    }

    /// Called when `thread` ends: unless the store is closing, it stopped early (returned, or
    /// panicked with `panic`); the first such stop is kept (the daemon logs it, and every
    /// later update is refused with it).
    fn ended(&self, thread: StoreThread, panic: Option<Box<dyn std::any::Any + Send>>) {
        if panic.is_none() && self.closing.load(Ordering::SeqCst) {
            return;
        }
        let how = match panic {
            Some(p) => format!("{} panicked: {}", thread.name(), panic_message(p.as_ref())),
            None => format!("{} stopped", thread.name()),
        };
        self.stopped.send_if_modified(|s| {
            if s.is_some() {
                return false;
            }
            *s = Some(how);
            true
        });
    }

    fn wait_while_paused(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        while *paused {
            paused = self.resume.wait(paused).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The handle the store keeps; dropping it lets the threads finish what is queued, then
/// joins them.
pub(super) struct Writer {
    tx: Option<mpsc::Sender<Request>>,
    shared: Arc<Shared>,
    written: Arc<AtomicU64>,
    progress: watch::Receiver<Progress>,
    /// The applying thread, then the flushing one (joined in that order).
    threads: Vec<JoinHandle<()>>,
}

/// While held, the writer applies nothing (tests: fill the queue, form one batch).
#[cfg(any(test, feature = "testing"))]
pub struct WritesPaused(Arc<Shared>);

#[cfg(any(test, feature = "testing"))]
impl Drop for WritesPaused {
    fn drop(&mut self) {
        *self.0.paused.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.resume.notify_all();
    }
}

impl Writer {
    /// Runs a first round at once (so `conf`, the directories and everything written at open
    /// are durable before the store is used), then starts the writer and flusher threads with
    /// a queue of `queue` updates.
    pub fn start(
        db: sled::Db,
        db_dir: &Path,
        written: Arc<AtomicU64>,
        queue: usize,
        apply: ApplyBatch,
        on_failure: OnFailure,
    ) -> std::io::Result<Writer> {
        let mut syncer = Syncer::new(db_dir)?;
        db.flush().map_err(std::io::Error::other)?;
        syncer.round()?;
        // The data directory holds the entry of `db` itself.
        if let Some(parent) = db_dir.parent() {
            sync_dir(parent)?;
        }
        let shared = Arc::new(Shared::new());
        let (progress_tx, progress) = watch::channel(Progress::default());
        let (tx, rx) = mpsc::channel(queue.max(1));
        // At most one batch waits between the two threads: an applier ahead of the disk
        // blocks, the queue fills, and callbacks get 503.
        let (handoff, handed) = std::sync::mpsc::sync_channel(1);
        let flusher = std::thread::Builder::new()
            .name("coverd-flusher".into())
            .spawn({
                let mut flusher = Flusher {
                    shared: shared.clone(),
                    written: written.clone(),
                    db,
                    syncer,
                    progress: progress_tx,
                    on_failure,
                    done: 0,
                    poisoned: None,
                };
                move || {
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        flusher.run(&handed)
                    }));
                    // Said before `handed` is dropped: the writer, which then ends too, is
                    // not taken for the first to stop.
                    flusher.shared.ended(StoreThread::Flusher, ran.err());
                    drop(handed);
                }
            })?;
        let applier = std::thread::Builder::new()
            .name("coverd-writer".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        apply_loop(&shared, rx, apply, &handoff)
                    }));
                    shared.ended(StoreThread::Writer, ran.err());
                    drop(handoff);
                }
            });
        let applier = match applier {
            Ok(a) => a,
            Err(e) => {
                // The flusher ends when its handoff sender (dropped with the closure) is gone.
                let _ = flusher.join();
                return Err(e);
            }
        };
        Ok(Writer {
            tx: Some(tx),
            shared,
            written,
            progress,
            threads: vec![applier, flusher],
        })
    }

    fn sender(&self) -> Result<&mpsc::Sender<Request>, StoreError> {
        self.tx.as_ref().ok_or_else(|| self.stopped_error())
    }

    /// Applies `write` in the writer's next batch, waiting for room in the queue. Returns
    /// once the batch is applied and its round has run: [`Writer::durable`] then answers at
    /// once for the ticket. Dropping the future only stops waiting.
    pub async fn apply(&self, write: Write) -> Outcome {
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send(Request::Apply(write, reply))
            .await
            .map_err(|_| self.stopped_error())?;
        answer.await.map_err(|_| self.stopped_error())?
    }

    /// As [`Writer::apply`], but a full queue is [`StoreError::Busy`] at once.
    pub async fn try_apply(&self, write: Write) -> Outcome {
        let (reply, answer) = oneshot::channel();
        match self.sender()?.try_send(Request::Apply(write, reply)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(StoreError::Busy {
                    queued: self.queued(),
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.stopped_error()),
        }
        answer.await.map_err(|_| self.stopped_error())?
    }

    /// Waits until every write up to `ticket` is durable. Cancel-safe: dropping the future
    /// only stops waiting; the round it asked for runs anyway and serves the next waiter.
    pub async fn durable(&self, ticket: u64) -> Result<(), String> {
        if crate::broken::active(crate::broken::Break::AckBeforeFlush) {
            // TEST ONLY (`COVERD_TEST_BREAK`): a round asked for, not waited for.
            let _ = self.request();
            return Ok(());
        }
        // A ticket is only handed out after its write, so none can exceed `written`.
        let ticket = ticket.min(self.written.load(Ordering::SeqCst));
        let mut rx = self.progress.clone();
        if rx.borrow().durable >= ticket {
            return Ok(());
        }
        self.request().map_err(|e| e.to_string())?;
        let p = rx
            .wait_for(|p| p.durable >= ticket || p.failed_upto >= ticket)
            .await
            .map_err(|_| "the store is closed".to_string())?;
        if p.durable >= ticket {
            Ok(())
        } else {
            Err(p
                .error
                .clone()
                .unwrap_or_else(|| "flush failed".to_string()))
        }
    }

    /// Asks for a round covering every ticket handed out so far, without waiting for it. A
    /// full queue needs no request: the round after the queued updates covers them.
    pub fn request(&self) -> Result<(), StoreError> {
        match self.sender()?.try_send(Request::Flush) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.stopped_error()),
        }
    }

    pub fn rounds(&self) -> u64 {
        self.shared.rounds.load(Ordering::SeqCst)
    }

    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::SeqCst)
    }

    pub fn applied(&self) -> u64 {
        self.shared.applied.load(Ordering::SeqCst)
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn max_concurrent_rounds(&self) -> u32 {
        self.shared.max_running.load(Ordering::SeqCst)
    }

    /// Requests waiting in the queue (not yet taken by the writer).
    pub fn queued(&self) -> usize {
        self.tx
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    /// The answer to an update the threads can no longer take.
    fn stopped_error(&self) -> StoreError {
        StoreError::Stopped(
            self.stopped()
                .unwrap_or_else(|| "the store's writer thread stopped".into()),
        )
    }

    /// How the first of the two threads that stopped early did, if one did.
    pub fn stopped(&self) -> Option<String> {
        self.shared.stopped.borrow().clone()
    }

    /// Waits until a thread stops early; what [`Writer::stopped`] then says.
    pub async fn wait_stopped(&self) -> String {
        let mut rx = self.shared.stopped.subscribe();
        let stopped = rx.wait_for(Option::is_some).await.map(|s| s.clone());
        match stopped {
            Ok(s) => s.unwrap_or_default(),
            // The sender lives as long as this writer.
            Err(_) => std::future::pending().await,
        }
    }

    #[cfg(any(test, feature = "testing"))]
    /// Test hook: `thread` panics when it next wakes up; a flush request wakes both.
    pub fn stop_for_test(&self, thread: StoreThread) {
        self.shared.stop.fetch_or(thread.bit(), Ordering::SeqCst);
        let _ = self.request();
    }

    #[cfg(any(test, feature = "testing"))]
    /// Test hook: the next round fails as an `fdatasync` returning EIO would.
    pub fn fail_next_round(&self) {
        self.shared.fail_next.store(true, Ordering::SeqCst);
    }

    /// Test hook: see [`WritesPaused`].
    #[cfg(any(test, feature = "testing"))]
    pub fn pause(&self) -> WritesPaused {
        *self.shared.paused.lock().unwrap_or_else(|e| e.into_inner()) = true;
        WritesPaused(self.shared.clone())
    }
}

/// The text of a panic's payload (a `&str` or a `String`, as `panic!` makes them).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

impl Drop for Writer {
    fn drop(&mut self) {
        // The thread applies what is still queued, then sees the queue closed and ends.
        self.shared.closing.store(true, Ordering::SeqCst);
        drop(self.tx.take());
        *self.shared.paused.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.shared.resume.notify_all();
        // The threads hold a clone of the `sled::Db` and the store's trees; joining them is
        // what lets the store's last handle really close sled. The applier ends first; the
        // flusher then sees its handoff closed, runs a last round and ends.
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A batch handed from the applying thread to the flushing one: its answers, sent after the
/// round that covers its tickets (none for a flush request).
type Handoff = Vec<(oneshot::Sender<Outcome>, Outcome)>;

/// The applying thread: takes the first request, drains what else is queued, applies the
/// updates in one transaction and hands their answers to the flusher, which flushes while
/// this thread goes on with the next batch.
fn apply_loop(
    shared: &Shared,
    mut rx: mpsc::Receiver<Request>,
    mut apply: ApplyBatch,
    handoff: &std::sync::mpsc::SyncSender<Handoff>,
) {
    let mut requests = Vec::with_capacity(MAX_BATCH);
    let mut writes = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        shared.stop_if_asked(StoreThread::Writer);
        shared.wait_while_paused();
        requests.push(first);
        while requests.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => requests.push(r),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(requests.len());
        for request in requests.drain(..) {
            if let Request::Apply(write, reply) = request {
                writes.push(write);
                replies.push(reply);
            }
        }
        let outcomes = if writes.is_empty() {
            Vec::new()
        } else {
            shared.batches.fetch_add(1, Ordering::SeqCst);
            shared
                .applied
                .fetch_add(writes.len() as u64, Ordering::SeqCst);
            apply(&writes)
        };
        writes.clear();
        let mut answers: Handoff = replies.into_iter().zip(outcomes).collect();
        if crate::broken::active(crate::broken::Break::AckBeforeFlush) {
            // TEST ONLY (`COVERD_TEST_BREAK`): answered before the round that covers them.
            for (reply, outcome) in answers.drain(..) {
                let _ = reply.send(outcome);
            }
        }
        // Every ticket of the batch is taken by now: the next round covers them.
        if handoff.send(answers).is_err() {
            // The flusher is gone (it panicked): waiters see the store closed.
            return;
        }
    }
}

/// The flushing thread's state.
struct Flusher {
    shared: Arc<Shared>,
    written: Arc<AtomicU64>,
    db: sled::Db,
    syncer: Syncer,
    progress: watch::Sender<Progress>,
    on_failure: OnFailure,
    /// Tickets covered by the last round (durable, or failed).
    done: u64,
    /// Why a round failed, once one has: every later round fails with it, without I/O.
    poisoned: Option<String>,
}

impl Flusher {
    fn run(&mut self, handed: &std::sync::mpsc::Receiver<Handoff>) {
        while let Ok(mut answers) = handed.recv() {
            self.shared.stop_if_asked(StoreThread::Flusher);
            while let Ok(more) = handed.try_recv() {
                answers.extend(more);
            }
            let round = self.round();
            for (reply, outcome) in answers {
                // An update whose round failed is not stored as far as anyone may know.
                let outcome = match (&round, outcome) {
                    (Err(reason), Ok(Some(_))) => Err(StoreError::Flush(reason.clone())),
                    (_, outcome) => outcome,
                };
                // A waiter that went away only stops waiting.
                let _ = reply.send(outcome);
            }
        }
        // The store is closing: what was written outside `apply` since the last round.
        let _ = self.round();
    }

    /// One flush round covering every ticket handed out before it starts; none if every
    /// such ticket was covered already. A failed round is final ("fsyncgate"): the kernel
    /// reports a writeback error once and may have dropped the pages it could not write, so
    /// a later `fdatasync` that succeeds proves nothing about them. After the first failure
    /// no round runs any more, and every later ticket fails with the first reason.
    fn round(&mut self) -> Result<(), String> {
        let target = self.written.load(Ordering::SeqCst);
        if target <= self.done {
            return self.poisoned.clone().map_or(Ok(()), Err);
        }
        let result = match &self.poisoned {
            Some(reason) => Err(reason.clone()),
            None => {
                let shared = &self.shared;
                let now_running = shared.running.fetch_add(1, Ordering::SeqCst) + 1;
                shared.max_running.fetch_max(now_running, Ordering::SeqCst);
                let result = self
                    .db
                    .flush()
                    .map_err(|e| super::describe(&e))
                    .and_then(|_| {
                        if shared.fail_next.swap(false, Ordering::SeqCst) {
                            return Err(super::describe_io(&std::io::Error::from_raw_os_error(
                                5, // EIO
                            )));
                        }
                        self.syncer.round().map_err(|e| super::describe_io(&e))
                    });
                shared.running.fetch_sub(1, Ordering::SeqCst);
                shared.rounds.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = &result {
                    self.poisoned = Some(e.clone());
                    (self.on_failure)(e);
                }
                result
            }
        };
        self.done = target;
        match &result {
            Ok(()) => self
                .progress
                .send_modify(|p| p.durable = p.durable.max(target)),
            Err(e) => self.progress.send_modify(|p| {
                p.failed_upto = p.failed_upto.max(target);
                p.error = Some(e.clone());
            }),
        }
        result
    }
}

/// The fsyncs that sled leaves out.
struct Syncer {
    /// `db/db`, sled's log; opened read-only (fdatasync works on any descriptor, and a second
    /// descriptor does not touch sled's lock on its own).
    log: File,
    /// `db/blobs/` and `db/`, in that order (a blob's directory entry before the directory
    /// that holds `blobs`).
    dirs: [Watched; 2],
}

impl Syncer {
    fn new(dir: &Path) -> std::io::Result<Syncer> {
        Ok(Syncer {
            log: File::open(dir.join("db"))?,
            dirs: [
                Watched::new(dir.join("blobs")),
                Watched::new(dir.to_path_buf()),
            ],
        })
    }

    fn round(&mut self) -> std::io::Result<()> {
        // TEST ONLY (`COVERD_TEST_BREAK`): sled's flush alone.
        if !crate::broken::active(crate::broken::Break::SkipLogFdatasync) {
            self.log.sync_data()?;
        }
        for dir in &mut self.dirs {
            dir.sync_new()?;
        }
        Ok(())
    }
}

/// A directory of sled's whose new files and changed entries each round makes durable. Kept
/// open between rounds: a round reads it again from the start (no open, no allocation while
/// nothing changes).
struct Watched {
    path: PathBuf,
    /// `None` until the directory exists.
    dir: Option<rustix::fs::Dir>,
    /// Names seen at the last round that synced them.
    seen: BTreeSet<Vec<u8>>,
}

impl Watched {
    fn new(path: PathBuf) -> Watched {
        Watched {
            path,
            dir: None,
            seen: BTreeSet::new(),
        }
    }

    /// fsyncs every file that appeared since the last round, then the directory itself if
    /// its set of names changed (creations, renames and removals are entries of the
    /// directory).
    fn sync_new(&mut self) -> std::io::Result<()> {
        let dir = match &mut self.dir {
            Some(dir) => dir,
            None => match File::open(&self.path) {
                Ok(f) => self.dir.insert(rustix::fs::Dir::new(f)?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            },
        };
        // The common case, checked without allocating: every name is known, none is gone.
        dir.rewind();
        let mut count = 0;
        let mut changed = false;
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            count += 1;
            if !self.seen.contains(name) {
                changed = true;
                break;
            }
        }
        if !changed && count == self.seen.len() {
            return Ok(());
        }
        // Read it again, syncing each name not seen before.
        dir.rewind();
        let mut now = BTreeSet::new();
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if !self.seen.contains(name) {
                sync_new_file(&self.path.join(std::ffi::OsStr::from_bytes(name)))?;
            }
            now.insert(name.to_vec());
        }
        self.seen = now;
        rustix::fs::fsync(dir.fd()?)?;
        Ok(())
    }
}

/// fsyncs `path` if it is a regular file; one renamed or removed by sled meanwhile is left
/// to the directory's fsync.
fn sync_new_file(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match File::open(path) {
        Ok(f) => f.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Waits until no one holds sled's lock on `db/db` any more: after the last `sled::Db` handle
/// is dropped, sled's I/O threads may still hold its file for a moment (a log write they were
/// finishing). Returns once the lock could be taken (and let go at once), or after `limit`.
pub(super) fn wait_for_lock_release(db_file: &Path, limit: Duration) {
    let Ok(file) = File::open(db_file) else {
        return;
    };
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(200);
    loop {
        // The same `flock` sled takes (through fs2 too).
        match fs2::FileExt::try_lock_exclusive(&file) {
            Ok(()) => {
                let _ = fs2::FileExt::unlock(&file);
                return;
            }
            Err(e)
                if e.raw_os_error() == fs2::lock_contended_error().raw_os_error()
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
            Err(_) => return,
        }
    }
}
