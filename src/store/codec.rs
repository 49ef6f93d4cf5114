//! The on-disk encoding of every stored value: bincode 1.3.3 inside versioned envelopes of
//! frozen record types. Owns the byte format and its evolution; must not open trees or know
//! about keys.
//!
//! Rules (bincode is not self-describing: a value is its fields in order, an enum variant is
//! its index as a u32, nothing names anything):
//! - every stored value is an envelope enum (`StoredTask`, `StoredEvent`,
//!   `StoredNotification`, `StoredParked`) whose variants are only ever appended, never
//!   reordered, changed or removed;
//! - an envelope variant holds record types of its own, frozen here (`TaskV1`, `ImageV1`,
//!   `EntryV2`, `EventKindV1`, `NotificationV1`, `ParkedV1`, …), never a domain type of
//!   `model`: a frozen type is never edited, its integers are spelled out (`i64`, not
//!   `Millis`), and it converts to and from the domain type with an exhaustive destructuring
//!   or `match` (no `..`, no `_`). A field or variant added to `model::Task` (or to what it
//!   holds, or to `Notification`, or to `parked::Parked`) is therefore a compile error here;
//!   the fix is a new version: new frozen types (copies of the old ones with the change),
//!   a new envelope variant that holds them (`StoredTask::V3`), the encoder writing it,
//!   the decoder reading every variant, a constant bumped, and a fixture written by the
//!   release that introduces it (`fixtures/`, tests below);
//! - a version may share the frozen types of an earlier one where they did not change
//!   (`V2` holds the `TaskV1` of `V1`, plus its history);
//! - the fixtures in `fixtures/` are bytes written by released versions and must decode
//!   forever.
//!
//! The versions:
//! - `StoredTask::V1(TaskV1)` (0.1.0, schema 1): the task; its history is in the schema-1
//!   `events` tree, one `StoredEvent::V1(EventV1)` per entry, which the store's migration
//!   folds into `V2` records. Written now only by tests (`encode_task_v1`).
//! - `StoredTask::V2(TaskRecordV2)` (schema 2, issue 9): the same `TaskV1`, then its whole
//!   history (`EntryV2`, oldest first; a detail equal to the task's `error` is not repeated).
//!   What coverd writes.
//! - `StoredNotification::V1(NotificationV1)`: an outbox entry (it holds no task: its body is
//!   already JSON).
//! - `StoredParked::V1(ParkedV1)`: a callback kept aside (`store::parked`).
//!
//! Not enveloped: an intent (`intents` tree) is the time it was recorded, 8 bytes, ms
//! big-endian (`encode_intent`); the indexes and counters are fixed-width integers the store
//! derives. A change of those is a new tree, not a new version.
//!
//! A coverd reading an envelope variant past the ones it knows reports it as written by a
//! newer coverd (`CodecError::Newer`), not as damage; the store quarantines such a record
//! (docs/operations.md, "Upgrades").

use std::borrow::Cow;

use bincode::Options;
use serde::{Deserialize, Serialize};

use super::parked::Parked;
use crate::model::{
    EventKind, EventRecord, Failure, Image, ImageState, Millis, Notification, NotifyState,
    NotifyType, Source, State, Task,
};

/// Largest value the decoder accepts; a task with 16 images and long URLs is a few KiB.
const MAX_VALUE_BYTES: u64 = 1 << 20;

// ---- envelopes ----

#[derive(Serialize, Deserialize)]
enum StoredTask<'a> {
    V1(TaskV1<'a>),
    /// Schema 2: the record and its whole history, oldest first.
    V2(TaskRecordV2<'a>),
}

#[derive(Serialize, Deserialize)]
enum StoredEvent<'a> {
    V1(EventV1<'a>),
}

#[derive(Serialize, Deserialize)]
enum StoredNotification<'a> {
    V1(NotificationV1<'a>),
}

/// A callback kept aside because its task's record could not be decoded (SPEC "Signals,
/// failures, exit status"): the body exactly as it arrived and the route it came on.
#[derive(Serialize, Deserialize)]
enum StoredParked<'a> {
    V1(ParkedV1<'a>),
}

/// The newest envelope version this build reads, of `StoredTask` (`V1`, `V2`); a newer
/// coverd appends `V3`, whose bincode variant index is 2.
pub const ENVELOPE_VERSION: u32 = 2;
/// The newest envelope version of `StoredEvent` and `StoredNotification` (`V1` only).
pub const EVENT_ENVELOPE_VERSION: u32 = 1;
pub const NOTIFICATION_ENVELOPE_VERSION: u32 = 1;
/// The newest envelope version of `StoredParked` (`V1` only).
pub const PARKED_ENVELOPE_VERSION: u32 = 1;
/// Variant indexes this far past the known ones still read as "a newer coverd": bincode
/// writes the index as the first 4 bytes (u32 LE), so any larger number is damage.
const PLAUSIBLE_NEWER_VERSIONS: u32 = 64;

// ---- frozen record types: never edit one; add a version (module doc) ----
//
// Strings are `Cow`: encoding borrows from the domain value (no copy of a task's history
// for each write); decoding owns. A `Cow<str>` is written exactly as a `String`, a
// `Cow<[u8]>` exactly as a `Vec<u8>`.

/// A task as `StoredTask::V1` and `V2` hold it (the shape of `model::Task` in 0.1.0).
#[derive(Serialize, Deserialize)]
struct TaskV1<'a> {
    task_id: Cow<'a, str>,
    music_task_id: Option<Cow<'a, str>>,
    state: StateV1,
    source: Option<SourceV1>,
    created_at: i64,
    updated_at: i64,
    callbacks: u32,
    polls: u32,
    error: Option<Cow<'a, str>>,
    failure: Option<FailureV1>,
    images: Vec<ImageV1<'a>>,
    submitted_at: i64,
    next_poll_at: i64,
    event_count: u32,
    confirmed: bool,
    confirm_attempts: u32,
}

