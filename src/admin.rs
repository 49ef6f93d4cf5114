//! `coverd admin …` and `coverd submit`: one set of requests executed against the store, either
//! inside the running daemon (reached over `admin.sock`, mode 0600, in the data directory) or,
//! when the daemon is stopped, by opening the store directly — the same code answers both
//! ways. Owns the requests, their JSON replies and their printing; must not change a task
//! except through `store::apply` (the state machine).

pub mod access;
pub mod backup;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::callback::Answer;
use crate::config::Config;
use crate::download;
use crate::kie::KieClient;
use crate::machine::{Ctx, Event};
use crate::model::{ImageState, State, TaskJson, format_time, now_millis, valid_task_id};
use crate::server::{self, Resp};
use crate::store::{IfMissing, Quarantined, Scanned, Store, StoreError};
use crate::submit::{self, SubmitError, SubmitJson, Submitter};

/// The admin socket's file name in the data directory. `admin` owns both ends: the daemon
/// binds it for [`Service`], [`run`] connects to it.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// Largest admin request body.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest an admin command waits for the daemon.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest `admin verify` or `admin export` waits for the daemon.
const WHOLE_STORE_TIMEOUT: Duration = Duration::from_secs(3600);
/// `admin list` without `--limit`.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// `admin list --limit` at most.
pub const MAX_LIST_LIMIT: usize = 10_000;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    List {
        state: Option<String>,
        limit: usize,
    },
    Show {
        task_id: String,
    },
    Track {
        task_id: String,
        music_task_id: Option<String>,
    },
    Retry {
        task_id: String,
    },
    Submit {
        music_task_id: String,
    },
    Verify,
    Export,
    Redeliver {
        task_id: String,
    },
    /// A consistent copy into `dest` (absolute; absent or empty).
    Backup {
        dest: PathBuf,
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
    pub data_bytes: u64,
    /// Whether the daemon polls KIE (it has an API key); `null` when the daemon is stopped:
    /// the service's key (e.g. a systemd credential) is not visible from here.
    pub polling: Option<bool>,
    /// Task records that cannot be decoded (exit 1 when any).
    #[serde(default)]
    pub quarantined: Vec<QuarantinedJson>,
}

/// A task record that cannot be decoded: damaged, or written by a newer coverd.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedJson {
    pub task_id: String,
    pub reason: String,
}

