//! The task state machine, in one place: a pure function of (task, event) → (changed task,
//! history notes). The `match` of [`apply`] over (state, event) is the transition table of
//! SPEC's "Task states": every pair is decided there, and the longer rules are named
//! functions below it (`receive`, `fail`, `settle`, `confirm`, `refuse_callback`,
//! `store_image`, `fail_image`, `refresh_url`, `retry_images`).
//! Must not do I/O, read clocks or draw random numbers: time and backoff arrive in the event
//! and the [`Ctx`], so every transition is unit-testable.

pub use crate::kind::read::Found;
use crate::model::{
    EventKind, Failure, Image, ImageState, Kind, Millis, Notification, NotifyState, NotifyType,
    Source, State, Task,
};
use crate::retry;

/// Facts the machine needs besides the task and the event.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub now: Millis,
    /// `download.max_attempts`: transient failures per image before it fails for good.
    pub max_attempts: u32,
    /// `poll.after` in milliseconds: how long a submitted task waits before its first poll.
    pub poll_after_ms: Millis,
    /// `notify.url` is set: a settle enqueues an outbound notification.
    pub notify: bool,
}

impl Ctx {
    pub fn from_config(config: &crate::config::Config, now: Millis) -> Ctx {
        Ctx {
            now,
            max_attempts: config.download.max_attempts,
            poll_after_ms: crate::model::millis(config.poll.after),
            notify: config.notify.url.is_some(),
        }
    }
}

/// What KIE told us about a task, by callback or by polling its details (record-info).
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Generation finished; these are the files (never empty).
    Success { files: Vec<Found> },
    /// Generation failed; `reason` is KIE's code and message.
    Failure { reason: String },
    /// A staged callback before the result (music's `text` and `first`): recorded, changes
    /// no state.
    Stage { stage: String },
}

impl Report {
    /// A cover's success: its image URLs, in KIE's order.
    pub fn images(urls: Vec<String>) -> Report {
        Report::Success {
            files: urls
                .into_iter()
                .zip(0u32..)
                .map(|(u, i)| Found::image(i, u))
                .collect(),
        }
    }

    /// Classifies a callback body's code, message and images. A "success" without images is
    /// a failure: there is nothing to download.
    pub fn from_callback(code: i64, msg: &str, images: Vec<String>) -> Report {
        if code == 200 && !images.is_empty() {
            Report::images(images)
        } else if code == 200 {
            Report::Failure {
                reason: "KIE reported success but sent no image URLs".into(),
            }
        } else {
            Report::Failure {
                reason: format!("KIE code {code}: {msg}"),
            }
        }
    }
}

/// Where a task comes from, as `submit` and `admin track` know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub kind: Kind,
    pub music_task_id: Option<String>,
    /// The track a `wav`, `video` or `stems` task is made from.
    pub audio_id: Option<String>,
}

impl Origin {
    /// A cover of the song `music_task_id`.
    pub fn cover(music_task_id: Option<String>) -> Origin {
        Origin {
            kind: Kind::Cover,
            music_task_id,
            audio_id: None,
        }
    }
}

/// Everything that can happen to a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `coverd submit` recorded its intent to ask KIE for this task.
    Submit(Origin),
    /// `admin track` adopted a task submitted elsewhere.
    Track(Origin),
    /// A callback delivery arrived on the route of its kind (duplicates included).
    Callback(Kind, Report),
    /// A record-info poll answered with a final result.
    Polled(Report),
    /// A record-info poll found the task still pending; look again at `next_poll_at`.
    PollPending {
        detail: String,
        next_poll_at: Millis,
    },
    /// No poll is possible (no API key): just wait for a callback until `until`.
    Wait { until: Millis },
    /// Nothing arrived by `poll.give_up_after`.
    GiveUp,
    /// record-info confirmed a success callback (`kie.confirm_callbacks`): these are the
    /// files it lists (never empty). They are the ones fetched.
    Confirm { files: Vec<Found>, detail: String },
    /// record-info, asked to confirm a success callback, says the task failed: the task
    /// fails with KIE's `reason` and the callback's URLs are dropped unfetched.
    ConfirmFailed { reason: String },
    /// record-info could not confirm a callback's URLs yet (pending, generating, an error);
    /// look again at `until` before fetching anything.
    ConfirmLater { until: Millis, detail: String },
    /// record-info still had no result for a callback's task at `poll.give_up_after`: the
    /// task fails with "no result from KIE" and nothing is fetched.
    ConfirmGiveUp { detail: String },
    /// Image `index` is complete at its final path.
    ImageStored {
        index: u32,
        path: String,
        bytes: u64,
        sha256: String,
    },
    /// A fetch of image `index` failed. `retry_at` is `None` for permanent failures.
    ImageFailed {
        index: u32,
        reason: String,
        retry_at: Option<Millis>,
    },
    /// KIE's download-url gave a fresh link for image `index`.
    UrlRefreshed { index: u32, url: String },
    /// `admin retry`. `damaged` lists stored images whose files are missing or corrupt.
    Retry { damaged: Vec<u32> },
    /// `admin migrate-files`: stored file `index`, whose sha256 is `sha256`, is now (also)
    /// at `path` (an object's location), copied there and verified.
    FileMoved {
        index: u32,
        path: String,
        sha256: String,
    },
}

