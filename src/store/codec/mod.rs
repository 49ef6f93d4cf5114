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
//!   holds, or to `Notification`, or to `store::Parked`) is therefore a compile error here;
//!   the fix is a new version: new frozen types (copies of the old ones with the change),
//!   a new envelope variant that holds them (`StoredTask::V3`), the encoder writing it,
//!   the decoder reading every variant, a constant bumped, and a fixture written by the
//!   release that introduces it (`fixtures/`, tests in `tests.rs`);
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
//!   What coverd wrote before task kinds.
//! - `StoredTask::V3(TaskRecordV3)` (issue 18, task kinds): the same `TaskV1`, then the
//!   task's kind and source track, a description of each file (name, expected type, a music
//!   track's id, title and duration), then the history as `V2` writes it. What coverd
//!   writes. A `V1` or `V2` record is a cover task's, its files named by their index.
//! - `StoredNotification::V1(NotificationV1)`: an outbox entry (it holds no task: its body is
//!   already JSON).
//! - `StoredParked::V1(ParkedV1)`: a callback kept aside (`store::parked`).
//! - `StoredIntent::V1(KindIntentV1)` (issue 18): a submission of a kind other than cover
//!   (`store::intent`).
//!
//! Not enveloped: an intent (`intents` tree) is the time it was recorded, 8 bytes, ms
//! big-endian (`encode_intent`); the indexes and counters are fixed-width integers the store
//! derives. A change of those is a new tree, not a new version.
//!
//! A coverd reading an envelope variant past the ones it knows reports it as written by a
//! newer coverd (`CodecError::Newer`), not as damage; the store quarantines such a record
//! (docs/operations.md, "Upgrades").

//!
//! Files: this one holds the envelopes, the version constants, bincode's options, the
//! encoders and decoders (envelope dispatch, a newer envelope told from damage) and the
//! intents' value; each version's frozen types and their conversions are in a file of their
//! own (`v1.rs`, `v2.rs`, `v3.rs`), a new version in a new file.

use std::borrow::Cow;

use bincode::Options;
use serde::{Deserialize, Serialize};

use super::Parked;
use crate::model::{EventRecord, Millis, Notification, Task};

mod v1;
mod v2;
mod v3;

use self::v1::{EventV1, NotificationV1, ParkedV1, TaskV1};
use self::v2::TaskRecordV2;
use self::v3::{KindIntentV1, TaskRecordV3};

/// Largest value the decoder accepts; a task with 16 images and long URLs is a few KiB.
const MAX_VALUE_BYTES: u64 = 1 << 20;

// ---- envelopes ----

#[derive(Serialize, Deserialize)]
enum StoredTask<'a> {
    V1(TaskV1<'a>),
    /// Schema 2: the record and its whole history, oldest first.
    V2(TaskRecordV2<'a>),
    /// Task kinds: the record, its kind and files' descriptions, its history.
    V3(TaskRecordV3<'a>),
}

#[derive(Serialize, Deserialize)]
enum StoredEvent<'a> {
    V1(EventV1<'a>),
}

#[derive(Serialize, Deserialize)]
enum StoredNotification<'a> {
    V1(NotificationV1<'a>),
}

/// An intent of a kind other than cover (`store::intent`, tree `kind_intents`; its key is
/// not in the value).
#[derive(Serialize, Deserialize)]
enum StoredIntent<'a> {
    V1(KindIntentV1<'a>),
}

/// A callback kept aside because its task's record could not be decoded (SPEC "Signals,
/// failures, exit status"): the body exactly as it arrived and the route it came on.
#[derive(Serialize, Deserialize)]
enum StoredParked<'a> {
    V1(ParkedV1<'a>),
}

/// The newest envelope version this build reads, of `StoredTask` (`V1`, `V2`, `V3`); a
/// newer coverd appends `V4`, whose bincode variant index is 3.
pub const ENVELOPE_VERSION: u32 = 3;
/// The newest envelope version of `StoredEvent` and `StoredNotification` (`V1` only).
pub const EVENT_ENVELOPE_VERSION: u32 = 1;
pub const NOTIFICATION_ENVELOPE_VERSION: u32 = 1;
/// The newest envelope version of `StoredIntent` (`V1` only).
pub const INTENT_ENVELOPE_VERSION: u32 = 1;
/// The newest envelope version of `StoredParked` (`V1` only).
pub const PARKED_ENVELOPE_VERSION: u32 = 1;
/// Variant indexes this far past the known ones still read as "a newer coverd": bincode
/// writes the index as the first 4 bytes (u32 LE), so any larger number is damage.
const PLAUSIBLE_NEWER_VERSIONS: u32 = 64;

// ---- frozen record types (`v1`, `v2`, …): never edit one; add a version (module doc) ----
//
// Strings are `Cow`: encoding borrows from the domain value (no copy of a task's history
// for each write); decoding owns. A `Cow<str>` is written exactly as a `String`, a
// `Cow<[u8]>` exactly as a `Vec<u8>`. The helpers their conversions share:

fn borrowed(s: &Option<String>) -> Option<Cow<'_, str>> {
    s.as_deref().map(Cow::Borrowed)
}

fn owned(s: Option<Cow<'_, str>>) -> Option<String> {
    s.map(Cow::into_owned)
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

/// A task record with its history inline, as `StoredTask::V3`.
pub fn encode_task(task: &Task, history: &[EventRecord]) -> Result<Vec<u8>, CodecError> {
    encode(&StoredTask::V3(TaskRecordV3::new(task, history)))
}

/// A record as the release before task kinds wrote it (`V2`; a cover task): for tests of
/// stores that release left. Not used by coverd.
#[cfg(any(test, feature = "testing"))]
pub fn encode_task_v2(task: &Task, history: &[EventRecord]) -> Result<Vec<u8>, CodecError> {
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
        StoredTask::V3(record) => {
            let (task, history) = record.into_domain().map_err(|reason| CodecError::Corrupt {
                what: "task",
                reason,
            })?;
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

pub fn encode_kind_intent(i: &crate::store::KindIntent) -> Result<Vec<u8>, CodecError> {
    encode(&StoredIntent::V1(i.into()))
}

/// A kind intent's value, given its key.
pub fn decode_kind_intent(key: &str, bytes: &[u8]) -> Result<crate::store::KindIntent, CodecError> {
    match decode::<StoredIntent>(bytes, "intent", INTENT_ENVELOPE_VERSION)? {
        StoredIntent::V1(i) => Ok(i.into_domain(key)),
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
mod tests;