impl From<Quarantined> for QuarantinedJson {
    fn from(q: Quarantined) -> QuarantinedJson {
        QuarantinedJson {
            task_id: q.task_id,
            reason: q.reason,
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
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
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
            SubmitError::Config(message) => AdminError::usage(message),
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

/// What executing a request needs: the store and, when present, the KIE client.
pub struct Exec {
    pub store: Store,
    pub config: Arc<Config>,
    pub kie: Option<Arc<KieClient>>,
    pub daemon_running: bool,
    /// The daemon's loops, woken after a change that may make work due (empty when stopped).
    pub wake: Vec<Arc<Notify>>,
    /// Progress of whole-store commands (a terminal's progress bar); `None` in the daemon.
    pub progress: Option<backup::Progress>,
}

impl Exec {
    pub async fn execute(&self, req: Request) -> Result<Reply, AdminError> {
        let reply = match req {
            Request::Status => Reply::Status {
                status: self.status().await?,
            },
            Request::List { state, limit } => {
                let state = match state.as_deref() {
                    None => None,
                    Some(s) => Some(State::parse(s).ok_or_else(|| {
                        AdminError::usage(format!(
                            "unknown state {s:?}; use one of submitted, received, downloaded, failed"
                        ))
                    })?),
                };
                let limit = limit.clamp(1, MAX_LIST_LIMIT);
                let tasks = self.store.list(state, limit)?;
                Reply::Tasks {
                    tasks: tasks
                        .iter()
                        .map(|t| self.json(t, None))
                        .collect::<Result<_, _>>()?,
                }
            }
            Request::Show { task_id } => Reply::Task {
                task: self.show(&task_id)?,
                message: String::new(),
            },
            Request::Track {
                task_id,
                music_task_id,
            } => {
                check_id(&task_id, "task id")?;
                if let Some(m) = &music_task_id {
                    check_id(m, "music task id")?;
                }
                let event = Event::Track { music_task_id };
                let applied = self.apply(&task_id, event, IfMissing::Create).await?;
                let message = if applied.0 {
                    format!(
                        "tracking {task_id}: {}",
                        self.who_polls("it is polled if no callback arrives")
                    )
                } else {
                    format!(
                        "{task_id} is already known ({}); nothing changed",
                        applied.1.state
                    )
                };
                Reply::Task {
                    task: applied.1,
                    message,
                }
            }
            Request::Retry { task_id } => {
                let task = self
                    .store
                    .get(&task_id)?
                    .ok_or_else(|| not_found(&task_id))?;
                // Hashing stored images is blocking file I/O: keep it off the runtime.
                let data_dir = self.config.data_dir.clone();
                let damaged = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, AdminError> {
                    let damaged = damaged_images(&data_dir, &task);
                    // A damaged file must not be adopted by the re-fetch as a crash leftover.
                    if task.state.is_finished() {
                        for &index in &damaged {
                            download::discard(&data_dir, &task.task_id, index).map_err(|e| {
                                AdminError::failed(format!(
                                    "cannot remove the damaged image {index} of {}: {e}; check the permissions of {}",
                                    task.task_id,
                                    data_dir.display()
                                ))
                            })?;
                        }
                    }
                    Ok(damaged)
                })
                .await
                .map_err(|e| AdminError::failed(format!("retry of {task_id} failed: {e}")))??;
                let event = Event::Retry { damaged };
                let (_, json) = self.apply(&task_id, event, IfMissing::Reject).await?;
                let message = if json.state == State::Submitted.as_str() {
                    format!(
                        "{task_id} is now {}: {}",
                        json.state,
                        self.who_polls("it is polled until KIE has its result")
                    )
                } else {
                    format!("{task_id} is now {}", json.state)
                };
                Reply::Task {
                    task: json,
                    message,
                }
            }
            Request::Verify => {
                let (store, data_dir) = (self.store.clone(), self.config.data_dir.clone());
                let progress = self.progress.clone();
                let verify =
                    tokio::task::spawn_blocking(move || verify(&store, &data_dir, progress))
                        .await
                        .map_err(|e| AdminError::failed(format!("verify failed: {e}")))??;
                Reply::Verified { verify }
            }
            Request::Export => {
                let store = self.store.clone();
                let progress = self.progress.clone();
                let (tasks, quarantined) =
                    tokio::task::spawn_blocking(move || export(&store, progress))
                        .await
                        .map_err(|e| AdminError::failed(format!("export failed: {e}")))??;
                Reply::Export { tasks, quarantined }
            }
            Request::Redeliver { task_id } => {
                if self.config.notify.url.is_none() {
                    return Err(AdminError::usage(format!(
                        "cannot redeliver {task_id}: notifications are off; set notify.url (and its secret) and restart coverd"
                    )));
                }
                let task = self
                    .store
                    .get(&task_id)?
                    .ok_or_else(|| not_found(&task_id))?;
                let n = self
                    .store
                    .redeliver(&task_id, now_millis())?
                    .ok_or_else(|| {
                        AdminError::missing(format!(
                            "task {task_id} has no notification: it has not settled yet ({}), or notifications were off when it did",
                            task.state.as_str()
                        ))
                    })?;
                self.store.flush().await?;
                let message = format!(
                    "{} notification of {task_id} queued again (webhook-id {}, the same as before, so receivers can drop it if they already have it)",
                    n.kind.as_str(),
                    n.webhook_id
                );
                Reply::Task {
                    task: self.json(&task, None)?,
                    message,
                }
            }
            Request::Backup { dest } => {
                let (store, data_dir) = (self.store.clone(), self.config.data_dir.clone());
                let progress = self.progress.clone();
                let to = dest.clone();
                let manifest = tokio::task::spawn_blocking(move || {
                    backup::backup(&store, &data_dir, &to, progress)
                })
                .await
                .map_err(|e| AdminError::failed(format!("backup failed: {e}")))??;
                Reply::BackedUp {
                    dest: access::shown(&dest).display().to_string(),
                    backup: manifest,
                }
            }
            Request::Restore { .. } => {
                return Err(AdminError::usage(format!(
                    "the daemon is running on {}; stop it first (`sudo systemctl stop coverd`), then restore into its empty data directory",
                    access::shown(&self.config.data_dir).display()
                )));
            }
            Request::Prune {
                older_than_secs,
                dry_run,
            } => {
                let (store, data_dir) = (self.store.clone(), self.config.data_dir.clone());
                let progress = self.progress.clone();
                let age = i64::try_from(older_than_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
                let cutoff = now_millis().saturating_sub(age);
                let prune = tokio::task::spawn_blocking(move || {
                    backup::prune(&store, &data_dir, cutoff, dry_run, progress)
                })
                .await
                .map_err(|e| AdminError::failed(format!("prune failed: {e}")))??;
                if !dry_run {
                    self.store.flush().await?;
                }
                Reply::Pruned { prune }
            }
            Request::Submit { music_task_id } => {
                check_id(&music_task_id, "music task id")?;
                let submitter = Submitter {
                    store: &self.store,
                    kie: self.kie.as_deref(),
                    config: &self.config,
                    wake: &self.wake,
                    daemon_running: self.daemon_running,
                };
                let (submitted, message) = submit::submit(&submitter, &music_task_id).await?;
                Reply::Submitted { submitted, message }
            }
        };
        Ok(reply)
    }

    /// Applies one event and makes it durable. Returns (created, task as JSON).
    pub async fn apply(
        &self,
        task_id: &str,
        event: Event,
        if_missing: IfMissing,
    ) -> Result<(bool, TaskJson), AdminError> {
        let ctx = Ctx::from_config(&self.config, now_millis());
        let applied = self
            .store
            .apply_async(task_id, event, ctx, if_missing)
            .await?
            .ok_or_else(|| not_found(task_id))?;
        self.store.durable(applied.ticket).await?;
        crate::journal::record(&applied, tracing::Level::INFO);
        for wake in &self.wake {
            wake.notify_one();
        }
        Ok((applied.before.is_none(), self.json(&applied.task, None)?))
    }

    /// A task as SPEC's JSON, with its latest notification.
    fn json(
        &self,
        task: &crate::model::Task,
        events: Option<&[crate::model::EventRecord]>,
    ) -> Result<TaskJson, StoreError> {
        let n = self.store.latest_notification(&task.task_id)?;
        Ok(TaskJson::new(task, events).with_notify(n.as_ref()))
    }

    /// Who will look at a submitted task: `polled` when the daemon runs with an API key.
    fn who_polls(&self, polled: &str) -> String {
        match (self.daemon_running, self.kie.is_some()) {
            (true, true) => polled.to_string(),
            (true, false) => "the daemon has no KIE API key, so nothing will poll for it: only KIE's callback can move it (give the daemon a key, see docs/configuration.md, \"Secrets\")".to_string(),
            (false, _) => "the daemon is stopped, so nothing polls for it now; once `coverd serve` runs with a KIE API key, it is polled if no callback arrives".to_string(),
        }
    }

    fn show(&self, task_id: &str) -> Result<TaskJson, AdminError> {
        let task = self.store.get(task_id)?.ok_or_else(|| not_found(task_id))?;
        let events = self.store.events(task_id)?;
        Ok(self.json(&task, Some(&events))?)
    }

    async fn status(&self) -> Result<StatusJson, AdminError> {
        // Reads every task record: blocking, and proportional to the store.
        let store = self.store.clone();
        let quarantined = tokio::task::spawn_blocking(move || store.scan_quarantined())
            .await
            .map_err(|e| AdminError::failed(format!("status failed: {e}")))??;
        let c = self.store.counts()?;
        let n = self.store.notify_counts()?;
        let oldest = self.store.oldest_unfinished()?.map(|t| Oldest {
            task_id: t.task_id,
            state: t.state.as_str().into(),
            created_at: format_time(t.created_at),
        });
        Ok(StatusJson {
            daemon: if self.daemon_running {
                "running"
            } else {
                "stopped"
            }
            .into(),
            tasks: TaskCounts {
                submitted: c.submitted,
                received: c.received,
                downloaded: c.downloaded,
                failed: c.failed,
            },
            notifications: NotificationCounts {
                enabled: self.config.notify.url.is_some(),
                pending: n.pending,
                undeliverable: n.undeliverable,
            },
            oldest_unfinished: oldest,
            data_dir: access::shown(&self.config.data_dir).display().to_string(),
            data_bytes: {
                // Walking the data directory is blocking file I/O: keep it off the runtime.
                let dir = self.config.data_dir.clone();
                tokio::task::spawn_blocking(move || dir_size(&dir))
                    .await
                    .unwrap_or(0)
            },
            polling: self.daemon_running.then_some(self.kie.is_some()),
            quarantined: quarantined.into_iter().map(Into::into).collect(),
        })
    }
}

/// Every readable task with its readable history; the records that cannot be decoded are
/// named instead, after the scan went through all the others.
fn export(
    store: &Store,
    progress: Option<backup::Progress>,
) -> Result<(Vec<TaskJson>, Vec<QuarantinedJson>), StoreError> {
    let (mut tasks, mut quarantined) = (Vec::new(), Vec::new());
    let total = total_tasks(store)?;
    for (done, scanned) in (1u64..).zip(store.all_tasks()) {
        if let Some(p) = &progress
            && done % 256 == 0
        {
            p(done, total.max(done));
        }
        match scanned? {
            Scanned::Task(t) => {
                let (events, damaged) = store.history(&t.task_id)?;
                quarantined.extend(damaged.into_iter().map(|reason| QuarantinedJson {
                    task_id: t.task_id.clone(),
                    reason,
                }));
                // A damaged notification record is named, not fatal to the export.
                let notify = store.latest_notification(&t.task_id).unwrap_or_else(|e| {
                    quarantined.push(QuarantinedJson {
                        task_id: t.task_id.clone(),
                        reason: e.to_string(),
                    });
                    None
                });
                tasks.push(TaskJson::new(&t, Some(&events)).with_notify(notify.as_ref()));
            }
            Scanned::Quarantined(q) => quarantined.push(q.into()),
        }
    }
    Ok((tasks, quarantined))
}

/// Re-hashes every stored image against its record. Cost grows with all stored images.
fn verify(
    store: &Store,
    data_dir: &Path,
    progress: Option<backup::Progress>,
) -> Result<VerifyJson, StoreError> {
    let mut out = VerifyJson::default();
    let total = total_tasks(store)?;
    for (done, scanned) in (1..).zip(store.all_tasks()) {
        if let Some(p) = &progress {
            p(done, total.max(done));
        }
        let task = match scanned? {
            Scanned::Task(task) => task,
            Scanned::Quarantined(q) => {
                out.quarantined.push(q.into());
                continue;
            }
        };
        for img in task
            .images
            .iter()
            .filter(|i| i.state == ImageState::Downloaded)
        {
            out.checked += 1;
            let path = img.path.clone().unwrap_or_default();
            match std::fs::read(data_dir.join(&path)) {
                Ok(bytes) if Some(hex::encode(Sha256::digest(&bytes))) == img.sha256 => out.ok += 1,
                Ok(_) => out.corrupt.push(path),
                Err(_) => out.missing.push(path),
            }
        }
    }
    Ok(out)
}

fn total_tasks(store: &Store) -> Result<u64, StoreError> {
    let c = store.counts()?;
    Ok(c.submitted + c.received + c.downloaded + c.failed)
}

/// Stored images whose file is missing or no longer matches its sha256.
fn damaged_images(data_dir: &Path, task: &crate::model::Task) -> Vec<u32> {
    task.images
        .iter()
        .filter(|i| i.state == ImageState::Downloaded)
        .filter(|i| {
            let Some(path) = &i.path else { return true };
            match std::fs::read(data_dir.join(path)) {
                Ok(bytes) => Some(hex::encode(Sha256::digest(&bytes))) != i.sha256,
                Err(_) => true,
            }
        })
        .map(|i| i.index)
        .collect()
}

fn not_found(task_id: &str) -> AdminError {
    AdminError::missing(format!(
        "no task {task_id} in this data directory; check the id, or `coverd admin track {task_id}` to adopt it"
    ))
}

fn check_id(id: &str, what: &str) -> Result<(), AdminError> {
    if valid_task_id(id) {
        Ok(())
    } else {
        Err(AdminError::usage(format!(
            "invalid {what} {id:?}: use 1 to 128 characters of A-Z, a-z, 0-9, '-' or '_'"
        )))
    }
}

/// Total size of the files under `dir` (not following links).
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

// ---- the daemon's side of the socket ----

/// Answers admin requests on the daemon's Unix socket: `POST /v1` with a JSON [`Request`].
pub struct Service {
    exec: Exec,
}

impl Service {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        kie: Option<Arc<KieClient>>,
        wake: Vec<Arc<Notify>>,
    ) -> Service {
        Service {
            exec: Exec {
                store,
                config,
                kie,
                daemon_running: true,
                wake,
                progress: None,
            },
        }
    }

    pub async fn handle(&self, req: hyper::Request<Incoming>) -> Resp {
        if req.method() != Method::POST || req.uri().path() != "/v1" {
            return server::answer(Answer::error(StatusCode::NOT_FOUND, "use POST /v1"));
        }
        let (parts, body) = req.into_parts();
        let bytes = match server::read_body(&parts.headers, body, MAX_REQUEST_BYTES).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let result = match serde_json::from_slice::<Request>(&bytes) {
            Ok(request) => self.exec.execute(request).await,
            Err(e) => Err(AdminError::usage(format!("bad admin request: {e}"))),
        };
        let (status, body) = match result {
            Ok(reply) => (StatusCode::OK, serde_json::to_string(&reply)),
            Err(err) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::to_string(&err),
            ),
        };
        server::answer(Answer {
            status,
            body: body.unwrap_or_else(|e| {
                format!(r#"{{"exit":1,"message":"cannot encode reply: {e}"}}"#)
            }),
        })
    }
}

// ---- the command's side ----

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

async fn remote(stream: tokio::net::UnixStream, req: &Request) -> Result<Reply, AdminError> {
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

// ---- printing ----

/// Renders a reply for people (`json = false`) or scripts (`json = true`).
pub fn render(reply: &Reply, json: bool) -> String {
    if json {
        let value = match reply {
            Reply::Status { status } => serde_json::to_string_pretty(status),
            Reply::Tasks { tasks } => serde_json::to_string_pretty(tasks),
            Reply::Task { task, .. } => serde_json::to_string_pretty(task),
            Reply::Submitted { submitted, .. } => serde_json::to_string(submitted),
            Reply::Verified { verify } => serde_json::to_string_pretty(verify),
            Reply::Export { .. } => Ok(render(reply, false)),
            Reply::BackedUp { backup, .. } | Reply::Restored { backup, .. } => {
                serde_json::to_string_pretty(backup)
            }
            Reply::Pruned { prune } => serde_json::to_string_pretty(prune),
        };
        return value.unwrap_or_default();
    }
    match reply {
        Reply::Status { status } => {
            let t = &status.tasks;
            let mut out = format!(
                "daemon: {}\ntasks: {} submitted, {} received, {} downloaded, {} failed\n",
                status.daemon, t.submitted, t.received, t.downloaded, t.failed
            );
            match &status.oldest_unfinished {
                Some(o) => {
                    out += &format!(
                        "oldest unfinished: {} ({}, since {})\n",
                        o.task_id, o.state, o.created_at
                    )
                }
                None => out += "oldest unfinished: none\n",
            }
            let n = &status.notifications;
            out += &format!(
                "notifications: {}{} pending, {} undeliverable\n",
                if n.enabled {
                    ""
                } else {
                    "off (notify.url is empty); "
                },
                n.pending,
                n.undeliverable
            );
            out += &format!("data: {} ({} bytes)\n", status.data_dir, status.data_bytes);
            out += &format!(
                "polling: {}",
                match status.polling {
                    Some(true) => "on",
                    Some(false) => "off (no KIE API key)",
                    None => "unknown (daemon stopped)",
                }
            );
            out += &render_quarantined(&status.quarantined);
            out
        }
        Reply::Tasks { tasks } => {
            if tasks.is_empty() {
                return "no tasks".into();
            }
            tasks
                .iter()
                .map(|t| {
                    let stored = t.images.iter().filter(|i| i.state == "downloaded").count();
                    format!(
                        "{}  {:<10}  {}  images {}/{}{}",
                        t.task_id,
                        t.state,
                        t.created_at,
                        stored,
                        t.images.len(),
                        t.error
                            .as_deref()
                            .map(|e| format!("  error: {e}"))
                            .unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        Reply::Task { task, message } => {
            let mut out = String::new();
            if !message.is_empty() {
                out += message;
                out += "\n";
            }
            out += &format!(
                "task {}\n  music task: {}\n  state: {}\n  source: {}\n  created: {}\n  updated: {}\n  callbacks: {}  polls: {}\n",
                task.task_id,
                task.music_task_id.as_deref().unwrap_or("-"),
                task.state,
                task.source.as_deref().unwrap_or("-"),
                task.created_at,
                task.updated_at,
                task.callbacks,
                task.polls
            );
            if let Some(e) = &task.error {
                out += &format!("  error: {e}\n");
            }
            if let Some(n) = &task.notify {
                out += &format!(
                    "  notification: {} after {} attempt(s)\n",
                    n.state, n.attempts
                );
            }
            for i in &task.images {
                out += &format!(
                    "  image {}: {} after {} attempt(s) {}{}\n",
                    i.index,
                    i.state,
                    i.attempts,
                    i.path.as_deref().unwrap_or(&i.url),
                    i.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                );
            }
            for e in task.events.iter().flatten() {
                out += &format!("  {} {}: {}\n", e.at, e.kind, e.detail);
            }
            out.trim_end().to_string()
        }
        Reply::Verified { verify } => {
            let mut out = format!(
                "checked {} stored image(s): {} ok, {} missing, {} corrupt",
                verify.checked,
                verify.ok,
                verify.missing.len(),
                verify.corrupt.len()
            );
            for p in &verify.missing {
                out += &format!("\nmissing: {p}");
            }
            for p in &verify.corrupt {
                out += &format!("\ncorrupt: {p}");
            }
            if !verify.missing.is_empty() || !verify.corrupt.is_empty() {
                out += "\n`coverd admin retry TASK_ID` fetches a task's damaged images again";
            }
            out += &render_quarantined(&verify.quarantined);
            out
        }
        // One JSON object per line, always (SPEC); quarantined records go to stderr
        // (see [`notes`]).
        Reply::Export { tasks, .. } => tasks
            .iter()
            .filter_map(|t| serde_json::to_string(t).ok())
            .collect::<Vec<_>>()
            .join("\n"),
        Reply::BackedUp { dest, backup } => format!(
            "backed up {} tasks and {} images ({} bytes) to {dest}",
            backup.tasks, backup.images, backup.bytes
        ),
        Reply::Restored { data_dir, backup } => format!(
            "restored {} tasks and {} images ({} bytes) from the backup of {} into {data_dir}; start the daemon now",
            backup.tasks, backup.images, backup.bytes, backup.created_at
        ),
        Reply::Pruned { prune } => format!(
            "{} {} finished task(s) last changed before {} and {} bytes of images",
            if prune.dry_run {
                "would remove"
            } else {
                "removed"
            },
            prune.tasks,
            prune.before,
            prune.bytes
        ),
        // The id alone on stdout, so scripts can capture it; the message goes to stderr.
        Reply::Submitted { submitted, .. } => submitted.task_id.clone(),
    }
}

/// Lines naming quarantined records (empty when there are none), each after a newline.
fn render_quarantined(quarantined: &[QuarantinedJson]) -> String {
    if quarantined.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n{} quarantined record(s), skipped by the daemon:",
        quarantined.len()
    );
    for q in quarantined {
        out += &format!("\nquarantined: {}: {}", q.task_id, q.reason);
    }
    out += "\nrun the newer coverd that wrote a record, or restore a corrupt one from a backup";
    out
}

/// What goes to stderr besides the reply: `submit`'s message, and the records `export`
/// could not read (its stdout stays one task per line).
pub fn notes(reply: &Reply, json: bool) -> Option<String> {
    match reply {
        Reply::Submitted { message, .. } if !json => Some(message.clone()),
        Reply::Export { quarantined, .. } if !quarantined.is_empty() => {
            Some(render_quarantined(quarantined).trim_start().to_string())
        }
        _ => None,
    }
}
