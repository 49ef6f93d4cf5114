//! The store's flusher thread: the one owner of every flush. Writers take a ticket after
//! their write and wait (on a `watch`) until a flush round covering that ticket has finished;
//! the thread runs one round at a time, so concurrent waiters share a round (group commit),
//! and a waiter that goes away (client reset, timeout) cannot start or stop anything.
//!
//! A round makes the writes durable against power loss, not only against a crash: sled 0.34
//! flushes its log with `sync_file_range`, which neither writes the file's metadata nor
//! flushes the disk's cache, so after sled's own flush the round `fdatasync`s the log file
//! (`db/db`), `fsync`s every file sled created since the last round (blobs, snapshots, `conf`)
//! and the directories whose names changed. Owns this thread and those fsyncs; must not
//! touch trees or keys (that is `store`).
//!
//! Shaped so that it can later become the store's single writer (batching the writes
//! themselves): the queue of requests is its only input.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// What the flusher has done so far; published after every round.
#[derive(Debug, Clone, Default)]
pub(super) struct Progress {
    /// Every ticket up to this one is on stable storage.
    pub durable: u64,
    /// The last round that failed was to cover the tickets up to this one.
    pub failed_upto: u64,
    /// Why that round failed.
    pub error: Option<String>,
}

/// Requests from writers, guarded by one mutex.
#[derive(Debug, Default)]
struct Requests {
    /// The highest ticket some waiter wants durable.
    wanted: u64,
    stop: bool,
}

struct Shared {
    requests: Mutex<Requests>,
    wake: Condvar,
    /// Rounds run since open, for tests and metrics.
    rounds: AtomicU64,
    /// Rounds running right now, and the most ever seen at once (tests: never above 1).
    running: AtomicU32,
    max_running: AtomicU32,
}

/// Called with the reason when a round fails (the store's health).
pub(super) type OnFailure = Box<dyn Fn(&str) + Send + 'static>;

