//! The task record: what coverd knows about one cover task, its images and its history, and
//! how that prints as SPEC's JSON. Owns the data types only; must not touch sled, the network
//! or the filesystem (the state machine that changes these records lives in `machine`).
//!
//! These types are not the disk format: `store::codec` writes frozen record types of its own
//! and converts to and from these field by field, so a field or variant added here does not
//! compile until the codec has a new version for it (see `store::codec`). They derive
//! `Serialize` only in unit tests, for the codec's proof that its frozen types write the
//! bytes these types wrote before they were frozen.

use serde::{Deserialize, Serialize};

pub use crate::kind::{FileType, Kind};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// The longest task id coverd accepts. KIE's ids are 32 hex characters.
pub const TASK_ID_MAX_LEN: usize = 128;

/// More image URLs than KIE ever sends for one cover: a task never holds more, whether they
/// came in a callback or in record-info.
pub const MAX_IMAGES: usize = 16;
/// Longest file URL a task holds (defined with the kinds' readings, which bound what KIE
/// sends by it).
pub use crate::kind::MAX_URL_BYTES;

/// The rule of [`valid_task_id`], as messages state it.
pub const TASK_ID_RULE: &str = "1 to 128 characters of A-Z, a-z, 0-9, '-' or '_'";

/// `id` as a `what` ("task id", "music task id", …): `Err` says what is wrong with it.
pub fn check_task_id(id: &str, what: &str) -> Result<(), String> {
    if valid_task_id(id) {
        Ok(())
    } else {
        Err(format!("invalid {what} {id:?}: use {TASK_ID_RULE}"))
    }
}

/// Task ids become directory names under `images/`, so only a safe alphabet is accepted.
pub fn valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= TASK_ID_MAX_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The task state machine's states (SPEC "Task states").
#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Submitted,
    Received,
    Downloaded,
    Failed,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Submitted,
        State::Received,
        State::Downloaded,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Submitted => "submitted",
            State::Received => "received",
            State::Downloaded => "downloaded",
            State::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Finished tasks are never polled or downloaded again without `admin retry`.
    pub fn is_finished(self) -> bool {
        matches!(self, State::Downloaded | State::Failed)
    }

    /// A stable one-byte code, used in index keys.
    pub fn code(self) -> u8 {
        match self {
            State::Submitted => 0,
            State::Received => 1,
            State::Downloaded => 2,
            State::Failed => 3,
        }
    }
}

/// Where the image URLs of a received task came from.
#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Callback,
    Poll,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Callback => "callback",
            Source::Poll => "poll",
        }
    }
}

/// Why a task failed; decides what `admin retry` and a late success callback may do.
#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// KIE reported that generation failed (callback or record-info).
    Generation,
    /// Nothing arrived by `poll.give_up_after`.
    NoResult,
    /// At least one image failed for good.
    Download,
}

#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageState {
    Pending,
    Downloaded,
    Failed,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Pending => "pending",
            ImageState::Downloaded => "downloaded",
            ImageState::Failed => "failed",
        }
    }
}

/// One file of a task (a cover's image, a track's MP3 or image, a WAV, a video, a stem):
/// where KIE serves it, where it is stored and how its download went. The type keeps its
/// first name, `Image`, from when covers were the only kind. The fields added with kinds are
/// skipped by the unit tests' `Serialize`, the codec's proof that its frozen version-1 and 2
/// types write what these types wrote before (`store::codec::tests`).
#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Its position in the task's files, stable (SPEC "Task kinds").
    pub index: u32,
    /// Its file name without extension, from the kind's rules (`track-0`, `audio`, `vocal`;
    /// a cover image's is its index): never from anything KIE sent.
    #[cfg_attr(test, serde(skip))]
    pub name: String,
    /// What its bytes must be.
    #[cfg_attr(test, serde(skip))]
    pub expect: FileType,
    /// For a music track's files: the track's `audio_id`, title and duration (ms) as KIE gave
    /// them.
    #[cfg_attr(test, serde(skip))]
    pub audio_id: Option<String>,
    #[cfg_attr(test, serde(skip))]
    pub title: Option<String>,
    #[cfg_attr(test, serde(skip))]
    pub duration_ms: Option<u64>,
    /// The URL as KIE gave it.
    pub url: String,
    /// A fresh link from KIE's download-url endpoint, once one was fetched.
    pub refreshed_url: Option<String>,
    pub state: ImageState,
    /// Every fetch of this image, the successful one included.
    pub attempts: u32,
    /// Attempts that count toward `download.max_attempts` start here (moved by `admin retry`).
    pub attempts_budget_start: u32,
    /// Earliest time of the next fetch while `Pending`.
    pub next_attempt_at: Millis,
    /// Where the file is stored, set once stored: relative to the data directory
    /// (`images/<task>/0.png`), or, in an object store, its location
    /// (`s3://bucket/<prefix><task>/0.png`, see [`is_object_location`]). One field for both,
    /// so that the record format did not change with object storage; the JSON shows them
    /// apart (`path`, `location`).
    pub path: Option<String>,
    pub bytes: Option<u64>,
    pub sha256: Option<String>,
    pub error: Option<String>,
}