#[derive(Serialize, Deserialize)]
struct ImageV1<'a> {
    index: u32,
    url: Cow<'a, str>,
    refreshed_url: Option<Cow<'a, str>>,
    state: ImageStateV1,
    attempts: u32,
    attempts_budget_start: u32,
    next_attempt_at: i64,
    path: Option<Cow<'a, str>>,
    bytes: Option<u64>,
    sha256: Option<Cow<'a, str>>,
    error: Option<Cow<'a, str>>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum StateV1 {
    Submitted,
    Received,
    Downloaded,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum SourceV1 {
    Callback,
    Poll,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum FailureV1 {
    Generation,
    NoResult,
    Download,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum ImageStateV1 {
    Pending,
    Downloaded,
    Failed,
}

/// `StoredTask::V2`: the task, then its history.
#[derive(Serialize, Deserialize)]
struct TaskRecordV2<'a> {
    task: TaskV1<'a>,
    history: Vec<EntryV2<'a>>,
}

/// One history entry of a `V2` record.
#[derive(Serialize, Deserialize)]
struct EntryV2<'a> {
    at: i64,
    kind: EventKindV1,
    detail: DetailV2<'a>,
}

/// A history entry's detail. A failure's reason is noted twice (the callback or poll that
/// reported it, then the failure) and is the task's `error` too: a detail equal to the
/// task's `error` when the record is written is stored as `TaskError`, not repeated (the
/// whole record is written at once, so it decodes to the same text).
#[derive(Serialize, Deserialize)]
enum DetailV2<'a> {
    Text(Cow<'a, str>),
    TaskError,
}

/// A schema-1 history entry (`events` tree), `StoredEvent::V1`.
#[derive(Serialize, Deserialize)]
struct EventV1<'a> {
    at: i64,
    kind: EventKindV1,
    detail: Cow<'a, str>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum EventKindV1 {
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

/// An outbox entry, `StoredNotification::V1`.
#[derive(Serialize, Deserialize)]
struct NotificationV1<'a> {
    task_id: Cow<'a, str>,
    seq: u32,
    webhook_id: Cow<'a, str>,
    kind: NotifyTypeV1,
    created_at: i64,
    body: Cow<'a, str>,
    state: NotifyStateV1,
    attempts: u32,
    attempts_budget_start: u32,
    next_attempt_at: i64,
    updated_at: i64,
    error: Option<Cow<'a, str>>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum NotifyTypeV1 {
    Downloaded,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum NotifyStateV1 {
    Pending,
    Delivered,
    Undeliverable,
}

/// A callback kept aside, `StoredParked::V1` (its task id and arrival order are its key).
#[derive(Serialize, Deserialize)]
struct ParkedV1<'a> {
    /// The task kind of the route it came on (`cover` for `/callbacks/cover`).
    route: Cow<'a, str>,
    received_at: i64,
    body: Cow<'a, [u8]>,
}

// ---- conversions: exhaustive on purpose (module doc) ----

/// Maps a Copy enum to its frozen twin and back, variant by variant (an exhaustive `match`
/// each way: a variant added on either side does not compile).
macro_rules! frozen_enum {
    ($domain:ident <=> $frozen:ident { $($variant:ident),+ $(,)? }) => {
        impl From<$domain> for $frozen {
            fn from(v: $domain) -> $frozen {
                match v {
                    $($domain::$variant => $frozen::$variant,)+
                }
            }
        }
        impl From<$frozen> for $domain {
            fn from(v: $frozen) -> $domain {
                match v {
                    $($frozen::$variant => $domain::$variant,)+
                }
            }
        }
    };
}

frozen_enum!(State <=> StateV1 { Submitted, Received, Downloaded, Failed });
frozen_enum!(Source <=> SourceV1 { Callback, Poll });
frozen_enum!(Failure <=> FailureV1 { Generation, NoResult, Download });
frozen_enum!(ImageState <=> ImageStateV1 { Pending, Downloaded, Failed });
frozen_enum!(EventKind <=> EventKindV1 {
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
});
frozen_enum!(NotifyType <=> NotifyTypeV1 { Downloaded, Failed });
frozen_enum!(NotifyState <=> NotifyStateV1 { Pending, Delivered, Undeliverable });

fn borrowed(s: &Option<String>) -> Option<Cow<'_, str>> {
    s.as_deref().map(Cow::Borrowed)
}

