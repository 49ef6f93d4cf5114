//! The frozen record types of version 2 (schema 2, issue 9): `TaskRecordV2`, a `TaskV1`
//! (`v1`) with its whole history (`EntryV2`, oldest first; a detail equal to the task's
//! `error` is stored as `DetailV2::TaskError`, not repeated), and its conversions to and
//! from the domain types. Never edited (see the codec's module doc): a change is a new
//! version in a new file. Must not encode, decode or know the envelopes.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::v1::{EventKindV1, TaskV1};
use crate::model::{EventRecord, Task};

/// `StoredTask::V2`: the task, then its history.
#[derive(Serialize, Deserialize)]
pub(super) struct TaskRecordV2<'a> {
    task: TaskV1<'a>,
    history: Vec<EntryV2<'a>>,
}

/// One history entry of a `V2` record.
#[derive(Serialize, Deserialize)]
pub(super) struct EntryV2<'a> {
    at: i64,
    kind: EventKindV1,
    detail: DetailV2<'a>,
}

/// A history entry's detail. A failure's reason is noted twice (the callback or poll that
/// reported it, then the failure) and is the task's `error` too: a detail equal to the
/// task's `error` when the record is written is stored as `TaskError`, not repeated (the
/// whole record is written at once, so it decodes to the same text).
#[derive(Serialize, Deserialize)]
pub(super) enum DetailV2<'a> {
    Text(Cow<'a, str>),
    TaskError,
}

/// A history as version 2 (and 3) writes it.
pub(super) fn history_of<'a>(task: &Task, history: &'a [EventRecord]) -> Vec<EntryV2<'a>> {
    history
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
        .collect()
}

/// A history read back, given the task it belongs to.
pub(super) fn history_from(task: &Task, history: Vec<EntryV2<'_>>) -> Vec<EventRecord> {
    history
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
        .collect()
}

impl<'a> TaskRecordV2<'a> {
    /// Only tests write version 2 now (a store as the release before version 3 left it).
    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
    pub(super) fn new(task: &'a Task, history: &'a [EventRecord]) -> TaskRecordV2<'a> {
        TaskRecordV2 {
            task: TaskV1::from(task),
            history: history_of(task, history),
        }
    }

    pub(super) fn into_domain(self) -> (Task, Vec<EventRecord>) {
        let TaskRecordV2 { task, history } = self;
        let task = Task::from(task);
        let history = history_from(&task, history);
        (task, history)
    }
}
