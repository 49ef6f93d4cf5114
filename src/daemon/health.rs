//! The health loop: a health stamp written and flushed now and then (so a store that cannot
//! take writes is noticed without callbacks), systemd's watchdog pinged only while the store
//! takes writes and the workers run, and, once sled has failed for good, a disk probe until
//! it takes writes again, then a stop with status 75. Owns that loop and the probe file;
//! must not decide what a worker's death does (`daemon::workers`) or touch the listeners.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::server::Health;
use crate::store::Store;

/// How often the health loop looks at the store (and, after a failure, probes the disk).
const HEALTH_EVERY: Duration = Duration::from_secs(2);
/// The store is written (a health stamp) and flushed at most this often by the health loop.
const HEALTH_WRITE_EVERY: Duration = Duration::from_secs(10);
/// Bytes written and fsynced to probe whether the disk takes writes again: enough for sled
/// to start a new log segment (512 KiB) after the restart.
const PROBE_BYTES: usize = 1024 * 1024;
/// The probe file, in the data directory.
const PROBE_FILE: &str = ".write-probe";

/// Watches the store's health: writes and flushes a health stamp now and then (so a store
/// that cannot take writes is noticed even when no callback comes), pings systemd's watchdog
/// only while the store takes writes and the workers run, and, once sled has failed for good,
/// probes the disk until it takes writes again, then stops the daemon so that it exits with
/// status 75 and is restarted (sled keeps a write error until the store is reopened).
pub(super) async fn health_loop(
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