impl Image {
    /// A cover image not fetched yet.
    pub fn pending(index: u32, url: String, now: Millis) -> Image {
        Image::pending_file(index, index.to_string(), FileType::Image, url, now)
    }

    /// A file not fetched yet.
    pub fn pending_file(
        index: u32,
        name: String,
        expect: FileType,
        url: String,
        now: Millis,
    ) -> Image {
        Image {
            index,
            name,
            expect,
            audio_id: None,
            title: None,
            duration_ms: None,
            url,
            refreshed_url: None,
            state: ImageState::Pending,
            attempts: 0,
            attempts_budget_start: 0,
            next_attempt_at: now,
            path: None,
            bytes: None,
            sha256: None,
            error: None,
        }
    }

    /// A file KIE listed, not fetched yet; its index is its position in the task's files.
    pub fn found(index: u32, found: crate::kind::read::Found, now: Millis) -> Image {
        let crate::kind::read::Found {
            stem,
            url,
            expect,
            audio_id,
            title,
            duration,
            created_at: _,
        } = found;
        Image {
            audio_id,
            title,
            duration_ms: duration.map(|d| (d * 1000.0).round() as u64),
            ..Image::pending_file(index, stem, expect, url, now)
        }
    }

    /// Attempts made since the last `admin retry`.
    pub fn budget_used(&self) -> u32 {
        crate::retry::budget_used(self.attempts, self.attempts_budget_start)
    }
}

#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub task_id: String,
    /// What the task is the result of; fixed when coverd first learns of it.
    #[cfg_attr(test, serde(skip))]
    pub kind: Kind,
    pub music_task_id: Option<String>,
    /// The track a `wav`, `video` or `stems` task was made from, when known.
    #[cfg_attr(test, serde(skip))]
    pub audio_id: Option<String>,
    pub state: State,
    pub source: Option<Source>,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Deliveries of KIE's callback, duplicates included.
    pub callbacks: u32,
    /// record-info calls made for this task.
    pub polls: u32,
    pub error: Option<String>,
    pub failure: Option<Failure>,
    pub images: Vec<Image>,
    /// Where the give-up clock (`poll.give_up_after`) starts: while `Submitted`, when the task
    /// entered that state; while `Received` from a callback awaiting confirmation, when that
    /// callback arrived.
    pub submitted_at: Millis,
    /// While `Submitted`: when the poller should look at it next.
    pub next_poll_at: Millis,
    /// Number of history events written; the next event's sequence number.
    pub event_count: u32,
    /// The image URLs were checked against record-info (`kie.confirm_callbacks`).
    pub confirmed: bool,
    /// record-info calls made to confirm the current callback's URLs that had no result yet.
    pub confirm_attempts: u32,
}

impl Task {
    /// A new cover task.
    pub fn new(task_id: String, music_task_id: Option<String>, now: Millis) -> Task {
        Task::new_of(Kind::Cover, task_id, music_task_id, now)
    }

    /// A new task of `kind`.
    pub fn new_of(kind: Kind, task_id: String, music_task_id: Option<String>, now: Millis) -> Task {
        Task {
            task_id,
            kind,
            music_task_id,
            audio_id: None,
            state: State::Submitted,
            source: None,
            created_at: now,
            updated_at: now,
            callbacks: 0,
            polls: 0,
            error: None,
            failure: None,
            images: Vec::new(),
            submitted_at: now,
            next_poll_at: now,
            event_count: 0,
            confirmed: false,
            confirm_attempts: 0,
        }
    }

