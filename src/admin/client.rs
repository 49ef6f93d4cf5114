//! The command's side: finds the data directory's daemon through `admin.sock` and sends the
//! request there, or opens the store and executes it here when the daemon is stopped.
//! Must not render replies.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;

use super::{
    ADMIN_SOCKET, AdminError, CLIENT_TIMEOUT, Exec, Reply, Request, WHOLE_STORE_TIMEOUT, access,
    backup,
};
use crate::config::Config;
use crate::kie::KieClient;
use crate::store::{Store, StoreError};

/// Runs one request: through the daemon when its socket answers, else on the store directly.
pub async fn run(config: Config, req: Request) -> Result<Reply, AdminError> {
    run_with(config, req, None).await
}

/// [`run`], reporting the progress of whole-store commands run here (not in the daemon).
pub async fn run_with(
    config: Config,
    req: Request,
    progress: Option<backup::Progress>,
) -> Result<Reply, AdminError> {
    let dir = config.data_dir.clone();
    let shown = access::shown(&dir);
    access::check_readable(&dir)?;
    let socket = dir.join(ADMIN_SOCKET);
    let mut not_answering = None;
    match tokio::net::UnixStream::connect(&socket).await {
        Ok(stream) => {
            // Whole-store commands read every task (and every image, for verify).
            let limit = match req {
                Request::Verify
                | Request::Export
                | Request::Backup { .. }
                | Request::Prune { .. } => WHOLE_STORE_TIMEOUT,
                _ => CLIENT_TIMEOUT,
            };
            // The daemon resolves paths itself: send the operator's, not this process's
            // `/proc/self/fd/N/…` alias (see `access::act_as_owner`).
            let req = match req {
                Request::Backup { dest } => Request::Backup {
                    dest: access::shown(&dest),
                },
                other => other,
            };
            return tokio::time::timeout(limit, remote(stream, &req))
                .await
                .unwrap_or_else(|_| {
                    Err(AdminError::failed(format!(
                        "the daemon did not answer within {}s on {}; check `journalctl -u coverd`",
                        limit.as_secs(),
                        shown.join(ADMIN_SOCKET).display()
                    )))
                });
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(AdminError::failed(format!(
                "cannot connect to the daemon's {}: permission denied; run as root or as the service's user",
                shown.join(ADMIN_SOCKET).display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => not_answering = Some(e),
    }
    if let Request::Restore { src } = req {
        let target = dir.clone();
        let manifest =
            tokio::task::spawn_blocking(move || backup::restore(&src, &target, progress))
                .await
                .map_err(|e| AdminError::failed(format!("restore failed: {e}")))??;
        return Ok(Reply::Restored {
            data_dir: shown.display().to_string(),
            backup: manifest,
        });
    }
    let writes = matches!(
        req,
        Request::Track { .. }
            | Request::Submit { .. }
            | Request::Retry { .. }
            | Request::Redeliver { .. }
    );
    if !writes && !dir.join("db").exists() {
        return Err(AdminError::missing(if config.data_dir_named {
            format!(
                "no coverd data in {}; start `coverd serve` first, or check --data-dir / COVERD_DATA_DIR / data_dir",
                shown.display()
            )
        } else {
            format!(
                "no coverd data in {} nor in {}; start `coverd serve` first, or name the data directory with --data-dir",
                access::LOCAL_DATA_DIR,
                access::SERVICE_DATA_DIR
            )
        }));
    }
    std::fs::create_dir_all(&dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            access::permission_denied(&dir)
        } else {
            AdminError::failed(format!(
                "cannot create the data directory {}: {e}",
                shown.display()
            ))
        }
    })?;
    let store = Store::open(&dir).map_err(|e| match e {
        StoreError::Locked { .. } => AdminError::failed(format!(
            "the daemon holds {} but its admin socket {} does not answer{}; wait until it has started, or check `journalctl -u coverd`",
            shown.display(),
            shown.join(ADMIN_SOCKET).display(),
            not_answering
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        )),
        StoreError::Open {
            source: sled::Error::Io(io),
            ..
        } if io.kind() == std::io::ErrorKind::PermissionDenied => {
            access::permission_denied(&shown.join("db"))
        }
        other => AdminError::failed(other.to_string()),
    })?;
    let kie = match &config.kie.api_key {
        Some(_) => Some(Arc::new(
            KieClient::new(&config.kie, &config.download.user_agent)
                .map_err(|e| AdminError::usage(e.to_string()))?,
        )),
        None => None,
    };
    let exec = Exec {
        store: store.clone(),
        config: Arc::new(config),
        kie,
        daemon_running: false,
        wake: Vec::new(),
        progress,
    };
    let reply = exec.execute(req).await;
    // Closed before returning, so the directory is free again at once (for the daemon, or
    // the next command in the same process): sled's lock goes with the last handle.
    drop(exec);
    store.close().await?;
    reply
}

pub(super) async fn remote(
    stream: tokio::net::UnixStream,
    req: &Request,
) -> Result<Reply, AdminError> {
    let lost = |e: &dyn std::fmt::Display| {
        AdminError::failed(format!("lost the connection to the daemon: {e}; retry"))
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| lost(&e))?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(req).map_err(|e| lost(&e))?;
    let request = hyper::Request::post("/v1")
        .header("host", "coverd")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| lost(&e))?;
    let resp = sender.send_request(request).await.map_err(|e| lost(&e))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| lost(&e))?
        .to_bytes();
    if status == StatusCode::OK {
        serde_json::from_slice(&bytes).map_err(|e| lost(&e))
    } else {
        Err(
            serde_json::from_slice::<AdminError>(&bytes).unwrap_or_else(|_| {
                AdminError::failed(format!(
                    "the daemon answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ))
            }),
        )
    }
}