impl Event {
    /// The kind of task this event is for, when it says: a task of another kind refuses it
    /// (`store::apply`), a task it creates has it.
    pub fn kind(&self) -> Option<Kind> {
        match self {
            Event::Submit(o) | Event::Track(o) => Some(o.kind),
            Event::Callback(kind, _) => Some(*kind),
            _ => None,
        }
    }
}

/// What `apply` did, for the history and for whoever must act next.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// History entries to append, in order.
    pub notes: Vec<(EventKind, String)>,
}

impl Outcome {
    fn note(&mut self, kind: EventKind, detail: impl Into<String>) {
        self.notes.push((kind, detail.into()));
    }
}

/// Applies `event` to `task`. Never fails: an event that does not fit the state is recorded
/// as ignored (or as a counted duplicate) and changes nothing else.
pub fn apply(task: &mut Task, event: Event, ctx: &Ctx) -> Outcome {
    let mut out = Outcome::default();
    let revivable = matches!(task.failure, Some(Failure::Generation | Failure::NoResult));
    match (task.state, event) {
        // ---- intake of a task id ----
        (State::Submitted, Event::Submit(origin) | Event::Track(origin))
            if task.event_count == 0 =>
        {
            task.kind = origin.kind;
            task.music_task_id = origin.music_task_id;
            task.audio_id = origin.audio_id;
            task.submitted_at = ctx.now;
            task.next_poll_at = ctx.now.saturating_add(ctx.poll_after_ms);
            out.note(EventKind::Submitted, "task recorded");
        }
        (_, Event::Submit(origin) | Event::Track(origin)) => {
            if task.music_task_id.is_none() {
                task.music_task_id = origin.music_task_id;
            }
            if task.audio_id.is_none() {
                task.audio_id = origin.audio_id;
            }
            out.note(EventKind::Tracked, "task already known; nothing changed");
        }

        // ---- KIE's result: callback or poll ----
        (_, Event::Callback(_, Report::Stage { stage })) => {
            task.callbacks += 1;
            out.note(
                EventKind::Callback,
                format!("`{stage}` stage callback: not the result yet; nothing changes"),
            );
        }
        (State::Submitted, Event::Callback(_, Report::Success { files })) => {
            task.callbacks += 1;
            out.note(EventKind::Callback, "success callback");
            receive(task, files, Source::Callback, ctx, &mut out);
        }
        (State::Failed, Event::Callback(_, Report::Success { files })) if revivable => {
            task.callbacks += 1;
            out.note(EventKind::Callback, "success callback after failure");
            receive(task, files, Source::Callback, ctx, &mut out);
        }
        (State::Submitted, Event::Callback(_, Report::Failure { reason })) => {
            task.callbacks += 1;
            out.note(EventKind::Callback, reason.clone());
            fail(task, Failure::Generation, reason, &mut out);
        }
        (State::Failed, Event::Callback(_, Report::Failure { reason }))
            if task.failure == Some(Failure::NoResult) =>
        {
            task.callbacks += 1;
            out.note(EventKind::Callback, reason.clone());
            fail(task, Failure::Generation, reason, &mut out);
        }
        (State::Received | State::Downloaded | State::Failed, Event::Callback(_, report)) => {
            task.callbacks += 1;
            let what = match report {
                Report::Success { .. } => "success",
                Report::Failure { .. } => "failure",
                Report::Stage { .. } => "stage",
            };
            out.note(
                EventKind::DuplicateCallback,
                format!(
                    "{what} callback #{} while {}; not processed again",
                    task.callbacks,
                    task.state.as_str()
                ),
            );
        }
        (State::Submitted, Event::Polled(Report::Success { files })) => {
            task.polls += 1;
            out.note(EventKind::Polled, "record-info reports success");
            receive(task, files, Source::Poll, ctx, &mut out);
        }
        (State::Submitted, Event::Polled(Report::Stage { stage })) => {
            task.polls += 1;
            out.note(EventKind::Polled, format!("record-info: {stage}"));
        }
        (State::Submitted, Event::Polled(Report::Failure { reason })) => {
            task.polls += 1;
            out.note(EventKind::Polled, reason.clone());
            fail(task, Failure::Generation, reason, &mut out);
        }
        (
            State::Submitted,
            Event::PollPending {
                detail,
                next_poll_at,
            },
        ) => {
            task.polls += 1;
            task.next_poll_at = next_poll_at;
            out.note(EventKind::Polled, detail);
        }
        (
            State::Received | State::Downloaded | State::Failed,
            Event::Polled(_) | Event::PollPending { .. },
        ) => {
            task.polls += 1;
            out.note(
                EventKind::Ignored,
                format!("poll answer arrived while {}; ignored", task.state.as_str()),
            );
        }
        (State::Submitted, Event::Wait { until }) => {
            task.next_poll_at = until;
            out.note(
                EventKind::Ignored,
                "no KIE API key: waiting for a callback only",
            );
        }
        (State::Received | State::Downloaded | State::Failed, Event::Wait { .. }) => {
            out.note(
                EventKind::Ignored,
                "wait ignored: task already has a result",
            );
        }
        (State::Received, Event::ConfirmLater { until, detail }) if !task.confirmed => {
            task.polls += 1;
            task.confirm_attempts += 1;
            for img in task
                .images
                .iter_mut()
                .filter(|i| i.state == ImageState::Pending)
            {
                img.next_attempt_at = img.next_attempt_at.max(until);
            }
            out.note(EventKind::Polled, detail);
        }
        (
            State::Submitted | State::Received | State::Downloaded | State::Failed,
            Event::ConfirmLater { .. },
        ) => {
            out.note(
                EventKind::Ignored,
                "confirmation retry ignored: task not awaiting one",
            );
        }
        (State::Received, Event::Confirm { files, detail }) if !task.confirmed => {
            confirm(task, files, detail, ctx, &mut out);
        }
        (State::Received, Event::ConfirmFailed { reason }) if !task.confirmed => {
            let note = format!(
                "record-info says the task failed; the callback's {} image URL(s) are not fetched",
                task.images.len()
            );
            refuse_callback(task, note, Failure::Generation, reason, &mut out);
        }
        (State::Received, Event::ConfirmGiveUp { detail }) if !task.confirmed => {
            let note = format!(
                "{detail}; the callback's {} image URL(s) are not fetched",
                task.images.len()
            );
            let reason = "no result from KIE".to_string();
            refuse_callback(task, note, Failure::NoResult, reason, &mut out);
        }
        (
            State::Submitted | State::Received | State::Downloaded | State::Failed,
            Event::Confirm { .. } | Event::ConfirmFailed { .. } | Event::ConfirmGiveUp { .. },
        ) => {
            out.note(
                EventKind::Ignored,
                "confirmation ignored: task not awaiting one",
            );
        }
        (State::Submitted, Event::GiveUp) => {
            fail(
                task,
                Failure::NoResult,
                "no result from KIE".into(),
                &mut out,
            );
        }
        (State::Received | State::Downloaded | State::Failed, Event::GiveUp) => {
            out.note(
                EventKind::Ignored,
                "give-up ignored: task already has a result",
            );
        }

        // ---- downloads ----
        (
            State::Received,
            Event::ImageStored {
                index,
                path,
                bytes,
                sha256,
            },
        ) => store_image(task, index, path, bytes, sha256, &mut out),
        (
            State::Received,
            Event::ImageFailed {
                index,
                reason,
                retry_at,
            },
        ) => fail_image(task, index, reason, retry_at, ctx, &mut out),
        (State::Received, Event::UrlRefreshed { index, url }) => {
            refresh_url(task, index, url, &mut out);
        }
        (
            State::Submitted | State::Downloaded | State::Failed,
            Event::ImageStored { index, .. }
            | Event::ImageFailed { index, .. }
            | Event::UrlRefreshed { index, .. },
        ) => ignore_download_result(task, index, &mut out),

        // ---- admin retry ----
        (State::Failed, Event::Retry { .. }) if revivable => {
            task.state = State::Submitted;
            task.failure = None;
            task.error = None;
            task.submitted_at = ctx.now;
            task.next_poll_at = ctx.now;
            out.note(
                EventKind::Retried,
                "generation failure retried: polling KIE again",
            );
        }
        (State::Failed | State::Downloaded, Event::Retry { damaged }) => {
            retry_images(task, &damaged, ctx, &mut out);
        }
        // ---- admin migrate-files: a stored file's place, in any state ----
        (
            _,
            Event::FileMoved {
                index,
                path,
                sha256,
            },
        ) => move_file(task, index, path, &sha256, &mut out),

        (State::Submitted | State::Received, Event::Retry { .. }) => {
            out.note(
                EventKind::Ignored,
                format!(
                    "retry ignored: task is {} and still in progress",
                    task.state.as_str()
                ),
            );
        }
    }
    task.updated_at = ctx.now;
    out
}

