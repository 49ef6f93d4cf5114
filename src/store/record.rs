//! A stored record's bytes to and from its domain value with the store's errors: the codec's
//! results (`codec::CodecError`) as `StoreError`s naming the record (a task, a
//! notification), a record written by a newer coverd told from damage. Must not touch
//! trees or keys (callers read and write the bytes).

use sled::transaction::ConflictableTransactionError;

use super::codec;
use super::error::{StoreError, TxResult, quarantine_reason};
use crate::model::{EventRecord, Notification, Task};

pub(super) fn encode(
    bytes: Result<Vec<u8>, codec::CodecError>,
    task_id: &str,
) -> TxResult<Vec<u8>> {
    bytes.map_err(|e| {
        ConflictableTransactionError::Abort(StoreError::Corrupt {
            what: format!("task {task_id}"),
            reason: e.to_string(),
        })
    })
}

pub(super) fn decode(bytes: &[u8], task_id: &str) -> Result<Task, StoreError> {
    decode_record(bytes, task_id).map(|(task, _)| task)
}

/// A task record and its inline history (`None`: a schema-1 record).
pub(super) fn decode_record(
    bytes: &[u8],
    task_id: &str,
) -> Result<(Task, Option<Vec<EventRecord>>), StoreError> {
    codec::decode_record(bytes).map_err(|e| undecodable(e, format!("task {task_id}")))
}

pub(super) fn decode_notification(bytes: &[u8], task_id: &str) -> Result<Notification, StoreError> {
    codec::decode_notification(bytes)
        .map_err(|e| undecodable(e, format!("notification of task {task_id}")))
}

/// The reason a record (`what`) could not be decoded: written by a newer coverd, or damage.
fn undecodable(e: codec::CodecError, what: String) -> StoreError {
    match e {
        codec::CodecError::Newer { found, known, .. } => StoreError::Newer { what, found, known },
        other => StoreError::Corrupt {
            what,
            reason: other.to_string(),
        },
    }
}

/// [`quarantine_reason`] of a codec error.
pub(super) fn codec_reason(err: codec::CodecError) -> String {
    quarantine_reason(&undecodable(err, String::new()))
}
