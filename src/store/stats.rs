//! What `admin status` reads without a scan (issue 15 item 11), beside the per-state
//! counters (`count/<code>`, kept by `Indexes`): the bytes of stored files (`meta`
//! `stats/bytes`: the sum of the sizes recorded for downloaded images) and the index of
//! quarantined records (`meta` `quarantine/<record key>` → empty). Owns their keys, their
//! upkeep in the transactions that change records (`bytes_delta` for `Indexes`,
//! `note_record` for `put_copies` and `forget`), their derivation from the records (the
//! schema 2 → 3 migration, a store last opened by a build with another record format) and
//! `admin verify`'s check and repair of them, serialized with the writer by `Gate`.
//! Must not decide anything about a task, read image files, or trust what a copied store
//! says about itself (restore derives these anew, record by record).
//!
//! The quarantine index holds every record found undecodable: by any read (the workers,
//! `get`, whole-store scans), by the derivation, or when a copy writes one. A record that
//! no one has read since it was damaged on disk is not in it until a scan (`admin verify`,
//! `export`, `backup`) reads it; `status` re-reads each entry, so an entry whose record
//! became readable or went away is not shown.

use std::sync::{Mutex, MutexGuard};

use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::error::{StoreError, describe, quarantine_reason};
use super::keys::{count_key, u64_from};
use super::record::decode;
use super::{Core, Counts, Quarantined, Scanned, Store, codec};
use crate::model::{ImageState, State, Task};

/// `meta`: the bytes of stored files, u64.
pub(super) const BYTES_KEY: &[u8] = b"stats/bytes";
/// `meta`: the record format (`codec::ENVELOPE_VERSION`) of the build that derived the
/// quarantine index; another build re-derives it at open (what is undecodable depends on
/// the build reading it). Absent while a derivation runs.
pub(super) const FORMAT_KEY: &[u8] = b"stats/envelope";
/// `meta`: the quarantine index's key space; the rest of the key is the record's key.
const QUARANTINE_PREFIX: &[u8] = b"quarantine/";
/// Most quarantined records `admin status` names (it counts the rest).
pub const MAX_QUARANTINED_SHOWN: usize = 1000;
/// Most quarantined record keys `admin verify`'s check remembers to put back in the index.
const MAX_REMEMBERED: usize = 10_000;
/// How often a derivation at open reports progress (systemd's start timeout).
const PROGRESS_EVERY: std::time::Duration = super::migrate::MIGRATION_PROGRESS_EVERY;

/// `meta` keys of this module: derived, never copied from another store.
pub(super) fn own_meta_key(key: &[u8]) -> bool {
    key.starts_with(b"stats/") || key.starts_with(QUARANTINE_PREFIX)
}

pub(super) fn quarantine_key(record_key: &[u8]) -> Vec<u8> {
    let mut k = QUARANTINE_PREFIX.to_vec();
    k.extend_from_slice(record_key);
    k
}

/// The bytes a record says it has stored: its downloaded images' recorded sizes.
pub(super) fn stored_bytes(task: &Task) -> u64 {
    task.images
        .iter()
        .filter(|i| i.state == ImageState::Downloaded)
        .filter_map(|i| i.bytes)
        .fold(0, u64::saturating_add)
}

/// How the stored bytes change when record `old` becomes `new` (`None`: no record).
pub(super) fn bytes_delta(old: Option<&Task>, new: Option<&Task>) -> i64 {
    let of = |t: Option<&Task>| i128::from(t.map(stored_bytes).unwrap_or(0));
    let d = of(new) - of(old);
    i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

/// In a transaction that writes (or removes, `readable = true`) the record at `key`: keeps
/// its quarantine entry in step, present exactly when the record written cannot be decoded.
pub(super) fn note_record(
    meta: &TransactionalTree,
    key: &[u8],
    readable: bool,
) -> Result<(), UnabortableTransactionError> {
    let qk = quarantine_key(key);
    match (readable, meta.get(&qk)?.is_some()) {
        (true, true) => {
            meta.remove(qk)?;
        }
        (false, false) => {
            meta.insert(qk, &[])?;
        }
        _ => {}
    }
    Ok(())
}

/// Serializes the transactions that change task records (the writer's batches, copies,
/// forgetting) with `admin verify`'s repair, and counts them: a check whose scan saw no
/// change compared a truth that still holds.
#[derive(Default)]
pub(super) struct Gate(Mutex<u64>);

impl Gate {
    fn lock(&self) -> MutexGuard<'_, u64> {
        // A poisoned count is still a count.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f`, a change of task records, holding the gate, and counts it (the test hook
    /// that plants raw records; coverd's own changes go through the writer).
    #[cfg(any(test, feature = "testing"))]
    pub(super) fn changing<T>(&self, f: impl FnOnce() -> T) -> T {
        let _held = self.hold();
        f()
    }

    /// Holds the gate until the guard is dropped, and counts one change then.
    pub(super) fn hold(&self) -> Changing<'_> {
        Changing(self.lock())
    }
}

/// A change of task records under way ([`Gate::hold`]).
pub(super) struct Changing<'a>(MutexGuard<'a, u64>);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        *self.0 += 1;
    }
}