// ---- outbound notifications ----

/// Whether a change of `before` into `after` settles the task, and as what: entering
/// `downloaded` or `failed` from any other state (or as a new task) does; staying there
/// (a duplicate, a failure reason replaced) does not.
pub fn settle_notice(before: Option<State>, after: &Task) -> Option<NotifyType> {
    if before == Some(after.state) {
        return None;
    }
    match after.state {
        State::Downloaded => Some(NotifyType::Downloaded),
        State::Failed => Some(NotifyType::Failed),
        State::Submitted | State::Received => None,
    }
}

/// What one delivery attempt of a notification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The receiver answered 2xx.
    Delivered { detail: String },
    /// The receiver answered 410 Gone: it wants no more.
    Gone,
    /// Anything else, or no answer; the next attempt may be at `retry_at`.
    Failed { reason: String, retry_at: Millis },
}

/// Records one attempt's result on a notification. A pending notification becomes
/// `delivered`, `undeliverable` (410, or `max_attempts` used since creation or the last
/// redeliver), or stays pending until `retry_at`. A result for a notification that is no
/// longer pending (a redeliver raced it) still counts the attempt and a success.
pub fn notify_attempted(n: &mut Notification, result: Delivery, max_attempts: u32, now: Millis) {
    n.attempts += 1;
    n.updated_at = now;
    match result {
        Delivery::Delivered { .. } => {
            n.state = NotifyState::Delivered;
            n.error = None;
        }
        Delivery::Gone => {
            n.state = NotifyState::Undeliverable;
            n.error = Some("410 Gone".into());
        }
        Delivery::Failed { reason, retry_at } => {
            if n.state != NotifyState::Pending {
                return;
            }
            if !retry::within_budget(n.budget_used(), max_attempts) {
                n.state = NotifyState::Undeliverable;
                n.error = Some(format!(
                    "{reason} (gave up after {} attempts)",
                    n.budget_used()
                ));
            } else {
                n.next_attempt_at = retry_at;
                n.error = Some(reason);
            }
        }
    }
}

