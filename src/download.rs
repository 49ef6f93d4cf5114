//! The download workers: due tasks from the store's download index, run by
//! `schedule::run_bounded` (bounded concurrency; a full disk pauses them), fetch their
//! pending images, hand each complete file to the file store (`storage`: the data
//! directory or an object store) and record it once stored. Owns the data directory's
//! `tmp/`, the order fetch → store → record, and the pauses (disk full, object store down);
//! must not decide state transitions (`machine`), talk HTTP itself (`fetch`) or know which
//! store it puts files in.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dirsync::{create_private_dir, sync_dir};
use crate::fetch::{FetchError, Fetcher};
use crate::kie::verdict::{RECORD_INFO_FAILED, Verdict, interpret};
use crate::kie::{KieClient, KieError};
use crate::machine::{Ctx, Event, Report};
use crate::metrics::Metrics;
use crate::model::{Clock, EventKind, Image, ImageState, Kind, Millis, State, Task, millis};
use crate::retry::{self, Backoff, Jitter};
use crate::schedule::{self, DueWork, Finished, Names, Scheduler};
use crate::storage::{FileStore, StorageError, adopt_existing};
use crate::store::{Applied, IfMissing, Store, StoreError};

const NAMES: Names = Names {
    what: "downloads",
    index: "the download index",
    abandoned: "they resume at the next start",
};
/// After the disk was full writing an image, or the object store was down or refused an
/// upload, downloads wait this long before trying again (no attempt is counted: the disk's
/// or the store's fault is not the file's).
const PAUSE: Duration = Duration::from_secs(5);
pub use crate::kind::{FILES_DIR, IMAGES_DIR};
/// Both, for what goes over every stored file.
pub const STORED_DIRS: [&str; 2] = [IMAGES_DIR, FILES_DIR];

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
    /// Fetched, but the file store did not take it.
    #[error(transparent)]
    Store(StorageError),
}

impl From<StorageError> for ObtainError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Io(e) => ObtainError::Fetch(FetchError::Io(e)),
            other => ObtainError::Store(other),
        }
    }
}

impl ObtainError {
    /// Why downloads pause instead of counting this against the file, if they do.
    fn pause(&self) -> Option<Pause> {
        match self {
            ObtainError::Fetch(e) if e.is_disk_full() => Some(Pause::DiskFull),
            ObtainError::Store(e) if e.is_unavailable() => Some(Pause::StoreDown),
            _ => None,
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            ObtainError::Fetch(e) => e.is_transient(),
            ObtainError::Refresh { .. } | ObtainError::Store(_) => true,
            ObtainError::BadRecord(_) => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ObtainError::Fetch(e) => e.retry_after(),
            ObtainError::Refresh { .. } | ObtainError::BadRecord(_) | ObtainError::Store(_) => None,
        }
    }
}

/// Why downloads pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pause {
    DiskFull,
    StoreDown,
}

