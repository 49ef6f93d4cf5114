//! The daemon's workers and what their death does: [`Worker`] (the loops and the store's two
//! threads, named on `/healthz`), `Workers` (the loops in a `JoinSet` of their own, watched
//! together with the store's threads: the first that stops or panics is named on `/healthz`,
//! logged, and ends the daemon, which exits with status 70), the timing of that stop, and
//! the test hook [`Faults`] that stops one. Owns the watching; must not start the loops'
//! parts (the daemon builds them) or decide anything a loop does.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::server::Health;
use crate::store::{Store, StoreThread};

/// After a worker died, the daemon serves on this long, `/healthz` answering 503 with the
/// worker's name and callbacks answered by what the store can do, then stops; in all it
/// exits with status 70 within SPEC's 5 s: this, [`WORKER_DEATH_GRACE`],
/// [`WORKER_DEATH_FLUSH`] and `main`'s runtime shutdown (0.5 s) add up to 4 s.
const WORKER_DEATH_LINGER: Duration = Duration::from_secs(1);
/// Requests and workers still running when the daemon stops after a worker died get this
/// long before they are abandoned.
pub(super) const WORKER_DEATH_GRACE: Duration = Duration::from_secs(2);
/// The last flush after a worker died gets this long (every 200 was flushed before it).
pub(super) const WORKER_DEATH_FLUSH: Duration = Duration::from_millis(500);

/// The daemon's workers: one that stops or panics while the daemon runs makes `/healthz`
/// 503 naming it, and the daemon exit with status 70.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Worker {
    Downloads,
    Polls,
    Notifications,
    StoreWriter,
    StoreFlusher,
}

impl Worker {
    pub const ALL: [Worker; 5] = [
        Worker::Downloads,
        Worker::Polls,
        Worker::Notifications,
        Worker::StoreWriter,
        Worker::StoreFlusher,
    ];

    /// How `/healthz` and the logs name it.
    pub fn name(self) -> &'static str {
        match self {
            Worker::Downloads => "download loop",
            Worker::Polls => "poll loop",
            Worker::Notifications => "notify loop",
            Worker::StoreWriter => StoreThread::Writer.name(),
            Worker::StoreFlusher => StoreThread::Flusher.name(),
        }
    }

    /// The short name of `COVERD_TEST_STOP_WORKER` (`download`, `poll`, `notify`, `writer`,
    /// `flusher`).
    pub fn parse(short: &str) -> Option<Worker> {
        match short {
            "download" => Some(Worker::Downloads),
            "poll" => Some(Worker::Polls),
            "notify" => Some(Worker::Notifications),
            "writer" => Some(Worker::StoreWriter),
            "flusher" => Some(Worker::StoreFlusher),
            _ => None,
        }
    }

    #[cfg(any(test, feature = "testing"))]
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Test hook ([`Hooks::faults`](super::Hooks::faults)): makes a worker panic on demand, as
/// a bug would. A loop panics in its own task (the loop's future is dropped by the
/// unwinding); the store's threads panic when they next wake up. Not used by coverd
/// itself, except through the test-only `COVERD_TEST_STOP_WORKER` of `main.rs`. Only with
/// the `testing` feature.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug)]
pub struct Faults {
    requested: tokio::sync::watch::Sender<u8>,
}