fn owned(s: Option<Cow<'_, str>>) -> Option<String> {
    s.map(Cow::into_owned)
}

impl<'a> From<&'a Task> for TaskV1<'a> {
    fn from(task: &'a Task) -> TaskV1<'a> {
        let Task {
            task_id,
            music_task_id,
            state,
            source,
            created_at,
            updated_at,
            callbacks,
            polls,
            error,
            failure,
            images,
            submitted_at,
            next_poll_at,
            event_count,
            confirmed,
            confirm_attempts,
        } = task;
        TaskV1 {
            task_id: Cow::Borrowed(task_id),
            music_task_id: borrowed(music_task_id),
            state: (*state).into(),
            source: source.map(Into::into),
            created_at: *created_at,
            updated_at: *updated_at,
            callbacks: *callbacks,
            polls: *polls,
            error: borrowed(error),
            failure: failure.map(Into::into),
            images: images.iter().map(ImageV1::from).collect(),
            submitted_at: *submitted_at,
            next_poll_at: *next_poll_at,
            event_count: *event_count,
            confirmed: *confirmed,
            confirm_attempts: *confirm_attempts,
        }
    }
}

impl From<TaskV1<'_>> for Task {
    fn from(task: TaskV1<'_>) -> Task {
        let TaskV1 {
            task_id,
            music_task_id,
            state,
            source,
            created_at,
            updated_at,
            callbacks,
            polls,
            error,
            failure,
            images,
            submitted_at,
            next_poll_at,
            event_count,
            confirmed,
            confirm_attempts,
        } = task;
        Task {
            task_id: task_id.into_owned(),
            music_task_id: owned(music_task_id),
            state: state.into(),
            source: source.map(Into::into),
            created_at,
            updated_at,
            callbacks,
            polls,
            error: owned(error),
            failure: failure.map(Into::into),
            images: images.into_iter().map(Image::from).collect(),
            submitted_at,
            next_poll_at,
            event_count,
            confirmed,
            confirm_attempts,
        }
    }
}

impl<'a> From<&'a Image> for ImageV1<'a> {
    fn from(image: &'a Image) -> ImageV1<'a> {
        let Image {
            index,
            url,
            refreshed_url,
            state,
            attempts,
            attempts_budget_start,
            next_attempt_at,
            path,
            bytes,
            sha256,
            error,
        } = image;
        ImageV1 {
            index: *index,
            url: Cow::Borrowed(url),
            refreshed_url: borrowed(refreshed_url),
            state: (*state).into(),
            attempts: *attempts,
            attempts_budget_start: *attempts_budget_start,
            next_attempt_at: *next_attempt_at,
            path: borrowed(path),
            bytes: *bytes,
            sha256: borrowed(sha256),
            error: borrowed(error),
        }
    }
}

impl From<ImageV1<'_>> for Image {
    fn from(image: ImageV1<'_>) -> Image {
        let ImageV1 {
            index,
            url,
            refreshed_url,
            state,
            attempts,
            attempts_budget_start,
            next_attempt_at,
            path,
            bytes,
            sha256,
            error,
        } = image;
        Image {
            index,
            url: url.into_owned(),
            refreshed_url: owned(refreshed_url),
            state: state.into(),
            attempts,
            attempts_budget_start,
            next_attempt_at,
            path: owned(path),
            bytes,
            sha256: owned(sha256),
            error: owned(error),
        }
    }
}

impl<'a> TaskRecordV2<'a> {
    fn new(task: &'a Task, history: &'a [EventRecord]) -> TaskRecordV2<'a> {
        let history = history
            .iter()
            .map(|entry| {
                let EventRecord { at, kind, detail } = entry;
                EntryV2 {
                    at: *at,
                    kind: (*kind).into(),
                    detail: if task.error.as_deref() == Some(detail.as_str()) {
                        DetailV2::TaskError
                    } else {
                        DetailV2::Text(Cow::Borrowed(detail))
                    },
                }
            })
            .collect();
        TaskRecordV2 {
            task: TaskV1::from(task),
            history,
        }
    }

    fn into_domain(self) -> (Task, Vec<EventRecord>) {
        let TaskRecordV2 { task, history } = self;
        let task = Task::from(task);
        let history = history
            .into_iter()
            .map(|entry| {
                let EntryV2 { at, kind, detail } = entry;
                EventRecord {
                    at,
                    kind: kind.into(),
                    detail: match detail {
                        DetailV2::Text(text) => text.into_owned(),
                        DetailV2::TaskError => task.error.clone().unwrap_or_default(),
                    },
                }
            })
            .collect();
        (task, history)
    }
}

impl<'a> From<&'a EventRecord> for EventV1<'a> {
    fn from(event: &'a EventRecord) -> EventV1<'a> {
        let EventRecord { at, kind, detail } = event;
        EventV1 {
            at: *at,
            kind: (*kind).into(),
            detail: Cow::Borrowed(detail),
        }
    }
}

