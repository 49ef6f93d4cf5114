//! `coverd serve`: starts every part in order (store, crash recovery, listeners, workers),
//! tells systemd when it is ready, and stops them in reverse order on shutdown. Watches the
//! workers: one that stops or panics is named on `/healthz` and ends the daemon (exit 70).
//! Owns the lifecycle only; each part's behaviour lives in its own module.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, ADMIN_SOCKET};
use crate::callback::Intake;
use crate::config::Config;
use crate::download::{self, Downloader};
use crate::fetch::Fetcher;
use crate::guard::UrlGuard;
use crate::kie::KieClient;
use crate::metrics::Metrics;
use crate::model::{Clock, SystemClock};
use crate::notify::Notifier;
use crate::poll::Poller;
use crate::server::{self, Health, Public};
use crate::sharing::FileAccess;
use crate::store::{Store, StoreError, StoreThread};

/// A private directory inside the data directory where the admin socket is bound and made
/// 0600 before it is renamed into place (so the path `admin.sock` is never reachable with
/// looser modes). As short as `admin.sock` so as not to hit the socket path length limit.
const SOCKET_STAGING: &str = ".admin.d";

/// Sets the process's file-creation mask to 0077, so that everything coverd creates in the
/// data directory is private (0700 / 0600) from the moment it exists, whatever the umask
/// it was started with (systemd's `UMask=0077` is not there when run by hand). A mask
/// rather than modes at each call site because sled creates its own files (db, conf,
/// blobs, snapshots) with default modes we cannot pass. The mask is process-wide: this is
/// called once at the start of every command (`main`) and again by [`start`] for callers
/// that embed the daemon; the daemon itself never wants anything else.
pub fn private_umask() {
    use rustix::fs::Mode;
    rustix::process::umask(Mode::from_raw_mode(0o077));
}

/// Creates `dir` (and missing parents) as 0700; an existing directory that others can
/// enter or read is tightened to 0700 with a warning (its files are the daemon's secrets:
/// signed URLs, images), and one we cannot tighten is left with a warning.
/// The outermost directory a start is about to create for the data directory, removed
/// again (with what the start put there) when the start fails before [`CreatedDir::keep`].
struct CreatedDir(Option<PathBuf>);

impl CreatedDir {
    fn before_creating(dir: &Path) -> CreatedDir {
        let missing = |p: &Path| matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        let mut outermost = None;
        let mut here = Some(dir);
        while let Some(p) = here.filter(|p| !p.as_os_str().is_empty() && missing(p)) {
            outermost = Some(p.to_path_buf());
            here = p.parent();
        }
        CreatedDir(outermost)
    }

    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for CreatedDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(
                    "removed {} again: it was created by this start, which failed",
                    dir.display()
                ),
                Err(e) => tracing::warn!(
                    "cannot remove {}, created by this failed start: {e}",
                    dir.display()
                ),
            }
        }
    }
}

/// Makes an existing data directory open to others beyond what `access` allows (0710 with
/// `storage.local_group`) 0700, with a warning. (`dirsync::create_private_dir` creates it
/// 0700; this is the data directory's own check, which `download`'s directories, whose modes
/// `sharing` owns, must not get.)
fn tighten_data_dir(dir: &Path, access: FileAccess) -> std::io::Result<()> {
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & !access.data_dir_mode() & 0o077 != 0 {
        match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            Ok(()) => tracing::warn!(
                "data directory {} was open to other users (mode {mode:o}); made it 0700",
                dir.display()
            ),
            Err(e) => tracing::warn!(
                "data directory {} is open to other users (mode {mode:o}) and cannot be made 0700: {e}; run `chmod 700 {}`",
                dir.display(),
                dir.display()
            ),
        }
    }
    Ok(())
}

