//! The due indexes' reads (`due_download`, `due_poll`: due ms, task id → ()): what is due
//! now, the queues in due order and the next due time, quarantined tasks left out. Must not
//! write them (they are derived in `index`, in the transaction that writes the record).

use super::Store;
use super::error::StoreError;
use super::keys::u64_from;
use crate::model::Millis;

impl Store {
    /// Task ids whose download is due at or before `now`, earliest first, at most `limit`.
    pub fn due_downloads(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        self.due(&self.inner.due_download, now, limit)
    }

    /// Task ids whose poll is due at or before `now`, earliest first, at most `limit`.
    pub fn due_polls(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        self.due(&self.inner.due_poll, now, limit)
    }

    /// The first `limit` entries of the download index, earliest first, due or not;
    /// quarantined tasks left out.
    pub fn download_queue(&self, limit: usize) -> Result<Vec<(Millis, String)>, StoreError> {
        self.queue(&self.inner.due_download, limit)
    }

    /// The first `limit` entries of the poll index, earliest first, due or not; quarantined
    /// tasks left out.
    pub fn poll_queue(&self, limit: usize) -> Result<Vec<(Millis, String)>, StoreError> {
        self.queue(&self.inner.due_poll, limit)
    }

    /// The earliest due time of any download, if one is scheduled.
    pub fn next_download_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self
            .queue(&self.inner.due_download, 1)?
            .first()
            .map(|e| e.0))
    }

    /// The earliest due time of any poll, if one is scheduled.
    pub fn next_poll_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self.queue(&self.inner.due_poll, 1)?.first().map(|e| e.0))
    }

    /// The first `limit` entries of a due index that are not quarantined. Looks past at
    /// most as many entries as there are quarantined tasks.
    fn queue(&self, tree: &sled::Tree, limit: usize) -> Result<Vec<(Millis, String)>, StoreError> {
        let mut out = Vec::new();
        for kv in tree.iter() {
            if out.len() >= limit {
                break;
            }
            let (k, _) = kv?;
            let id = k.get(8..).unwrap_or_default();
            if self.is_quarantined(id) {
                continue;
            }
            let at = i64::try_from(u64_from(&k)).unwrap_or(i64::MAX);
            out.push((at, String::from_utf8_lossy(id).into_owned()));
        }
        Ok(out)
    }

    fn due(&self, tree: &sled::Tree, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self
            .queue(tree, limit)?
            .into_iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, id)| id)
            .collect())
    }
}