impl From<EventV1<'_>> for EventRecord {
    fn from(event: EventV1<'_>) -> EventRecord {
        let EventV1 { at, kind, detail } = event;
        EventRecord {
            at,
            kind: kind.into(),
            detail: detail.into_owned(),
        }
    }
}

impl<'a> From<&'a Notification> for NotificationV1<'a> {
    fn from(n: &'a Notification) -> NotificationV1<'a> {
        let Notification {
            task_id,
            seq,
            webhook_id,
            kind,
            created_at,
            body,
            state,
            attempts,
            attempts_budget_start,
            next_attempt_at,
            updated_at,
            error,
        } = n;
        NotificationV1 {
            task_id: Cow::Borrowed(task_id),
            seq: *seq,
            webhook_id: Cow::Borrowed(webhook_id),
            kind: (*kind).into(),
            created_at: *created_at,
            body: Cow::Borrowed(body),
            state: (*state).into(),
            attempts: *attempts,
            attempts_budget_start: *attempts_budget_start,
            next_attempt_at: *next_attempt_at,
            updated_at: *updated_at,
            error: borrowed(error),
        }
    }
}

impl From<NotificationV1<'_>> for Notification {
    fn from(n: NotificationV1<'_>) -> Notification {
        let NotificationV1 {
            task_id,
            seq,
            webhook_id,
            kind,
            created_at,
            body,
            state,
            attempts,
            attempts_budget_start,
            next_attempt_at,
            updated_at,
            error,
        } = n;
        Notification {
            task_id: task_id.into_owned(),
            seq,
            webhook_id: webhook_id.into_owned(),
            kind: kind.into(),
            created_at,
            body: body.into_owned(),
            state: state.into(),
            attempts,
            attempts_budget_start,
            next_attempt_at,
            updated_at,
            error: owned(error),
        }
    }
}

impl<'a> From<&'a Parked> for ParkedV1<'a> {
    fn from(p: &'a Parked) -> ParkedV1<'a> {
        // The key and the task id are the entry's key, not its value.
        let Parked {
            key: _,
            task_id: _,
            route,
            received_at,
            body,
        } = p;
        ParkedV1 {
            route: Cow::Borrowed(route),
            received_at: *received_at,
            body: Cow::Borrowed(body),
        }
    }
}

impl ParkedV1<'_> {
    fn into_domain(self, key: Vec<u8>, task_id: String) -> Parked {
        let ParkedV1 {
            route,
            received_at,
            body,
        } = self;
        Parked {
            key,
            task_id,
            route: route.into_owned(),
            received_at,
            body: body.into_owned(),
        }
    }
}

// ---- encoding ----

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode record: {0}")]
    Encode(String),
    /// The bytes are not a record this or any coverd wrote: damage.
    #[error("undecodable {what} record: {reason}")]
    Corrupt { what: &'static str, reason: String },
    /// The envelope is a version this build does not know: a newer coverd wrote it.
    #[error(
        "{what} record in format v{found}, written by a newer coverd (this build reads up to v{known})"
    )]
    Newer {
        what: &'static str,
        found: u32,
        known: u32,
    },
}

/// Fixed-width little-endian integers, no trailing bytes, bounded size: explicit, so a
/// change of bincode's defaults can never change our format.
fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(MAX_VALUE_BYTES)
}

/// Fails only past `MAX_VALUE_BYTES`, which the callers' bounds (image count, URL length,
/// detail length) keep far away.
fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    options()
        .serialize(value)
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes an envelope, telling a newer envelope version (by its variant index, the first
/// four bytes) from damage.
fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    known: u32,
) -> Result<T, CodecError> {
    let index = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    if let Some(index) = index
        && (known..known + PLAUSIBLE_NEWER_VERSIONS).contains(&index)
    {
        return Err(CodecError::Newer {
            what,
            found: index + 1,
            known,
        });
    }
    options()
        .deserialize::<T>(bytes)
        .map_err(|e| CodecError::Corrupt {
            what,
            reason: e.to_string(),
        })
}

/// A task record (schema 2: with its history inline), as `StoredTask::V2`.
pub fn encode_task(task: &Task, history: &[EventRecord]) -> Result<Vec<u8>, CodecError> {
    encode(&StoredTask::V2(TaskRecordV2::new(task, history)))
}

/// A task record without its history.
pub fn decode_task(bytes: &[u8]) -> Result<Task, CodecError> {
    decode_record(bytes).map(|(task, _)| task)
}

/// A task record and its inline history: `None` for a schema-1 record (`V1`), whose
/// history is in the schema-1 `events` tree.
pub fn decode_record(bytes: &[u8]) -> Result<(Task, Option<Vec<EventRecord>>), CodecError> {
    match decode::<StoredTask>(bytes, "task", ENVELOPE_VERSION)? {
        StoredTask::V1(task) => Ok((task.into(), None)),
        StoredTask::V2(record) => {
            let (task, history) = record.into_domain();
            Ok((task, Some(history)))
        }
    }
}

/// A schema-1 record (`V1`), as coverd wrote it before schema 2: for the migration's tests
/// (and the integration tests' schema-1 backups). Not used by coverd.
#[cfg(any(test, feature = "testing"))]
pub fn encode_task_v1(task: &Task) -> Result<Vec<u8>, CodecError> {
    encode(&StoredTask::V1(TaskV1::from(task)))
}

