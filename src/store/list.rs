//! Listings without a scan where one can be avoided: unfinished tasks by state (`by_state`),
//! the newest tasks from the ring of recently created ones (`RECENT` in `by_state`, its next
//! seq in `meta`), a bounded scan for the rest (`TopN`), the oldest unfinished task and the
//! per-state counters. Must not write a record; the ring's entry for a new task is written
//! with it (`index`).

use super::codec;
use super::error::StoreError;
use super::keys::{count_key, u64_from};
use super::{Core, Counts, Scanned, Store};
use crate::model::{Kind, Millis, State, Task};

/// First byte of the ring of recently created tasks in `by_state` (see the module doc).
pub(super) const RECENT: u8 = 0xff;

/// Tasks the ring remembers: `admin list`'s largest `--limit`.
pub const RECENT_TASKS: u64 = 10_000;

/// `meta` key: the ring's next seq.
pub(super) const RECENT_SEQ: &str = "recent/seq";

pub(super) fn recent_key(seq: u64) -> [u8; 9] {
    let mut k = [RECENT; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl Store {
    /// Newest first (created, then id, descending), optionally only in one state, at most
    /// `limit`. Quarantined tasks are left out (`admin status` names them). Unfinished
    /// states read their `by_state` range; finished states and all tasks scan `tasks`
    /// (finished tasks have no index entry), keeping the newest `limit`: blocking, with a
    /// time that grows with the store.
    pub fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Task>, StoreError> {
        self.list_of(state, None, limit)
    }

    /// [`Store::list`], optionally only tasks of one kind.
    pub fn list_of(
        &self,
        state: Option<State>,
        kind: Option<Kind>,
        limit: usize,
    ) -> Result<Vec<Task>, StoreError> {
        let wanted =
            |t: &Task| state.is_none_or(|s| s == t.state) && kind.is_none_or(|k| k == t.kind);
        if let Some(s) = state
            && !s.is_finished()
        {
            let mut out = Vec::new();
            for kv in self.inner.by_state.scan_prefix([s.code()]).rev() {
                if out.len() >= limit {
                    break;
                }
                let (k, _) = kv?;
                let id = String::from_utf8_lossy(&k[9..]).into_owned();
                match self.get(&id) {
                    Ok(Some(task)) if wanted(&task) => out.push(task),
                    Ok(_) => {}
                    Err(e) if e.is_undecodable() => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(out);
        }
        if let Some(out) = self.list_recent(&wanted, limit)? {
            return Ok(out);
        }
        let mut newest = TopN::new(limit);
        for scanned in self.all_tasks() {
            let Scanned::Task(task) = scanned? else {
                continue;
            };
            if !wanted(&task) {
                continue;
            }
            newest.push(Newest(task));
        }
        Ok(newest
            .into_greatest_first()
            .into_iter()
            .map(|Newest(t)| *t)
            .collect())
    }

    /// `list` from the ring of recently created tasks: `None` when it holds fewer than
    /// `limit` of them (that are `wanted`), and the caller scans. The ring is in creation order,
    /// which is `created_at` order (one clock); it is read newest first until `limit` tasks
    /// are found and the next one is older than all of them, so ties are ordered by id as
    /// a scan orders them.
    fn list_recent(
        &self,
        wanted: &dyn Fn(&Task) -> bool,
        limit: usize,
    ) -> Result<Option<Vec<Task>>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut found: Vec<Task> = Vec::new();
        let mut oldest_found = Millis::MAX;
        for kv in self.inner.by_state.scan_prefix([RECENT]).rev() {
            let (_, id) = kv?;
            let id = String::from_utf8_lossy(&id).into_owned();
            if !seen.insert(id.clone()) {
                continue;
            }
            let task = match self.get(&id) {
                Ok(Some(task)) => task,
                Ok(None) => continue,
                Err(e) if e.is_undecodable() => continue,
                Err(e) => return Err(e),
            };
            if !wanted(&task) {
                continue;
            }
            if found.len() >= limit && task.created_at < oldest_found {
                break;
            }
            oldest_found = oldest_found.min(task.created_at);
            found.push(task);
        }
        if found.len() < limit {
            return Ok(None);
        }
        found.sort_by(|a, b| (b.created_at, &b.task_id).cmp(&(a.created_at, &a.task_id)));
        found.truncate(limit);
        Ok(Some(found))
    }

    /// Rewrites the ring of recently created tasks from the records (the newest
    /// `RECENT_TASKS` by created, id): after a restore wrote tasks in id order. Reads the
    /// whole store; blocking.
    pub fn rebuild_recent(&self) -> Result<(), StoreError> {
        let mut newest = TopN::new(RECENT_TASKS as usize);
        for kv in self.inner.tasks.iter() {
            let (k, v) = kv?;
            if let Ok(task) = codec::decode_task(&v) {
                newest.push((task.created_at, String::from_utf8_lossy(&k).into_owned()));
            }
        }
        self.inner.write_recent(newest)
    }

    pub fn counts(&self) -> Result<Counts, StoreError> {
        let get = |s: State| -> Result<u64, StoreError> {
            Ok(self
                .inner
                .meta
                .get(count_key(s))?
                .map(|v| u64_from(&v))
                .unwrap_or(0))
        };
        Ok(Counts {
            submitted: get(State::Submitted)?,
            received: get(State::Received)?,
            downloaded: get(State::Downloaded)?,
            failed: get(State::Failed)?,
        })
    }

    /// The oldest task still submitted or received (quarantined tasks left out).
    pub fn oldest_unfinished(&self) -> Result<Option<Task>, StoreError> {
        let mut oldest: Option<Task> = None;
        for s in [State::Submitted, State::Received] {
            for kv in self.inner.by_state.scan_prefix([s.code()]) {
                let (k, _) = kv?;
                let id = String::from_utf8_lossy(&k[9..]).into_owned();
                match self.get(&id) {
                    Ok(Some(task)) => {
                        if oldest
                            .as_ref()
                            .is_none_or(|o| task.created_at < o.created_at)
                        {
                            oldest = Some(task);
                        }
                        break;
                    }
                    Ok(None) => break,
                    Err(e) if e.is_undecodable() => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(oldest)
    }
}

impl Core {
    /// Replaces the ring with the tasks in `newest` (written oldest first).
    pub(super) fn write_recent(&self, newest: TopN<(Millis, String)>) -> Result<(), StoreError> {
        for k in self.by_state.scan_prefix([RECENT]).keys() {
            self.by_state.remove(k?)?;
        }
        let mut seq = 0u64;
        for (_, id) in newest.into_greatest_first().into_iter().rev() {
            self.by_state.insert(recent_key(seq), id.as_bytes())?;
            seq += 1;
        }
        self.meta.insert(RECENT_SEQ, &seq.to_be_bytes())?;
        Ok(())
    }
}

/// The `limit` greatest items pushed into it: a bounded min-heap, so keeping the newest N
/// of a scan holds N items, not the scan.
pub(super) struct TopN<T: Ord> {
    heap: std::collections::BinaryHeap<std::cmp::Reverse<T>>,
    limit: usize,
}

impl<T: Ord> TopN<T> {
    pub(super) fn new(limit: usize) -> TopN<T> {
        TopN {
            heap: std::collections::BinaryHeap::new(),
            limit,
        }
    }

    pub(super) fn push(&mut self, item: T) {
        self.heap.push(std::cmp::Reverse(item));
        if self.heap.len() > self.limit {
            self.heap.pop();
        }
    }

    pub(super) fn into_greatest_first(self) -> Vec<T> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|std::cmp::Reverse(t)| t)
            .collect()
    }
}

/// A task ordered by (created, id), as `list` orders them.
struct Newest(Box<Task>);

impl Newest {
    fn key(&self) -> (Millis, &str) {
        (self.0.created_at, self.0.task_id.as_str())
    }
}

impl PartialEq for Newest {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Newest {}

impl PartialOrd for Newest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Newest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}