/// Binds the admin socket at `path` with mode 0600 from the moment it exists at that path:
/// bound inside a fresh 0700 staging directory, chmod-ed, then renamed into place.
fn bind_admin_socket(
    data_dir: &Path,
    path: &Path,
) -> Result<tokio::net::UnixListener, DaemonError> {
    let staging = data_dir.join(SOCKET_STAGING);
    let setup = |e: std::io::Error| DaemonError::Setup {
        what: "the admin socket",
        reason: format!("{}: {e}", staging.display()),
    };
    // We hold the store's lock, so leftovers here belong to a dead daemon.
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(setup)?;
    let staged = staging.join("s");
    let listener =
        tokio::net::UnixListener::bind(&staged).map_err(|source| DaemonError::Listen {
            addr: path.display().to_string(),
            source,
        })?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(setup)?;
    std::fs::rename(&staged, path).map_err(setup)?;
    let _ = std::fs::remove_dir(&staging);
    Ok(listener)
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "cannot create the data directory {path}: {source}; check the path and its permissions"
    )]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Download(#[from] download::DownloadError),
    #[error(
        "cannot listen on {addr}: {source}; is another process using it? set `listen` or --listen"
    )]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot set up {what}: {reason}")]
    Setup { what: &'static str, reason: String },
    #[error(
        "the store failed ({reason}) and the disk takes writes again; exiting with status 75 so that the service manager restarts coverd, which reopens the store"
    )]
    StoreNeedsRestart { reason: String },
    #[error(
        "cannot give the stored files in {data_dir} the access of storage.local_group = {group:?}: {source}; {hint} (see `man coverd`, FILES)"
    )]
    Sharing {
        group: String,
        data_dir: PathBuf,
        source: std::io::Error,
        /// What to change: membership, or the system call filter that blocks chown(2).
        hint: String,
    },
    /// A worker stopped or panicked: `serve` exits with status 70 (SPEC).
    #[error("{how}; exiting with status 70 so that the service manager restarts coverd")]
    WorkerStopped { how: String },
}

impl DaemonError {
    /// `serve`'s exit status for this error: 70 a worker died, 75 a temporary failure of
    /// the store, 2 a configuration this machine cannot honour (restarting cannot fix it),
    /// else 1.
    pub fn exit_status(&self) -> u8 {
        if matches!(self, DaemonError::WorkerStopped { .. }) {
            70
        } else if matches!(self, DaemonError::Sharing { .. }) {
            2
        } else if self.is_temporary() {
            75
        } else {
            1
        }
    }

    /// A temporary failure of the store (disk full, a write error sled keeps until restart):
    /// `serve` exits with status 75, and a restart can fix it.
    pub fn is_temporary(&self) -> bool {
        let disk_full = |e: &sled::Error| {
            matches!(e, sled::Error::Io(io) if matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ))
        };
        match self {
            DaemonError::StoreNeedsRestart { .. } => true,
            DaemonError::Store(StoreError::Flush(_) | StoreError::Unwritable(_)) => true,
            DaemonError::Store(StoreError::Io(e) | StoreError::Open { source: e, .. }) => {
                disk_full(e)
            }
            _ => false,
        }
    }
}

/// How often the health loop looks at the store (and, after a failure, probes the disk).
const HEALTH_EVERY: Duration = Duration::from_secs(2);
/// The store is written (a health stamp) and flushed at most this often by the health loop.
const HEALTH_WRITE_EVERY: Duration = Duration::from_secs(10);
/// Bytes written and fsynced to probe whether the disk takes writes again: enough for sled
/// to start a new log segment (512 KiB) after the restart.
const PROBE_BYTES: usize = 1024 * 1024;
/// The probe file, in the data directory.
const PROBE_FILE: &str = ".write-probe";

/// After a worker died, the daemon serves on this long, `/healthz` answering 503 with the
/// worker's name and callbacks answered by what the store can do, then stops; in all it
/// exits with status 70 within SPEC's 5 s: this, [`WORKER_DEATH_GRACE`],
/// [`WORKER_DEATH_FLUSH`] and `main`'s runtime shutdown (0.5 s) add up to 4 s.
const WORKER_DEATH_LINGER: Duration = Duration::from_secs(1);
/// Requests and workers still running when the daemon stops after a worker died get this
/// long before they are abandoned.
const WORKER_DEATH_GRACE: Duration = Duration::from_secs(2);
/// The last flush after a worker died gets this long (every 200 was flushed before it).
const WORKER_DEATH_FLUSH: Duration = Duration::from_millis(500);

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

