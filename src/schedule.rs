//! The scheduling loop the background workers share: wait while the store cannot take
//! writes, do what is due, sleep until the next due time or a wake-up, stop at shutdown.
//! [`run_bounded`] runs it for a due index whose entries are worked on concurrently (the
//! downloads, the notifications): at most a fixed number at once, each entry once at a time,
//! the unfinished ones given a grace period at shutdown. Owns no index, no store write and
//! no decision about an entry (the [`DueWork`] does); must not touch sled.

use std::collections::HashSet;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::model::{Clock, Millis, Task, millis};
use crate::retry;
use crate::store::{Store, StoreError};

/// Longest a loop sleeps without looking at its index again.
pub const MAX_IDLE: Duration = Duration::from_secs(60);
/// Entries still being worked on at shutdown get this long before they are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the loop does next after looking at the store's health.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// The store takes writes: go on.
    Go,
    /// The loop waited for the store: look again from the top.
    Again,
    /// Shutdown.
    Stop,
}

/// While the store cannot take writes, waits until it can (nothing is worked on whose
/// result could not be recorded), logging the pause and the resumption as `what` (`polls`).
pub async fn wait_while_unwritable(
    store: &Store,
    what: &str,
    shutdown: &CancellationToken,
) -> Flow {
    let Some(reason) = store.write_failure() else {
        return Flow::Go;
    };
    tracing::warn!(reason, "{what} paused: the store cannot take writes");
    tokio::select! {
        _ = shutdown.cancelled() => return Flow::Stop,
        _ = store.writable() => {}
    }
    tracing::info!("{what} resumed: the store takes writes again");
    Flow::Again
}

/// Sleeps until `next` (at least `min`, at most [`MAX_IDLE`]; `MAX_IDLE` when nothing is
/// due), a wake-up or shutdown; `false` at shutdown.
pub async fn sleep_until_due(
    clock: &dyn Clock,
    next: Option<Millis>,
    min: Duration,
    wake: &Notify,
    shutdown: &CancellationToken,
) -> bool {
    let sleep = next
        .map(|at| Duration::from_millis(u64::try_from(at - clock.now()).unwrap_or(0)))
        .unwrap_or(MAX_IDLE)
        .clamp(min, MAX_IDLE);
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = wake.notified() => true,
        _ = tokio::time::sleep(sleep) => true,
    }
}

/// Task `task_id` as a worker reads it before working on it: `None` when it is gone, or
/// cannot be read (logged as not `done` now; an undecodable record was logged by the store,
/// which quarantines it so its index skips it from now on).
pub fn task_to_work_on(store: &Store, task_id: &str, done: &str) -> Option<Task> {
    match store.get(task_id) {
        Ok(task) => task,
        Err(e) if e.is_undecodable() => None,
        Err(e) => {
            tracing::error!(
                task_id,
                "task {task_id} not {done} now: cannot read it from the store: {e}"
            );
            None
        }
    }
}

/// How a worker left its entry.
pub enum Finished {
    /// Done with it for now; the index brings it back when it is due again.
    Done,
    /// Leave it alone until the next start (its record cannot be decoded).
    KeepOut,
}

/// The words [`run_bounded`] logs with.
pub struct Names {
    /// The work, plural (`downloads`).
    pub what: &'static str,
    /// The index read (`the download index`).
    pub index: &'static str,
    /// What becomes of entries abandoned at shutdown.
    pub abandoned: &'static str,
}

/// What [`run_bounded`] schedules with: the store and clock the due times are read from,
/// the wake-up, the entries being worked on and the slots that bound them.
pub struct Scheduler<K> {
    names: &'static Names,
    store: Store,
    clock: Arc<dyn Clock>,
    wake: Arc<Notify>,
    keys: Mutex<HashSet<K>>,
    slots: Arc<Semaphore>,
}

impl<K: Eq + Hash> Scheduler<K> {
    /// At most `max` entries at once (at least one); `wake` is woken when there is new work.
    pub fn new(
        names: &'static Names,
        store: Store,
        clock: Arc<dyn Clock>,
        wake: Arc<Notify>,
        max: usize,
    ) -> Scheduler<K> {
        Scheduler {
            names,
            store,
            clock,
            wake,
            keys: Mutex::new(HashSet::new()),
            slots: Arc::new(Semaphore::new(max.max(1))),
        }
    }

