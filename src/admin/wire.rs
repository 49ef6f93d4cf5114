//! The admin protocol's types: requests, replies and their JSON (SPEC's shapes), and
//! [`AdminError`] with its kind. Plain data; must not do I/O.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::backup;
use crate::model::TaskJson;
use crate::store::{Quarantined, StoreError};
use crate::submit::{KindRequest, SubmitError, SubmitJson};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    List {
        state: Option<String>,
        /// Only tasks of this kind (`cover`, `music`, …).
        #[serde(default)]
        kind: Option<String>,
        limit: usize,
    },
    Show {
        task_id: String,
    },
    Track {
        task_id: String,
        music_task_id: Option<String>,
        /// The task's kind; `None`: a cover.
        #[serde(default)]
        kind: Option<String>,
        /// The track a `wav`, `video` or `stems` task was made from.
        #[serde(default)]
        audio_id: Option<String>,
    },
    /// Remove one task, its files and notifications (a mistaken track); an unfinished one
    /// only with `force`.
    Forget {
        task_id: String,
        force: bool,
    },
    Retry {
        task_id: String,
    },
    Submit {
        music_task_id: String,
    },
    /// `submit music|wav|video|stems`.
    SubmitKind {
        request: KindRequest,
    },
    /// `admin intents`: submissions whose outcome is unknown; `drop`: forget one.
    Intents {
        drop: Option<String>,
    },
    Verify,
    Export,
    Redeliver {
        task_id: String,
    },
    /// A consistent copy into `dest` (absolute; absent or empty).
    Backup {
        dest: PathBuf,
        /// The directory holding `dest` as the command sees it; the daemon refuses when it
        /// sees another one there (the service's private `/tmp`), before writing anything.
        #[serde(default)]
        seen: Option<DirSeen>,
    },
    /// Rebuild the (absent or empty) data directory from the backup in `src` (absolute).
    /// Only with the daemon stopped.
    Restore {
        src: PathBuf,
    },
    /// Forget finished tasks whose last change is more than `older_than_secs` ago.
    Prune {
        older_than_secs: u64,
        dry_run: bool,
    },
    /// Move the stored files from the data directory to the object store.
    MigrateFiles {
        dry_run: bool,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Oldest {
    pub task_id: String,
    pub state: String,
    pub created_at: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TaskCounts {
    pub submitted: u64,
    pub received: u64,
    pub downloaded: u64,
    pub failed: u64,
}

/// Outbound notifications waiting to be delivered, and those given up on.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NotificationCounts {
    /// `notify.url` is set.
    pub enabled: bool,
    pub pending: u64,
    pub undeliverable: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StatusJson {
    pub daemon: String,
    pub tasks: TaskCounts,
    pub notifications: NotificationCounts,
    pub oldest_unfinished: Option<Oldest>,
    pub data_dir: String,
    /// The data directory's size without a walk: the database's files (sled's log and
    /// blobs) plus `stored_bytes`.
    pub data_bytes: u64,
    /// The sizes recorded for the stored files (kept beside the records, not summed).
    #[serde(default)]
    pub stored_bytes: u64,
    /// Whether the daemon polls KIE (it has an API key); `null` when the daemon is stopped:
    /// the service's key (e.g. a systemd credential) is not visible from here.
    pub polling: Option<bool>,
    /// Task records that cannot be decoded (exit 1 when any).
    #[serde(default)]
    pub quarantined: Vec<QuarantinedJson>,
    /// How many records the quarantine index holds: more than `quarantined` names when
    /// past `store::MAX_QUARANTINED_SHOWN`.
    #[serde(default)]
    pub quarantined_total: u64,
}

/// A task record that cannot be decoded: damaged, or written by a newer coverd.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedJson {
    pub task_id: String,
    pub reason: String,
    /// Callbacks for this task kept aside until its record can be read (`admin status`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kept_callbacks: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl From<Quarantined> for QuarantinedJson {
    fn from(q: Quarantined) -> QuarantinedJson {
        QuarantinedJson {
            task_id: q.task_id,
            reason: q.reason,
            kept_callbacks: 0,
        }
    }
}

/// `admin verify --json` (SPEC): stored images re-hashed against their records; `missing`
/// and `corrupt` list their paths relative to the data directory.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyJson {
    pub checked: u64,
    pub ok: u64,
    pub missing: Vec<String>,
    pub corrupt: Vec<String>,
    /// Task records that cannot be decoded, so their images could not be checked.
    #[serde(default)]
    pub quarantined: Vec<QuarantinedJson>,
    /// The counters and index `admin status` reads, checked against the records scanned.
    #[serde(default)]
    pub statistics: StatisticsJson,
}

