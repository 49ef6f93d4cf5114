//! Executes one admin request against the store (in the daemon, or in the command when the
//! daemon is stopped). Must not change a task except through `store::apply`.

use std::sync::Arc;

use tokio::sync::Notify;

use super::{
    AdminError, IntentJson, MAX_LIST_LIMIT, NotificationCounts, Oldest, QuarantinedJson, Reply,
    Request, StatisticsJson, StatusJson, TaskCounts, VerifyJson, access, backup,
};
use crate::config::Config;
use crate::download;
use crate::kie::KieClient;
use crate::machine::{Ctx, Event, Origin};
use crate::model::{ImageState, Kind, State, TaskJson, check_task_id, format_time, now_millis};
use crate::storage::{FileStore as _, Files};
use crate::store::summary::Summary;
use crate::store::{IfMissing, Scanned, StatsVerdict, Store, StoreError};
use crate::submit::{self, Submitter};

/// What [`Exec::apply`] did.
pub struct AppliedJson {
    /// The event created the task (it was not known before).
    pub created: bool,
    /// The task after the event, as SPEC's JSON.
    pub task: TaskJson,
}

/// What executing a request needs: the store and, when present, the KIE client.
#[derive(Clone)]
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
    /// Runs `req`. A change to a task says which data directory it was made in (SPEC: every
    /// command that changes something names the data directory), so a stray
    /// `./coverd-data` taking the service's place cannot go unnoticed.
    pub async fn execute(&self, req: Request) -> Result<Reply, AdminError> {
        let writes = req.writes();
        let mut reply = self.execute_request(req).await?;
        if writes && let Reply::Task { message, .. } = &mut reply {
            let dir = access::shown(&self.config.data_dir);
            message.push_str(&format!(" (data directory {})", dir.display()));
        }
        Ok(reply)
    }

    async fn execute_request(&self, req: Request) -> Result<Reply, AdminError> {
        let reply = match req {
            Request::Status => Reply::Status {
                status: self.status().await?,
            },
            Request::List { state, kind, limit } => {
                let kind = parse_kind(kind.as_deref())?;
                let state = match state.as_deref() {
                    None => None,
                    Some(s) => Some(State::parse(s).ok_or_else(|| {
                        AdminError::usage(format!(
                            "unknown state {s:?}; use one of submitted, received, downloaded, failed"
                        ))
                    })?),
                };
                let limit = limit.clamp(1, MAX_LIST_LIMIT);
                // A listing of finished tasks scans the store: off the runtime.
                let store = self.store.clone();
                let tasks = tokio::task::spawn_blocking(move || store.list_of(state, kind, limit))
                    .await
                    .map_err(|e| AdminError::failed(format!("listing tasks failed: {e}")))??;
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
                kind,
                audio_id,
            } => {
                check_id(&task_id, "task id")?;
                if let Some(m) = &music_task_id {
                    check_id(m, "music task id")?;
                }
                if let Some(a) = &audio_id {
                    check_id(a, "audio id")?;
                }
                let kind = parse_kind(kind.as_deref())?.unwrap_or(Kind::Cover);
                if kind == Kind::Music && (music_task_id.is_some() || audio_id.is_some()) {
                    return Err(AdminError::usage(
                        "a music task is not made from another task: drop --music-task-id and --audio-id",
                    ));
                }
                let event = Event::Track(Origin {
                    kind,
                    music_task_id,
                    audio_id,
                });
                let applied = self.apply(&task_id, event, IfMissing::Create).await?;
                let message = if applied.created {
                    format!(
                        "tracking {task_id}: {}",
                        self.who_polls("it is polled if no callback arrives")
                    )
                } else {
                    format!(
                        "{task_id} is already known ({}); nothing changed",
                        applied.task.state
                    )
                };
                Reply::Task {
                    task: applied.task,
                    message,
                }
            }
            Request::Retry { task_id } => {
                // The id names the task's image directory: only a valid one.
                check_id(&task_id, "task id")?;
                let task = self
                    .store
                    .get(&task_id)?
                    .ok_or_else(|| not_found(&task_id))?;
                if task.task_id != task_id {
                    return Err(AdminError::failed(format!(
                        "the record stored for task {task_id} holds task {:?}: it is damaged; nothing was changed (restore it from a backup, or `coverd admin export` to see it)",
                        task.task_id
                    )));
                }
                let files = self.files()?;
                let damaged = damaged_images(&files, &task).await;
                // A damaged file must not be adopted by the re-fetch as a crash leftover.
                if task.state.is_finished() {
                    for img in task.images.iter().filter(|i| damaged.contains(&i.index)) {
                        let index = img.index;
                        let slot = download::Slot::of(task.kind, &task.task_id, img)
                            .map_err(AdminError::failed)?;
                        for store in files.all() {
                            store.discard(&slot).await.map_err(|e| {
                                AdminError::failed(format!(
                                    "cannot remove the damaged file {index} of {} from {}: {e}; check its permissions",
                                    task.task_id,
                                    store.describe()
                                ))
                            })?;
                        }
                    }
                }
                let event = Event::Retry { damaged };
                let json = self.apply(&task_id, event, IfMissing::Reject).await?.task;
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
                let (store, files) = (self.store.clone(), self.files()?);
                let progress = self.progress.clone();
                let runtime = tokio::runtime::Handle::current();
                let verify =
                    tokio::task::spawn_blocking(move || verify(&store, &files, &runtime, progress))
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
            Request::Forget { task_id, force } => {
                check_id(&task_id, "task id")?;
                let task = self
                    .store
                    .get(&task_id)?
                    .ok_or_else(|| not_found(&task_id))?;
                if !task.state.is_finished() && !force {
                    return Err(AdminError::usage(format!(
                        "task {task_id} is {}, not finished: forgetting it stops its work and drops what KIE sends for it later; add --force if that is what you want",
                        task.state.as_str()
                    )));
                }
                let json = self.json(&task, None)?;
                // Objects before the record: a crash between leaves a record that the next
                // `forget` finishes, never an object no record names.
                let files = self.files()?;
                files.remove_objects(task.kind, &task_id).await.map_err(|e| {
                    AdminError::failed(format!(
                        "cannot remove the objects of task {task_id}: {e}; nothing else was removed, try again once the object store answers"
                    ))
                })?;
                let store = self.store.clone();
                let (id, updated_at) = (task.task_id.clone(), task.updated_at);
                tokio::task::spawn_blocking(move || -> Result<(), AdminError> {
                    if !store.forget_task(&id, updated_at, force)? {
                        return Err(AdminError::failed(format!(
                            "task {id} changed while it was being forgotten (or its notification is still being sent); its record was kept, try again"
                        )));
                    }
                    Ok(())
                })
                .await
                .map_err(|e| AdminError::failed(format!("forgetting {task_id} failed: {e}")))??;
                // The record went first: a crash here leaves only files in the data
                // directory, which no record names (prune does the same).
                let local = files.local();
                local.remove_task(task.kind, &task_id).await.map_err(|e| {
                    AdminError::failed(format!(
                        "forgot task {task_id} but cannot remove its directory in {}: {e}; remove {} by hand",
                        local.data_dir().display(),
                        download::task_dir(task.kind, &task_id)
                    ))
                })?;
                self.store.flush().await?;
                let files = task.images.iter().filter(|i| i.path.is_some()).count();
                Reply::Task {
                    task: json,
                    message: format!(
                        "forgot {} task {task_id} ({}) and its {files} stored file(s)",
                        task.kind.as_str(),
                        task.state.as_str()
                    ),
                }
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
                        AdminError::missing(if task.state.is_finished() {
                            format!(
                                "task {task_id} ({}) has no notification: notifications were off when it settled",
                                task.state.as_str()
                            )
                        } else {
                            format!(
                                "task {task_id} has no notification: it has not settled yet (it is {})",
                                task.state.as_str()
                            )
                        })
                    })?;
                self.store.flush().await?;
                let message = format!(
                    "{} notification of {task_id} queued again (webhook-id {}, the same as before, so receivers can drop it if they already have it)",
                    n.type_name(),
                    n.webhook_id
                );
                Reply::Task {
                    task: self.json(&task, None)?,
                    message,
                }
            }
            Request::Backup { dest, seen } => {
                if let Some(seen) = &seen {
                    check_same_place(&dest, seen)?;
                }
                let (store, data_dir) = (self.store.clone(), self.config.data_dir.clone());
                let progress = self.progress.clone();
                let to = dest.clone();
                let files = self.files()?;
                let manifest = tokio::task::spawn_blocking(move || {
                    let object = files.object().map(|o| o.as_ref());
                    backup::backup(&store, &data_dir, &to, object, progress)
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
                    "the daemon is running on {}; stop it first (`sudo systemctl stop coverd`), move the data directory aside (`mv DIR DIR.old`), then restore into the new, empty one",
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
                let files = self.files()?;
                let runtime = tokio::runtime::Handle::current();
                let prune = tokio::task::spawn_blocking(move || {
                    let objects = backup::Objects {
                        files: &files,
                        runtime: &runtime,
                    };
                    backup::prune(&store, &data_dir, &objects, cutoff, dry_run, progress)
                })
                .await
                .map_err(|e| AdminError::failed(format!("prune failed: {e}")))??;
                if !dry_run {
                    self.store.flush().await?;
                }
                Reply::Pruned { prune }
            }
            Request::MigrateFiles { dry_run } => Reply::Migrated {
                migrate: self.migrate_files(dry_run).await?,
            },
            Request::Submit { music_task_id } => {
                check_id(&music_task_id, "music task id")?;
                let submitter = self.submitter();
                let (submitted, message) = submit::submit(&submitter, &music_task_id).await?;
                Reply::Submitted { submitted, message }
            }
            Request::SubmitKind { request } => {
                let submitter = self.submitter();
                let (submitted, message) = submit::submit_kind(&submitter, &request).await?;
                Reply::Submitted { submitted, message }
            }
            Request::Intents { drop } => {
                let mut message = String::new();
                if let Some(key) = drop {
                    let dropped = if self.store.drop_kind_intent(&key)? {
                        true
                    } else if self
                        .store
                        .intents(usize::MAX)?
                        .iter()
                        .any(|(m, _)| *m == key)
                    {
                        self.store.drop_intent(&key)?;
                        true
                    } else {
                        false
                    };
                    if !dropped {
                        return Err(AdminError::missing(format!(
                            "no intent {key}; `coverd admin intents` lists them"
                        )));
                    }
                    self.store.flush().await?;
                    message = format!("dropped intent {key}");
                }
                let mut intents: Vec<IntentJson> = self
                    .store
                    .intents(MAX_LIST_LIMIT)?
                    .into_iter()
                    .map(|(music, at)| IntentJson {
                        key: music.clone(),
                        kind: Kind::Cover.as_str().into(),
                        music_task_id: Some(music),
                        audio_id: None,
                        recorded_at: format_time(at),
                        state: "pending".into(),
                        detail: "a cover request whose answer is not recorded; the daemon asks KIE again (a repeat is answered with the existing task)".into(),
                    })
                    .collect();
                intents.extend(
                    self.store
                        .unknown_kind_intents(MAX_LIST_LIMIT)?
                        .into_iter()
                        .map(|i| IntentJson {
                            key: i.key,
                            kind: i.kind.as_str().into(),
                            music_task_id: i.music_task_id,
                            audio_id: i.audio_id,
                            recorded_at: format_time(i.recorded_at),
                            state: i.state.as_str().into(),
                            detail: i.detail,
                        }),
                );
                Reply::Intents { intents, message }
            }
        };
        Ok(reply)
    }

    /// The file stores of this data directory (`storage`).
    fn files(&self) -> Result<Files, AdminError> {
        Files::new(&self.config).map_err(|e| AdminError::usage(e.to_string()))
    }

    /// What a submit of this process needs: its store, KIE client, configuration and loops.
    fn submitter(&self) -> Submitter<'_> {
        Submitter {
            store: &self.store,
            kie: self.kie.as_deref(),
            config: &self.config,
            wake: &self.wake,
            daemon_running: self.daemon_running,
        }
    }

    /// Applies one event and makes it durable; wakes the daemon's loops.
    pub async fn apply(
        &self,
        task_id: &str,
        event: Event,
        if_missing: IfMissing,
    ) -> Result<AppliedJson, AdminError> {
        let ctx = Ctx::from_config(&self.config, now_millis());
        let applied = self
            .store
            .apply_async(task_id, event, ctx, if_missing)
            .await?
            .ok_or_else(|| not_found(task_id))?;
        self.store.durable(applied.ticket).await?;
        crate::logline::record(&applied, tracing::Level::INFO);
        for wake in &self.wake {
            wake.notify_one();
        }
        Ok(AppliedJson {
            created: applied.before.is_none(),
            task: self.json(&applied.task, None)?,
        })
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
            (true, false) => "the daemon has no KIE API key, so nothing will poll for it: only KIE's callback can move it (give the daemon a key: `man coverd`, CONFIGURATION)".to_string(),
            (false, _) => "the daemon is stopped, so nothing polls for it now; once `coverd serve` runs with a KIE API key, it is polled if no callback arrives".to_string(),
        }
    }

    fn show(&self, task_id: &str) -> Result<TaskJson, AdminError> {
        let task = self.store.get(task_id)?.ok_or_else(|| not_found(task_id))?;
        let events = self.store.events(task_id)?;
        Ok(self.json(&task, Some(&events))?)
    }

    /// Reads counters and indexes kept beside the records, never every record nor the data
    /// directory's files (issue 15 item 11): its cost does not grow with the store.
    async fn status(&self) -> Result<StatusJson, AdminError> {
        // The quarantine index and the records it names, sled's files: blocking reads.
        let store = self.store.clone();
        let summary = tokio::task::spawn_blocking(move || store.summary())
            .await
            .map_err(|e| AdminError::failed(format!("status failed: {e}")))??;
        Ok(status_json(
            summary,
            self.daemon_running.then_some(self.kie.is_some()),
            &self.config,
        ))
    }
}

