//! The frozen record types of version 1 (0.1.0, schema 1): `TaskV1` (held by
//! `StoredTask::V1`, and unchanged by `V2`) with its images and enums, `EventV1` (schema 1's
//! history entries, `StoredEvent::V1`), `EventKindV1` (shared by `v2`'s entries),
//! `NotificationV1`, `ParkedV1`, and their exhaustive conversions to and from the domain
//! types. Never edited (see the codec's module doc): a change is a new version in a new
//! file. Must not encode, decode or know the envelopes.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::{borrowed, owned};
use crate::model::{
    EventKind, EventRecord, Failure, Image, ImageState, Notification, NotifyState, NotifyType,
    Source, State, Task,
};
use crate::store::Parked;

/// A task as `StoredTask::V1` and `V2` hold it (the shape of `model::Task` in 0.1.0).
#[derive(Serialize, Deserialize)]
pub(super) struct TaskV1<'a> {
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

/// A schema-1 history entry (`events` tree), `StoredEvent::V1`.
#[derive(Serialize, Deserialize)]
pub(super) struct EventV1<'a> {
    at: i64,
    kind: EventKindV1,
    detail: Cow<'a, str>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
pub(super) enum EventKindV1 {
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
pub(super) struct NotificationV1<'a> {
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
pub(super) struct ParkedV1<'a> {
    /// The task kind of the route it came on (`cover` for `/callbacks/cover`).
    route: Cow<'a, str>,
    received_at: i64,
    body: Cow<'a, [u8]>,
}

// ---- conversions: exhaustive on purpose (the codec's module doc) ----

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
pub(super) use frozen_enum;

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

impl<'a> From<&'a Task> for TaskV1<'a> {
    fn from(task: &'a Task) -> TaskV1<'a> {
        // `kind` and `audio_id` (version 3) are not in this version: `v3` writes them beside
        // it, and a record of this version alone is a cover's.
        let Task {
            task_id,
            kind: _,
            music_task_id,
            audio_id: _,
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
            kind: crate::model::Kind::Cover,
            music_task_id: owned(music_task_id),
            audio_id: None,
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
        // What version 3 added to a file (`v3` writes it beside this).
        let Image {
            index,
            name: _,
            expect: _,
            audio_id: _,
            title: _,
            duration_ms: _,
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
            name: index.to_string(),
            expect: crate::model::FileType::Image,
            audio_id: None,
            title: None,
            duration_ms: None,
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
    pub(super) fn into_domain(self, key: Vec<u8>, task_id: String) -> Parked {
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
