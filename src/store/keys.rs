//! How the store spells its keys and fixed-width values: big-endian integers, so that byte
//! order is numeric order (`ms_bytes`, `u32_from`, `u64_from`), the keys of the due
//! indexes, `by_state` and schema 1's `events` (`time_key`, `state_key`, `event_key`), the
//! per-state counters (`count_key`) and the one read–add–write of a counter (`bump_key`).
//! Must not decide what is indexed or counted (`index`, `outbox`) nor read a record.

use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use crate::model::{Millis, State};

pub(super) fn u32_from(bytes: &[u8]) -> u32 {
    bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

pub(super) fn u64_from(bytes: &[u8]) -> u64 {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

pub(super) fn ms_bytes(ms: Millis) -> [u8; 8] {
    u64::try_from(ms).unwrap_or(0).to_be_bytes()
}

pub(super) fn count_key(state: State) -> Vec<u8> {
    let mut k = b"count/".to_vec();
    k.push(state.code());
    k
}

pub(super) fn time_key(at: Millis, task_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + task_id.len());
    k.extend_from_slice(&ms_bytes(at));
    k.extend_from_slice(task_id.as_bytes());
    k
}

pub(super) fn state_key(state: State, created: Millis, task_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + task_id.len());
    k.push(state.code());
    k.extend_from_slice(&time_key(created, task_id));
    k
}

pub(super) fn event_key(task_id: &str, seq: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(task_id.len() + 5);
    k.extend_from_slice(task_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Adds `delta` to the u64 counter at `key` in `meta` (saturating; absent reads as 0).
pub(super) fn bump_key(
    meta: &TransactionalTree,
    key: Vec<u8>,
    delta: i64,
) -> Result<(), UnabortableTransactionError> {
    let current = meta.get(&key)?.map(|v| u64_from(&v)).unwrap_or(0);
    let next = current.saturating_add_signed(delta);
    meta.insert(key, &next.to_be_bytes())?;
    Ok(())
}
