//! Callbacks kept aside for task records that cannot be decoded (SPEC "Signals, failures,
//! exit status"): a delivery for a quarantined task is stored as it arrived, with the route
//! (task kind) it came on, and answered 200, instead of a 503 that KIE would retry three
//! times and then give up on. `callback::replay_parked` applies each once its record can be
//! read again (after an upgrade or a repair), at the daemon's start. Owns the `parked` tree
//! and its bounds; must not parse callbacks or decide anything about a task.
//!
//! Key: task id, 0x00, sled id (u64, big-endian: arrival order) → `StoredParked`.

use super::{Parked, Store, StoreError, codec};
use crate::model::Millis;

/// Deliveries kept aside per task: KIE sends a task's callback a few times at most (its
/// stages and retries); past this, more are answered 503 as before.
pub const MAX_PARKED_PER_TASK: usize = 16;
/// Deliveries kept aside in all (64 KiB each at most: 256 MiB on disk at the very worst).
pub const MAX_PARKED: usize = 4096;

fn prefix(task_id: &str) -> Vec<u8> {
    let mut key = task_id.as_bytes().to_vec();
    key.push(0);
    key
}

impl Store {
    /// Keeps a delivery for `task_id` aside. Not durable until the next flush: the caller
    /// awaits [`Store::flush`] before it answers. Refused ([`StoreError::ParkFull`]) past
    /// [`MAX_PARKED_PER_TASK`] for the task or [`MAX_PARKED`] in all.
    pub fn park(
        &self,
        task_id: &str,
        route: &str,
        body: &[u8],
        now: Millis,
    ) -> Result<(), StoreError> {
        if let Some(reason) = self.write_failure() {
            return Err(StoreError::Unwritable(reason));
        }
        let tree = &self.inner.parked;
        let full = |why: String| StoreError::ParkFull {
            task_id: task_id.to_string(),
            why,
        };
        if tree
            .scan_prefix(prefix(task_id))
            .take(MAX_PARKED_PER_TASK)
            .count()
            >= MAX_PARKED_PER_TASK
        {
            return Err(full(format!("{MAX_PARKED_PER_TASK} already kept for it")));
        }
        if tree.iter().take(MAX_PARKED).count() >= MAX_PARKED {
            return Err(full(format!("{MAX_PARKED} already kept in all")));
        }
        let mut key = prefix(task_id);
        key.extend_from_slice(&self.inner.db.generate_id()?.to_be_bytes());
        let parked = Parked {
            key,
            task_id: task_id.to_string(),
            route: route.to_string(),
            received_at: now,
            body: body.to_vec(),
        };
        let value = codec::encode_parked(&parked).map_err(|e| StoreError::Corrupt {
            what: format!("kept delivery for task {task_id}"),
            reason: e.to_string(),
        })?;
        tree.insert(parked.key, value)?;
        Ok(())
    }

    /// The next delivery kept aside after the one keyed `after` (from the first with
    /// `None`), oldest first per task; one at a time, so that reading them holds one body in
    /// memory whatever the tree holds (it may come from a backup, which is untrusted). An
    /// entry that cannot be decoded is skipped with a warning (it stays where it is).
    pub fn parked_after(&self, after: Option<&Parked>) -> Result<Option<Parked>, StoreError> {
        let range = match after {
            Some(p) => self.inner.parked.range::<&[u8], _>((
                std::ops::Bound::Excluded(&p.key[..]),
                std::ops::Bound::Unbounded,
            )),
            None => self.inner.parked.range::<&[u8], _>(..),
        };
        for kv in range {
            let (key, value) = kv?;
            let task_id = match key.iter().position(|&b| b == 0) {
                Some(split) => String::from_utf8_lossy(&key[..split]).into_owned(),
                None => String::from_utf8_lossy(&key).into_owned(),
            };
            match codec::decode_parked(key.to_vec(), task_id.clone(), &value) {
                Ok(p) => return Ok(Some(p)),
                Err(e) => tracing::warn!(
                    task_id = %task_id,
                    "task {task_id}: a callback kept aside cannot be read ({e}); left as it is"
                ),
            }
        }
        Ok(None)
    }

    /// How many deliveries are kept aside for `task_id`.
    pub fn parked_count(&self, task_id: &str) -> Result<u64, StoreError> {
        let mut n = 0;
        for kv in self.inner.parked.scan_prefix(prefix(task_id)).keys() {
            kv?;
            n += 1;
        }
        Ok(n)
    }

    /// Forgets a delivery once it was applied (durably) or found unusable. Not durable until
    /// the next flush; applying it twice is harmless (a duplicate callback).
    pub fn unpark(&self, parked: &Parked) -> Result<(), StoreError> {
        self.inner.parked.remove(&parked.key)?;
        Ok(())
    }
}
