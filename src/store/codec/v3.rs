//! The frozen record types of version 3 (issue 18, task kinds): `TaskRecordV3`, a `TaskV1`
//! (`v1`) followed by what kinds added (the task's kind and source track, and for each of
//! its files, in the order of the `TaskV1`'s images, its name, expected type and a music
//! track's description), then its history as version 2 writes it (`EntryV2`). Never edited
//! (see the codec's module doc): a change is a new version in a new file. Must not encode,
//! decode or know the envelopes.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::v1::TaskV1;
use super::v2::{EntryV2, history_from, history_of};
use super::{borrowed, owned};
use crate::model::{EventRecord, FileType, Image, Kind, Task};
use crate::store::{IntentState, KindIntent};

/// `StoredTask::V3`: the task as version 1 holds it, what kinds added, then its history.
#[derive(Serialize, Deserialize)]
pub(super) struct TaskRecordV3<'a> {
    task: TaskV1<'a>,
    kind: KindV3,
    audio_id: Option<Cow<'a, str>>,
    /// One per image of `task`, in the same order.
    files: Vec<FileV3<'a>>,
    history: Vec<EntryV2<'a>>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum KindV3 {
    Cover,
    Music,
    Wav,
    Video,
    Stems,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum FileTypeV3 {
    Image,
    Mp3,
    Wav,
    Mp4,
}

/// What version 3 adds to a `TaskV1` image.
#[derive(Serialize, Deserialize)]
struct FileV3<'a> {
    name: Cow<'a, str>,
    expect: FileTypeV3,
    audio_id: Option<Cow<'a, str>>,
    title: Option<Cow<'a, str>>,
    duration_ms: Option<u64>,
}

super::v1::frozen_enum!(Kind <=> KindV3 { Cover, Music, Wav, Video, Stems });
super::v1::frozen_enum!(FileType <=> FileTypeV3 { Image, Mp3, Wav, Mp4 });

impl<'a> TaskRecordV3<'a> {
    pub(super) fn new(task: &'a Task, history: &'a [EventRecord]) -> TaskRecordV3<'a> {
        // `TaskV1::from` takes every field `v1` knows; these are the rest (a field added to
        // `Task` fails to compile there until a version holds it).
        let Task { kind, audio_id, .. } = task;
        let files = task
            .images
            .iter()
            .map(|image| {
                let Image {
                    name,
                    expect,
                    audio_id,
                    title,
                    duration_ms,
                    ..
                } = image;
                FileV3 {
                    name: Cow::Borrowed(name),
                    expect: (*expect).into(),
                    audio_id: borrowed(audio_id),
                    title: borrowed(title),
                    duration_ms: *duration_ms,
                }
            })
            .collect();
        TaskRecordV3 {
            task: TaskV1::from(task),
            kind: (*kind).into(),
            audio_id: borrowed(audio_id),
            files,
            history: history_of(task, history),
        }
    }

    pub(super) fn into_domain(self) -> Result<(Task, Vec<EventRecord>), String> {
        let TaskRecordV3 {
            task,
            kind,
            audio_id,
            files,
            history,
        } = self;
        let mut task = Task::from(task);
        if files.len() != task.images.len() {
            return Err(format!(
                "{} file descriptions for {} files",
                files.len(),
                task.images.len()
            ));
        }
        task.kind = kind.into();
        task.audio_id = owned(audio_id);
        for (image, file) in task.images.iter_mut().zip(files) {
            let FileV3 {
                name,
                expect,
                audio_id,
                title,
                duration_ms,
            } = file;
            image.name = name.into_owned();
            image.expect = expect.into();
            image.audio_id = owned(audio_id);
            image.title = owned(title);
            image.duration_ms = duration_ms;
        }
        let history = history_from(&task, history);
        Ok((task, history))
    }
}

/// `StoredIntent::V1`: a submission of a kind other than cover (its key is the tree's).
#[derive(Serialize, Deserialize)]
pub(super) struct KindIntentV1<'a> {
    kind: KindV3,
    music_task_id: Option<Cow<'a, str>>,
    audio_id: Option<Cow<'a, str>>,
    recorded_at: i64,
    state: IntentStateV1,
    task_id: Option<Cow<'a, str>>,
    detail: Cow<'a, str>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum IntentStateV1 {
    Sending,
    Unknown,
    Done,
}

super::v1::frozen_enum!(IntentState <=> IntentStateV1 { Sending, Unknown, Done });

impl<'a> From<&'a KindIntent> for KindIntentV1<'a> {
    fn from(i: &'a KindIntent) -> KindIntentV1<'a> {
        let KindIntent {
            key: _,
            kind,
            music_task_id,
            audio_id,
            recorded_at,
            state,
            task_id,
            detail,
        } = i;
        KindIntentV1 {
            kind: (*kind).into(),
            music_task_id: borrowed(music_task_id),
            audio_id: borrowed(audio_id),
            recorded_at: *recorded_at,
            state: (*state).into(),
            task_id: borrowed(task_id),
            detail: Cow::Borrowed(detail),
        }
    }
}

impl KindIntentV1<'_> {
    pub(super) fn into_domain(self, key: &str) -> KindIntent {
        let KindIntentV1 {
            kind,
            music_task_id,
            audio_id,
            recorded_at,
            state,
            task_id,
            detail,
        } = self;
        KindIntent {
            key: key.to_string(),
            kind: kind.into(),
            music_task_id: owned(music_task_id),
            audio_id: owned(audio_id),
            recorded_at,
            state: state.into(),
            task_id: owned(task_id),
            detail: detail.into_owned(),
        }
    }
}