    /// When the downloader should next look at this task, if at all.
    pub fn download_due(&self) -> Option<Millis> {
        if self.state != State::Received {
            return None;
        }
        self.images
            .iter()
            .filter(|i| i.state == ImageState::Pending)
            .map(|i| i.next_attempt_at)
            .min()
    }

    /// When the poller should next look at this task, if at all.
    pub fn poll_due(&self) -> Option<Millis> {
        (self.state == State::Submitted).then_some(self.next_poll_at)
    }
}

/// One entry of a task's history.
#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub at: Millis,
    pub kind: EventKind,
    pub detail: String,
}

/// What happened. Printed in snake_case in JSON. A new variant is a new record version in
/// `store::codec` (an older coverd could not read it).
#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Submitted,
    Tracked,
    Callback,
    DuplicateCallback,
    Polled,
    Received,
    ImageStored,
    ImageRetry,
    ImageFailed,
    Downloaded,
    Failed,
    Retried,
    Ignored,
    UrlRefreshed,
    Mismatch,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Submitted => "submitted",
            EventKind::Tracked => "tracked",
            EventKind::Callback => "callback",
            EventKind::DuplicateCallback => "duplicate_callback",
            EventKind::Polled => "polled",
            EventKind::Received => "received",
            EventKind::ImageStored => "image_stored",
            EventKind::ImageRetry => "image_retry",
            EventKind::ImageFailed => "image_failed",
            EventKind::Downloaded => "downloaded",
            EventKind::Failed => "failed",
            EventKind::Retried => "retried",
            EventKind::Ignored => "ignored",
            EventKind::UrlRefreshed => "url_refreshed",
            EventKind::Mismatch => "mismatch",
        }
    }
}

/// RFC 3339 UTC with second precision, as SPEC's JSON shows (`2026-11-27T10:33:01Z`).
pub fn format_time(ms: Millis) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.format(&f)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// A duration in milliseconds, saturating.
pub fn millis(d: std::time::Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The current wall-clock time.
pub fn now_millis() -> Millis {
    millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

/// Where the schedulers read the time, so tests can move it instead of sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Millis;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        now_millis()
    }
}

/// A clock for tests: it runs at real speed from `start` and jumps forward when told
/// ([`ManualClock::advance`]), so schedules minutes or hours away come due without sleeping,
/// short backoffs still elapse, and records stamped with the wall clock (callbacks, admin
/// commands) never lie in its future.
#[derive(Debug)]
pub struct ManualClock {
    start: Millis,
    origin: std::time::Instant,
    advanced: std::sync::atomic::AtomicI64,
}

impl ManualClock {
    pub fn new(start: Millis) -> ManualClock {
        ManualClock {
            start,
            origin: std::time::Instant::now(),
            advanced: std::sync::atomic::AtomicI64::new(0),
        }
    }
    pub fn advance(&self, by: std::time::Duration) {
        let ms = millis(by);
        self.advanced
            .fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        let elapsed = millis(self.origin.elapsed());
        self.start
            .saturating_add(elapsed)
            .saturating_add(self.advanced.load(std::sync::atomic::Ordering::SeqCst))
    }
}

// ---- outbound notifications (SPEC "Notifications (outbound)") ----

/// Which settle a notification announces.
#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyType {
    Downloaded,
    Failed,
}

impl NotifyType {
    /// The settle it announces: `downloaded` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyType::Downloaded => "downloaded",
            NotifyType::Failed => "failed",
        }
    }

    /// The `type` of the webhook body for a task of `kind`: `cover.downloaded`,
    /// `music.failed`, ….
    pub fn type_for(self, kind: Kind) -> String {
        format!("{}.{}", kind.as_str(), self.as_str())
    }
}

/// Where one notification's delivery stands.
#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyState {
    Pending,
    Delivered,
    Undeliverable,
}

impl NotifyState {
    pub const ALL: [NotifyState; 3] = [
        NotifyState::Pending,
        NotifyState::Delivered,
        NotifyState::Undeliverable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyState::Pending => "pending",
            NotifyState::Delivered => "delivered",
            NotifyState::Undeliverable => "undeliverable",
        }
    }

    /// A stable one-byte code, used in counter keys.
    pub fn code(self) -> u8 {
        match self {
            NotifyState::Pending => 0,
            NotifyState::Delivered => 1,
            NotifyState::Undeliverable => 2,
        }
    }
}

