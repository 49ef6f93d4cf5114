//! Why `coverd serve` stops or cannot start: [`DaemonError`], and the exit status each
//! reason gives (70 a worker died, 75 a store failure a restart can fix, 2 a setting this
//! machine cannot honour, else 1). Owns the messages and the mapping to exit statuses; must
//! not start, stop or watch anything.

use std::path::PathBuf;

use crate::download;
use crate::store::StoreError;

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
