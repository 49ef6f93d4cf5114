//! The on-disk encoding of every stored value: bincode 1.3.3 inside versioned envelopes.
//! Owns the byte format and its evolution; must not open trees or know about keys.
//!
//! Rules (bincode is not self-describing):
//! - every stored value is an envelope enum (`StoredTask`, `StoredEvent`,
//!   `StoredNotification`); variants are only
//!   ever appended, never reordered or removed;
//! - when `model::Task` changes shape, freeze the old shape here as `TaskV1` (a copy of the
//!   struct), point `V1` at it, add `V2(Task)` and an upgrade from `TaskV1` in `decode_task`;
//! - a `Notification` holds no `Task` (its body is already JSON), so a change of `Task` does
//!   not touch it; its own changes follow the same rule (`NotificationV1`, `V2`, upgrade);
//! - the fixtures in `fixtures/` are bytes written by released versions and must decode
//!   forever (see the tests below).
//!
//! `StoredTask::V2` (schema 2) carries the task's history inline, after the task; a `V1`
//! record's history is in the schema-1 `events` tree (one `StoredEvent` per entry), which
//! the store's migration folds into `V2` records.

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::model::{EventRecord, Notification, Task};

/// Largest value the decoder accepts; a task with 16 images and long URLs is a few KiB.
const MAX_VALUE_BYTES: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
enum StoredTask {
    V1(Task),
    /// Schema 2: the record and its whole history, oldest first.
    V2 {
        task: Task,
        history: Vec<StoredEntry>,
    },
}

/// One history entry of a `V2` record.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    at: crate::model::Millis,
    kind: crate::model::EventKind,
    detail: Detail,
}

/// A history entry's detail. A failure's reason is noted twice (the callback or poll that
/// reported it, then the failure) and is the task's `error` too: a detail equal to the
/// task's `error` when the record is written is stored as `TaskError`, not repeated (the
/// whole record is written at once, so it decodes to the same text).
#[derive(Serialize, Deserialize)]
enum Detail {
    Text(String),
    TaskError,
}

#[derive(Serialize, Deserialize)]
enum StoredEvent {
    V1(EventRecord),
}

#[derive(Serialize, Deserialize)]
enum StoredNotification {
    V1(Notification),
}

/// A callback kept aside because its task's record could not be decoded (SPEC "Signals,
/// failures, exit status"): the body exactly as it arrived and the route it came on.
#[derive(Serialize, Deserialize)]
enum StoredParked {
    V1(ParkedV1),
}

/// `StoredParked::V1`'s fields, frozen: its own type, not a domain type, so that nothing
/// changes these bytes but a new version here.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ParkedV1 {
    /// The task kind of the route it came on (`cover` for `/callbacks/cover`).
    pub route: String,
    pub received_at: crate::model::Millis,
    pub body: Vec<u8>,
}

/// The newest envelope version of `StoredParked` (`V1` only).
pub const PARKED_ENVELOPE_VERSION: u32 = 1;

/// The newest envelope version this build reads, of `StoredTask` (`V1`, `V2`); a newer
/// coverd appends `V3`, whose bincode variant index is 2.
pub const ENVELOPE_VERSION: u32 = 2;
/// The newest envelope version of `StoredEvent` and `StoredNotification` (`V1` only).
pub const EVENT_ENVELOPE_VERSION: u32 = 1;
pub const NOTIFICATION_ENVELOPE_VERSION: u32 = 1;
/// Variant indexes this far past the known ones still read as "a newer coverd": bincode
/// writes the index as the first 4 bytes (u32 LE), so any larger number is damage.
const PLAUSIBLE_NEWER_VERSIONS: u32 = 64;

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