/// Test hook ([`Hooks::faults`]): makes a worker panic on demand, as a bug would. A loop
/// panics in its own task (the loop's future is dropped by the unwinding); the store's
/// threads panic when they next wake up. Not used by coverd itself, except through the
/// test-only `COVERD_TEST_STOP_WORKER` of `main.rs`. Only with the `testing` feature.
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

/// The workers' test hook: [`Hooks::faults`], or nothing without the `testing` feature.
#[cfg(any(test, feature = "testing"))]
type FaultHook = Option<Arc<Faults>>;
#[cfg(not(any(test, feature = "testing")))]
type FaultHook = NoFaults;

/// No fault hook (a build without the `testing` feature).
#[cfg(not(any(test, feature = "testing")))]
#[derive(Clone)]
struct NoFaults;

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

/// Knobs for tests that run the daemon in-process.
#[derive(Debug, Default, Clone)]
pub struct Hooks {
    /// Addresses the URL guard allows even when private networks are refused.
    pub trusted_addrs: Vec<IpAddr>,
    /// The clock of the schedulers, poller and downloader (default: the wall clock). Records
    /// stamped elsewhere (callbacks, admin) use the wall clock, so a test clock must never
    /// run behind it (see `model::ManualClock`).
    pub clock: Option<Arc<dyn Clock>>,
    /// The callback listener's connection cap (default: derived from the fd limit).
    pub max_connections: Option<usize>,
    /// Room in the store writer's queue (default: the store's); a tiny one shows what a full
    /// queue does. Only with the `testing` feature.
    #[cfg(any(test, feature = "testing"))]
    pub write_queue: Option<usize>,
    /// Makes workers panic on demand (tests of `/healthz` and exit status 70). Only with the
    /// `testing` feature.
    #[cfg(any(test, feature = "testing"))]
    pub faults: Option<Arc<Faults>>,
}

/// A started daemon.
pub struct Running {
    pub addr: SocketAddr,
    pub store: Store,
    wake_polls: Arc<Notify>,
    wake_downloads: Arc<Notify>,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    socket_path: PathBuf,
    /// Set by the health loop when the store failed for good in this process but the disk
    /// takes writes again: `wait` then ends with [`DaemonError::StoreNeedsRestart`].
    restart: Arc<std::sync::Mutex<Option<String>>>,
    /// Set by the workers' watcher when one stopped: `wait` then ends with
    /// [`DaemonError::WorkerStopped`] within [`WORKER_DEATH_GRACE`].
    died: Arc<std::sync::Mutex<Option<String>>>,
}

impl Running {
    /// Asks every part to stop (what SIGTERM does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Makes the poller, the downloader and the notifier look at their indexes now (tests
    /// move the clock).
    pub fn wake(&self) {
        self.wake_polls.notify_one();
        self.wake_downloads.notify_one();
        self.store.outbox_waker().notify_one();
    }

    /// Waits for shutdown to be requested, then for every part to stop, then flushes.
    pub async fn wait(mut self) -> Result<(), DaemonError> {
        self.shutdown.cancelled().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let slot = self.died.clone();
        let died = move || slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if died().is_some() {
            // A worker died: stop as SIGTERM would, but within SPEC's 5 s.
            let joined = tokio::time::timeout(WORKER_DEATH_GRACE, async {
                while self.tasks.join_next().await.is_some() {}
            });
            if joined.await.is_err() {
                self.tasks.abort_all();
                while self.tasks.join_next().await.is_some() {}
            }
        } else {
            while self.tasks.join_next().await.is_some() {}
        }
        let _ = std::fs::remove_file(&self.socket_path);
        if let Some(how) = died() {
            let _ = tokio::time::timeout(WORKER_DEATH_FLUSH, self.store.flush()).await;
            return Err(DaemonError::WorkerStopped { how });
        }
        let restart = self
            .restart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(reason) = restart.or_else(|| {
            self.store
                .needs_reopen()
                .then(|| self.store.write_failure())
                .flatten()
        }) {
            // sled keeps the error: nothing more can be flushed in this process. Every write
            // answered 200 was flushed before its answer.
            return Err(DaemonError::StoreNeedsRestart { reason });
        }
        // Flushed, and when nothing else holds the store (a test may), closed with the
        // status summary that `admin status` reads while the daemon is stopped.
        self.store.close().await?;
        tracing::info!("coverd stopped cleanly");
        Ok(())
    }
}