    fn keys(&self) -> MutexGuard<'_, HashSet<K>> {
        // A poisoned set only means a worker panicked; the set itself is still valid.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A due index worked on concurrently by [`run_bounded`].
pub trait DueWork: Send + Sync + Sized + 'static {
    /// One entry of the index.
    type Key: Clone + Eq + Hash + Send + Sync + 'static;

    fn scheduler(&self) -> &Scheduler<Self::Key>;

    /// The index's entries from the earliest, at most `limit`, each with its due time
    /// (those due later than `now` may be left out).
    fn queue(&self, now: Millis, limit: usize) -> Result<Vec<(Millis, Self::Key)>, StoreError>;

    /// When to look again if [`DueWork::queue`] named nothing due later.
    fn next_due(&self, _now: Millis) -> Result<Option<Millis>, StoreError> {
        Ok(None)
    }

    /// Until when nothing is started (beyond the store's health), if anything holds it.
    fn paused_until(&self) -> Option<tokio::time::Instant> {
        None
    }

    /// Called when [`DueWork::paused_until`] has passed.
    fn end_pause(&self) {}

    /// Works on one entry.
    fn work(
        self: Arc<Self>,
        key: Self::Key,
        shutdown: CancellationToken,
    ) -> impl Future<Output = Finished> + Send;
}

/// Runs `work` until `shutdown`: starts a worker for each due entry not in flight while a
/// slot is free, then sleeps until the next due time or a wake-up. Store errors do not stop
/// it: it logs them and tries again.
pub async fn run_bounded<W: DueWork>(work: Arc<W>, shutdown: CancellationToken) {
    let s = work.scheduler();
    let names = s.names;
    let mut workers = JoinSet::new();
    loop {
        while workers.try_join_next().is_some() {}
        match wait_while_unwritable(&s.store, names.what, &shutdown).await {
            Flow::Go => {}
            Flow::Again => continue,
            Flow::Stop => break,
        }
        if let Some(until) = work.paused_until() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(until) => {}
            }
            work.end_pause();
            continue;
        }
        let next = match dispatch(&work, &mut workers, &shutdown) {
            Ok(next) => next,
            Err(e) => {
                // The store may recover (disk space freed): keep trying, slowly.
                tracing::error!(
                    error = %e,
                    "{} paused: cannot read {}: {e}; retrying",
                    names.what,
                    names.index
                );
                Some(s.clock.now().saturating_add(millis(retry::STORE_RETRY)))
            }
        };
        if !sleep_until_due(s.clock.as_ref(), next, Duration::ZERO, &s.wake, &shutdown).await {
            break;
        }
    }
    if workers.is_empty() {
        return;
    }
    let n = workers.len();
    tracing::info!(
        n,
        "shutting down: waiting for {n} unfinished {}",
        names.what
    );
    let finished = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while workers.join_next().await.is_some() {}
    });
    if finished.await.is_err() {
        tracing::warn!(
            "shutting down: abandoning unfinished {} after {SHUTDOWN_GRACE:?}; {}",
            names.what,
            names.abandoned
        );
        workers.abort_all();
    }
}

/// Starts a worker for each due entry not in flight while a slot is free; returns the
/// earliest due time of an entry not started.
fn dispatch<W: DueWork>(
    work: &Arc<W>,
    workers: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) -> Result<Option<Millis>, StoreError> {
    let in_flight = work.scheduler();
    let now = in_flight.clock.now();
    let free = in_flight.slots.available_permits();
    if free == 0 {
        // A finishing worker wakes the loop.
        return Ok(None);
    }
    // Entries in flight stay in the index until they finish, so look past them.
    let busy = in_flight.keys().len();
    for (at, key) in work.queue(now, free + busy)? {
        if in_flight.keys().contains(&key) {
            continue;
        }
        if at > now {
            return Ok(Some(at));
        }
        let Ok(permit) = in_flight.slots.clone().try_acquire_owned() else {
            break;
        };
        in_flight.keys().insert(key.clone());
        let guard = Release {
            work: work.clone(),
            key: key.clone(),
            keep: false,
            permit: Some(permit),
        };
        let (w, shutdown) = (work.clone(), shutdown.clone());
        workers.spawn(async move {
            // Released however the worker ends: finished, panicked or aborted.
            let mut guard = guard;
            if let Finished::KeepOut = w.work(key, shutdown).await {
                guard.keep = true;
            }
        });
    }
    work.next_due(now)
}

