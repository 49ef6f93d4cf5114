//! A task's history inside its record: reading a record with its history (a schema-1
//! record's history moved out of `events` in the same transaction), appending an update's
//! notes (past `MAX_EVENTS_PER_TASK`, repetitive ones dropped), and keeping it within the
//! record's size limit. Must not decide what is noted (`machine`) nor write the record.

use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::MAX_EVENTS_PER_TASK;
use super::codec;
use super::error::TxResult;
use super::keys::event_key;
use super::record::decode_record;
use crate::model::{EventKind, EventRecord, Millis, Task};

/// A task record and its history, in a transaction. A schema-1 record's history is moved
/// out of `events` (its entries removed there: the caller writes the record back in the
/// same transaction); entries that cannot be decoded stay there, where `history` names
/// them. A record that cannot be decoded aborts with the reason.
pub(super) fn read_record(
    bytes: &[u8],
    task_id: &str,
    events: &TransactionalTree,
) -> TxResult<(Task, Vec<EventRecord>)> {
    let (task, history) =
        decode_record(bytes, task_id).map_err(ConflictableTransactionError::Abort)?;
    if let Some(history) = history {
        return Ok((task, history));
    }
    let mut history = Vec::new();
    for seq in 0..task.event_count {
        let key = event_key(task_id, seq);
        if let Some(v) = events.get(&key)?
            && let Ok(event) = codec::decode_event(&v)
        {
            history.push(event);
            events.remove(key)?;
        }
    }
    Ok((task, history))
}

/// Longest detail kept in a history entry, in bytes (cut at a character boundary): with
/// `MAX_EVENTS_PER_TASK`, bounds a record with its history (`codec`'s value limit).
pub(super) const MAX_DETAIL_BYTES: usize = 1024;

/// Appends `notes` to a task's history. Past [`MAX_EVENTS_PER_TASK`] entries, repetitive
/// notes are dropped; state changes are always kept.
pub(super) fn append_history(
    task: &mut Task,
    history: &mut Vec<EventRecord>,
    notes: &[(EventKind, String)],
    now: Millis,
) {
    for (kind, detail) in notes {
        if task.event_count >= MAX_EVENTS_PER_TASK && is_repetitive(*kind) {
            continue;
        }
        let mut end = detail.len().min(MAX_DETAIL_BYTES);
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        history.push(EventRecord {
            at: now,
            kind: *kind,
            detail: detail[..end].to_string(),
        });
        task.event_count += 1;
    }
}

/// Bytes a record's history may take: the codec's value limit (1 MiB) less room for the
/// task itself (at most 16 images with 4 KiB URLs, a few KiB of error and ids).
pub(super) const MAX_HISTORY_BYTES: usize = 768 * 1024;

/// What a history entry costs in the record besides its detail: time, kind, detail tag and
/// length (bincode, fixed-width integers), rounded up.
pub(super) const ENTRY_OVERHEAD: usize = 24;

/// Keeps a history within [`MAX_HISTORY_BYTES`], so that its record can always be written:
/// details longer than [`MAX_DETAIL_BYTES`] are cut (schema 1 did not cut them, so a
/// migrated record may carry them); past the budget the oldest repetitive entries go first,
/// then the oldest of any kind but the first (how the task began). Returns how many entries
/// were dropped. Costs one pass over the entries' lengths while the history is small.
pub(super) fn fit_history(history: &mut Vec<EventRecord>) -> usize {
    for entry in history.iter_mut() {
        if entry.detail.len() > MAX_DETAIL_BYTES {
            let mut end = MAX_DETAIL_BYTES;
            while !entry.detail.is_char_boundary(end) {
                end -= 1;
            }
            entry.detail.truncate(end);
        }
    }
    let cost = |e: &EventRecord| e.detail.len() + ENTRY_OVERHEAD;
    let mut total: usize = history.iter().map(cost).sum();
    if total <= MAX_HISTORY_BYTES {
        return 0;
    }
    let before = history.len();
    let mut keep = vec![true; history.len()];
    for pass_repetitive_only in [true, false] {
        for (i, entry) in history.iter().enumerate().skip(1) {
            if total <= MAX_HISTORY_BYTES {
                break;
            }
            if keep[i] && (!pass_repetitive_only || is_repetitive(entry.kind)) {
                keep[i] = false;
                total -= cost(entry);
            }
        }
    }
    let mut flags = keep.into_iter();
    history.retain(|_| flags.next().unwrap_or(true));
    before - history.len()
}

/// Notes that may be dropped past [`MAX_EVENTS_PER_TASK`]: they change nothing (duplicates,
/// polls, ignored events, retries, a repeated `admin track`).
fn is_repetitive(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Tracked
            | EventKind::DuplicateCallback
            | EventKind::Polled
            | EventKind::Ignored
            | EventKind::ImageRetry
    )
}