/// `admin verify`'s check of what `admin status` reads without a scan (per-state counts,
/// bytes stored, the quarantined records): `result` is `ok`, `repaired` (they disagreed
/// with the records and were derived again; exit 1) or `not_compared` (task records
/// changed during the scan).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StatisticsJson {
    pub result: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl StatisticsJson {
    pub fn ok() -> StatisticsJson {
        StatisticsJson {
            result: "ok".into(),
            detail: String::new(),
        }
    }
}

impl Default for StatisticsJson {
    fn default() -> StatisticsJson {
        StatisticsJson::ok()
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status {
        status: StatusJson,
    },
    Tasks {
        tasks: Vec<TaskJson>,
    },
    Task {
        task: TaskJson,
        message: String,
    },
    Submitted {
        submitted: SubmitJson,
        message: String,
    },
    Verified {
        verify: VerifyJson,
    },
    /// Every task with its history, for `admin export`, and the records that could not be
    /// read.
    Export {
        tasks: Vec<TaskJson>,
        #[serde(default)]
        quarantined: Vec<QuarantinedJson>,
    },
    BackedUp {
        dest: String,
        backup: backup::Manifest,
    },
    Restored {
        data_dir: String,
        backup: backup::Manifest,
    },
    Pruned {
        prune: backup::PruneJson,
    },
    Migrated {
        migrate: super::MigrateJson,
    },
    /// `admin intents`: submissions not resolved yet (a cover's the daemon resolves; the
    /// other kinds' have an unknown outcome and wait for the operator).
    Intents {
        intents: Vec<IntentJson>,
        message: String,
    },
}

/// One submission whose outcome is not recorded yet.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct IntentJson {
    /// What `--drop` takes.
    pub key: String,
    pub kind: String,
    pub music_task_id: Option<String>,
    pub audio_id: Option<String>,
    pub recorded_at: String,
    /// `pending` (a cover: the daemon asks KIE again) or `unknown` (never sent again).
    pub state: String,
    pub detail: String,
}

impl Reply {
    /// The process exit code for a successful exchange: 1 when verification found damage
    /// or a record is quarantined.
    pub fn exit_code(&self) -> u8 {
        let damaged = match self {
            Reply::Verified { verify } => {
                !verify.missing.is_empty()
                    || !verify.corrupt.is_empty()
                    || !verify.quarantined.is_empty()
                    || verify.statistics.result == "repaired"
            }
            Reply::Status { status } => !status.quarantined.is_empty(),
            Reply::Export { quarantined, .. } => !quarantined.is_empty(),
            _ => false,
        };
        u8::from(damaged)
    }
}

/// An admin failure: its kind and one sentence for stderr. `main` maps the kind to the exit
/// status (SPEC: 1 missing, unhealthy or failed; 2 usage or configuration).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    pub kind: AdminErrorKind,
    pub message: String,
}

/// What kind of failure an [`AdminError`] is.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminErrorKind {
    /// The thing asked about does not exist (a task, a notification, a data directory).
    Missing,
    /// The command could not be carried out: I/O, permissions, the store, the daemon, KIE.
    Failed,
    /// The command or the configuration is wrong; running it again as is cannot help.
    Usage,
}

impl AdminError {
    pub fn missing(message: impl Into<String>) -> AdminError {
        AdminError {
            kind: AdminErrorKind::Missing,
            message: message.into(),
        }
    }
    pub fn failed(message: impl Into<String>) -> AdminError {
        AdminError {
            kind: AdminErrorKind::Failed,
            message: message.into(),
        }
    }
    pub fn usage(message: impl Into<String>) -> AdminError {
        AdminError {
            kind: AdminErrorKind::Usage,
            message: message.into(),
        }
    }
}