/// `admin redeliver`: the same message (same webhook-id and body) is due again at once, with
/// a fresh budget of attempts.
pub fn notify_redeliver(n: &mut Notification, now: Millis) {
    n.state = NotifyState::Pending;
    n.attempts_budget_start = n.attempts;
    n.next_attempt_at = now;
    n.updated_at = now;
    n.error = None;
}

/// How notes name file `index` of `task`: `image N` for a cover (as before kinds), else
/// `file N (name)`.
fn file_label(task: &Task, index: u32) -> String {
    match (task.kind, task.images.get(index as usize)) {
        (Kind::Cover, _) | (_, None) => format!("image {index}"),
        (_, Some(f)) => format!("file {index} ({})", f.name),
    }
}

/// The image `index` while a download result for it is still awaited.
fn pending_image(task: &mut Task, index: u32) -> Option<&mut Image> {
    task.images
        .get_mut(index as usize)
        .filter(|i| i.state == ImageState::Pending)
}

/// A download result for an image that is not pending (or a task not downloading) changes
/// nothing: a late or duplicate worker report.
/// A stored file moved to `path`: recorded only while the file is stored with the same
/// sha256 (a retry or prune in between changed it: the move is dropped, its copy left to be
/// overwritten by the next move or removed with the task).
fn move_file(task: &mut Task, index: u32, path: String, sha256: &str, out: &mut Outcome) {
    let label = file_label(task, index);
    match task.images.iter_mut().find(|i| i.index == index) {
        Some(img)
            if img.state == ImageState::Downloaded && img.sha256.as_deref() == Some(sha256) =>
        {
            let from = img.path.replace(path.clone()).unwrap_or_default();
            out.note(
                EventKind::ImageStored,
                format!("{label} moved from {from} to {path} (migrate-files, verified)"),
            );
        }
        _ => out.note(
            EventKind::Ignored,
            format!("move of {label} to {path} ignored: it is no longer stored as copied"),
        ),
    }
}

fn ignore_download_result(task: &Task, index: u32, out: &mut Outcome) {
    out.note(
        EventKind::Ignored,
        format!(
            "download result for {} ignored: task is {} and it is not pending",
            file_label(task, index),
            task.state.as_str()
        ),
    );
}

/// record-info confirmed a success callback. Its URLs replace the callback's when they
/// differ and nothing was fetched yet.
fn confirm(task: &mut Task, files: Vec<Found>, detail: String, ctx: &Ctx, out: &mut Outcome) {
    task.polls += 1;
    task.confirmed = true;
    let current: Vec<&str> = task.images.iter().map(|i| i.url.as_str()).collect();
    let untouched = task
        .images
        .iter()
        .all(|i| i.state == ImageState::Pending && i.attempts == 0);
    let urls: Vec<String> = files.iter().map(|f| f.url.clone()).collect();
    let current: Vec<String> = current.into_iter().map(str::to_string).collect();
    match files {
        files if !files.is_empty() && urls != current && untouched => {
            out.note(
                EventKind::Mismatch,
                format!(
                    "callback URLs [{}] differ from record-info; using record-info's [{}]",
                    current.join(", "),
                    urls.join(", ")
                ),
            );
            task.images = files
                .into_iter()
                .zip(0u32..)
                .map(|(file, index)| Image::found(index, file, ctx.now))
                .collect();
        }
        _ => out.note(EventKind::Received, detail),
    }
}

/// record-info did not confirm a callback (it says the task failed, or gave no result in
/// time): the callback's URLs are dropped unfetched and the task fails.
fn refuse_callback(
    task: &mut Task,
    note: String,
    failure: Failure,
    reason: String,
    out: &mut Outcome,
) {
    task.polls += 1;
    out.note(EventKind::Polled, note);
    drop_unconfirmed(task);
    fail(task, failure, reason, out);
}

/// Image `index` is complete at its final path; the task settles when none is pending.
fn store_image(
    task: &mut Task,
    index: u32,
    path: String,
    bytes: u64,
    sha256: String,
    out: &mut Outcome,
) {
    let what = file_label(task, index);
    let Some(img) = pending_image(task, index) else {
        return ignore_download_result(task, index, out);
    };
    img.attempts += 1;
    img.state = ImageState::Downloaded;
    img.error = None;
    out.note(
        EventKind::ImageStored,
        format!("{what}: {bytes} bytes at {path}, sha256 {sha256}"),
    );
    img.path = Some(path);
    img.bytes = Some(bytes);
    img.sha256 = Some(sha256);
    settle(task, out);
}

/// A fetch of image `index` failed: retried at `retry_at` while its budget lasts, else the
/// image fails for good (at once when `retry_at` is `None`); the task settles when none is
/// pending.
fn fail_image(
    task: &mut Task,
    index: u32,
    reason: String,
    retry_at: Option<Millis>,
    ctx: &Ctx,
    out: &mut Outcome,
) {
    let what = file_label(task, index);
    let Some(img) = pending_image(task, index) else {
        return ignore_download_result(task, index, out);
    };
    img.attempts += 1;
    match retry_at {
        Some(at) if retry::within_budget(img.budget_used(), ctx.max_attempts) => {
            img.next_attempt_at = at;
            out.note(
                EventKind::ImageRetry,
                format!(
                    "{what}: attempt {} failed: {reason}; retrying",
                    img.budget_used()
                ),
            );
            img.error = Some(reason);
        }
        Some(_) => {
            let reason = format!("{reason} (gave up after {} attempts)", img.budget_used());
            out.note(EventKind::ImageFailed, format!("{what}: {reason}"));
            img.state = ImageState::Failed;
            img.error = Some(reason);
        }
        None => {
            out.note(EventKind::ImageFailed, format!("{what}: {reason}"));
            img.state = ImageState::Failed;
            img.error = Some(reason);
        }
    }
    settle(task, out);
}

