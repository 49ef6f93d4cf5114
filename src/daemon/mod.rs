//! `coverd serve`: starts every part in order (store, crash recovery, listeners, workers),
//! tells systemd when it is ready, and stops them in reverse order on shutdown. Owns the
//! lifecycle only: the order of the start and of the stop, [`Hooks`] and [`Running`]; each
//! part's behaviour lives in its own module. Its own parts: `datadir` (the private data
//! directory and the admin socket), `workers` (watching the workers: one that stops or
//! panics is named on `/healthz` and ends the daemon, exit 70), `health` (the health loop
//! and the watchdog), `error` ([`DaemonError`] and exit statuses).

mod datadir;
mod error;
mod health;
mod workers;

pub use datadir::private_umask;
pub use error::DaemonError;
#[cfg(any(test, feature = "testing"))]
pub use workers::Faults;
pub use workers::Worker;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::datadir::{CreatedDir, bind_admin_socket, tighten_data_dir};
use self::health::health_loop;
#[cfg(not(any(test, feature = "testing")))]
use self::workers::NoFaults;
use self::workers::{WORKER_DEATH_FLUSH, WORKER_DEATH_GRACE, Workers};
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
use crate::store::Store;

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
    /// The free space a fetch must leave (default `fetch::FREE_SPACE_RESERVE`, 1 GiB); a
    /// test on a small filesystem sets 0 to reach the full-disk path itself. Only with the
    /// `testing` feature.
    #[cfg(any(test, feature = "testing"))]
    pub free_space_reserve: Option<u64>,
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
    datadir::share_stored_files(&config, &data_dir, access)?;
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
    #[cfg(any(test, feature = "testing"))]
    let fetcher = match hooks.free_space_reserve {
        Some(reserve) => fetcher.with_free_space_reserve(reserve),
        None => fetcher,
    };

    let files = crate::storage::Files::new(&config).map_err(|e| DaemonError::Setup {
        what: "the file store",
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
        crate::download::Transfer {
            fetcher,
            files: files.primary(),
        },
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