/// The handle the store keeps; dropping it stops and joins the thread.
pub(super) struct Flusher {
    shared: Arc<Shared>,
    written: Arc<AtomicU64>,
    progress: watch::Receiver<Progress>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Runs a first round at once (so `conf`, the directories and everything sled wrote at
    /// open are durable before the store is used), then starts the thread.
    pub fn start(
        db: sled::Db,
        db_dir: &Path,
        written: Arc<AtomicU64>,
        on_failure: OnFailure,
    ) -> std::io::Result<Flusher> {
        let mut syncer = Syncer::new(db_dir)?;
        db.flush().map_err(std::io::Error::other)?;
        syncer.round_files()?;
        // The data directory holds the entry of `db` itself.
        if let Some(parent) = db_dir.parent() {
            sync_dir(parent)?;
        }
        let shared = Arc::new(Shared {
            requests: Mutex::new(Requests::default()),
            wake: Condvar::new(),
            rounds: AtomicU64::new(0),
            running: AtomicU32::new(0),
            max_running: AtomicU32::new(0),
        });
        let (tx, progress) = watch::channel(Progress::default());
        let thread = std::thread::Builder::new()
            .name("coverd-flusher".into())
            .spawn({
                let shared = shared.clone();
                let written = written.clone();
                move || run(&shared, &written, db, syncer, &tx, &on_failure)
            })?;
        Ok(Flusher {
            shared,
            written,
            progress,
            thread: Some(thread),
        })
    }

    /// Waits until every write up to `ticket` is durable. Cancel-safe: dropping the future
    /// only stops waiting; the round it asked for runs anyway and serves the next waiter.
    pub async fn durable(&self, ticket: u64) -> Result<(), String> {
        // A ticket is only handed out after its write, so none can exceed `written`.
        let ticket = ticket.min(self.written.load(Ordering::SeqCst));
        let mut rx = self.progress.clone();
        if rx.borrow().durable >= ticket {
            return Ok(());
        }
        self.request(ticket);
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

    /// Asks for a round covering `ticket` without waiting for it.
    pub fn request(&self, ticket: u64) {
        {
            let mut r = lock(&self.shared.requests);
            r.wanted = r.wanted.max(ticket);
        }
        self.shared.wake.notify_one();
    }

    pub fn rounds(&self) -> u64 {
        self.shared.rounds.load(Ordering::SeqCst)
    }

    pub fn max_concurrent_rounds(&self) -> u32 {
        self.shared.max_running.load(Ordering::SeqCst)
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        lock(&self.shared.requests).stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread holds a clone of the `sled::Db`; joining it is what lets the store's
            // last handle really close sled.
            let _ = thread.join();
        }
    }
}

fn lock(m: &Mutex<Requests>) -> std::sync::MutexGuard<'_, Requests> {
    // The guarded data is two plain fields; a panic elsewhere leaves them valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(
    shared: &Shared,
    written: &AtomicU64,
    db: sled::Db,
    mut syncer: Syncer,
    progress: &watch::Sender<Progress>,
    on_failure: &OnFailure,
) {
    let mut done = 0u64;
    loop {
        {
            let mut r = lock(&shared.requests);
            while !r.stop && r.wanted <= done {
                r = shared.wake.wait(r).unwrap_or_else(|e| e.into_inner());
            }
            if r.stop {
                return;
            }
        }
        // Every write whose ticket is ≤ target finished before this round starts.
        let target = written.load(Ordering::SeqCst);
        let now_running = shared.running.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_running.fetch_max(now_running, Ordering::SeqCst);
        let result = db
            .flush()
            .map_err(|e| e.to_string())
            .and_then(|_| syncer.round().map_err(|e| e.to_string()));
        shared.running.fetch_sub(1, Ordering::SeqCst);
        shared.rounds.fetch_add(1, Ordering::SeqCst);
        done = done.max(target);
        match result {
            Ok(()) => progress.send_modify(|p| p.durable = p.durable.max(target)),
            Err(e) => {
                on_failure(&e);
                progress.send_modify(|p| {
                    p.failed_upto = p.failed_upto.max(target);
                    p.error = Some(e);
                });
            }
        }
    }
}

/// The fsyncs that sled leaves out.
struct Syncer {
    dir: PathBuf,
    /// `db/db`, sled's log; opened read-only (fdatasync works on any descriptor, and a second
    /// descriptor does not touch sled's lock on its own).
    log: File,
    /// Names seen in `db/` and `db/blobs/` at the last round that synced them.
    names: BTreeSet<String>,
    blobs: BTreeSet<String>,
}

impl Syncer {
    fn new(dir: &Path) -> std::io::Result<Syncer> {
        Ok(Syncer {
            dir: dir.to_path_buf(),
            log: File::open(dir.join("db"))?,
            names: BTreeSet::new(),
            blobs: BTreeSet::new(),
        })
    }

    fn round(&mut self) -> std::io::Result<()> {
        self.log.sync_data()?;
        self.round_files()
    }

    /// fsyncs every file that appeared in `db/` or `db/blobs/` since the last round, then
    /// the directory (creations, renames and removals are entries of the directory).
    fn round_files(&mut self) -> std::io::Result<()> {
        let blob_dir = self.dir.join("blobs");
        if sync_new(&blob_dir, &mut self.blobs)? {
            sync_dir(&blob_dir)?;
        }
        let dir = self.dir.clone();
        if sync_new(&dir, &mut self.names)? {
            sync_dir(&dir)?;
        }
        Ok(())
    }
}

/// fsyncs the files in `dir` not in `seen`; returns whether the set of names changed.
fn sync_new(dir: &Path, seen: &mut BTreeSet<String>) -> std::io::Result<bool> {
    let mut now = BTreeSet::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !seen.contains(&name) && entry.file_type()?.is_file() {
            match File::open(entry.path()) {
                Ok(f) => f.sync_all()?,
                // Renamed or removed by sled meanwhile: the directory sync covers it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        now.insert(name);
    }
    let changed = now != *seen;
    *seen = now;
    Ok(changed)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
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