/// `admin status`'s answer from the store's side of it (read from the store, or from the
/// summary a clean close left) and the daemon's: `polling` is `None` when it is stopped.
pub(super) fn status_json(summary: Summary, polling: Option<bool>, config: &Config) -> StatusJson {
    StatusJson {
        daemon: if polling.is_some() {
            "running"
        } else {
            "stopped"
        }
        .into(),
        tasks: TaskCounts {
            submitted: summary.counts.submitted,
            received: summary.counts.received,
            downloaded: summary.counts.downloaded,
            failed: summary.counts.failed,
        },
        notifications: NotificationCounts {
            enabled: config.notify.url.is_some(),
            pending: summary.notify.pending,
            undeliverable: summary.notify.undeliverable,
        },
        oldest_unfinished: summary.oldest_unfinished.map(|t| Oldest {
            task_id: t.task_id,
            state: t.state.as_str().into(),
            created_at: format_time(t.created_at),
        }),
        data_dir: access::shown(&config.data_dir).display().to_string(),
        data_bytes: summary.stored_bytes.saturating_add(summary.db_bytes),
        stored_bytes: summary.stored_bytes,
        polling,
        // Beside each record, the callbacks kept aside for it (SPEC).
        quarantined: summary
            .quarantined
            .into_iter()
            .map(|q| QuarantinedJson {
                task_id: q.task_id,
                reason: q.reason,
                kept_callbacks: q.kept_callbacks,
            })
            .collect(),
        quarantined_total: summary.quarantined_total,
    }
}