pub fn encode_event(event: &EventRecord) -> Result<Vec<u8>, CodecError> {
    encode(&StoredEvent::V1(event.into()))
}

pub fn decode_event(bytes: &[u8]) -> Result<EventRecord, CodecError> {
    match decode::<StoredEvent>(bytes, "event", EVENT_ENVELOPE_VERSION)? {
        StoredEvent::V1(event) => Ok(event.into()),
    }
}

pub fn encode_parked(p: &Parked) -> Result<Vec<u8>, CodecError> {
    encode(&StoredParked::V1(p.into()))
}

/// A kept delivery's value, given its key and the task id the key names.
pub fn decode_parked(key: Vec<u8>, task_id: String, bytes: &[u8]) -> Result<Parked, CodecError> {
    match decode::<StoredParked>(bytes, "kept delivery", PARKED_ENVELOPE_VERSION)? {
        StoredParked::V1(p) => Ok(p.into_domain(key, task_id)),
    }
}

pub fn encode_notification(n: &Notification) -> Result<Vec<u8>, CodecError> {
    encode(&StoredNotification::V1(n.into()))
}

pub fn decode_notification(bytes: &[u8]) -> Result<Notification, CodecError> {
    match decode::<StoredNotification>(bytes, "notification", NOTIFICATION_ENVELOPE_VERSION)? {
        StoredNotification::V1(n) => Ok(n.into()),
    }
}

/// An intent's value: when it was recorded, ms big-endian (negative reads as 0).
pub fn encode_intent(recorded_at: Millis) -> [u8; 8] {
    u64::try_from(recorded_at).unwrap_or(0).to_be_bytes()
}