/// What the records add up to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Tally {
    counts: Counts,
    bytes: u64,
    quarantined: u64,
}

impl Tally {
    fn task(&mut self, t: &Task) {
        let c = &mut self.counts;
        match t.state {
            State::Submitted => c.submitted += 1,
            State::Received => c.received += 1,
            State::Downloaded => c.downloaded += 1,
            State::Failed => c.failed += 1,
        }
        self.bytes = self.bytes.saturating_add(stored_bytes(t));
    }
}

impl Core {
    /// At open, before anything else reads the store: derives the counters, the stored bytes
    /// and the quarantine index from every record when this build did not derive them (a
    /// schema-2 store, a store another build's records format last indexed, a derivation
    /// that was interrupted), or always with `force` (a store of an older schema: an older
    /// coverd may have written it after a derivation whose schema flip did not happen).
    /// Returns whether it derived.
    pub(super) fn check_stats(
        &self,
        force: bool,
        progress: &dyn Fn(u64),
    ) -> Result<bool, StoreError> {
        let current = self.meta.get(FORMAT_KEY)?;
        if !force && current.as_deref() == Some(&codec::ENVELOPE_VERSION.to_be_bytes()[..]) {
            return Ok(false);
        }
        self.derive_stats(progress)?;
        Ok(true)
    }

    /// Marks a new, empty store's statistics as derived (all zero).
    pub(super) fn init_stats(&self) -> Result<(), StoreError> {
        self.meta
            .insert(FORMAT_KEY, &codec::ENVELOPE_VERSION.to_be_bytes())?;
        Ok(())
    }

    /// Reads every record once: per-state counters, stored bytes, the quarantine index.
    /// Safe to stop at any point: the format key goes first and comes back last, so an
    /// interrupted run runs again at the next open. Blocking; at open only (nothing else
    /// writes meanwhile).
    fn derive_stats(&self, progress: &dyn Fn(u64)) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let mut reported = started;
        self.meta.remove(FORMAT_KEY)?;
        for k in self.meta.scan_prefix(QUARANTINE_PREFIX).keys() {
            self.meta.remove(k?)?;
        }
        let mut tally = Tally::default();
        let mut read = 0u64;
        for kv in self.tasks.iter() {
            let (k, v) = kv?;
            match codec::decode_task(&v) {
                Ok(task) => tally.task(&task),
                Err(_) => {
                    tally.quarantined += 1;
                    self.meta.insert(quarantine_key(&k), &[])?;
                }
            }
            read += 1;
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = std::time::Instant::now();
                progress(read);
            }
        }
        self.write_tally(&tally)?;
        self.init_stats()?;
        self.db.flush()?;
        tracing::info!(
            records = read,
            quarantined = tally.quarantined,
            took_ms = started.elapsed().as_millis() as u64,
            "store statistics derived from {read} task records ({} quarantined): counts per state, bytes stored, quarantined records",
            tally.quarantined
        );
        Ok(())
    }

    fn write_tally(&self, tally: &Tally) -> Result<(), StoreError> {
        let c = &tally.counts;
        for (state, n) in [
            (State::Submitted, c.submitted),
            (State::Received, c.received),
            (State::Downloaded, c.downloaded),
            (State::Failed, c.failed),
        ] {
            self.meta.insert(count_key(state), &n.to_be_bytes())?;
        }
        self.meta.insert(BYTES_KEY, &tally.bytes.to_be_bytes())?;
        Ok(())
    }

    /// Remembers, durably with the next flush, that the record at `key` cannot be decoded
    /// (found by a read). A failure to write is logged: this process still knows it.
    pub(super) fn persist_quarantined(&self, key: &[u8]) {
        if let Err(e) = self.meta.insert(quarantine_key(key), &[]) {
            tracing::warn!(
                key = %String::from_utf8_lossy(key),
                error = %describe(&e),
                "could not add a quarantined record to the store's index; `admin verify` adds it again"
            );
        }
    }
}

/// What `admin verify` concluded about the derived statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsVerdict {
    /// They agree with the records.
    Agreed,
    /// They did not; they were derived again from the scan. What differed, in words.
    Repaired(String),
    /// Records changed during the scan, so it could not tell; in words.
    NotCompared(String),
}

/// `admin verify`'s check of the derived statistics: feed it every record of one scan
/// ([`StatsCheck::add`]), then [`Store::finish_stats_check`].
pub struct StatsCheck {
    epoch: u64,
    tally: Tally,
    /// Keys of the quarantined records seen (at most `MAX_REMEMBERED`).
    quarantined: Vec<Vec<u8>>,
}

impl StatsCheck {
    /// Adds one record of the scan.
    pub fn add(&mut self, scanned: &Scanned) {
        match scanned {
            Scanned::Task(t) => self.tally.task(t),
            Scanned::Quarantined(q) => {
                self.tally.quarantined += 1;
                if self.quarantined.len() < MAX_REMEMBERED {
                    self.quarantined.push(q.key.clone());
                }
            }
        }
    }
}