/// KIE's download-url gave a fresh link for pending image `index`.
fn refresh_url(task: &mut Task, index: u32, url: String, out: &mut Outcome) {
    let what = file_label(task, index);
    let Some(img) = pending_image(task, index) else {
        return ignore_download_result(task, index, out);
    };
    out.note(
        EventKind::UrlRefreshed,
        format!("{what}: KIE's download-url gave {url} for {}", img.url),
    );
    img.refreshed_url = Some(url);
}

/// `admin retry` of a downloaded or download-failed task: failed and `damaged` images are
/// fetched again with a fresh budget; with none, nothing changes.
fn retry_images(task: &mut Task, damaged: &[u32], ctx: &Ctx, out: &mut Outcome) {
    let mut revived = Vec::new();
    for img in &mut task.images {
        if img.state == ImageState::Failed || damaged.contains(&img.index) {
            img.state = ImageState::Pending;
            img.attempts_budget_start = img.attempts;
            img.next_attempt_at = ctx.now;
            // A refreshed link lives 20 minutes; start again from KIE's URL.
            img.refreshed_url = None;
            img.path = None;
            img.bytes = None;
            img.sha256 = None;
            img.error = None;
            revived.push(img.index.to_string());
        }
    }
    if revived.is_empty() {
        out.note(EventKind::Ignored, "retry: nothing to repair");
    } else {
        task.state = State::Received;
        task.failure = None;
        task.error = None;
        out.note(
            EventKind::Retried,
            format!("fetching image(s) {} again", revived.join(", ")),
        );
    }
}

fn receive(task: &mut Task, files: Vec<Found>, source: Source, ctx: &Ctx, out: &mut Outcome) {
    task.state = State::Received;
    task.source = Some(source);
    // record-info's URLs need no confirmation; a callback's may (kie.confirm_callbacks),
    // also when it revives a failed task: record-info is asked again from scratch, and
    // the give-up clock of that confirmation starts now.
    task.confirmed = source == Source::Poll;
    if source == Source::Callback {
        task.confirm_attempts = 0;
        task.submitted_at = ctx.now;
    }
    task.failure = None;
    task.error = None;
    let n = files.len();
    task.images = files
        .into_iter()
        .zip(0u32..)
        .map(|(file, index)| Image::found(index, file, ctx.now))
        .collect();
    let what = match task.kind {
        Kind::Cover => "image",
        _ => "file",
    };
    out.note(
        EventKind::Received,
        format!("{n} {what} URL(s) from {}", source.as_str()),
    );
}

/// Drops the image URLs of a callback that record-info did not confirm. They were never the
/// task's images: removed when untouched (the normal case: nothing is fetched before
/// confirmation); otherwise (fetched before an API key was configured) the stored ones stay
/// and the pending ones fail.
fn drop_unconfirmed(task: &mut Task) {
    if task
        .images
        .iter()
        .all(|i| i.state == ImageState::Pending && i.attempts == 0)
    {
        task.images.clear();
        return;
    }
    for img in task
        .images
        .iter_mut()
        .filter(|i| i.state == ImageState::Pending)
    {
        img.state = ImageState::Failed;
        img.error = Some("not fetched: record-info did not confirm the callback's URLs".into());
    }
}

fn fail(task: &mut Task, failure: Failure, reason: String, out: &mut Outcome) {
    task.state = State::Failed;
    task.failure = Some(failure);
    out.note(EventKind::Failed, reason.clone());
    task.error = Some(reason);
}