/// One outbound notification: created in the same transaction as the settle it announces
/// (see `store::apply`), delivered by `notify`. Its `webhook_id` and `body` are fixed at
/// creation, so every attempt (and every restart) sends the same message.
#[cfg_attr(test, derive(Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub task_id: String,
    /// Settles of this task so far, this one included (1 for the first settle).
    pub seq: u32,
    /// `webhook-id`: `msg_<task id>_<seq>_<settled at, ms>`, the same for every attempt of
    /// this message. The time keeps it unique even if the task is forgotten (prune) and its
    /// id comes back: a receiver must never drop a new message as a repeat.
    pub webhook_id: String,
    pub kind: NotifyType,
    pub created_at: Millis,
    /// The exact JSON body sent (type, timestamp, data).
    pub body: String,
    pub state: NotifyState,
    /// Every delivery attempt, the successful one included.
    pub attempts: u32,
    /// Attempts that count toward `notify.max_attempts` start here (moved by `admin redeliver`).
    pub attempts_budget_start: u32,
    /// Earliest time of the next attempt while `Pending`.
    pub next_attempt_at: Millis,
    pub updated_at: Millis,
    /// Why the last attempt failed, or why the notification is undeliverable.
    pub error: Option<String>,
}

impl Notification {
    /// A new pending notification of `task`'s settle, due at once.
    pub fn new(task: &Task, seq: u32, kind: NotifyType, now: Millis) -> Notification {
        let mut data = serde_json::to_value(TaskJson::new(task, None)).unwrap_or_default();
        if let Some(obj) = data.as_object_mut() {
            // The delivery's own state is not part of the task's news.
            obj.remove("notify");
            obj.remove("events");
        }
        let body = serde_json::json!({
            "type": kind.type_for(task.kind),
            "timestamp": format_time(now),
            "data": data,
        })
        .to_string();
        Notification {
            task_id: task.task_id.clone(),
            seq,
            webhook_id: format!("msg_{}_{seq}_{now}", task.task_id),
            kind,
            created_at: now,
            body,
            state: NotifyState::Pending,
            attempts: 0,
            attempts_budget_start: 0,
            next_attempt_at: now,
            updated_at: now,
            error: None,
        }
    }

    /// Attempts made since creation or the last `admin redeliver`.
    pub fn budget_used(&self) -> u32 {
        crate::retry::budget_used(self.attempts, self.attempts_budget_start)
    }

    /// The `type` it is sent with (`cover.downloaded`, …), read from its fixed body.
    pub fn type_name(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("type")?.as_str().map(str::to_string))
            .unwrap_or_else(|| self.kind.as_str().to_string())
    }

    /// When the notifier should next try, if at all.
    pub fn due(&self) -> Option<Millis> {
        (self.state == NotifyState::Pending).then_some(self.next_attempt_at)
    }
}

// ---- JSON views (SPEC "JSON shapes") ----

/// A file entry of the task JSON (`files`, and a cover's `images`).
#[derive(Serialize, Debug, Clone, PartialEq, Deserialize)]
pub struct ImageJson {
    pub index: u32,
    /// The file's name in its task's directory once stored (`0.png`, `track-0.mp3`); until
    /// then its name without extension. `None` in `images` (where it never appeared).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    /// The type its bytes showed once stored (`image/png`, `audio/mpeg`, …).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub media_type: Option<String>,
    /// A music track's files: the track as KIE described it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub audio_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub duration: Option<f64>,
    pub url: String,
    pub state: String,
    pub attempts: u32,
    /// Relative to the data directory, once stored there; `null` when stored in an object
    /// store (then `location`).
    pub path: Option<String>,
    /// With object storage: the stored object, `s3://bucket/key`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub location: Option<String>,
    pub bytes: Option<u64>,
    pub sha256: Option<String>,
    pub error: Option<String>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EventJson {
    pub at: String,
    pub kind: String,
    pub detail: String,
}

#[derive(Serialize, Debug, Clone, PartialEq, Deserialize)]
pub struct TaskJson {
    pub task_id: String,
    #[serde(default = "cover_name")]
    pub kind: String,
    pub music_task_id: Option<String>,
    /// The track a `wav`, `video` or `stems` task was made from (absent for the others).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub audio_id: Option<String>,
    pub state: String,
    pub source: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub callbacks: u32,
    pub polls: u32,
    pub error: Option<String>,
    /// A cover task's images, as before kinds existed (the same entries as `files`, without
    /// the fields added with them); absent for the other kinds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub images: Option<Vec<ImageJson>>,
    /// Every task's files.
    #[serde(default)]
    pub files: Vec<ImageJson>,
    /// The latest notification of this task; `null` when none was made (notifications off).
    #[serde(default)]
    pub notify: Option<NotifyJson>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub events: Option<Vec<EventJson>>,
}

/// `"notify"` of the task JSON.
#[derive(Serialize, Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NotifyJson {
    pub state: String,
    pub attempts: u32,
}