/// A task record (schema 2: with its history inline).
pub fn encode_task(task: &Task, history: &[EventRecord]) -> Result<Vec<u8>, CodecError> {
    // The same bytes as `StoredTask::V2`, without cloning the task or the history.
    #[derive(Serialize)]
    enum Borrowed<'a> {
        #[allow(dead_code)]
        V1(&'a Task),
        V2 {
            task: &'a Task,
            history: Vec<Entry<'a>>,
        },
    }
    #[derive(Serialize)]
    struct Entry<'a> {
        at: crate::model::Millis,
        kind: crate::model::EventKind,
        detail: BorrowedDetail<'a>,
    }
    #[derive(Serialize)]
    enum BorrowedDetail<'a> {
        Text(&'a str),
        TaskError,
    }
    let history = history
        .iter()
        .map(|e| Entry {
            at: e.at,
            kind: e.kind,
            detail: if task.error.as_deref() == Some(e.detail.as_str()) {
                BorrowedDetail::TaskError
            } else {
                BorrowedDetail::Text(&e.detail)
            },
        })
        .collect();
    encode(&Borrowed::V2 { task, history })
}

/// A task record without its history.
pub fn decode_task(bytes: &[u8]) -> Result<Task, CodecError> {
    decode_record(bytes).map(|(task, _)| task)
}

/// A task record and its inline history: `None` for a schema-1 record (`V1`), whose
/// history is in the schema-1 `events` tree.
pub fn decode_record(bytes: &[u8]) -> Result<(Task, Option<Vec<EventRecord>>), CodecError> {
    match decode::<StoredTask>(bytes, "task", ENVELOPE_VERSION)? {
        StoredTask::V1(task) => Ok((task, None)),
        StoredTask::V2 { task, history } => {
            let history = history
                .into_iter()
                .map(|e| EventRecord {
                    at: e.at,
                    kind: e.kind,
                    detail: match e.detail {
                        Detail::Text(text) => text,
                        Detail::TaskError => task.error.clone().unwrap_or_default(),
                    },
                })
                .collect();
            Ok((task, Some(history)))
        }
    }
}

/// A schema-1 record (`V1`), as coverd wrote it before schema 2: for the migration's tests
/// (and the integration tests' schema-1 backups). Not used by coverd.
#[doc(hidden)]
pub fn encode_task_v1(task: &Task) -> Result<Vec<u8>, CodecError> {
    encode(&StoredTask::V1(task.clone()))
}

pub fn encode_event(event: &EventRecord) -> Result<Vec<u8>, CodecError> {
    encode(&StoredEvent::V1(event.clone()))
}

pub fn decode_event(bytes: &[u8]) -> Result<EventRecord, CodecError> {
    match decode::<StoredEvent>(bytes, "event", EVENT_ENVELOPE_VERSION)? {
        StoredEvent::V1(event) => Ok(event),
    }
}

pub fn encode_parked(p: &ParkedV1) -> Result<Vec<u8>, CodecError> {
    encode(&StoredParked::V1(p.clone()))
}

pub fn decode_parked(bytes: &[u8]) -> Result<ParkedV1, CodecError> {
    match decode::<StoredParked>(bytes, "kept delivery", PARKED_ENVELOPE_VERSION)? {
        StoredParked::V1(p) => Ok(p),
    }
}

pub fn encode_notification(n: &Notification) -> Result<Vec<u8>, CodecError> {
    encode(&StoredNotification::V1(n.clone()))
}

pub fn decode_notification(bytes: &[u8]) -> Result<Notification, CodecError> {
    match decode::<StoredNotification>(bytes, "notification", NOTIFICATION_ENVELOPE_VERSION)? {
        StoredNotification::V1(n) => Ok(n),
    }
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
        let kinds = [
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
        for kind in kinds {
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

    /// Writes the fixtures; run once per release with `cargo test -- --ignored write_fixtures`.
    /// (The checked-in files are the bytes of the release that introduced each format: do
    /// not rewrite an existing one.)
    #[test]
    #[ignore]
    fn write_fixtures() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/fixtures");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("task_v1.bin"),
            encode_task_v1(&sample_task()).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.join("task_v2.bin"),
            encode_task(&sample_task(), &sample_history()).unwrap(),
        )
        .unwrap();
        let e = EventRecord {
            at: 1_795_775_581_000,
            kind: EventKind::ImageStored,
            detail: "image 0 stored".into(),
        };
        std::fs::write(dir.join("event_v1.bin"), encode_event(&e).unwrap()).unwrap();
        std::fs::write(
            dir.join("notification_v1.bin"),
            encode_notification(&sample_notification()).unwrap(),
        )
        .unwrap();
    }
}