impl From<SubmitError> for AdminError {
    fn from(e: SubmitError) -> AdminError {
        match e {
            SubmitError::Config(message) | SubmitError::Usage(message) => {
                AdminError::usage(message)
            }
            SubmitError::Failed(message) => AdminError::failed(message),
            SubmitError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> AdminError {
        AdminError::failed(e.to_string())
    }
}

/// A directory as one process sees it: its path (the nearest existing one at or above a
/// destination), device and inode.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DirSeen {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

impl DirSeen {
    /// The nearest existing directory at or above `path`, as this process sees it; `shown`
    /// is the name to record for it (the operator's path when `path` is an alias).
    pub fn nearest(path: &std::path::Path, shown: &std::path::Path) -> Option<DirSeen> {
        use std::os::unix::fs::MetadataExt;
        let (mut here, mut named) = (path, shown);
        loop {
            if let Ok(m) = std::fs::metadata(here)
                && m.is_dir()
            {
                return Some(DirSeen {
                    path: named.to_path_buf(),
                    dev: m.dev(),
                    ino: m.ino(),
                });
            }
            here = here.parent()?;
            named = named.parent().unwrap_or(named);
        }
    }
}

impl Request {
    /// Whether the request changes the store (tasks, notifications, images). Exhaustive:
    /// a new request must say.
    pub fn writes(&self) -> bool {
        match self {
            Request::Track { .. }
            | Request::Forget { .. }
            | Request::Retry { .. }
            | Request::Submit { .. }
            | Request::SubmitKind { .. }
            | Request::Redeliver { .. }
            | Request::Restore { .. }
            | Request::Prune { .. } => true,
            Request::MigrateFiles { dry_run } => !dry_run,
            Request::Intents { drop } => drop.is_some(),
            Request::Status
            | Request::List { .. }
            | Request::Show { .. }
            | Request::Verify
            | Request::Export
            | Request::Backup { .. } => false,
        }
    }

    /// Whether it reads the whole store (every task, every image for verify): such a
    /// request gets the long overall timeout through the daemon.
    pub fn whole_store(&self) -> bool {
        match self {
            Request::Verify
            | Request::Export
            | Request::Backup { .. }
            | Request::Prune { .. }
            | Request::MigrateFiles { .. }
            | Request::Restore { .. } => true,
            Request::Status
            | Request::List { .. }
            | Request::Show { .. }
            | Request::Track { .. }
            | Request::Forget { .. }
            | Request::Retry { .. }
            | Request::Submit { .. }
            | Request::SubmitKind { .. }
            | Request::Intents { .. }
            | Request::Redeliver { .. } => false,
        }
    }

    /// What a progress bar says while it runs; `None`: no bar (a quick request).
    pub fn progress_label(&self) -> Option<&'static str> {
        match self {
            Request::Verify => Some("verifying"),
            Request::Export => Some("exporting"),
            Request::Backup { .. } => Some("backing up"),
            Request::Restore { .. } => Some("restoring"),
            Request::Prune { .. } => Some("pruning"),
            Request::MigrateFiles { .. } => Some("migrating"),
            Request::Status
            | Request::List { .. }
            | Request::Show { .. }
            | Request::Track { .. }
            | Request::Forget { .. }
            | Request::Retry { .. }
            | Request::Submit { .. }
            | Request::SubmitKind { .. }
            | Request::Intents { .. }
            | Request::Redeliver { .. } => None,
        }
    }
}

/// One line of the daemon's streamed answer on `POST /v2` (newline-delimited JSON): the
/// daemon sends [`Frame::Alive`] every [`ALIVE_EVERY`](super::ALIVE_EVERY) and progress
/// as it goes, so the command can tell a working daemon from a stopped one, and ends with
/// the reply or the error.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Frame {
    Alive,
    Progress { done: u64, total: u64 },
    Reply(Box<Reply>),
    Error(AdminError),
}
