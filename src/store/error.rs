//! The store's errors: `StoreError` (what failed, in words for `/healthz` and the logs, with
//! what to do), `describe`/`describe_io` (sled's and the OS's errors by their Display, never a
//! `Debug` dump), the short reason a quarantined record is listed with, and the result type
//! of a step inside a transaction. Must not touch trees or decide what a failure does.

use std::path::PathBuf;

use sled::transaction::ConflictableTransactionError;

use super::SCHEMA_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the data directory {path} is in use by another coverd process; stop that process, or use `coverd admin`, which talks to a running daemon"
    )]
    Locked { path: PathBuf },
    #[error(
        "cannot open the store at {path}: {}; check the directory's permissions and free space",
        describe(.source)
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "the store at {path} has schema version {found}, newer than this coverd supports ({SCHEMA_VERSION}); run a newer coverd"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error(
        "{path} holds a database that coverd did not write; point --data-dir at a coverd data directory or an empty one"
    )]
    Foreign { path: PathBuf },
    /// `admin restore` was cut short (a crash, a power loss) while writing this directory.
    #[error(
        "{path} holds a restore that did not finish (cut short by a crash or a power loss), so its store is incomplete; run `coverd admin restore SRC` into it again (it starts over), or move it aside"
    )]
    UnfinishedRestore { path: PathBuf },
    #[error("store I/O failed: {}; check disk space and permissions", describe(.0))]
    Io(#[from] sled::Error),
    #[error("cannot make the store's writes durable: {0}; check disk space and the disk's health")]
    Flush(String),
    #[error(
        "the store cannot take writes since an earlier failure ({0}); free disk space or fix the disk, coverd then restarts to reopen the store"
    )]
    Unwritable(String),
    /// No room left to keep another callback for a quarantined task aside.
    #[error(
        "cannot keep the callback for task {task_id} aside: {why}; repair or restore its record (`coverd admin status` names it)"
    )]
    ParkFull { task_id: String, why: String },
    /// The store's writer or flusher thread stopped: nothing can be written until a restart.
    #[error("the store cannot take writes: {0}; coverd exits (status 70) and is restarted")]
    Stopped(String),
    /// The writer's queue is full: the store takes updates more slowly than they come.
    #[error(
        "the store's write queue is full ({queued} updates waiting); retry later, or spread the load"
    )]
    Busy { queued: usize },
    #[error(
        "an update of {what} panicked ({reason}) and was not applied; this is a bug in coverd: please report it with the log"
    )]
    Panicked { what: String, reason: String },
    #[error(
        "corrupt record for {what}: {reason}; run `coverd admin verify` and restore from a backup if needed"
    )]
    Corrupt { what: String, reason: String },
    /// The record is an envelope version this build does not know.
    #[error(
        "the record of {what} was written by a newer coverd (record format v{found}; this build reads up to v{known}); run that newer coverd, or restore a backup made by this version"
    )]
    Newer {
        what: String,
        found: u32,
        known: u32,
    },
    /// An update for a task of one kind (a callback on `/callbacks/<kind>`, a `track --kind`)
    /// names a task of another: nothing changed.
    #[error(
        "task {task_id} is a {is} task, not a {asked} task; nothing changed (KIE calls back each kind on its own route, /callbacks/{is} for this one)"
    )]
    WrongKind {
        task_id: String,
        is: &'static str,
        asked: &'static str,
    },
}

/// An error of sled's as people read it: an I/O error by its Display ("No space left on
/// device (os error 28)"), never a Rust `Debug` dump. sled keeps the first I/O error and
/// hands out copies of it made from its `Debug` text (`Os { code: 28, kind: StorageFull, …
/// }`, sled 0.34 `result.rs`); the OS error code is read back from that text.
pub fn describe(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) => describe_io(io),
        sled::Error::Corruption { at, .. } => match at {
            Some(at) => format!("corrupt data in the store at {at}"),
            None => "corrupt data in the store".to_string(),
        },
        other => other.to_string(),
    }
}

/// An I/O error by its Display; a copy sled made from `Debug` text is turned back into it.
pub fn describe_io(e: &std::io::Error) -> String {
    if e.raw_os_error().is_some() {
        return e.to_string();
    }
    let text = e.to_string();
    if let Some(code) = text
        .split_once("code: ")
        .and_then(|(_, rest)| rest.split([',', ' ', '}']).next())
        .and_then(|code| code.parse::<i32>().ok())
    {
        return std::io::Error::from_raw_os_error(code).to_string();
    }
    if text.contains(" kind: ") || text.starts_with("Kind(") {
        return e.kind().to_string();
    }
    text
}

impl StoreError {
    /// A stored record could not be decoded (damaged, or written by a newer coverd): the
    /// record is quarantined, and trying again cannot help.
    pub fn is_undecodable(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. } | StoreError::Newer { .. })
    }

    /// The same failure again, for each update of a refused batch.
    pub(super) fn clone_failure(&self) -> StoreError {
        match self {
            StoreError::Unwritable(r) => StoreError::Unwritable(r.clone()),
            StoreError::Io(e) => StoreError::Io(e.clone()),
            other => StoreError::Unwritable(other.to_string()),
        }
    }
}

/// The short reason a quarantined record is listed with.
pub(super) fn quarantine_reason(err: &StoreError) -> String {
    match err {
        StoreError::Newer { found, known, .. } => format!(
            "written by a newer coverd (record format v{found}; this build reads up to v{known})"
        ),
        StoreError::Corrupt { reason, .. } => format!("corrupt ({reason})"),
        other => other.to_string(),
    }
}

/// The result of a step inside a transaction: an abort carries the store's error.
pub(super) type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;