/// Once no image is pending the task ends: downloaded when all are stored, else failed.
fn settle(task: &mut Task, out: &mut Outcome) {
    if task.images.iter().any(|i| i.state == ImageState::Pending) {
        return;
    }
    let failed: Vec<String> = task
        .images
        .iter()
        .filter(|i| i.state == ImageState::Failed)
        .map(|i| {
            format!(
                "{}: {}",
                file_label(task, i.index),
                i.error.as_deref().unwrap_or("failed")
            )
        })
        .collect();
    if failed.is_empty() {
        task.state = State::Downloaded;
        let what = match task.kind {
            Kind::Cover => "image",
            _ => "file",
        };
        out.note(
            EventKind::Downloaded,
            format!("all {} {what}(s) stored", task.images.len()),
        );
    } else {
        fail(task, Failure::Download, failed.join("; "), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_000_000;

    fn ctx() -> Ctx {
        Ctx {
            now: NOW,
            max_attempts: 3,
            poll_after_ms: 120_000,
            notify: true,
        }
    }

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("https://h/{i}.png")).collect()
    }

    fn cover_files(urls: Vec<String>) -> Vec<Found> {
        match Report::images(urls) {
            Report::Success { files } => files,
            _ => Vec::new(),
        }
    }

    fn success(n: usize) -> Report {
        Report::images(urls(n))
    }

    fn failure() -> Report {
        Report::from_callback(501, "Cover generation failed", vec![])
    }

    fn stored(index: u32) -> Event {
        Event::ImageStored {
            index,
            path: format!("images/t/{index}.png"),
            bytes: 10,
            sha256: "ab".repeat(32),
        }
    }

    fn transient(index: u32) -> Event {
        Event::ImageFailed {
            index,
            reason: "HTTP 500".into(),
            retry_at: Some(NOW + 5),
        }
    }

    fn permanent(index: u32) -> Event {
        Event::ImageFailed {
            index,
            reason: "HTTP 404".into(),
            retry_at: None,
        }
    }

    /// A task in the given state, reached through the machine itself.
    fn task_in(state: &str) -> Task {
        let mut t = Task::new("t".into(), None, NOW);
        apply(&mut t, Event::Track(Origin::cover(None)), &ctx());
        t.event_count = 1;
        let evs: Vec<Event> = match state {
            "submitted" => vec![],
            "received" => vec![Event::Callback(Kind::Cover, success(2))],
            "downloaded" => vec![
                Event::Callback(Kind::Cover, success(2)),
                stored(0),
                stored(1),
            ],
            "failed_generation" => vec![Event::Callback(Kind::Cover, failure())],
            "failed_noresult" => vec![Event::GiveUp],
            "failed_download" => vec![
                Event::Callback(Kind::Cover, success(2)),
                stored(0),
                permanent(1),
            ],
            other => panic!("no such fixture {other}"),
        };
        for e in evs {
            apply(&mut t, e, &ctx());
        }
        t
    }

    const FIXTURES: [&str; 6] = [
        "submitted",
        "received",
        "downloaded",
        "failed_generation",
        "failed_noresult",
        "failed_download",
    ];

    fn all_events() -> Vec<Event> {
        vec![
            Event::Submit(Origin::cover(Some("m".into()))),
            Event::Track(Origin::cover(Some("m".into()))),
            Event::Callback(Kind::Cover, success(2)),
            Event::Callback(Kind::Cover, failure()),
            Event::Polled(success(1)),
            Event::Polled(Report::Failure {
                reason: "KIE: failed".into(),
            }),
            Event::PollPending {
                detail: "pending".into(),
                next_poll_at: NOW + 30_000,
            },
            Event::GiveUp,
            Event::Wait { until: NOW + 5 },
            Event::Confirm {
                files: cover_files(urls(3)),
                detail: "confirmed".into(),
            },
            Event::ConfirmFailed {
                reason: "KIE code 501: Cover generation failed".into(),
            },
            Event::ConfirmGiveUp {
                detail: "record-info: generating".into(),
            },
            Event::ConfirmLater {
                until: NOW + 9,
                detail: "later".into(),
            },
            stored(0),
            stored(1),
            transient(0),
            permanent(1),
            Event::UrlRefreshed {
                index: 0,
                url: "https://h/fresh.png".into(),
            },
            Event::Retry { damaged: vec![] },
            Event::Retry { damaged: vec![0] },
            Event::FileMoved {
                index: 0,
                path: "s3://b/t/0.png".into(),
                sha256: "00".repeat(32),
            },
        ]
    }

    /// Expected state after (fixture, event), for every pair: the whole table in one place.
    fn expected(fixture: &str, event: &Event) -> &'static str {
        use Event as E;
        match (fixture, event) {
            (_, E::Submit { .. } | E::Track { .. }) => same(fixture),
            (
                "submitted",
                E::Callback(_, Report::Success { .. }) | E::Polled(Report::Success { .. }),
            ) => "received",
            (
                "submitted",
                E::Callback(_, Report::Failure { .. }) | E::Polled(Report::Failure { .. }),
            ) => "failed",
            ("submitted", E::GiveUp) => "failed",
            ("failed_generation" | "failed_noresult", E::Callback(_, Report::Success { .. })) => {
                "received"
            }
            ("failed_noresult", E::Callback(_, Report::Failure { .. })) => "failed",
            ("received", E::ConfirmFailed { .. } | E::ConfirmGiveUp { .. }) => "failed",
            ("received", E::ImageStored { .. }) => "received",
            ("received", E::ImageFailed { .. }) => "received",
            ("failed_generation" | "failed_noresult", E::Retry { .. }) => "submitted",
            ("failed_download", E::Retry { .. }) => "received",
            ("downloaded", E::Retry { damaged }) if !damaged.is_empty() => "received",
            _ => same(fixture),
        }
    }

    fn same(fixture: &str) -> &'static str {
        match fixture {
            "submitted" => "submitted",
            "received" => "received",
            "downloaded" => "downloaded",
            _ => "failed",
        }
    }

    #[test]
    fn every_state_event_pair() {
        for fixture in FIXTURES {
            for event in all_events() {
                let mut t = task_in(fixture);
                let before = t.clone();
                let out = apply(&mut t, event.clone(), &ctx());
                assert_eq!(
                    t.state.as_str(),
                    expected(fixture, &event),
                    "{fixture} + {event:?}"
                );
                assert!(
                    !out.notes.is_empty(),
                    "{fixture} + {event:?} left no history"
                );
                // Invariants that hold after every transition.
                if t.state == State::Failed {
                    assert!(
                        t.error.is_some() && t.failure.is_some(),
                        "{fixture} + {event:?}"
                    );
                    assert!(t.images.iter().all(|i| i.state != ImageState::Pending));
                }
                if t.state == State::Downloaded {
                    assert!(t.images.iter().all(|i| i.state == ImageState::Downloaded));
                }
                if before.state == State::Downloaded && !matches!(event, Event::Retry { .. }) {
                    assert_eq!(t.images, before.images, "downloaded regressed: {event:?}");
                }
            }
        }
    }

    #[test]
    fn duplicates_are_counted_not_processed() {
        for fixture in ["received", "downloaded", "failed_download"] {
            let mut t = task_in(fixture);
            let before = t.clone();
            let out = apply(&mut t, Event::Callback(Kind::Cover, success(3)), &ctx());
            assert_eq!(t.callbacks, before.callbacks + 1);
            assert_eq!(t.images, before.images, "{fixture}: images replaced");
            assert_eq!(out.notes[0].0, EventKind::DuplicateCallback);
        }
    }

    #[test]
    fn images_settle_into_downloaded() {
        let mut t = task_in("received");
        assert_eq!(t.download_due(), Some(NOW));
        apply(&mut t, stored(1), &ctx());
        assert_eq!(t.state, State::Received);
        apply(&mut t, stored(0), &ctx());
        assert_eq!(t.state, State::Downloaded);
        assert_eq!(t.download_due(), None);
        assert_eq!(t.images[0].attempts, 1);
        assert_eq!(t.images[0].path.as_deref(), Some("images/t/0.png"));
    }

    #[test]
    fn transient_failures_retry_until_the_budget_is_spent() {
        let mut t = task_in("received");
        apply(&mut t, stored(1), &ctx());
        for attempt in 1..3 {
            apply(&mut t, transient(0), &ctx());
            assert_eq!(t.images[0].state, ImageState::Pending, "attempt {attempt}");
            assert_eq!(t.download_due(), Some(NOW + 5));
        }
        apply(&mut t, transient(0), &ctx());
        assert_eq!(t.images[0].attempts, 3);
        assert_eq!(t.state, State::Failed);
        assert_eq!(t.failure, Some(Failure::Download));
        assert!(
            t.error
                .as_deref()
                .unwrap()
                .contains("gave up after 3 attempts")
        );
        // The stored image stays.
        assert_eq!(t.images[1].state, ImageState::Downloaded);
    }

    #[test]
    fn retry_gives_a_fresh_budget_and_keeps_counting_attempts() {
        let mut t = task_in("failed_download");
        apply(&mut t, Event::Retry { damaged: vec![] }, &ctx());
        assert_eq!(t.state, State::Received);
        assert_eq!(t.images[1].state, ImageState::Pending);
        assert_eq!(t.images[1].attempts, 1);
        assert_eq!(t.images[1].budget_used(), 0);
        assert_eq!(
            t.images[0].state,
            ImageState::Downloaded,
            "stored image untouched"
        );
        apply(&mut t, stored(1), &ctx());
        assert_eq!(t.state, State::Downloaded);
        assert_eq!(t.images[1].attempts, 2);
    }

    #[test]
    fn submitted_schedules_first_poll_after_wait() {
        let t = task_in("submitted");
        assert_eq!(t.poll_due(), Some(NOW + 120_000));
        assert_eq!(t.download_due(), None);
        let mut t2 = t.clone();
        apply(
            &mut t2,
            Event::PollPending {
                detail: "generating".into(),
                next_poll_at: NOW + 1,
            },
            &ctx(),
        );
        assert_eq!((t2.poll_due(), t2.polls), (Some(NOW + 1), 1));
    }

    /// record-info is the truth for a callback's URLs: a failure there fails the task and
    /// drops the URLs; a replayed success revives it only to be confirmed again.
    #[test]
    fn confirmation_failure_drops_the_callbacks_urls_and_a_revival_is_confirmed_again() {
        let mut t = task_in("received");
        assert!(!t.confirmed);
        apply(
            &mut t,
            Event::ConfirmLater {
                until: NOW + 30_000,
                detail: "record-info: generating".into(),
            },
            &ctx(),
        );
        assert_eq!(
            (t.state, t.download_due()),
            (State::Received, Some(NOW + 30_000))
        );
        apply(
            &mut t,
            Event::ConfirmFailed {
                reason: "KIE code 501: Cover generation failed".into(),
            },
            &ctx(),
        );
        assert_eq!(t.state, State::Failed);
        assert_eq!(t.failure, Some(Failure::Generation));
        assert_eq!(
            t.error.as_deref(),
            Some("KIE code 501: Cover generation failed")
        );
        assert!(t.images.is_empty(), "the callback's URLs are dropped");
        assert_eq!((t.download_due(), t.polls), (None, 2));

        // A replayed success callback revives it (SPEC), unconfirmed: nothing is due for
        // download before record-info has been asked again.
        let later = Ctx {
            now: NOW + 60_000,
            ..ctx()
        };
        apply(&mut t, Event::Callback(Kind::Cover, success(2)), &later);
        assert_eq!(t.state, State::Received);
        assert!(!t.confirmed);
        assert_eq!((t.confirm_attempts, t.submitted_at), (0, NOW + 60_000));
        apply(
            &mut t,
            Event::ConfirmGiveUp {
                detail: "record-info: generating".into(),
            },
            &later,
        );
        assert_eq!(t.state, State::Failed);
        assert_eq!(t.failure, Some(Failure::NoResult));
        assert_eq!(t.error.as_deref(), Some("no result from KIE"));
        assert!(t.images.is_empty());

        // Confirmed URLs replace the callback's; later confirmation events are ignored.
        let mut t = task_in("received");
        let kie = vec!["https://h/kie.png".to_string()];
        apply(
            &mut t,
            Event::Confirm {
                files: cover_files(kie.clone()),
                detail: "confirmed".into(),
            },
            &ctx(),
        );
        assert!(t.confirmed);
        assert_eq!(t.images.len(), 1);
        assert_eq!(t.images[0].url, kie[0]);
        let before = t.clone();
        let out = apply(
            &mut t,
            Event::ConfirmFailed {
                reason: "late".into(),
            },
            &ctx(),
        );
        assert_eq!(t.state, State::Received);
        assert_eq!(t.images, before.images);
        assert_eq!(out.notes[0].0, EventKind::Ignored);
    }

    #[test]
    fn failure_reasons_keep_kies_code_and_message() {
        for (code, msg) in [
            (400, "bad"),
            (408, "timeout"),
            (500, "err"),
            (501, "failed"),
            (531, "refunded"),
        ] {
            let mut t = task_in("submitted");
            apply(
                &mut t,
                Event::Callback(Kind::Cover, Report::from_callback(code, msg, vec![])),
                &ctx(),
            );
            assert_eq!(t.state, State::Failed);
            assert_eq!(
                t.error.as_deref(),
                Some(format!("KIE code {code}: {msg}").as_str())
            );
        }
        assert!(matches!(
            Report::from_callback(200, "success", vec![]),
            Report::Failure { .. }
        ));
    }

    /// Long random walks through the machine keep every invariant (seeded, repeatable).
    #[test]
    fn random_event_sequences_keep_the_invariants() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0FFEE);
        let events = all_events();
        for walk in 0..500 {
            let mut t = task_in(FIXTURES[walk % FIXTURES.len()]);
            for _ in 0..40 {
                let e = events[rng.random_range(0..events.len())].clone();
                let is_retry = matches!(e, Event::Retry { .. });
                let before = t.clone();
                apply(&mut t, e.clone(), &ctx());
                if t.state == State::Failed {
                    assert!(t.error.is_some() && t.failure.is_some(), "{e:?}");
                    assert!(t.images.iter().all(|i| i.state != ImageState::Pending));
                }
                if t.state == State::Downloaded {
                    assert!(t.images.iter().all(|i| i.state == ImageState::Downloaded));
                }
                if before.state == State::Downloaded && !is_retry {
                    assert_eq!(t.state, State::Downloaded, "{e:?} left downloaded");
                    assert_eq!(t.images, before.images, "{e:?} changed stored images");
                }
                assert!(t.callbacks >= before.callbacks && t.polls >= before.polls);
                for img in &t.images {
                    assert_eq!(
                        img.state == ImageState::Downloaded,
                        img.path.is_some(),
                        "{img:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn settles_are_entering_downloaded_or_failed() {
        use State::*;
        let mut t = Task::new("t".into(), None, NOW);
        assert_eq!(settle_notice(None, &t), None);
        t.state = Received;
        assert_eq!(settle_notice(Some(Submitted), &t), None);
        t.state = Downloaded;
        assert_eq!(
            settle_notice(Some(Received), &t),
            Some(NotifyType::Downloaded)
        );
        assert_eq!(settle_notice(Some(Downloaded), &t), None);
        t.state = Failed;
        assert_eq!(settle_notice(Some(Submitted), &t), Some(NotifyType::Failed));
        assert_eq!(settle_notice(None, &t), Some(NotifyType::Failed));
        assert_eq!(settle_notice(Some(Failed), &t), None);
    }

    #[test]
    fn notification_attempts() {
        let t = Task::new("t".into(), None, NOW);
        let mut n = Notification::new(&t, 1, NotifyType::Failed, NOW);
        let fail = |at| Delivery::Failed {
            reason: "HTTP 500".into(),
            retry_at: at,
        };
        notify_attempted(&mut n, fail(NOW + 5), 2, NOW + 1);
        assert_eq!(
            (n.state, n.attempts, n.next_attempt_at),
            (NotifyState::Pending, 1, NOW + 5)
        );
        notify_attempted(&mut n, fail(NOW + 50), 2, NOW + 6);
        assert_eq!(n.state, NotifyState::Undeliverable);
        assert!(
            n.error
                .as_deref()
                .unwrap()
                .contains("gave up after 2 attempts")
        );
        // Redeliver: a fresh budget, same message.
        notify_redeliver(&mut n, NOW + 100);
        assert_eq!(
            (n.state, n.budget_used(), n.next_attempt_at),
            (NotifyState::Pending, 0, NOW + 100)
        );
        notify_attempted(&mut n, fail(NOW + 105), 2, NOW + 101);
        assert_eq!((n.state, n.attempts), (NotifyState::Pending, 3));
        notify_attempted(&mut n, Delivery::Gone, 2, NOW + 106);
        assert_eq!(
            (n.state, n.error.as_deref()),
            (NotifyState::Undeliverable, Some("410 Gone"))
        );
        notify_redeliver(&mut n, NOW + 200);
        notify_attempted(
            &mut n,
            Delivery::Delivered {
                detail: "HTTP 204".into(),
            },
            2,
            NOW + 201,
        );
        assert_eq!(
            (n.state, n.attempts, n.error),
            (NotifyState::Delivered, 5, None)
        );
        assert_eq!(n.webhook_id, format!("msg_t_1_{NOW}"));
    }
}