/// Refuses a backup whose destination the command sees somewhere else than this process
/// does (SPEC "Data directory"): under systemd the service has its own `/tmp`
/// (`PrivateTmp=`), so a copy written there would be reported as made, then deleted at the
/// next stop, never seen by the operator.
fn check_same_place(dest: &std::path::Path, seen: &super::DirSeen) -> Result<(), AdminError> {
    use std::os::unix::fs::MetadataExt;
    let same = std::fs::metadata(&seen.path)
        .is_ok_and(|m| m.is_dir() && m.dev() == seen.dev && m.ino() == seen.ino);
    if same {
        return Ok(());
    }
    Err(AdminError::failed(format!(
        "{} is not the same place for the daemon as for you: the service sees another {} (it has its own /tmp and a read-only system); nothing was written. Back up under /var/lib/coverd-backup/NAME (root reaches it at /var/lib/private/coverd-backup/NAME), or stop the service and back up offline",
        dest.display(),
        seen.path.display()
    )))
}

/// Every readable task with its readable history; the records that cannot be decoded are
/// named instead, after the scan went through all the others.
pub(super) fn export(
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
                    kept_callbacks: 0,
                }));
                // A damaged notification record is named, not fatal to the export.
                let notify = store.latest_notification(&t.task_id).unwrap_or_else(|e| {
                    quarantined.push(QuarantinedJson {
                        task_id: t.task_id.clone(),
                        reason: e.to_string(),
                        kept_callbacks: 0,
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
pub(super) fn verify(
    store: &Store,
    files: &Files,
    runtime: &tokio::runtime::Handle,
    progress: Option<backup::Progress>,
) -> Result<VerifyJson, StoreError> {
    let mut out = VerifyJson::default();
    let total = total_tasks(store)?;
    // The counters and index `status` reads, against what this scan finds.
    let mut stats = store.stats_check();
    for (done, scanned) in (1..).zip(store.all_tasks()) {
        if let Some(p) = &progress {
            p(done, total.max(done));
        }
        let scanned = scanned?;
        stats.add(&scanned);
        let task = match scanned {
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
            match runtime.block_on(check_image(files, task.kind, &task.task_id, img)) {
                ImageCheck::Ok => out.ok += 1,
                ImageCheck::Corrupt => out.corrupt.push(path),
                ImageCheck::Missing => out.missing.push(path),
            }
        }
    }
    out.statistics = match store.finish_stats_check(stats)? {
        StatsVerdict::Agreed => StatisticsJson::ok(),
        StatsVerdict::Repaired(what) => StatisticsJson {
            result: "repaired".into(),
            detail: format!("they disagreed with the task records ({what}); derived again"),
        },
        StatsVerdict::NotCompared(why) => StatisticsJson {
            result: "not_compared".into(),
            detail: why,
        },
    };
    Ok(out)
}

pub(super) fn total_tasks(store: &Store) -> Result<u64, StoreError> {
    let c = store.counts()?;
    Ok(c.submitted + c.received + c.downloaded + c.failed)
}

/// Stored images whose file is missing or no longer matches its sha256.
pub(super) async fn damaged_images(files: &Files, task: &crate::model::Task) -> Vec<u32> {
    let mut damaged = Vec::new();
    for img in task
        .images
        .iter()
        .filter(|i| i.state == ImageState::Downloaded)
    {
        if check_image(files, task.kind, &task.task_id, img).await != ImageCheck::Ok {
            damaged.push(img.index);
        }
    }
    damaged
}

/// A stored image's file against its record (`verify` and `retry` share this one check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ImageCheck {
    Ok,
    /// The file is there, but its sha256 differs from the record's.
    Corrupt,
    /// No file (or no recorded place, or one other than the image's own, or unreadable).
    Missing,
}

/// Reads and hashes (streaming) the file `img` of task `task_id` of `kind`, in the data
/// directory or the object store its record names. The place is built from the id, the
/// kind's file names and the file's type (`Files::recorded`), never taken from the record:
/// a record naming anything else has no file here (missing, so `retry` fetches it again to
/// its own place).
pub(super) async fn check_image(
    files: &Files,
    kind: crate::model::Kind,
    task_id: &str,
    img: &crate::model::Image,
) -> ImageCheck {
    let Ok(Some(recorded)) = files.recorded(kind, task_id, img) else {
        return ImageCheck::Missing;
    };
    match recorded.store.read(&recorded.place).await {
        Ok(Some(back)) if img.sha256.as_deref() == Some(back.sha256.as_str()) => ImageCheck::Ok,
        Ok(Some(_)) => ImageCheck::Corrupt,
        Ok(None) | Err(_) => ImageCheck::Missing,
    }
}

/// A `--kind` argument: `None` when not given.
fn parse_kind(kind: Option<&str>) -> Result<Option<Kind>, AdminError> {
    kind.map(|k| {
        Kind::parse(k).ok_or_else(|| {
            AdminError::usage(format!(
                "unknown kind {k:?}; use one of cover, music, wav, video, stems"
            ))
        })
    })
    .transpose()
}

pub(super) fn not_found(task_id: &str) -> AdminError {
    AdminError::missing(format!(
        "no task {task_id} in this data directory; check the id, or `coverd admin track {task_id}` to adopt it"
    ))
}

pub(super) fn check_id(id: &str, what: &str) -> Result<(), AdminError> {
    check_task_id(id, what).map_err(AdminError::usage)
}