/// Starts a pause of [`PAUSE`] because of `why`, unless one is under way.
fn arm(paused: &mut Option<(tokio::time::Instant, Pause)>, why: Pause) {
    if paused.is_none() {
        *paused = Some((tokio::time::Instant::now() + PAUSE, why));
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
    /// Set when the disk was full writing a file or the object store did not take one:
    /// downloads pause until then.
    paused: Mutex<Option<(tokio::time::Instant, Pause)>>,
    /// Set from an upload the object store did not take (down or refusing) until one it
    /// takes: meanwhile each task asks it ([`FileStore::probe`]) before fetching anything,
    /// and the outage is logged once.
    store_down: AtomicBool,
    /// Where files go.
    files: Arc<dyn FileStore>,
}

/// Where the downloads' files come from and where they go.
pub struct Transfer {
    pub fetcher: Fetcher,
    /// The file store new files go to (`storage::Files::primary`).
    pub files: Arc<dyn FileStore>,
}

impl Downloader {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        Transfer { fetcher, files }: Transfer,
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
            paused: Mutex::new(None),
            store_down: AtomicBool::new(false),
            files,
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
        if self.paused() || !self.store_answers().await {
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

    /// Whether downloads pause: the store cannot take writes, the disk was full, or the
    /// object store was down.
    fn paused(&self) -> bool {
        self.store.write_failure().is_some() || self.pause_state().is_some()
    }

    fn pause_state(&self) -> std::sync::MutexGuard<'_, Option<(tokio::time::Instant, Pause)>> {
        self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pauses downloads for [`PAUSE`] because of `why`: one log line per pause of a full
    /// disk, one per outage of the object store (until a file is stored again).
    fn pause(&self, why: Pause, task_id: &str, index: u32, e: &dyn std::fmt::Display) {
        let mut paused = self.pause_state();
        let secs = PAUSE.as_secs();
        match why {
            Pause::DiskFull if paused.is_none() => tracing::error!(
                task_id,
                index,
                error = %e,
                "no room for file {index} of task {task_id} ({e}); downloads paused for {secs}s, no attempt counted; free space in the data directory"
            ),
            Pause::StoreDown if !self.store_down.swap(true, Ordering::Relaxed) => {
                self.metrics.storage_up(false);
                tracing::error!(
                    task_id,
                    index,
                    error = %e,
                    "file {index} of task {task_id} not stored: {e}; uploads paused (tried again every {secs}s, no attempt counted, callbacks still taken); check the object store and the [storage] keys"
                );
            }
            _ => {}
        }
        arm(&mut paused, why);
    }

    /// Whether the file store takes files: during an outage of the object store, asks it
    /// first ([`PAUSE`] apart), so that nothing is fetched only to be dropped.
    async fn store_answers(&self) -> bool {
        if !self.store_down.load(Ordering::Relaxed) {
            return true;
        }
        match self.files.probe().await {
            Ok(()) => true,
            Err(e) => {
                arm(&mut self.pause_state(), Pause::StoreDown);
                tracing::debug!(error = %e, "the object store still does not answer");
                false
            }
        }
    }

    /// A file was stored: an outage of the object store, if there was one, is over.
    fn store_took_a_file(&self) {
        if self.store_down.swap(false, Ordering::Relaxed) {
            self.metrics.storage_up(true);
            tracing::info!(
                "{} takes files again; uploads resumed",
                self.files.describe()
            );
        }
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
            Err(e) if let Some(why) = e.pause() => {
                // Not the file's fault: nothing recorded, no attempt used; every download
                // waits a while (one log line per pause).
                self.pause(why, task_id, index, &e);
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
        // A crash between store and record leaves a complete file: adopt it, don't refetch.
        if let Some((place, _, back)) = adopt_existing(self.files.as_ref(), &slot).await {
            let index = image.index;
            tracing::info!(
                task_id,
                index,
                "task {task_id} image {index}: adopting the file stored before a restart"
            );
            return Ok(Event::ImageStored {
                index,
                path: place,
                bytes: back.bytes,
                sha256: back.sha256,
            });
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
        let uploaded = std::time::Instant::now();
        let place = self
            .files
            .put(
                &fetched.temp_path,
                &slot,
                fetched.ext,
                fetched.bytes,
                &fetched.sha256,
            )
            .await
            .inspect_err(|_| self.metrics.file_store_failed(kind))?;
        self.metrics.file_stored(kind, uploaded.elapsed());
        self.store_took_a_file();
        Ok(Event::ImageStored {
            index: image.index,
            path: place,
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
        self.pause_state().map(|(until, _)| until)
    }

    fn end_pause(&self) {
        if let Some((_, why)) = self.pause_state().take()
            && why == Pause::DiskFull
        {
            tracing::info!("downloads resumed after the disk was full");
        }
    }

    async fn work(self: Arc<Self>, task_id: String, shutdown: CancellationToken) -> Finished {
        self.process(&task_id, &shutdown).await;
        Finished::Done
    }
}

pub use crate::storage::local::{discard, hash_file};
pub use crate::storage::slot::{Slot, file_path, task_dir};