/// Starts the daemon; returns once it accepts callbacks.
pub async fn start(config: Config, hooks: Hooks) -> Result<Running, DaemonError> {
    private_umask();
    if let Some(b) = crate::broken::selected() {
        tracing::warn!(
            "TEST ONLY: {}={} breaks a durability promise on purpose; never set it outside the power-cut tests",
            crate::broken::VAR,
            b.name()
        );
    }
    if let Some(base) = crate::broken::notify_backoff() {
        tracing::warn!(
            "TEST ONLY: {}={base:?} retries notifications after {base:?} instead of 5 s; never set it outside the kill and power-cut loops",
            crate::broken::NOTIFY_BACKOFF_VAR,
        );
    }
    let config = Arc::new(config);
    let data_dir = config.data_dir.clone();
    // The listeners first: a port in use (the commonest failed start) then creates nothing.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let metrics_listener = match config.metrics_listen {
        Some(metrics_addr) => Some(tokio::net::TcpListener::bind(metrics_addr).await.map_err(
            |source| DaemonError::Listen {
                addr: metrics_addr.to_string(),
                source,
            },
        )?),
        None => None,
    };
    // A start that fails before its workers run leaves no data directory it created: a
    // stray `./coverd-data` would later be taken for the service's by `coverd admin`.
    // Declared before the store, so it runs after the store has closed.
    let created = CreatedDir::before_creating(&data_dir);
    let access = FileAccess::of(&config);
    crate::dirsync::create_private_dir(&data_dir)
        .and_then(|()| tighten_data_dir(&data_dir, access))
        .map_err(|source| DaemonError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
    let fd_limit = server::raise_fd_limit();
    let max_connections = hooks
        .max_connections
        .unwrap_or_else(|| server::public_connection_cap(fd_limit));
    // A schema migration can outlast systemd's start timeout on a large store: each
    // progress report extends it.
    let progress = |migrated| {
        tracing::info!(migrated, "store migration in progress");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(30_000_000)]);
    };
    #[cfg(any(test, feature = "testing"))]
    let store = match hooks.write_queue {
        Some(queue) => Store::open_with_queue(&data_dir, queue)?,
        None => Store::open_with_progress(&data_dir, &progress)?,
    };
    #[cfg(not(any(test, feature = "testing")))]
    let store = Store::open_with_progress(&data_dir, &progress)?;
    download::recover(&data_dir)?;
    match access.reconcile(&data_dir, &data_dir.join(download::IMAGES_DIR)) {
        Ok(0) => {}
        Ok(changed) => tracing::info!(
            changed,
            "gave images/ and the data directory the access `storage.local_group` asks for"
        ),
        Err(source) => {
            let (group, gid) = config.storage.local_group.as_ref().map_or_else(
                || ("(none)".to_string(), None),
                |g| (g.name.clone(), Some(g.gid)),
            );
            let member = gid.is_some_and(|gid| {
                let gid = nix::unistd::Gid::from_raw(gid);
                nix::unistd::getegid() == gid
                    || nix::unistd::getgroups().is_ok_and(|groups| groups.contains(&gid))
            });
            let hint = if member {
                // In the group, yet refused: a seccomp filter (the shipped unit's
                // `~@privileged` takes the chown family with it) answers EPERM.
                format!(
                    "the daemon is in the group, so a system call filter refuses chown(2): add SystemCallFilter=@chown beside SupplementaryGroups={group} in the unit's drop-in"
                )
            } else {
                format!(
                    "the daemon's user must be a member of that group (in the unit: SupplementaryGroups={group} and SystemCallFilter=@chown)"
                )
            };
            return Err(DaemonError::Sharing {
                group,
                data_dir: data_dir.clone(),
                source,
                hint,
            });
        }
    }
    // Callbacks kept aside while their records could not be read, applied now if they can.
    crate::callback::replay_parked(&store, &config).await?;

    let addr = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    // We hold the store's lock, so a socket file left here belongs to a dead daemon.
    let socket_path = data_dir.join(ADMIN_SOCKET);
    let _ = std::fs::remove_file(&socket_path);
    let admin_listener = bind_admin_socket(&data_dir, &socket_path)?;

    let metrics = Arc::new(Metrics::new());
    let kie = match &config.kie.api_key {
        Some(_) => Some(Arc::new(
            KieClient::new(&config.kie, &config.download.user_agent)
                .map_err(|e| DaemonError::Setup {
                    what: "the KIE client",
                    reason: e.to_string(),
                })?
                .with_metrics(metrics.clone()),
        )),
        None => {
            tracing::warn!(
                "no KIE API key: polling, confirmed callbacks and URL refresh are off; set kie.api_key, KIE_API_KEY, kie.api_key_file or the credential kie-api-key"
            );
            None
        }
    };
    let guard = UrlGuard::new(&config.download).with_trusted_addrs(hooks.trusted_addrs.clone());
    let fetcher = Fetcher::new(&config.download, guard).map_err(|e| DaemonError::Setup {
        what: "the download client",
        reason: e.to_string(),
    })?;

    // From here on the start goes through: the directory stays.
    created.keep();
    let shutdown = CancellationToken::new();
    let wake_downloads = Arc::new(Notify::new());
    let wake_polls = Arc::new(Notify::new());
    let health = Arc::new(Health::default());
    let mut tasks = tokio::task::JoinSet::new();
    #[cfg(any(test, feature = "testing"))]
    let mut workers = Workers::new(hooks.faults.clone());
    #[cfg(not(any(test, feature = "testing")))]
    let mut workers = Workers::new(NoFaults);

    let clock = hooks.clock.clone().unwrap_or_else(|| Arc::new(SystemClock));
    let downloader = Downloader::new(
        store.clone(),
        config.clone(),
        fetcher,
        kie.clone(),
        wake_downloads.clone(),
        clock.clone(),
        metrics.clone(),
    );
    {
        let shutdown = shutdown.clone();
        workers.spawn(Worker::Downloads, async move {
            downloader.run(shutdown).await;
        });
    }
    match Notifier::new(store.clone(), &config, clock.clone(), metrics.clone()) {
        Ok(Some(notifier)) => {
            let shutdown = shutdown.clone();
            workers.spawn(Worker::Notifications, async move {
                notifier.run(shutdown).await
            });
        }
        Ok(None) => {}
        Err(e) => {
            return Err(DaemonError::Setup {
                what: "outbound notifications",
                reason: e.to_string(),
            });
        }
    }
    {
        let poller = Poller::new(
            store.clone(),
            config.clone(),
            kie.clone(),
            wake_downloads.clone(),
            wake_polls.clone(),
            clock.clone(),
        )
        .with_metrics(metrics.clone());
        let shutdown = shutdown.clone();
        workers.spawn(Worker::Polls, async move { poller.run(shutdown).await });
    }
    let died = Arc::new(std::sync::Mutex::new(None));
    tasks.spawn(workers.watch(
        store.clone(),
        health.clone(),
        died.clone(),
        shutdown.clone(),
    ));

    let public = Arc::new(Public {
        intake: Intake {
            store: store.clone(),
            config: config.clone(),
            downloads: wake_downloads.clone(),
        },
        health: health.clone(),
        metrics: metrics.clone(),
    });
    tasks.spawn(server::serve(
        listener,
        move |req| {
            let public = public.clone();
            async move { public.route(req).await }
        },
        server::Limits::public(max_connections),
        shutdown.clone(),
    ));
    let admin = Arc::new(admin::Service::new(
        store.clone(),
        config.clone(),
        kie.clone(),
        vec![wake_downloads.clone(), wake_polls.clone()],
    ));
    tasks.spawn(server::serve(
        admin_listener,
        move |req| {
            let admin = admin.clone();
            async move { admin.handle(req).await }
        },
        server::Limits::ADMIN,
        shutdown.clone(),
    ));
    if let Some(listener) = metrics_listener {
        let (metrics, store, clock) = (metrics.clone(), store.clone(), clock.clone());
        tasks.spawn(server::serve(
            listener,
            move |req| {
                let (metrics, store, now) = (metrics.clone(), store.clone(), clock.now());
                async move { server::metrics_route(req, &metrics, &store, now).await }
            },
            server::Limits::METRICS,
            shutdown.clone(),
        ));
    }
    let restart = Arc::new(std::sync::Mutex::new(None));
    tasks.spawn(health_loop(
        store.clone(),
        health,
        data_dir.clone(),
        restart.clone(),
        shutdown.clone(),
    ));

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let metrics_at = config
        .metrics_listen
        .map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics"));
    tracing::info!(
        %addr,
        max_connections,
        metrics = %metrics_at,
        data_dir = %data_dir.display(),
        "coverd is ready: callbacks on http://{addr}/callbacks/cover, metrics {metrics_at}, data in {}",
        data_dir.display()
    );
    Ok(Running {
        addr,
        store,
        wake_polls,
        wake_downloads,
        shutdown,
        tasks,
        socket_path,
        restart,
        died,
    })
}

