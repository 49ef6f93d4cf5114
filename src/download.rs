//! The download workers: due tasks from the store's download index, run by
//! `schedule::run_bounded` (bounded concurrency; a full disk pauses them), fetch their
//! pending images, install each complete file at its final path and record it.
//! Owns the data directory's `images/` and `tmp/` and the install order
//! (temp file → fsync → rename → fsync dir → record); must not decide state transitions
//! (`machine`) or talk HTTP itself (`fetch`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dirsync::{DirSyncs, create_private_dir, sync_dir};
use crate::fetch::{Ext, FetchError, Fetcher};
use crate::kie::verdict::{RECORD_INFO_FAILED, Verdict, interpret};
use crate::kie::{KieClient, KieError};
use crate::machine::{Ctx, Event, Report};
use crate::metrics::Metrics;
use crate::model::{
    Clock, EventKind, FileType, Image, ImageState, Kind, Millis, State, Task, millis,
};
use crate::retry::{self, Backoff, Jitter};
use crate::schedule::{self, DueWork, Finished, Names, Scheduler};
use crate::sharing::FileAccess;
use crate::store::{Applied, IfMissing, Store, StoreError};

const NAMES: Names = Names {
    what: "downloads",
    index: "the download index",
    abandoned: "they resume at the next start",
};
/// After the disk was full writing an image, downloads wait this long before trying again
/// (no attempt is counted: the disk's fault is not the image's).
const DISK_FULL_PAUSE: Duration = Duration::from_secs(5);
pub use crate::kind::{FILES_DIR, IMAGES_DIR};
/// Both, for what goes over every stored file.
pub const STORED_DIRS: [&str; 2] = [IMAGES_DIR, FILES_DIR];

/// The directory of a task's files, relative to the data directory: `images/<task_id>` for a
/// cover, `files/<task_id>` for the others.
pub fn task_dir(kind: Kind, task_id: &str) -> String {
    format!("{}/{task_id}", kind.describe().dir)
}

/// Where a file is stored, relative to the data directory: `images/<task_id>/<index>.<ext>`
/// for a cover image, `files/<task_id>/<name>.<ext>` for the others (SPEC "Data directory").
/// The one place that builds it: `install` writes there, and restore accepts a record only
/// if its path is exactly this.
pub fn file_path(kind: Kind, task_id: &str, name: &str, ext: Ext) -> String {
    format!("{}/{name}.{}", task_dir(kind, task_id), ext.as_str())
}
/// Where partial downloads live; emptied at every start.
pub const TMP_DIR: &str = "tmp";
/// Tasks being worked on at once, per unit of `download.concurrency`.
const TASKS_PER_SLOT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(
        "cannot prepare {path}: {source}; check permissions and free space of the data directory"
    )]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Prepares the data directory for downloads and removes what a crash left behind: every
