//! The indexes derived from a task record, written in the transaction that writes it: the
//! due indexes, `by_state` for unfinished tasks, the ring of recent tasks, the per-state
//! counters and the stored bytes (`Deltas`, summed over a batch and written once). Must not
//! decide a state, and owns no rule of `by_music` (each caller has its own).

use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::error::TxResult;
use super::keys::{bump_key, count_key, state_key, time_key, u64_from};
use super::list::{RECENT_SEQ, RECENT_TASKS, recent_key};
use super::stats;
use crate::model::{Millis, State, Task};

/// The trees derived from a task record: `due_download`, `due_poll`, and `by_state` (for
/// unfinished tasks) with the per-state counters in `meta`. (`by_music` is each caller's:
/// `apply`, copying and forgetting a task each have their own rule for it.)
pub(super) struct Indexes<'a> {
    pub meta: &'a TransactionalTree,
    pub due_download: &'a TransactionalTree,
    pub due_poll: &'a TransactionalTree,
    pub by_state: &'a TransactionalTree,
}

impl Indexes<'_> {
    /// Moves task `id`'s entries from what record `old` implied to what `new` implies (`None`:
    /// no record); writes only what changed.
    pub(super) fn derive(&self, id: &str, old: Option<&Task>, new: Option<&Task>) -> TxResult<()> {
        let mut counts = Deltas::default();
        self.derive_into(id, old, new, &mut counts)?;
        counts.write(self.meta)?;
        Ok(())
    }

    /// [`Indexes::derive`], but the counter changes are added to `counts` (a batch writes
    /// each counter once, at its end).
    pub(super) fn derive_into(
        &self,
        id: &str,
        old: Option<&Task>,
        new: Option<&Task>,
        counts: &mut Deltas,
    ) -> TxResult<()> {
        reindex(
            self.due_download,
            old.and_then(Task::download_due),
            new.and_then(Task::download_due),
            id,
        )?;
        reindex(
            self.due_poll,
            old.and_then(Task::poll_due),
            new.and_then(Task::poll_due),
            id,
        )?;
        // Finished tasks have no `by_state` entry (see the module doc).
        let entry =
            |t: &Task| (!t.state.is_finished()).then(|| state_key(t.state, t.created_at, id));
        let (old_entry, new_entry) = (old.and_then(entry), new.and_then(entry));
        if old_entry != new_entry {
            if let Some(k) = old_entry {
                self.by_state.remove(k)?;
            }
            if let Some(k) = new_entry {
                self.by_state.insert(k, &[])?;
            }
        }
        if old.is_none() && new.is_some() {
            let seq = self
                .meta
                .get(RECENT_SEQ)?
                .map(|v| u64_from(&v))
                .unwrap_or(0);
            self.by_state.insert(&recent_key(seq), id.as_bytes())?;
            if let Some(gone) = seq.checked_sub(RECENT_TASKS) {
                self.by_state.remove(&recent_key(gone))?;
            }
            self.meta.insert(RECENT_SEQ, &(seq + 1).to_be_bytes())?;
        }
        counts.bytes = counts.bytes.saturating_add(stats::bytes_delta(old, new));
        let (old_state, new_state) = (old.map(|t| t.state), new.map(|t| t.state));
        if old_state != new_state {
            if let Some(s) = old_state {
                counts.add(s, -1);
            }
            if let Some(s) = new_state {
                counts.add(s, 1);
            }
        }
        Ok(())
    }
}

fn reindex(
    tree: &TransactionalTree,
    old: Option<Millis>,
    new: Option<Millis>,
    task_id: &str,
) -> TxResult<()> {
    if old == new {
        return Ok(());
    }
    if let Some(at) = old {
        tree.remove(time_key(at, task_id))?;
    }
    if let Some(at) = new {
        tree.insert(time_key(at, task_id), &[])?;
    }
    Ok(())
}

/// Changes of the per-state counters (`count/<code>` in `meta`) and of the stored bytes
/// (`stats`) not written yet.
#[derive(Default)]
pub(super) struct Deltas {
    states: Vec<(State, i64)>,
    bytes: i64,
}

impl Deltas {
    fn add(&mut self, state: State, delta: i64) {
        match self.states.iter_mut().find(|(s, _)| *s == state) {
            Some((_, d)) => *d += delta,
            None => self.states.push((state, delta)),
        }
    }

    /// Writes each counter that changed, once.
    pub(super) fn write(
        &self,
        meta: &TransactionalTree,
    ) -> Result<(), UnabortableTransactionError> {
        for &(state, delta) in &self.states {
            if delta != 0 {
                bump_key(meta, count_key(state), delta)?;
            }
        }
        if self.bytes != 0 {
            bump_key(meta, stats::BYTES_KEY.to_vec(), self.bytes)?;
        }
        Ok(())
    }
}