/// The workers whose death is fatal: the loops, in a set of their own, and (through the
/// store) the store's two threads.
struct Workers {
    set: JoinSet<()>,
    names: HashMap<Id, Worker>,
    faults: FaultHook,
}

impl Workers {
    fn new(faults: FaultHook) -> Workers {
        Workers {
            set: JoinSet::new(),
            names: HashMap::new(),
            faults,
        }
    }

    /// Runs `run`, the loop of `worker`, until it ends (at shutdown).
    fn spawn(&mut self, worker: Worker, run: impl Future<Output = ()> + Send + 'static) {
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
    async fn watch(
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

/// Watches the store's health: writes and flushes a health stamp now and then (so a store
/// that cannot take writes is noticed even when no callback comes), pings systemd's watchdog
/// only while the store takes writes and the workers run, and, once sled has failed for good,
/// probes the disk until it takes writes again, then stops the daemon so that it exits with
/// status 75 and is restarted (sled keeps a write error until the store is reopened).
async fn health_loop(
    store: Store,
    health: Arc<Health>,
    data_dir: PathBuf,
    restart: Arc<std::sync::Mutex<Option<String>>>,
    shutdown: CancellationToken,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog
        .map(|w| (w / 2).clamp(Duration::from_millis(100), HEALTH_EVERY))
        .unwrap_or(HEALTH_EVERY);
    let mut last_write: Option<tokio::time::Instant> = None;
    let mut unhealthy_logged = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if store.needs_reopen() {
            let probe = data_dir.join(PROBE_FILE);
            let writable = tokio::task::spawn_blocking(move || probe_disk(&probe))
                .await
                .is_ok_and(|r| r.is_ok());
            if writable {
                let reason = store.write_failure().unwrap_or_default();
                tracing::warn!(
                    reason,
                    "the disk takes writes again; restarting to reopen the store (exit status 75)"
                );
                *restart.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                shutdown.cancel();
                return;
            }
            // Alive and answering 503 while it waits for the disk: not a hang, so the
            // watchdog (which would restart into the same full disk) keeps being fed.
            if watchdog.is_some() {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            continue;
        }
        let write_due = last_write.is_none_or(|t| t.elapsed() >= HEALTH_WRITE_EVERY);
        let store_ok = if write_due || watchdog.is_some() {
            last_write = Some(tokio::time::Instant::now());
            store.check_health().await.is_ok()
        } else {
            store.write_failure().is_none()
        };
        let healthy = store_ok && health.stopped_worker().is_none();
        if healthy {
            unhealthy_logged = false;
            if watchdog.is_some() {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        } else if watchdog.is_some() && !unhealthy_logged {
            unhealthy_logged = true;
            tracing::error!(
                "unhealthy (the store cannot take writes, or a worker stopped): not pinging the systemd watchdog, which restarts coverd"
            );
        }
    }
}

/// Writes [`PROBE_BYTES`] to `path`, fsyncs them and removes the file again.
fn probe_disk(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let result = (|| {
        let mut f = std::fs::File::create(path)?;
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(path);
    result
}