/// file in `tmp/` is a partial download that was never recorded. Call before serving.
pub fn recover(data_dir: &Path) -> Result<usize, DownloadError> {
    let prepare = |path: PathBuf| {
        create_private_dir(&path).map_err(|source| DownloadError::Prepare { path, source })
    };
    for dir in STORED_DIRS {
        prepare(data_dir.join(dir))?;
    }
    let tmp = data_dir.join(TMP_DIR);
    prepare(tmp.clone())?;
    // The entries of `images/`, `files/` and `tmp/` in the data directory: `install` syncs
    // `images/<task>/` and `images/`, never the data directory, so without this a power cut
    // could take `images/` with every image recorded in it (found by the power-cut loop, on
    // a fresh data directory: the store syncs the data directory before these exist).
    sync_dir(data_dir).map_err(|source| DownloadError::Prepare {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let mut removed = 0;
    let entries = std::fs::read_dir(&tmp).map_err(|source| DownloadError::Prepare {
        path: tmp.clone(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            "removed {removed} partial download(s) left by an earlier run; they are fetched again"
        );
    }
    Ok(removed)
}

/// Why one image could not be obtained.
#[derive(Debug, thiserror::Error)]
enum ObtainError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The link answered 403/404/410 and KIE's download-url failed transiently (429, 455,
    /// 5xx, unreachable): the image is tried again later instead of failing for good.
    #[error("{original}; KIE's download-url could not give a fresh link yet: {kie}")]
    Refresh { original: FetchError, kie: KieError },
    /// The record names the file in a way its kind never does (damage): nothing is fetched.
    #[error("not fetched: the record is damaged ({0})")]
    BadRecord(String),
}

impl ObtainError {
    fn is_disk_full(&self) -> bool {
        matches!(self, ObtainError::Fetch(e) if e.is_disk_full())
    }

    fn is_transient(&self) -> bool {
        match self {
            ObtainError::Fetch(e) => e.is_transient(),
            ObtainError::Refresh { .. } => true,
            ObtainError::BadRecord(_) => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ObtainError::Fetch(e) => e.retry_after(),
            ObtainError::Refresh { .. } | ObtainError::BadRecord(_) => None,
        }
    }
}

/// The download scheduler and its workers.
pub struct Downloader {
    store: Store,
    config: Arc<Config>,
    fetcher: Fetcher,
    kie: Option<Arc<KieClient>>,
    /// The daemon's scheduling clock, shared with the poller: due times written by either
    /// are read against the same time.
    clock: Arc<dyn Clock>,
    fetch_slots: Arc<Semaphore>,
    scheduler: Scheduler<String>,
    metrics: Arc<Metrics>,
    /// Set when the disk was full writing an image: downloads pause until then.
    disk_full_until: Mutex<Option<tokio::time::Instant>>,
    /// The directory fsyncs of installs, shared by images landing at once.
    dir_syncs: Arc<DirSyncs>,
}

impl Downloader {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        fetcher: Fetcher,
        kie: Option<Arc<KieClient>>,
        wake: Arc<Notify>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Arc<Downloader> {
        let slots = config.download.concurrency.max(1);
        Arc::new(Downloader {
            store: store.clone(),
            config,
            fetcher,
            kie,
            scheduler: Scheduler::new(
                &NAMES,
                store.clone(),
                clock.clone(),
                wake,
                slots * TASKS_PER_SLOT,
            ),
            clock,
            fetch_slots: Arc::new(Semaphore::new(slots)),
            metrics,
            disk_full_until: Mutex::new(None),
            dir_syncs: Arc::new(DirSyncs::default()),
        })
    }

    /// Runs until `shutdown`: works on due tasks ([`schedule::run_bounded`]), at most
    /// `download.concurrency` × [`TASKS_PER_SLOT`] at once.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        schedule::run_bounded(self, shutdown).await;
    }

    /// Fetches every due pending image of one task, each in its own fetch slot.
    async fn process(self: &Arc<Self>, task_id: &str, shutdown: &CancellationToken) {
        let task = schedule::task_to_work_on(&self.store, task_id, "downloaded");
        let Some(task) = task.filter(|t| t.state == State::Received) else {
            return;
        };
        if self.paused() {
            return;
        }
        let task = match self.confirm(task).await {
            // Not confirmed yet (deferred): nothing is fetched; the index brings it back.
            Some(t) if !self.needs_confirmation(&t) => t,
            _ => return,
        };
        let now = self.clock.now();
        let kind = task.kind;
        let mut fetches = tokio::task::JoinSet::new();
        for image in task
            .images
            .into_iter()
            .filter(|i| i.state == ImageState::Pending && i.next_attempt_at <= now)
        {
            let this = self.clone();
            let task_id = task_id.to_string();
            let shutdown = shutdown.clone();
            fetches.spawn(async move {
                let Ok(_slot) = this.fetch_slots.acquire().await else {
                    return;
                };
                if shutdown.is_cancelled() || this.paused() {
                    return;
                }
                this.download_image(&task_id, kind, image).await;
            });
        }
        while fetches.join_next().await.is_some() {}
    }

    /// Whether downloads pause: the store cannot take writes, or the disk was full.
    fn paused(&self) -> bool {
        self.store.write_failure().is_some()
            || self
                .disk_full_until
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// Applies `event` to an existing task at the scheduling clock's time.
    async fn record(&self, task_id: &str, event: Event) -> Result<Option<Applied>, StoreError> {
        let ctx = Ctx::from_config(&self.config, self.clock.now());
        self.store
            .apply_async(task_id, event, ctx, IfMissing::Reject)
            .await
    }

    /// The downloads' backoff (`download.backoff_base`, `download.backoff_max`, full
    /// jitter), also between confirmations that failed transiently.
    fn backoff(&self) -> Backoff {
        Backoff {
            base: self.config.download.backoff_base,
            max: self.config.download.backoff_max,
            jitter: Jitter::Full,
        }
    }

    fn needs_confirmation(&self, task: &Task) -> bool {
        self.kie.is_some() && self.config.kie.confirm_callbacks && !task.confirmed
    }

    /// With `kie.confirm_callbacks` and an API key, record-info is the truth about a success
    /// callback (its signature does not cover its URLs): its URLs are the ones fetched; if it
    /// says the task failed, the task fails with KIE's reason; while it has no result yet,
    /// it is asked again on the poll schedule (`poll.interval`, sooner after a transient
    /// error) until `poll.give_up_after` from the callback, and nothing is fetched
    /// meanwhile. Every call goes through the KIE client's rate limiter. Returns the task as
    /// recorded afterwards (`None` when nothing could be recorded).
    async fn confirm(&self, task: Task) -> Option<Task> {
        let kie = match &self.kie {
            Some(kie) if self.needs_confirmation(&task) => kie,
            _ => return Some(task),
        };
        let task_id = task.task_id.as_str();
        let asked = task.confirm_attempts + 1;
        let answer = kie.details(task.kind, task_id).await;
        let now = self.clock.now();
        let give_up_at = task
            .submitted_at
            .saturating_add(millis(self.config.poll.give_up_after));
        let event = match interpret(task_id, answer, now.saturating_sub(task.submitted_at)) {
            Verdict::Done(Report::Success { files }) => Event::Confirm {
                files,
                detail: "record-info confirms the callback's image URLs".into(),
            },
            Verdict::Done(Report::Failure { reason }) => Event::ConfirmFailed { reason },
            // Not a details reading (stages come by callback only): not confirmed yet.
            Verdict::Done(Report::Stage { stage }) => Event::ConfirmLater {
                until: now
                    .saturating_add(millis(self.config.poll.interval))
                    .min(give_up_at),
                detail: format!("record-info: {stage}; confirming again before any download"),
            },
            Verdict::Pending { detail, .. } if now >= give_up_at => Event::ConfirmGiveUp {
                detail: format!(
                    "{detail} after {asked} confirmation(s), at poll.give_up_after ({})",
                    humantime::format_duration(self.config.poll.give_up_after)
                ),
            },
            Verdict::Pending { detail, transient } => {
                let interval = self.config.poll.interval;
                let delay = if transient {
                    self.backoff().delay(asked, None).min(interval)
                } else {
                    interval
                };
                Event::ConfirmLater {
                    until: now.saturating_add(millis(delay)).min(give_up_at),
                    detail: format!(
                        "{detail}; confirming again before any download (asked {asked} time(s))"
                    ),
                }
            }
        };
        // A failed KIE call is said as a warning, once, with the event that records it.
        let level = match &event {
            Event::ConfirmLater { detail, .. } | Event::ConfirmGiveUp { detail }
                if detail.starts_with(RECORD_INFO_FAILED) =>
            {
                tracing::Level::WARN
            }
            _ => tracing::Level::INFO,
        };
        match self.record(task_id, event).await {
            Ok(Some(applied)) => {
                crate::logline::record(&applied, level);
                Some(applied.task)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(task_id, "task {task_id} confirmation not recorded: {e}");
                store_backoff().await;
                None
            }
        }
    }

    async fn download_image(&self, task_id: &str, kind: Kind, image: Image) {
        let index = image.index;
        let started = std::time::Instant::now();
        let obtained = self.obtain(task_id, kind, &image).await;
        self.metrics.file_fetch_took(kind, started.elapsed());
        let event = match obtained {
            Ok(stored) => stored,
            Err(e) if e.is_disk_full() => {
                // Not the image's fault: nothing recorded, no attempt used; every download
                // waits a while (one log line per pause).
                let mut until = self
                    .disk_full_until
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if until.is_none() {
                    tracing::error!(
                        task_id,
                        index,
                        error = %e,
                        "no room for file {index} of task {task_id} ({e}); downloads paused for {}s, no attempt counted; free space in the data directory",
                        DISK_FULL_PAUSE.as_secs()
                    );
                    *until = Some(tokio::time::Instant::now() + DISK_FULL_PAUSE);
                }
                return;
            }
            Err(e) => {
                let retry_at = e.is_transient().then(|| {
                    let delay = self
                        .backoff()
                        .delay(image.budget_used() + 1, e.retry_after());
                    self.clock.now().saturating_add(millis(delay))
                });
                Event::ImageFailed {
                    index,
                    reason: e.to_string(),
                    retry_at,
                }
            }
        };
        let bytes = match &event {
            Event::ImageStored { bytes, .. } => *bytes,
            _ => 0,
        };
        match self.record(task_id, event).await {
            Ok(Some(applied)) => {
                for (note, _) in &applied.outcome.notes {
                    match note {
                        EventKind::ImageStored => self.metrics.file_fetch(kind, "stored", bytes),
                        EventKind::ImageRetry => self.metrics.file_fetch(kind, "retry", 0),
                        EventKind::ImageFailed => self.metrics.file_fetch(kind, "failed", 0),
                        _ => {}
                    }
                }
                crate::logline::record(&applied, tracing::Level::INFO);
            }
            Ok(None) => tracing::warn!(task_id, "task {task_id} vanished during its download"),
            Err(e) => {
                tracing::error!(
                    task_id,
                    index,
                    "task {task_id} image {index}: download result not recorded: {e}; trying again"
                );
                // The task stays due; don't come straight back to a failing store.
                store_backoff().await;
            }
        }
    }

    /// Gets file `image` of `task_id` to its final path and returns the event recording it.
    async fn obtain(&self, task_id: &str, kind: Kind, image: &Image) -> Result<Event, ObtainError> {
        let data_dir = &self.config.data_dir;
        let slot = Slot::of(kind, task_id, image).map_err(ObtainError::BadRecord)?;
        // A crash between rename and record leaves a complete file: adopt it, don't refetch.
        if let Some(event) = adopt_existing(data_dir, &slot, image.index).await {
            let index = image.index;
            tracing::info!(
                task_id,
                index,
                "task {task_id} image {index}: adopting the file stored before a restart"
            );
            return Ok(event);
        }
        let url = image.refreshed_url.as_deref().unwrap_or(&image.url);
        let tmp = data_dir.join(TMP_DIR);
        let expect = image.expect;
        let fetched = match self.fetcher.fetch_as(url, &tmp, expect).await {
            Err(e) if e.is_gone() && image.refreshed_url.is_none() => {
                match self.refresh(task_id, image).await {
                    Some(Ok(fresh)) => self.fetcher.fetch_as(&fresh, &tmp, expect).await?,
                    // KIE could not be asked right now: not a refusal, so try again later.
                    Some(Err(kie)) if kie.is_transient() => {
                        return Err(ObtainError::Refresh { original: e, kie });
                    }
                    _ => return Err(e.into()),
                }
            }
            other => other?,
        };
        let rel = slot.path(fetched.ext);
        install(
            self.dir_syncs.clone(),
            FileAccess::of(&self.config),
            data_dir,
            &fetched.temp_path,
            &slot,
            fetched.ext,
        )
        .await
        .map_err(FetchError::Io)?;
        Ok(Event::ImageStored {
            index: image.index,
            path: rel,
            bytes: fetched.bytes,
            sha256: fetched.sha256,
        })
    }

    /// Asks KIE for a fresh link to an expired image URL (once per image) and records it.
    /// `None` without an API key.
    async fn refresh(&self, task_id: &str, image: &Image) -> Option<Result<String, KieError>> {
        let kie = self.kie.as_ref()?;
        Some(match kie.refresh_download_url(&image.url).await {
            Ok(fresh) => {
                let event = Event::UrlRefreshed {
                    index: image.index,
                    url: fresh.clone(),
                };
                if let Err(e) = self.record(task_id, event).await {
                    tracing::error!(task_id, "task {task_id} refreshed URL not recorded: {e}");
                }
                Ok(fresh)
            }
            Err(e) => Err(e),
        })
    }
}

async fn store_backoff() {
    tokio::time::sleep(retry::STORE_RETRY).await;
}

/// Tasks with due images, from the store's download index.
impl DueWork for Downloader {
    type Key = String;

    fn scheduler(&self) -> &Scheduler<Self::Key> {
        &self.scheduler
    }

    fn queue(&self, _now: Millis, limit: usize) -> Result<Vec<(Millis, String)>, StoreError> {
        self.store.download_queue(limit)
    }

    fn paused_until(&self) -> Option<tokio::time::Instant> {
        *self
            .disk_full_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn end_pause(&self) {
        *self
            .disk_full_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        tracing::info!("downloads resumed after the disk was full");
    }

    async fn work(self: Arc<Self>, task_id: String, shutdown: CancellationToken) -> Finished {
        self.process(&task_id, &shutdown).await;
        Finished::Done
    }
}

/// Where one file of a task goes: its kind's directory, the task's directory in it, its
/// name without extension and the type its bytes must be. Built from the kind's rules (a
/// record's name is checked against them), never from a path a record holds.
#[derive(Debug, Clone)]
pub struct Slot {
    kind: Kind,
    task_id: String,
    name: String,
    expect: FileType,
}

impl Slot {
    /// The slot of file `image` of task `task_id` of `kind`; `Err` (why) for an invalid task
    /// id or a name the kind does not give.
    pub fn of(kind: Kind, task_id: &str, image: &Image) -> Result<Slot, String> {
        if !crate::model::valid_task_id(task_id) {
            return Err(format!("{task_id:?} is not a valid task id"));
        }
        if !kind.file_name_ok(image.index, &image.name) {
            return Err(format!(
                "file {} is named {:?}, not a name a {} task gives its files",
                image.index,
                image.name,
                kind.as_str()
            ));
        }
        Ok(Slot {
            kind,
            task_id: task_id.to_string(),
            name: image.name.clone(),
            expect: image.expect,
        })
    }

    /// The task's directory, relative to the data directory.
    pub fn dir(&self) -> String {
        task_dir(self.kind, &self.task_id)
    }

    /// The file's path with `ext`, relative to the data directory.
    pub fn path(&self, ext: Ext) -> String {
        file_path(self.kind, &self.task_id, &self.name, ext)
    }

    /// The file's name in its directory with `ext`.
    pub fn file_name(&self, ext: Ext) -> String {
        format!("{}.{}", self.name, ext.as_str())
    }

    /// The extensions a file of this slot may have (those of its type).
    pub fn exts(&self) -> impl Iterator<Item = Ext> + use<> {
        self.expect.exts()
    }
}

/// Moves a complete, synced temp file to its slot's path with `ext` (with the mode and group
/// of `access`) and syncs the directories, so that after this returns the file survives a
/// crash. Files of the same slot with another extension of its type (an earlier attempt)
/// are removed first. Each directory fsync starts after the rename and is shared with
/// installs landing at the same time (`dirsync`).
async fn install(
    syncs: Arc<DirSyncs>,
    access: FileAccess,
    data_dir: &Path,
    temp: &Path,
    slot: &Slot,
    ext: Ext,
) -> std::io::Result<()> {
    let kind_dir = data_dir.join(slot.kind.describe().dir);
    let dir = data_dir.join(slot.dir());
    let final_path = data_dir.join(slot.path(ext));
    let others: Vec<PathBuf> = slot
        .exts()
        .filter(|e| *e != ext)
        .map(|e| data_dir.join(slot.path(e)))
        .collect();
    let temp_owned = temp.to_path_buf();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let temp = temp_owned;
        if access != FileAccess::private() {
            // Readable by `storage.local_group` before it is at its final path, and durably
            // so: the sync of the temp file came before this change of its inode.
            let file = std::fs::File::open(&temp)?;
            access.set_file(&file)?;
            file.sync_all()?;
            create_private_dir(&dir)?;
            access.set_dir(&dir)?;
        } else {
            create_private_dir(&dir)?;
        }
        for p in others {
            if p.exists() {
                std::fs::remove_file(&p)?;
            }
        }
        std::fs::rename(&temp, &final_path)?;
        if crate::broken::active(crate::broken::Break::SkipImageDirsync) {
            // TEST ONLY (`COVERD_TEST_BREAK`): the rename is left to chance.
            return Ok(());
        }
        syncs.sync(&dir)?;
        // Always, not only when this call created `dir`: two files of a new task install at
        // once, and the second must not be recorded before the entry of `dir` in `images/`
        // (or `files/`) is durable, which only the first one's sync would otherwise
        // guarantee. Installs at the same time share this sync.
        syncs.sync(&kind_dir)?;
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?;
    if result.is_err() {
        // Never leave a partial download behind; it would be removed at the next start anyway.
        let _ = tokio::fs::remove_file(temp).await;
    }
    result
}

/// Removes the stored file(s) of `slot` — any extension of its type — because they are
/// known to be damaged (`admin retry`). Without this, the re-fetch would adopt a corrupt
/// file that still looks like its type as if a crash had left it (see [`adopt_existing`]).
pub fn discard(data_dir: &Path, slot: &Slot) -> std::io::Result<()> {
    for ext in slot.exts() {
        match std::fs::remove_file(data_dir.join(slot.path(ext))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A complete file already at the final path of `slot` (written before a crash that came
/// before its record): hash it (streaming) and return the event that records it.
async fn adopt_existing(data_dir: &Path, slot: &Slot, index: u32) -> Option<Event> {
    let candidates: Vec<(Ext, String)> = slot.exts().map(|e| (e, slot.path(e))).collect();
    let data_dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        for (ext, rel) in candidates {
            let Ok((bytes, sha256, head)) = hash_file(&data_dir.join(&rel)) else {
                continue;
            };
            if Ext::sniff(&head) != Some(ext) {
                continue;
            }
            return Some(Event::ImageStored {
                index,
                path: rel,
                bytes,
                sha256,
            });
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// A file's size, sha256 (hex) and first 16 bytes, read in 128 KiB steps (bounded memory
/// for any size of file).
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String, Vec<u8>)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut head = Vec::with_capacity(16);
    let mut total: u64 = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if head.len() < 16 {
            let take = (16 - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize()), head))
}
