//! Opening and closing the store: the data directory's `db/` (refused while a restore did
//! not finish, or while another process holds sled's lock), sled's settings, the trees, the
//! schema check and migrations (`migrate`), the writer's threads; closing, which returns
//! only once sled's lock is free. Must not read or write records itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::error::StoreError;
use super::health::Health;
use super::{Core, Inner, Store, stats, summary, writer};

/// sled's page cache; its default is 1 GiB. 8 MiB: peak RSS while ingesting 100k callbacks
/// fell from 145 to ~85 MiB against 64 MiB, with no measurable change in ingest or restart
/// (docs/benchmarks.md).
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Waits, when the store's last handle is gone, until sled has let go of its lock, so the
/// directory can be opened again at once (in this process too). `None`: nothing to wait for.
pub(super) struct ReleaseOnDrop(Option<PathBuf>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            writer::wait_for_lock_release(&path.join("db"), LOCK_RELEASE_LIMIT);
        }
    }
}

/// Longest a closing store waits for sled's I/O threads to let go of the lock.
pub(super) const LOCK_RELEASE_LIMIT: Duration = Duration::from_secs(10);

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
    ///
    /// [`MIGRATION_PROGRESS_EVERY`]: super::MIGRATION_PROGRESS_EVERY
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
            .flush_every_ms(periodic_flush_ms())
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
        let health = Arc::new(Health::new());
        let core = Arc::new(Core {
            meta: tree("meta")?,
            tasks: tree("tasks")?,
            events: tree("events")?,
            due_download: tree("due_download")?,
            due_poll: tree("due_poll")?,
            by_state: tree("by_state")?,
            by_music: tree("by_music")?,
            intents: tree("intents")?,
            kind_intents: tree("kind_intents")?,
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
}

/// sled's periodic flush, every 500 ms: a background flush of its buffers and an `fsync` of
/// its log (`Store::flush`'s rounds do not wait for it). TEST ONLY: off under
/// `COVERD_TEST_BREAK=skip-log-fdatasync`, which must rely on sled's `flush()` alone; with
/// it, whether the power loop's cut right after the first 200 lost that write depended on
/// whether the periodic `fsync` had run in between (the loop missed the broken build about
/// once in ten runs on a loaded machine).
fn periodic_flush_ms() -> Option<u64> {
    (!crate::broken::active(crate::broken::Break::SkipLogFdatasync)).then_some(500)
}