/// Frees an entry's slot and (unless it is kept out) its key when its worker ends, and
/// wakes the loop.
struct Release<W: DueWork> {
    work: Arc<W>,
    key: W::Key,
    keep: bool,
    permit: Option<OwnedSemaphorePermit>,
}

impl<W: DueWork> Drop for Release<W> {
    fn drop(&mut self) {
        if !self.keep {
            self.work.scheduler().keys().remove(&self.key);
        }
        // The slot is free before the loop looks again.
        drop(self.permit.take());
        self.work.scheduler().wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::model::ManualClock;

    const NAMES: Names = Names {
        what: "test entries",
        index: "the test index",
        abandoned: "they come back",
    };

    /// An index of entries all due now; working on one blocks until the test lets it
    /// finish, then removes it, except the one that is kept out.
    struct Entries {
        scheduler: Scheduler<u32>,
        due: Mutex<Vec<u32>>,
        gate: Semaphore,
        running: AtomicUsize,
        most: AtomicUsize,
        runs: Mutex<Vec<u32>>,
        kept_out: u32,
    }

    impl DueWork for Entries {
        type Key = u32;
        fn scheduler(&self) -> &Scheduler<u32> {
            &self.scheduler
        }
        fn queue(&self, now: Millis, limit: usize) -> Result<Vec<(Millis, u32)>, StoreError> {
            let due = self.due.lock().unwrap();
            Ok(due.iter().take(limit).map(|k| (now, *k)).collect())
        }
        async fn work(self: Arc<Self>, key: u32, _: CancellationToken) -> Finished {
            self.runs.lock().unwrap().push(key);
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            if key == self.kept_out {
                self.running.fetch_sub(1, Ordering::SeqCst);
                return Finished::KeepOut;
            }
            self.gate.acquire().await.unwrap().forget();
            self.due.lock().unwrap().retain(|k| *k != key);
            self.running.fetch_sub(1, Ordering::SeqCst);
            Finished::Done
        }
    }

    /// Every due entry is worked on once, never more than the slots at a time; one kept out
    /// is not started again, and a finishing worker wakes the loop for the next.
    #[tokio::test]
    async fn bounded_runner_works_each_due_entry_once_within_its_slots() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_000));
        let work = Arc::new(Entries {
            scheduler: Scheduler::new(&NAMES, store, clock, Arc::new(Notify::new()), 2),
            due: Mutex::new((0..7).collect()),
            gate: Semaphore::new(0),
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            runs: Mutex::new(Vec::new()),
            kept_out: 0,
        });
        let shutdown = CancellationToken::new();
        let runner = tokio::spawn(run_bounded(work.clone(), shutdown.clone()));
        // One finish at a time; the loop is woken by each and starts the next entry.
        for done in 1..=6 {
            while work.runs.lock().unwrap().len() < (done + 1).min(7) {
                tokio::task::yield_now().await;
            }
            work.gate.add_permits(1);
            while work.due.lock().unwrap().len() > 7 - done {
                tokio::task::yield_now().await;
            }
        }
        // Let the loop look at the index once more: only the kept-out entry is left.
        work.scheduler.wake.notify_one();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        shutdown.cancel();
        runner.await.unwrap();
        let mut runs = work.runs.lock().unwrap().clone();
        runs.sort();
        assert_eq!(runs, (0..7).collect::<Vec<_>>(), "each entry once");
        assert_eq!(
            work.most.load(Ordering::SeqCst),
            2,
            "at most the slots at once"
        );
        assert_eq!(*work.due.lock().unwrap(), vec![0]);
    }
}