#[cfg(any(test, feature = "testing"))]
impl Default for Faults {
    fn default() -> Faults {
        Faults {
            requested: tokio::sync::watch::channel(0).0,
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl Faults {
    /// Makes `worker` panic now.
    pub fn stop(&self, worker: Worker) {
        self.requested.send_modify(|m| *m |= worker.bit());
    }

    async fn requested(&self, worker: Worker) {
        let mut rx = self.requested.subscribe();
        if rx.wait_for(|m| m & worker.bit() != 0).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The workers' test hook: [`Hooks::faults`](super::Hooks::faults), or nothing without the
/// `testing` feature.
#[cfg(any(test, feature = "testing"))]
pub(super) type FaultHook = Option<Arc<Faults>>;
#[cfg(not(any(test, feature = "testing")))]
pub(super) type FaultHook = NoFaults;

/// No fault hook (a build without the `testing` feature).
#[cfg(not(any(test, feature = "testing")))]
#[derive(Clone)]
pub(super) struct NoFaults;

/// Waits until a test asks `worker` to stop; never without [`Faults`].
#[cfg(any(test, feature = "testing"))]
async fn fault(faults: &FaultHook, worker: Worker) {
    match faults {
        Some(f) => f.requested(worker).await,
        None => std::future::pending().await,
    }
}

/// Never: a build without the `testing` feature has no fault hook.
#[cfg(not(any(test, feature = "testing")))]
async fn fault(_: &FaultHook, _: Worker) {
    std::future::pending().await
}

/// Makes the store's `thread` panic, for [`fault`] (which never asks it without the
/// `testing` feature).
fn stop_store_thread(store: &Store, thread: StoreThread) {
    #[cfg(any(test, feature = "testing"))]
    store.stop_thread_for_test(thread);
    #[cfg(not(any(test, feature = "testing")))]
    let _ = (store, thread);
}

/// The workers whose death is fatal: the loops, in a set of their own, and (through the
/// store) the store's two threads.
pub(super) struct Workers {
    set: JoinSet<()>,
    names: HashMap<Id, Worker>,
    faults: FaultHook,
}

impl Workers {
    pub(super) fn new(faults: FaultHook) -> Workers {
        Workers {
            set: JoinSet::new(),
            names: HashMap::new(),
            faults,
        }
    }

    /// Runs `run`, the loop of `worker`, until it ends (at shutdown).
    pub(super) fn spawn(&mut self, worker: Worker, run: impl Future<Output = ()> + Send + 'static) {
        #[cfg(any(test, feature = "testing"))]
        let run = {
            let faults = self.faults.clone();
            async move {
                tokio::select! {
                    _ = run => {}
                    _ = fault(&faults, worker) => panic!("{} stopped by a test hook", worker.name()),
                }
            }
        };
        let handle = self.set.spawn(run);
        self.names.insert(handle.id(), worker);
    }

    /// Watches the workers until they have all ended at shutdown: the first that returns
    /// before shutdown or panics (a loop; or the store's writer or flusher thread) is named
    /// on `/healthz` at once and logged, and [`WORKER_DEATH_LINGER`] later stops the daemon,
    /// which then exits with status 70.
    pub(super) async fn watch(
        mut self,
        store: Store,
        health: Arc<Health>,
        died: Arc<std::sync::Mutex<Option<String>>>,
        shutdown: CancellationToken,
    ) {
        let mut stop_at: Option<tokio::time::Instant> = None;
        let (mut store_seen, mut writer_asked, mut flusher_asked) = (false, false, false);
        loop {
            let stop = async {
                match stop_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let how = tokio::select! {
                _ = stop => {
                    stop_at = None;
                    shutdown.cancel();
                    None
                }
                joined = self.set.join_next_with_id() => {
                    let Some(joined) = joined else {
                        // Every loop has ended: wait out the linger of a death, if any.
                        if let Some(at) = stop_at {
                            tokio::time::sleep_until(at).await;
                            shutdown.cancel();
                        }
                        return;
                    };
                    let (id, failure) = match joined {
                        Ok((id, ())) => (id, None),
                        Err(e) => (e.id(), Some(e)),
                    };
                    let name = self.names.get(&id).map_or("a worker", |w| w.name());
                    match failure {
                        None if shutdown.is_cancelled() => None,
                        None => Some(format!("{name} stopped")),
                        Some(e) if e.is_panic() => {
                            Some(format!("{name} panicked: {}", panic_message(e.into_panic())))
                        }
                        Some(_) if shutdown.is_cancelled() => None,
                        Some(_) => Some(format!("{name} was cancelled")),
                    }
                }
                how = store.thread_stopped(), if !store_seen => {
                    store_seen = true;
                    Some(how)
                }
                _ = fault(&self.faults, Worker::StoreWriter), if !writer_asked => {
                    writer_asked = true;
                    stop_store_thread(&store, StoreThread::Writer);
                    None
                }
                _ = fault(&self.faults, Worker::StoreFlusher), if !flusher_asked => {
                    flusher_asked = true;
                    stop_store_thread(&store, StoreThread::Flusher);
                    None
                }
            };
            if let Some(how) = how
                && health.worker_stopped(how.clone())
            {
                tracing::error!(
                    "{how}: /healthz answers 503; exiting with status 70 so that the service manager restarts coverd"
                );
                *died.lock().unwrap_or_else(|e| e.into_inner()) = Some(how);
                stop_at = Some(tokio::time::Instant::now() + WORKER_DEATH_LINGER);
            }
        }
    }
}

/// The text of a panic's payload (a `&str` or a `String`, as `panic!` makes them).
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}
