//! `coverd serve`: starts every part in order (store, crash recovery, listeners, workers),
//! tells systemd when it is ready, and stops them in reverse order on shutdown. Owns the
//! lifecycle only; each part's behaviour lives in its own module.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::callback::Intake;
use crate::config::Config;
use crate::download::{self, Downloader};
use crate::fetch::Fetcher;
use crate::guard::UrlGuard;
use crate::kie::KieClient;
use crate::metrics::Metrics;
use crate::model::{Clock, SystemClock};
use crate::poll::Poller;
use crate::server::{self, Health, Public};
use crate::store::{Store, StoreError};

/// The admin socket's file name inside the data directory.
pub const ADMIN_SOCKET: &str = "admin.sock";
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
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
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
}

impl Running {
    /// Asks every part to stop (what SIGTERM does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Makes the poller and the downloader look at their indexes now (tests move the clock).
    pub fn wake(&self) {
        self.wake_polls.notify_one();
        self.wake_downloads.notify_one();
    }

    /// Waits for shutdown to be requested, then for every part to stop, then flushes.
    pub async fn wait(mut self) -> Result<(), DaemonError> {
        self.shutdown.cancelled().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        while self.tasks.join_next().await.is_some() {}
        self.store.flush().await?;
        let _ = std::fs::remove_file(&self.socket_path);
        tracing::info!("coverd stopped cleanly");
        Ok(())
    }
}

/// Starts the daemon; returns once it accepts callbacks.
pub async fn start(config: Config, hooks: Hooks) -> Result<Running, DaemonError> {
    private_umask();
    let config = Arc::new(config);
    let data_dir = config.data_dir.clone();
    create_private_dir(&data_dir).map_err(|source| DaemonError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let fd_limit = server::raise_fd_limit();
    let max_connections = hooks
        .max_connections
        .unwrap_or_else(|| server::public_connection_cap(fd_limit));
    let store = Store::open(&data_dir)?;
    download::recover(&data_dir)?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
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

    let shutdown = CancellationToken::new();
    let wake_downloads = Arc::new(Notify::new());
    let wake_polls = Arc::new(Notify::new());
    let health = Arc::new(Health::default());
    let mut tasks = tokio::task::JoinSet::new();

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
    health.downloads_running.store(true, Ordering::SeqCst);
    {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        tasks.spawn(async move {
            downloader.run(shutdown.clone()).await;
            health.downloads_running.store(false, Ordering::SeqCst);
        });
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
        tasks.spawn(async move { poller.run(shutdown).await });
    }

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
    if let Some(metrics_addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .map_err(|source| DaemonError::Listen {
                addr: metrics_addr.to_string(),
                source,
            })?;
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
    tasks.spawn(watchdog(store.clone(), health, shutdown.clone()));

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
    })
}

/// Pings systemd's watchdog only while the store answers and the workers run.
async fn watchdog(store: Store, health: Arc<Health>, shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (interval / 2).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if store.check_health().await.is_ok() && health.downloads_running.load(Ordering::SeqCst) {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::error!(
                "unhealthy (store or download workers down): not pinging the systemd watchdog, which restarts coverd"
            );
        }
    }
}