impl NotifyJson {
    pub fn new(n: &Notification) -> NotifyJson {
        NotifyJson {
            state: n.state.as_str().into(),
            attempts: n.attempts,
        }
    }
}

fn cover_name() -> String {
    Kind::Cover.as_str().into()
}

/// The scheme of an object's location (`s3://bucket/key`).
pub const OBJECT_SCHEME: &str = "s3://";

/// Whether a stored file's recorded place (`Image::path`) is an object's location rather
/// than a path relative to the data directory: the record keeps either in the same field.
pub fn is_object_location(place: &str) -> bool {
    place.starts_with(OBJECT_SCHEME)
}

impl ImageJson {
    /// A file entry of `files`.
    pub fn file(i: &Image) -> ImageJson {
        let stored = i
            .path
            .as_deref()
            .and_then(|p| p.rsplit_once('/'))
            .map(|(_, n)| n);
        let ext = stored
            .and_then(|n| n.rsplit_once('.'))
            .and_then(|(_, e)| crate::kind::Ext::parse(e));
        ImageJson {
            index: i.index,
            name: Some(stored.map_or_else(|| i.name.clone(), str::to_string)),
            media_type: ext.map(|e| e.media_type().to_string()),
            audio_id: i.audio_id.clone(),
            title: i.title.clone(),
            duration: i.duration_ms.map(|ms| ms as f64 / 1000.0),
            url: i.url.clone(),
            state: i.state.as_str().into(),
            attempts: i.attempts,
            path: i.path.clone().filter(|p| !is_object_location(p)),
            location: i.path.clone().filter(|p| is_object_location(p)),
            bytes: i.bytes,
            sha256: i.sha256.clone(),
            error: i.error.clone(),
        }
    }
}

impl TaskJson {
    /// Adds the task's latest notification (`None`: `"notify": null`).
    pub fn with_notify(mut self, n: Option<&Notification>) -> TaskJson {
        self.notify = n.map(NotifyJson::new);
        self
    }

    pub fn new(task: &Task, events: Option<&[EventRecord]>) -> TaskJson {
        let files: Vec<ImageJson> = task.images.iter().map(ImageJson::file).collect();
        let images = match task.kind {
            Kind::Cover => Some(
                files
                    .iter()
                    .map(|f| ImageJson {
                        name: None,
                        media_type: None,
                        audio_id: None,
                        title: None,
                        duration: None,
                        ..f.clone()
                    })
                    .collect(),
            ),
            _ => None,
        };
        TaskJson {
            task_id: task.task_id.clone(),
            kind: task.kind.as_str().into(),
            music_task_id: task.music_task_id.clone(),
            audio_id: task.audio_id.clone(),
            state: task.state.as_str().into(),
            source: task.source.map(|s| s.as_str().into()),
            created_at: format_time(task.created_at),
            updated_at: format_time(task.updated_at),
            callbacks: task.callbacks,
            polls: task.polls,
            error: task.error.clone(),
            images,
            files,
            notify: None,
            events: events.map(|evs| {
                evs.iter()
                    .map(|e| EventJson {
                        at: format_time(e.at),
                        kind: e.kind.as_str().into(),
                        detail: e.detail.clone(),
                    })
                    .collect()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids() {
        for ok in ["21aee3c3c2a01fa5e030b3799fa4dd56", "a", "A-b_9"] {
            assert!(valid_task_id(ok), "{ok}");
        }
        let long = "a".repeat(TASK_ID_MAX_LEN + 1);
        for bad in ["", "../etc", "a/b", "a b", "a\0", "é", long.as_str()] {
            assert!(!valid_task_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn time_format() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_795_775_581_999), "2026-11-27T10:33:01Z");
    }

    #[test]
    fn state_names_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("nope"), None);
    }
}
