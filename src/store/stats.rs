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
const FORMAT_KEY: &[u8] = b"stats/envelope";
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Ctx, Event, Report};
    use crate::model::Millis;
    use crate::store::IfMissing;

    fn ctx(now: Millis) -> Ctx {
        Ctx {
            now,
            max_attempts: 3,
            poll_after_ms: 1000,
            notify: false,
        }
    }

    fn apply(store: &Store, id: &str, event: Event, now: Millis) {
        store
            .apply(id, &event, &ctx(now), IfMissing::Create)
            .unwrap()
            .unwrap();
    }

    fn stored(index: u32, bytes: u64) -> Event {
        Event::ImageStored {
            index,
            path: format!("images/x/{index}.png"),
            bytes,
            sha256: "ab".repeat(32),
        }
    }

    /// Tasks in every state; `a` and `b` store 100 + 20 and 7 bytes.
    fn fill(store: &Store) {
        let success = |n: usize| {
            Event::Callback(Report::Success {
                images: (0..n).map(|i| format!("https://h/{i}.png")).collect(),
            })
        };
        apply(store, "a", success(2), 1);
        apply(store, "a", stored(0, 100), 2);
        apply(store, "a", stored(1, 20), 3);
        apply(store, "b", success(2), 4);
        apply(store, "b", stored(1, 7), 5);
        apply(
            store,
            "c",
            Event::Track {
                music_task_id: None,
            },
            6,
        );
        let failure = Event::Callback(Report::Failure {
            reason: "KIE code 501: no".into(),
        });
        apply(store, "d", failure, 7);
    }

    /// A record damaged on disk, found by a read.
    fn damage(store: &Store, id: &str) {
        store.put_raw_task(id, b"\xde\xad not a record").unwrap();
        assert!(store.get(id).unwrap_err().is_undecodable());
    }

    fn quarantined_ids(store: &Store) -> (Vec<String>, u64) {
        let (named, total) = store.quarantined(100).unwrap();
        (named.into_iter().map(|q| q.task_id).collect(), total)
    }

    /// `admin verify`'s check: one scan, then the comparison.
    fn check(store: &Store) -> StatsVerdict {
        let mut check = store.stats_check();
        for scanned in store.all_tasks() {
            check.add(&scanned.unwrap());
        }
        store.finish_stats_check(check).unwrap()
    }

    fn counts(submitted: u64, received: u64, downloaded: u64, failed: u64) -> Counts {
        Counts {
            submitted,
            received,
            downloaded,
            failed,
        }
    }

    #[test]
    fn bytes_and_quarantine_follow_every_change_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fill(&store);
        assert_eq!(store.stored_bytes().unwrap(), 127);
        assert_eq!(store.counts().unwrap(), counts(1, 1, 1, 1));
        // A retry of a downloaded task whose file is damaged: its bytes are not stored now.
        apply(&store, "a", Event::Retry { damaged: vec![0] }, 8);
        assert_eq!(store.stored_bytes().unwrap(), 27);
        assert_eq!(check(&store), StatsVerdict::Agreed);

        // A quarantine event: the read that finds it puts it in the index.
        assert_eq!(quarantined_ids(&store), (vec![], 0));
        damage(&store, "c");
        assert_eq!(quarantined_ids(&store), (vec!["c".to_string()], 1));
        // The counters still count it as it was: verify's check sees the difference and
        // derives them again from the records.
        let StatsVerdict::Repaired(what) = check(&store) else {
            panic!("not repaired")
        };
        assert!(what.contains("counts per state"), "{what}");
        assert_eq!(store.counts().unwrap(), counts(0, 2, 0, 1));
        assert_eq!(check(&store), StatsVerdict::Agreed);

        // Kept across a restart, without a scan.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(quarantined_ids(&store), (vec!["c".to_string()], 1));
        assert_eq!(store.stored_bytes().unwrap(), 27);
        // Repaired (made readable again): out of the index in the same write.
        let readable = codec::encode_task(&Task::new("c".into(), None, 6), &[]).unwrap();
        store.put_raw_task("c", &readable).unwrap();
        assert_eq!(quarantined_ids(&store), (vec![], 0));
    }

    #[test]
    fn verify_repairs_counters_and_index_that_disagree_with_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fill(&store);
        damage(&store, "d");
        // The counters still count the damaged record as it was: the first check repairs.
        assert!(matches!(check(&store), StatsVerdict::Repaired(_)));
        assert_eq!(check(&store), StatsVerdict::Agreed);
        let meta = &store.inner.meta;
        meta.insert(BYTES_KEY, &5u64.to_be_bytes()).unwrap();
        meta.insert(count_key(State::Failed), &9u64.to_be_bytes())
            .unwrap();
        meta.remove(quarantine_key(b"d")).unwrap();
        meta.insert(quarantine_key(b"a"), &[]).unwrap();
        meta.insert(quarantine_key(b"gone"), &[]).unwrap();
        // `status` shows only what is really quarantined, even from a stale index (and
        // what this process found, even when the index lost it).
        assert_eq!(quarantined_ids(&store), (vec!["d".to_string()], 1));
        let StatsVerdict::Repaired(what) = check(&store) else {
            panic!("not repaired")
        };
        assert!(what.contains("bytes stored were 5"), "{what}");
        assert!(what.contains("2 of them readable or gone"), "{what}");
        assert_eq!(store.stored_bytes().unwrap(), 127);
        assert_eq!(store.counts().unwrap(), counts(1, 1, 1, 0));
        assert_eq!(quarantined_ids(&store), (vec!["d".to_string()], 1));
        assert_eq!(check(&store), StatsVerdict::Agreed);

        // A record changed during the scan: not compared, nothing written.
        let mut during = store.stats_check();
        for scanned in store.all_tasks() {
            during.add(&scanned.unwrap());
        }
        apply(
            &store,
            "e",
            Event::Track {
                music_task_id: None,
            },
            9,
        );
        meta.insert(BYTES_KEY, &5u64.to_be_bytes()).unwrap();
        assert!(matches!(
            store.finish_stats_check(during).unwrap(),
            StatsVerdict::NotCompared(_)
        ));
        assert_eq!(store.stored_bytes().unwrap(), 5);
    }

    /// Restore and backup write copies with statistics derived from them, never the
    /// source's (a backup is untrusted input).
    #[test]
    fn copies_derive_the_statistics_instead_of_copying_them() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (src, dst) = (
            Store::open(d1.path()).unwrap(),
            Store::open(d2.path()).unwrap(),
        );
        fill(&src);
        src.put_raw_task("q", b"\xde\xad not a record").unwrap();
        // Lies in the source's meta: not believed.
        let meta = &src.inner.meta;
        meta.insert(BYTES_KEY, &999u64.to_be_bytes()).unwrap();
        meta.insert(quarantine_key(b"a"), &[]).unwrap();
        meta.insert(FORMAT_KEY, &0u32.to_be_bytes()).unwrap();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let chunk = src.read_tasks(after.as_deref(), 2).unwrap();
            let Some(last) = chunk.last() else { break };
            after = Some(last.key().to_vec());
            dst.put_copies(&chunk).unwrap();
        }
        src.copy_other_trees(&dst).unwrap();
        assert_eq!(dst.stored_bytes().unwrap(), 127);
        assert_eq!(dst.counts().unwrap(), counts(1, 1, 1, 1));
        assert_eq!(quarantined_ids(&dst), (vec!["q".to_string()], 1));
        assert_eq!(check(&dst), StatsVerdict::Agreed);
        // Forgetting a task takes its bytes away.
        let a = dst.get("a").unwrap().unwrap();
        assert!(dst.forget("a", a.updated_at).unwrap());
        assert_eq!(dst.stored_bytes().unwrap(), 7);
        assert_eq!(check(&dst), StatsVerdict::Agreed);
    }

    /// Turns `dir`'s store into what the previous release (schema 2) wrote: no statistics.
    fn as_schema_2(dir: &std::path::Path) {
        let store = Store::open(dir).unwrap();
        let meta = &store.inner.meta;
        for k in meta.iter().keys() {
            let k = k.unwrap();
            if own_meta_key(&k) {
                meta.remove(k).unwrap();
            }
        }
        meta.insert("schema_version", &2u32.to_be_bytes()).unwrap();
        store.flush_now().unwrap();
    }

    #[test]
    fn a_schema_2_store_gets_its_statistics_derived_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            fill(&store);
            // Damage no one has read yet: the derivation finds it.
            store.put_raw_task("q", b"\xde\xad not a record").unwrap();
        }
        as_schema_2(dir.path());
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.inner.meta.get("schema_version").unwrap().as_deref(),
            Some(&super::super::SCHEMA_VERSION.to_be_bytes()[..])
        );
        assert_eq!(store.stored_bytes().unwrap(), 127);
        assert_eq!(store.counts().unwrap(), counts(1, 1, 1, 1));
        assert_eq!(quarantined_ids(&store), (vec!["q".to_string()], 1));
        assert_eq!(check(&store), StatsVerdict::Agreed);

        // A store another build's record format last indexed is derived again at open.
        store
            .inner
            .meta
            .insert(FORMAT_KEY, &(codec::ENVELOPE_VERSION + 1).to_be_bytes())
            .unwrap();
        store.inner.meta.insert(quarantine_key(b"a"), &[]).unwrap();
        store
            .inner
            .meta
            .insert(BYTES_KEY, &1u64.to_be_bytes())
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.stored_bytes().unwrap(), 127);
        assert_eq!(quarantined_ids(&store), (vec!["q".to_string()], 1));
        assert_eq!(check(&store), StatsVerdict::Agreed);
    }

    /// Builds the store of docs/benchmarks.md's `admin status` benchmark: `COVERD_BENCH_TASKS`
    /// (default 1,000,000) tasks written straight into `COVERD_BENCH_DIR` (which must not
    /// hold a store yet) in transactions of 10,000 with their derived indexes: 94 % downloaded
    /// with 2 images, 4 % failed, 1 % received, 1 % submitted, and 10 undecodable records;
    /// with `COVERD_BENCH_SCHEMA=2`, left as the previous release wrote it (no statistics,
    /// schema 2), for its binary. No image files. A tool, not a test:
    /// `scripts/bench-status`.
    #[test]
    #[ignore = "builds a benchmark's store"]
    fn build_status_bench_store() {
        use crate::model::{EventKind, EventRecord, Image};
        use sled::Transactional;
        let env = |k: &str| std::env::var(k).ok();
        let dir = std::path::PathBuf::from(env("COVERD_BENCH_DIR").expect("COVERD_BENCH_DIR"));
        let n: u64 = env("COVERD_BENCH_TASKS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let schema: u32 = env("COVERD_BENCH_SCHEMA")
            .and_then(|v| v.parse().ok())
            .unwrap_or(super::super::SCHEMA_VERSION);
        let started = std::time::Instant::now();
        let store = Store::open(&dir).unwrap();
        assert!(
            store.inner.tasks.is_empty(),
            "{} holds tasks",
            dir.display()
        );
        let t0: Millis = 1_780_000_000_000;
        let task_of = |i: u64| -> (Task, Vec<EventRecord>) {
            let id = format!("bench{i:07}-{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let at = t0 + i as Millis * 10;
            let mut t = Task::new(id, None, at);
            let note = |at, kind, detail: &str| EventRecord {
                at,
                kind,
                detail: detail.to_string(),
            };
            let mut history = vec![note(
                at,
                EventKind::Callback,
                "success callback, 2 image(s)",
            )];
            t.callbacks = 1;
            t.confirmed = true;
            t.images = (0..2)
                .map(|k| {
                    Image::pending(
                        k,
                        format!("https://tempfile.aiquickdraw.com/s/{i}_{k}.png"),
                        at,
                    )
                })
                .collect();
            match i % 100 {
                0 => {
                    t.images.clear();
                    history = vec![note(at, EventKind::Tracked, "tracked")];
                }
                1 => t.state = State::Received,
                2..=5 => {
                    t.state = State::Failed;
                    t.images.clear();
                    t.error = Some("KIE code 501: Cover generation failed".into());
                    history.push(note(
                        at + 1,
                        EventKind::Failed,
                        "KIE code 501: Cover generation failed",
                    ));
                }
                _ => {
                    t.state = State::Received;
                    for img in &mut t.images {
                        img.state = ImageState::Downloaded;
                        img.path = Some(format!("images/{}/{}.png", t.task_id, img.index));
                        img.bytes = Some(1_500_000 + (i % 1000) * 1000 + u64::from(img.index));
                        img.sha256 = Some("ab".repeat(32));
                        history.push(note(at + 5, EventKind::ImageStored, "image stored"));
                    }
                    t.state = State::Downloaded;
                    history.push(note(at + 6, EventKind::Downloaded, "2 image(s)"));
                }
            }
            t.updated_at = at + 6;
            t.event_count = history.len() as u32;
            (t, history)
        };
        let i = &*store.inner;
        const CHUNK: u64 = 10_000;
        for first in (0..n).step_by(CHUNK as usize) {
            let chunk: Vec<(Task, Vec<u8>)> = (first..(first + CHUNK).min(n))
                .map(|k| {
                    let (t, h) = task_of(k);
                    let bytes = codec::encode_task(&t, &h).unwrap();
                    (t, bytes)
                })
                .collect();
            (&i.meta, &i.tasks, &i.due_download, &i.due_poll, &i.by_state)
                .transaction(|(meta, tasks, due_download, due_poll, by_state)| {
                    let indexes = super::super::index::Indexes {
                        meta,
                        due_download,
                        due_poll,
                        by_state,
                    };
                    let mut deltas = super::super::index::Deltas::default();
                    for (t, bytes) in &chunk {
                        indexes.derive_into(&t.task_id, None, Some(t), &mut deltas)?;
                        tasks.insert(t.task_id.as_bytes(), bytes.as_slice())?;
                    }
                    deltas.write(meta)?;
                    Ok::<_, sled::transaction::ConflictableTransactionError<StoreError>>(())
                })
                .unwrap();
        }
        for q in 0..10 {
            let id = format!("bench-damaged-{q}");
            store.put_raw_task(&id, b"\xde\xad not a record").unwrap();
            // Found by a read, as the workers would (schema 2 has no index for them).
            assert!(store.get(&id).is_err());
        }
        store.flush_now().unwrap();
        drop(store);
        if schema == 2 {
            as_schema_2(&dir);
        }
        println!(
            "built a schema-{schema} store of {n} tasks in {} in {:.1} s",
            dir.display(),
            started.elapsed().as_secs_f64()
        );
    }
}
