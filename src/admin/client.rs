//! The command's side: finds the data directory's daemon through `admin.sock` and sends the
//! request there, or opens the store and executes it here when the daemon is stopped.
//! Must not render replies.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;

use super::{
    ADMIN_SOCKET, ANSWER_TIMEOUT, AdminError, CLIENT_TIMEOUT, Exec, Frame, Reply, Request,
    WHOLE_STORE_TIMEOUT, access, backup,
};
use crate::config::Config;
use crate::kie::KieClient;
use crate::store::{Store, StoreError, UNFINISHED_RESTORE};

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
            let limit = if req.whole_store() {
                WHOLE_STORE_TIMEOUT
            } else {
                CLIENT_TIMEOUT
            };
            // The daemon resolves paths itself: send the operator's, not this process's
            // `/proc/self/fd/N/…` alias (see `access::act_as_owner`).
            // and where DEST is as this process sees it, so that the daemon can refuse a
            // place it sees differently (its private /tmp) before writing anything.
            let req = match req {
                Request::Backup { dest, seen } => {
                    let shown_dest = access::shown(&dest);
                    Request::Backup {
                        seen: seen.or_else(|| super::DirSeen::nearest(&dest, &shown_dest)),
                        dest: shown_dest,
                    }
                }
                other => other,
            };
            let socket_shown = shown.join(ADMIN_SOCKET);
            let reply = tokio::time::timeout(limit, remote(stream, &req, progress, &socket_shown))
                .await
                .unwrap_or_else(|_| {
                    Err(AdminError::failed(format!(
                        "the daemon did not finish within {}s on {}; check `journalctl -u coverd`",
                        limit.as_secs(),
                        socket_shown.display()
                    )))
                });
            // The data directory as this command found it (the daemon's own path may be
            // relative to its working directory).
            return reply.map(|reply| match reply {
                Reply::Status { mut status } => {
                    status.data_dir = shown.display().to_string();
                    Reply::Status { status }
                }
                other => other,
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
        let files =
            crate::storage::Files::new(&config).map_err(|e| AdminError::usage(e.to_string()))?;
        let runtime = tokio::runtime::Handle::current();
        let manifest = tokio::task::spawn_blocking(move || {
            let objects = backup::Objects {
                files: &files,
                runtime: &runtime,
            };
            backup::restore(&src, &target, Some(&objects), progress)
        })
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
    // Said before "no coverd data": a restore cut short may have written nothing else yet.
    if std::fs::symlink_metadata(dir.join(UNFINISHED_RESTORE)).is_ok() {
        return Err(AdminError::failed(
            StoreError::UnfinishedRestore {
                path: shown.to_path_buf(),
            }
            .to_string(),
        ));
    }
    // The unit's directory is made by systemd (StateDirectory=, owned by the service's
    // user): a command never creates it, even one that writes.
    if (!writes || config.data_dir_from_unit) && !dir.join("db").exists() {
        return Err(AdminError::missing(if config.data_dir_from_unit {
            format!(
                "no coverd data in {}, the data directory of the installed unit {}; start the service first (`systemctl start coverd`), or name another with --data-dir",
                shown.display(),
                config
                    .unit
                    .as_deref()
                    .unwrap_or(crate::config::unit::UNIT_NAME)
            )
        } else if config.data_dir_named {
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
    // What the last clean close left, when it still describes the store: no open of sled,
    // which is most of what status would cost on a large store (`store::summary`).
    if matches!(req, Request::Status) {
        if let Some(summary) = crate::store::summary::read(&dir) {
            return Ok(Reply::Status {
                status: super::exec::status_json(summary, None, &config),
            });
        }
    }
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

/// Sends `req` to the daemon on `POST /v2` and reads its frames: a sign of life at least
/// every [`ANSWER_TIMEOUT`] (else the daemon is stopped or stuck, and the command says so
/// instead of waiting), progress (handed to `progress`, the same bar as offline), then the
/// reply or the error.
pub(super) async fn remote(
    stream: tokio::net::UnixStream,
    req: &Request,
    progress: Option<backup::Progress>,
    socket: &std::path::Path,
) -> Result<Reply, AdminError> {
    let lost = |e: &dyn std::fmt::Display| {
        AdminError::failed(format!("lost the connection to the daemon: {e}; retry"))
    };
    let silent = || {
        let maybe = if req.writes() {
            " It may still carry the request out once it runs again."
        } else {
            ""
        };
        AdminError::failed(format!(
            "the daemon holding {} did not answer within {}s: it is stopped (SIGSTOP) or stuck; check `systemctl status coverd` and `journalctl -u coverd`.{maybe}",
            socket.display(),
            ANSWER_TIMEOUT.as_secs()
        ))
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| lost(&e))?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(req).map_err(|e| lost(&e))?;
    let request = hyper::Request::post("/v2")
        .header("host", "coverd")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| lost(&e))?;
    let resp = tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| silent())?
        .map_err(|e| lost(&e))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if status != StatusCode::OK {
        let bytes = tokio::time::timeout(ANSWER_TIMEOUT, body.collect())
            .await
            .map_err(|_| silent())?
            .map_err(|e| lost(&e))?
            .to_bytes();
        return Err(
            serde_json::from_slice::<AdminError>(&bytes).unwrap_or_else(|_| {
                AdminError::failed(format!(
                    "the daemon answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ))
            }),
        );
    }
    // Newline-delimited frames; a frame is at most a reply (an export can be large).
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let Some(frame) = tokio::time::timeout(ANSWER_TIMEOUT, body.frame())
            .await
            .map_err(|_| silent())?
        else {
            return Err(lost(&"the daemon closed the answer before its end"));
        };
        let frame = frame.map_err(|e| lost(&e))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            match serde_json::from_slice::<Frame>(&line).map_err(|e| lost(&e))? {
                Frame::Alive => {}
                Frame::Progress { done, total } => {
                    if let Some(p) = &progress {
                        p(done, total);
                    }
                }
                Frame::Reply(reply) => return Ok(*reply),
                Frame::Error(e) => return Err(e),
            }
        }
    }
}