/// Reads an intent's value; a short value reads as 0 (long due).
pub fn decode_intent(bytes: &[u8]) -> Millis {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .and_then(|v| i64::try_from(v).ok())
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::*;

    /// A task that exercises every field and every variant that can be stored.
    pub fn sample_task() -> Task {
        let mut t = Task::new(
            "21aee3c3c2a01fa5e030b3799fa4dd56".into(),
            Some("73d6128b3523a0079df10da9471017c8".into()),
            1_795_775_581_000,
        );
        t.state = State::Failed;
        t.source = Some(Source::Poll);
        t.callbacks = 2;
        t.polls = 3;
        t.error = Some("image 1: HTTP 404".into());
        t.failure = Some(Failure::Download);
        t.event_count = 7;
        let mut a = Image::pending(0, "https://tempfile.aiquickdraw.com/s/a.png".into(), 5);
        a.state = ImageState::Downloaded;
        a.attempts = 2;
        a.path = Some("images/21aee3c3c2a01fa5e030b3799fa4dd56/0.png".into());
        a.bytes = Some(1234);
        a.sha256 = Some("ab".repeat(32));
        let mut b = Image::pending(1, "https://tempfile.aiquickdraw.com/s/b.png".into(), 6);
        b.state = ImageState::Failed;
        b.refreshed_url = Some("https://tempfile.aiquickdraw.com/s/b2.png".into());
        b.attempts_budget_start = 1;
        b.error = Some("HTTP 404".into());
        t.images = vec![a, b];
        t
    }

    #[test]
    fn every_stored_type_round_trips() {
        let task = sample_task();
        assert_eq!(
            decode_task(&encode_task(&task, &[]).unwrap()).unwrap(),
            task
        );
        let history = sample_history();
        assert_eq!(
            decode_record(&encode_task(&task, &history).unwrap()).unwrap(),
            (task.clone(), Some(history))
        );
        assert_eq!(
            decode_record(&encode_task_v1(&task).unwrap()).unwrap(),
            (task.clone(), None)
        );
        for state in State::ALL {
            let mut t = task.clone();
            t.state = state;
            assert_eq!(decode_task(&encode_task(&t, &[]).unwrap()).unwrap(), t);
        }
        for failure in [None, Some(Failure::Generation), Some(Failure::NoResult)] {
            let mut t = task.clone();
            t.failure = failure;
            t.source = Some(Source::Callback);
            assert_eq!(decode_task(&encode_task(&t, &[]).unwrap()).unwrap(), t);
        }
        for kind in ALL_KINDS {
            let e = EventRecord {
                at: 42,
                kind,
                detail: "d".into(),
            };
            assert_eq!(decode_event(&encode_event(&e).unwrap()).unwrap(), e);
        }
    }

    /// A notification with every field set.
    pub fn sample_notification() -> Notification {
        let mut n = Notification::new(&sample_task(), 3, NotifyType::Failed, 1_795_775_590_000);
        n.state = NotifyState::Undeliverable;
        n.attempts = 14;
        n.attempts_budget_start = 2;
        n.next_attempt_at = 1_795_775_600_000;
        n.updated_at = 1_795_775_601_000;
        n.error = Some("410 Gone".into());
        n
    }

    #[test]
    fn notifications_round_trip() {
        let n = sample_notification();
        assert_eq!(
            decode_notification(&encode_notification(&n).unwrap()).unwrap(),
            n
        );
        for state in NotifyState::ALL {
            for kind in [NotifyType::Downloaded, NotifyType::Failed] {
                let mut m = n.clone();
                m.state = state;
                m.kind = kind;
                m.error = None;
                assert_eq!(
                    decode_notification(&encode_notification(&m).unwrap()).unwrap(),
                    m
                );
            }
        }
        assert!(decode_notification(&[]).is_err());
        assert!(
            decode_notification(&encode_task(&sample_task(), &sample_history()).unwrap()[..10])
                .is_err()
        );
    }

    /// Bytes of the first notification format. If this fails, the stored format changed:
    /// add a new envelope variant instead.
    #[test]
    fn notification_v1_fixture_decodes_forever() {
        let n = decode_notification(include_bytes!("fixtures/notification_v1.bin"))
            .expect("v1 notification");
        assert_eq!(n, sample_notification());
        assert_eq!(
            n.webhook_id,
            "msg_21aee3c3c2a01fa5e030b3799fa4dd56_3_1795775590000"
        );
    }

    #[test]
    fn garbage_and_trailing_bytes_are_errors_not_panics() {
        assert!(decode_task(&[]).is_err());
        assert!(decode_task(&[9, 0, 0, 0]).is_err());
        let mut bytes = encode_task(&sample_task(), &sample_history()).unwrap();
        bytes.push(0);
        assert!(
            decode_task(&bytes).is_err(),
            "trailing bytes must be refused"
        );
        assert!(decode_event(&[1, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn a_newer_envelope_is_told_apart_from_damage() {
        // The current record with the envelope index of `V3`: what a newer build writes.
        let mut newer = encode_task(&sample_task(), &sample_history()).unwrap();
        newer[..4].copy_from_slice(&ENVELOPE_VERSION.to_le_bytes());
        let err = decode_task(&newer).unwrap_err();
        assert!(matches!(err, CodecError::Newer { found: 3, .. }), "{err}");
        assert!(
            err.to_string().contains("written by a newer coverd"),
            "{err}"
        );
        let mut newer_event = encode_event(&EventRecord {
            at: 1,
            kind: EventKind::Callback,
            detail: "d".into(),
        })
        .unwrap();
        newer_event[..4].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(
            decode_event(&newer_event),
            Err(CodecError::Newer { found: 8, .. })
        ));
        // Garbage, and a valid envelope cut short, are damage, not a newer coverd.
        for bad in [
            b"\xde\xad\xbe\xef garbage".to_vec(),
            vec![0, 0, 0],
            encode_task(&sample_task(), &sample_history()).unwrap()[..20].to_vec(),
        ] {
            let err = decode_task(&bad).unwrap_err();
            assert!(matches!(err, CodecError::Corrupt { .. }), "{bad:?}: {err}");
            assert!(!err.to_string().contains("newer"), "{err}");
        }
    }

    /// The history `task_v2.bin` carries.
    pub fn sample_history() -> Vec<EventRecord> {
        vec![
            EventRecord {
                at: 1_795_775_581_000,
                kind: EventKind::Tracked,
                detail: "adopted".into(),
            },
            EventRecord {
                at: 1_795_775_590_000,
                kind: EventKind::Failed,
                detail: "image 1: HTTP 404".into(),
            },
        ]
    }

    /// A failure's reason, noted twice and kept as the task's `error`, is stored once; the
    /// history decodes to the same text, whatever the details.
    #[test]
    fn a_detail_equal_to_the_error_is_not_repeated() {
        let task = sample_task();
        let reason = task.error.clone().unwrap();
        let entry = |detail: &str| EventRecord {
            at: 1,
            kind: EventKind::Callback,
            detail: detail.into(),
        };
        let same = vec![entry(&reason), entry("other"), entry(&reason)];
        let other_text = "x".repeat(reason.len());
        let different = vec![entry(&other_text), entry("other"), entry(&other_text)];
        let short = encode_task(&task, &same).unwrap();
        let long = encode_task(&task, &different).unwrap();
        assert_eq!(long.len() - short.len(), 2 * (8 + reason.len()));
        assert_eq!(
            decode_record(&short).unwrap(),
            (task.clone(), Some(same.clone()))
        );
        let mut no_error = task.clone();
        no_error.error = None;
        assert_eq!(
            decode_record(&encode_task(&no_error, &same).unwrap()).unwrap(),
            (no_error, Some(same))
        );
    }

    /// Bytes of the schema-2 task record. If this fails, the stored format changed: add a
    /// new envelope variant instead.
    #[test]
    fn task_v2_fixture_decodes_forever() {
        let (task, history) =
            decode_record(include_bytes!("fixtures/task_v2.bin")).expect("v2 task");
        assert_eq!(task, sample_task());
        assert_eq!(history, Some(sample_history()));
    }

    /// Bytes written by version 0.1.0. If this fails, the stored format changed: add a new
    /// envelope variant instead (see the module doc).
    #[test]
    fn v1_fixtures_decode_forever() {
        let (task, history) =
            decode_record(include_bytes!("fixtures/task_v1.bin")).expect("v1 task");
        assert_eq!(task, sample_task());
        assert_eq!(history, None);
        let event = decode_event(include_bytes!("fixtures/event_v1.bin")).expect("v1 event");
        assert_eq!(event.kind, EventKind::ImageStored);
        assert_eq!(event.detail, "image 0 stored");
    }

    /// Writes the fixtures that do not exist yet: run with
    /// `cargo test --lib -- --ignored write_fixtures` by the release that introduces a
    /// version (after adding it here). The checked-in files are the bytes of the release that
    /// introduced each format: an existing one is never rewritten.
    #[test]
    #[ignore]
    fn write_fixtures() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/fixtures");
        std::fs::create_dir_all(&dir).unwrap();
        let e = EventRecord {
            at: 1_795_775_581_000,
            kind: EventKind::ImageStored,
            detail: "image 0 stored".into(),
        };
        let fixtures = [
            ("task_v1.bin", encode_task_v1(&sample_task()).unwrap()),
            (
                "task_v2.bin",
                encode_task(&sample_task(), &sample_history()).unwrap(),
            ),
            ("event_v1.bin", encode_event(&e).unwrap()),
            (
                "notification_v1.bin",
                encode_notification(&sample_notification()).unwrap(),
            ),
            ("parked_v1.bin", encode_parked(&sample_parked()).unwrap()),
        ];
        for (name, bytes) in fixtures {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(name))
            {
                Ok(mut file) => std::io::Write::write_all(&mut file, &bytes).unwrap(),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }

    /// A kept delivery with every field set (its key and task id are not in the value).
    fn sample_parked() -> Parked {
        Parked {
            key: Vec::new(),
            task_id: String::new(),
            route: "cover".into(),
            received_at: 1_795_775_581_000,
            body: br#"{"code":200,"data":{"task_id":"21aee3c3c2a01fa5e030b3799fa4dd56"}}"#.to_vec(),
        }
    }

    /// Bytes of the first kept-delivery format. If this fails, the stored format changed:
    /// add a new envelope variant instead.
    #[test]
    fn parked_v1_fixture_decodes_forever() {
        let p = decode_parked(
            b"t\0k".to_vec(),
            "t".into(),
            include_bytes!("fixtures/parked_v1.bin"),
        )
        .expect("v1 kept delivery");
        let want = Parked {
            key: b"t\0k".to_vec(),
            task_id: "t".into(),
            ..sample_parked()
        };
        assert_eq!(p, want);
        assert!(matches!(
            decode_parked(Vec::new(), String::new(), &[1, 0, 0, 0]),
            Err(CodecError::Newer { found: 2, .. })
        ));
    }

    /// The encoders of before issue 17, which wrote the domain types themselves (they derive
    /// `Serialize` in unit tests for this alone); the frozen types must write the same bytes.
    /// When a domain type changes shape (a new version), these no longer describe a stored
    /// format and this module goes: the fixtures stay.
    mod before_frozen {
        use crate::model::{EventKind, EventRecord, Millis, Notification, Task};
        use serde::Serialize;

        #[derive(Serialize)]
        pub enum StoredTask<'a> {
            V1(&'a Task),
            V2 {
                task: &'a Task,
                history: Vec<Entry<'a>>,
            },
        }
        #[derive(Serialize)]
        pub struct Entry<'a> {
            at: Millis,
            kind: EventKind,
            detail: Detail<'a>,
        }
        #[derive(Serialize)]
        enum Detail<'a> {
            Text(&'a str),
            TaskError,
        }
        #[derive(Serialize)]
        enum StoredEvent<'a> {
            V1(&'a EventRecord),
        }
        #[derive(Serialize)]
        enum StoredNotification<'a> {
            V1(&'a Notification),
        }
        #[derive(Serialize)]
        enum StoredParked {
            V1(ParkedV1),
        }
        #[derive(Serialize)]
        struct ParkedV1 {
            route: String,
            received_at: Millis,
            body: Vec<u8>,
        }

        pub fn task(task: &Task, history: &[EventRecord]) -> Vec<u8> {
            let history = history
                .iter()
                .map(|e| Entry {
                    at: e.at,
                    kind: e.kind,
                    detail: if task.error.as_deref() == Some(e.detail.as_str()) {
                        Detail::TaskError
                    } else {
                        Detail::Text(&e.detail)
                    },
                })
                .collect();
            super::super::encode(&StoredTask::V2 { task, history }).unwrap()
        }
        pub fn task_v1(task: &Task) -> Vec<u8> {
            super::super::encode(&StoredTask::V1(task)).unwrap()
        }
        pub fn event(e: &EventRecord) -> Vec<u8> {
            super::super::encode(&StoredEvent::V1(e)).unwrap()
        }
        pub fn notification(n: &Notification) -> Vec<u8> {
            super::super::encode(&StoredNotification::V1(n)).unwrap()
        }
        pub fn parked(route: &str, received_at: Millis, body: &[u8]) -> Vec<u8> {
            super::super::encode(&StoredParked::V1(ParkedV1 {
                route: route.into(),
                received_at,
                body: body.into(),
            }))
            .unwrap()
        }
    }

    const ALL_KINDS: [EventKind; 15] = [
        EventKind::Submitted,
        EventKind::Tracked,
        EventKind::Callback,
        EventKind::DuplicateCallback,
        EventKind::Polled,
        EventKind::Received,
        EventKind::ImageStored,
        EventKind::ImageRetry,
        EventKind::ImageFailed,
        EventKind::Downloaded,
        EventKind::Failed,
        EventKind::Retried,
        EventKind::Ignored,
        EventKind::UrlRefreshed,
        EventKind::Mismatch,
    ];

    /// Tasks over every state, source, failure and image state, with empty, unicode and
    /// long strings, `None` and `Some` everywhere, and extreme numbers.
    fn varied_tasks() -> Vec<Task> {
        let mut tasks = vec![
            Task::new("a".into(), None, 0),
            Task::new(String::new(), Some(String::new()), -1),
            Task::new("x".repeat(128), Some("é✓".into()), i64::MAX),
        ];
        let base = sample_task();
        for (i, state) in State::ALL.into_iter().enumerate() {
            for source in [None, Some(Source::Callback), Some(Source::Poll)] {
                for failure in [
                    None,
                    Some(Failure::Generation),
                    Some(Failure::NoResult),
                    Some(Failure::Download),
                ] {
                    let mut t = base.clone();
                    t.state = state;
                    t.source = source;
                    t.failure = failure;
                    t.callbacks = u32::MAX - i as u32;
                    t.confirmed = i % 2 == 0;
                    t.confirm_attempts = i as u32;
                    t.updated_at = i64::MIN + i as i64;
                    t.next_poll_at = 17;
                    t.submitted_at = 99;
                    if failure.is_none() {
                        t.error = None;
                    }
                    tasks.push(t);
                }
            }
        }
        let mut many = base.clone();
        many.images = (0..16)
            .map(|i| {
                let mut image =
                    Image::pending(i, format!("https://h/{}", "u".repeat(i as usize * 250)), 3);
                image.state = [
                    ImageState::Pending,
                    ImageState::Downloaded,
                    ImageState::Failed,
                ][i as usize % 3];
                image.bytes = (i % 2 == 0).then_some(u64::MAX);
                image.next_attempt_at = -5;
                image
            })
            .collect();
        tasks.push(many);
        tasks
    }

    fn varied_histories(task: &Task) -> Vec<Vec<EventRecord>> {
        let error = task.error.clone().unwrap_or_default();
        vec![
            Vec::new(),
            sample_history(),
            ALL_KINDS
                .iter()
                .enumerate()
                .map(|(i, &kind)| EventRecord {
                    at: i as i64 * 1000 - 3,
                    kind,
                    detail: match i % 4 {
                        0 => error.clone(),
                        1 => String::new(),
                        2 => "détail ✓".into(),
                        _ => "d".repeat(1024),
                    },
                })
                .collect(),
        ]
    }

    #[test]
    fn frozen_types_write_the_bytes_the_domain_types_wrote() {
        let mut compared = 0;
        for task in varied_tasks() {
            assert_eq!(
                encode_task_v1(&task).unwrap(),
                before_frozen::task_v1(&task)
            );
            for history in varied_histories(&task) {
                let bytes = encode_task(&task, &history).unwrap();
                assert_eq!(bytes, before_frozen::task(&task, &history), "{task:?}");
                assert_eq!(
                    decode_record(&bytes).unwrap(),
                    (task.clone(), Some(history))
                );
                compared += 1;
            }
            for (i, state) in NotifyState::ALL.into_iter().enumerate() {
                for kind in [NotifyType::Downloaded, NotifyType::Failed] {
                    let mut n = Notification::new(&task, i as u32, kind, task.created_at);
                    n.state = state;
                    n.error = (i % 2 == 0).then(|| "é".into());
                    let bytes = encode_notification(&n).unwrap();
                    assert_eq!(bytes, before_frozen::notification(&n));
                    assert_eq!(decode_notification(&bytes).unwrap(), n);
                }
            }
        }
        for (i, kind) in ALL_KINDS.into_iter().enumerate() {
            let e = EventRecord {
                at: i64::MIN + i as i64,
                kind,
                detail: "é".repeat(i),
            };
            assert_eq!(encode_event(&e).unwrap(), before_frozen::event(&e));
        }
        for body in [Vec::new(), b"{}".to_vec(), vec![0xff; 65536]] {
            let p = Parked {
                body: body.clone(),
                ..sample_parked()
            };
            assert_eq!(
                encode_parked(&p).unwrap(),
                before_frozen::parked(&p.route, p.received_at, &body)
            );
        }
        assert!(compared > 150, "{compared}");
    }

    #[test]
    fn intents_are_eight_bytes_big_endian() {
        assert_eq!(encode_intent(0x0102), [0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(
            decode_intent(&encode_intent(1_795_775_581_000)),
            1_795_775_581_000
        );
        assert_eq!(encode_intent(-1), [0; 8]);
        assert_eq!(decode_intent(&[1, 2]), 0);
        assert_eq!(decode_intent(&[0xff; 8]), 0);
    }
}