impl Store {
    /// Bytes of stored files, as recorded (no walk of the data directory).
    pub fn stored_bytes(&self) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .meta
            .get(BYTES_KEY)?
            .map(|v| u64_from(&v))
            .unwrap_or(0))
    }

    /// The quarantined records, in key order: at most `limit` of them named with their
    /// reason (each re-read: an entry whose record is readable now, or gone, is left out),
    /// and how many the index holds in all. Reads the index and those records, not the
    /// store.
    pub fn quarantined(&self, limit: usize) -> Result<(Vec<Quarantined>, u64), StoreError> {
        let mut keys: std::collections::BTreeSet<Vec<u8>> = std::collections::BTreeSet::new();
        let mut total = 0u64;
        for k in self.inner.meta.scan_prefix(QUARANTINE_PREFIX).keys() {
            let k = k?;
            total += 1;
            if keys.len() < limit {
                keys.insert(k[QUARANTINE_PREFIX.len()..].to_vec());
            }
        }
        // Found by this process but not in the index (its write failed): still named.
        for id in self.inner.quarantined_ids().keys() {
            let key = id.as_bytes();
            if self.inner.meta.get(quarantine_key(key))?.is_none() {
                total += 1;
                if keys.len() < limit {
                    keys.insert(key.to_vec());
                }
            }
        }
        let mut named = Vec::with_capacity(keys.len());
        for key in keys {
            let task_id = String::from_utf8_lossy(&key).into_owned();
            let Some(bytes) = self.inner.tasks.get(&key)? else {
                total = total.saturating_sub(1);
                continue;
            };
            match decode(&bytes, &task_id) {
                Ok(_) => total = total.saturating_sub(1),
                Err(e) => named.push(Quarantined {
                    reason: quarantine_reason(&e),
                    task_id,
                    key,
                }),
            }
        }
        Ok((named, total))
    }

    /// Starts `admin verify`'s check of the derived statistics, before its scan.
    pub fn stats_check(&self) -> StatsCheck {
        StatsCheck {
            epoch: *self.inner.stats_gate.lock(),
            tally: Tally::default(),
            quarantined: Vec::new(),
        }
    }

    /// Compares the per-state counters, the stored bytes and the quarantine index with what
    /// the scan found, and when they differ writes the scan's values in their place. Only
    /// when no task record changed since [`Store::stats_check`] (always so with the daemon
    /// stopped): otherwise the scan is not one moment's truth, and nothing is written. Holds
    /// the writer's updates back while it compares and writes (a few reads and writes, and
    /// a pass over the quarantine index).
    pub fn finish_stats_check(&self, check: StatsCheck) -> Result<StatsVerdict, StoreError> {
        let i = &*self.inner;
        let epoch = i.stats_gate.lock();
        if *epoch != check.epoch {
            return Ok(StatsVerdict::NotCompared(format!(
                "{} change(s) of task records during the scan; run verify again with the daemon stopped to compare them",
                *epoch - check.epoch
            )));
        }
        let mut differed = Vec::new();
        let stored = self.counts()?;
        let want = &check.tally;
        if stored != want.counts {
            let c = &want.counts;
            differed.push(format!(
                "counts per state were {} submitted, {} received, {} downloaded, {} failed; the records hold {}, {}, {}, {}",
                stored.submitted,
                stored.received,
                stored.downloaded,
                stored.failed,
                c.submitted,
                c.received,
                c.downloaded,
                c.failed
            ));
        }
        let bytes = self.stored_bytes()?;
        if bytes != want.bytes {
            differed.push(format!(
                "bytes stored were {bytes}; the records say {}",
                want.bytes
            ));
        }
        // Stale entries: records readable now, or gone.
        let mut stale = Vec::new();
        let mut indexed = 0u64;
        for k in i.meta.scan_prefix(QUARANTINE_PREFIX).keys() {
            let k = k?;
            let key = &k[QUARANTINE_PREFIX.len()..];
            let undecodable = match i.tasks.get(key)? {
                Some(v) => codec::decode_task(&v).is_err(),
                None => false,
            };
            if undecodable {
                indexed += 1;
            } else {
                stale.push(k.to_vec());
            }
        }
        let missing: Vec<&Vec<u8>> = check
            .quarantined
            .iter()
            .filter(|k| matches!(i.meta.get(quarantine_key(k)), Ok(None)))
            .collect();
        if !stale.is_empty() || !missing.is_empty() || indexed != want.quarantined {
            differed.push(format!(
                "the quarantine index named {} record(s), {} of them readable or gone; the records hold {} undecodable",
                indexed + stale.len() as u64,
                stale.len(),
                want.quarantined
            ));
        }
        if differed.is_empty() {
            return Ok(StatsVerdict::Agreed);
        }
        i.write_tally(want)?;
        for k in stale {
            i.meta.remove(k)?;
        }
        for k in missing {
            i.meta.insert(quarantine_key(k), &[])?;
        }
        let what = differed.join("; ");
        tracing::warn!(
            "store statistics disagreed with the task records and were derived again: {what}"
        );
        Ok(StatsVerdict::Repaired(what))
    }
}
