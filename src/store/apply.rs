//! The batch transaction core: `Core::apply_batch` applies the writer's batch (or
//! `Store::apply`'s one update) in one sled transaction, each update (`apply_one`) running
//! `machine::apply` and writing the record with its history, the indexes derived from it,
//! `by_music` and the outbox, with per-update isolation (a quarantined record, a refused
//! task, a panic) and one write of the counters per batch. Must not decide a transition
//! (`machine`) nor flush (`writer`).

use std::sync::atomic::Ordering;

use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionResult, TransactionalTree,
};

use super::error::{StoreError, TxResult, describe};
use super::history::{append_history, fit_history, read_record};
use super::index::{Deltas, Indexes};
use super::outbox::enqueue;
use super::record::encode;
use super::{Applied, Core, IfMissing, codec, writer};
use crate::machine::{self, Ctx, Event, Outcome};
use crate::model::{State, Task};

impl Core {
    /// Applies `writes` in one transaction (a batch of the writer; [`Store::apply`] is a
    /// batch of one), each update seeing the ones before it, and the per-state counters
    /// written once. Per-update isolation: one whose record cannot be decoded (it is
    /// quarantined) or that names an unknown task with [`IfMissing::Reject`] changes nothing
    /// and does not stop the others; one that fails after it began to write, or panics, is
    /// left out and the transaction runs again without it. A storage error fails them all
    /// (and marks the store's health).
    ///
    /// [`Store::apply`]: super::Store::apply
    pub(super) fn apply_batch(&self, writes: &[writer::Write]) -> Vec<writer::Outcome> {
        if let Err(e) = self.health.check() {
            return writes.iter().map(|_| Err(e.clone_failure())).collect();
        }
        // Statistics derived from the records change with them (`stats`).
        let _changing = self.stats_gate.hold();
        // Updates left out, with why; decided between runs of the transaction.
        let mut left_out: Vec<Option<StoreError>> = writes.iter().map(|_| None).collect();
        loop {
            let result = self.records_transaction(|trees| {
                // sled may run this closure again: everything it accumulates starts here.
                let mut batch = BatchState::default();
                let mut out = Vec::with_capacity(writes.len());
                for (n, w) in writes.iter().enumerate() {
                    if left_out[n].is_some() {
                        out.push(Ok(None));
                        continue;
                    }
                    batch.nothing_written = false;
                    let one = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        apply_one(
                            trees,
                            &w.task_id,
                            &w.event,
                            &w.ctx,
                            w.if_missing,
                            &mut batch,
                        )
                    }));
                    match one {
                        Ok(Ok(applied)) => out.push(Ok(applied)),
                        // Refused at its first read, before it wrote anything.
                        Ok(Err(ConflictableTransactionError::Abort(e)))
                            if batch.nothing_written =>
                        {
                            out.push(Err(e))
                        }
                        Ok(Err(ConflictableTransactionError::Abort(e))) => {
                            return Err(ConflictableTransactionError::Abort((n, e)));
                        }
                        Ok(Err(ConflictableTransactionError::Conflict)) => {
                            return Err(ConflictableTransactionError::Conflict);
                        }
                        Ok(Err(ConflictableTransactionError::Storage(e))) => {
                            return Err(ConflictableTransactionError::Storage(e));
                        }
                        Err(panic) => {
                            let reason = panic
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "a panic".to_string());
                            let what = format!("task {}", w.task_id);
                            return Err(ConflictableTransactionError::Abort((
                                n,
                                StoreError::Panicked { what, reason },
                            )));
                        }
                    }
                }
                batch.counts.write(trees.meta)?;
                Ok(out)
            });
            match result {
                Ok(out) => return self.applied(writes, out, left_out),
                Err(TransactionError::Abort((n, e))) => left_out[n] = Some(e),
                Err(TransactionError::Storage(e)) => {
                    self.health.mark(&describe(&e));
                    return writes
                        .iter()
                        .map(|_| Err(StoreError::Io(e.clone())))
                        .collect();
                }
            }
        }
    }

    /// The outcomes of a committed batch: tickets for what was applied (taken after the
    /// commit, so a round that starts later covers them), quarantine for what could not be
    /// decoded, the notifier woken for a settle.
    fn applied(
        &self,
        writes: &[writer::Write],
        out: Vec<Result<AppliedOne, StoreError>>,
        left_out: Vec<Option<StoreError>>,
    ) -> Vec<writer::Outcome> {
        let mut settled = false;
        let mut outcomes = Vec::with_capacity(writes.len());
        for ((one, w), left) in out.into_iter().zip(writes).zip(left_out) {
            outcomes.push(match (left, one) {
                (Some(e), _) => Err(e),
                (None, Ok(Some((before, task, outcome)))) => {
                    settled |= w.ctx.notify && machine::settle_notice(before, &task).is_some();
                    Ok(Some(Applied {
                        before,
                        task,
                        outcome,
                        ticket: self.written.fetch_add(1, Ordering::SeqCst) + 1,
                    }))
                }
                (None, Ok(None)) => Ok(None),
                (None, Err(e)) if !e.is_undecodable() => Err(e),
                (None, Err(e)) => {
                    self.undecodable_reads.fetch_add(1, Ordering::SeqCst);
                    self.quarantine_task(&w.task_id, w.task_id.as_bytes(), &e);
                    Err(e)
                }
            });
        }
        if settled {
            self.outbox_wake.notify_one();
        }
        outcomes
    }
}

/// The trees a change of task records writes (an update, a copy, forgetting a task), as
/// one transaction sees them ([`Core::records_transaction`]).
pub(super) struct TxTrees<'t> {
    pub(super) meta: &'t TransactionalTree,
    pub(super) tasks: &'t TransactionalTree,
    pub(super) events: &'t TransactionalTree,
    pub(super) due_download: &'t TransactionalTree,
    pub(super) due_poll: &'t TransactionalTree,
    pub(super) by_state: &'t TransactionalTree,
    pub(super) by_music: &'t TransactionalTree,
    pub(super) outbox: &'t TransactionalTree,
}

impl TxTrees<'_> {
    /// The trees derived from a task record, with the counters in `meta`.
    pub(super) fn indexes(&self) -> Indexes<'_> {
        Indexes {
            meta: self.meta,
            due_download: self.due_download,
            due_poll: self.due_poll,
            by_state: self.by_state,
        }
    }
}

impl Core {
    /// Runs `f` in one sled transaction over the trees of [`TxTrees`]; sled may run it
    /// more than once (after a conflict), so `f` starts afresh each time.
    pub(super) fn records_transaction<T, E>(
        &self,
        f: impl Fn(&TxTrees<'_>) -> ConflictableTransactionResult<T, E>,
    ) -> TransactionResult<T, E> {
        (
            &self.meta,
            &self.tasks,
            &self.events,
            &self.due_download,
            &self.due_poll,
            &self.by_state,
            &self.by_music,
            &self.outbox,
        )
            .transaction(
                |(meta, tasks, events, due_download, due_poll, by_state, by_music, outbox)| {
                    f(&TxTrees {
                        meta,
                        tasks,
                        events,
                        due_download,
                        due_poll,
                        by_state,
                        by_music,
                        outbox,
                    })
                },
            )
    }
}

/// What one update did: the state before, the new record, the machine's outcome; `None` for
/// an unknown task refused.
type AppliedOne = Option<(Option<State>, Task, Outcome)>;

/// What a run of a batch's transaction accumulates; reset when sled runs it again.
#[derive(Default)]
struct BatchState {
    /// Changes of the per-state counters, written once at the end of the batch.
    counts: Deltas,
    /// Set when the update being applied was refused at its first read, before it wrote
    /// anything: its record is undecodable, or the task is of another kind.
    nothing_written: bool,
}

/// One update inside a batch's transaction: the record, its history, the indexes derived
/// from it, `by_music`, the outbox. Sees the writes of the updates before it in the batch.
fn apply_one(
    trees: &TxTrees<'_>,
    task_id: &str,
    event: &Event,
    ctx: &Ctx,
    if_missing: IfMissing,
    batch: &mut BatchState,
) -> TxResult<AppliedOne> {
    let (before, mut history) = match trees.tasks.get(task_id.as_bytes())? {
        Some(bytes) => {
            let (task, history) = read_record(&bytes, task_id, trees.events).map_err(|e| {
                if let ConflictableTransactionError::Abort(_) = e {
                    batch.nothing_written = true;
                }
                e
            })?;
            (Some(task), history)
        }
        None => (None, Vec::new()),
    };
    let asked = event.kind();
    if let (Some(t), Some(asked)) = (&before, asked)
        && t.kind != asked
    {
        batch.nothing_written = true;
        return Err(ConflictableTransactionError::Abort(StoreError::WrongKind {
            task_id: task_id.to_string(),
            is: t.kind.as_str(),
            asked: asked.as_str(),
        }));
    }
    let mut task = match (&before, if_missing) {
        (Some(t), _) => t.clone(),
        (None, IfMissing::Create) => Task::new_of(
            asked.unwrap_or(crate::model::Kind::Cover),
            task_id.to_string(),
            None,
            ctx.now,
        ),
        (None, IfMissing::Reject) => return Ok(None),
    };
    let outcome = machine::apply(&mut task, event.clone(), ctx);

    // History, kept in the record, within the record's limit.
    append_history(&mut task, &mut history, &outcome.notes, ctx.now);
    fit_history(&mut history);

    // Indexes, derived from the old and new record.
    let old = before.as_ref();
    trees
        .indexes()
        .derive_into(task_id, old, Some(&task), &mut batch.counts)?;
    // `by_music` maps a song to its cover: a WAV, video or stems task of the same song
    // (which carries its music task id too) is not its cover.
    if let Some(music) = &task.music_task_id
        && task.kind == crate::model::Kind::Cover
        && old.and_then(|t| t.music_task_id.as_ref()) != Some(music)
    {
        trees
            .by_music
            .insert(music.as_bytes(), task_id.as_bytes())?;
    }

    // The outbox: a settle and its notification are one write.
    if ctx.notify
        && let Some(kind) = machine::settle_notice(old.map(|t| t.state), &task)
    {
        enqueue(trees.outbox, trees.meta, &task, kind, ctx.now)?;
    }

    trees.tasks.insert(
        task_id.as_bytes(),
        encode(codec::encode_task(&task, &history), task_id)?,
    )?;
    Ok(Some((before.map(|t| t.state), task, outcome)))
}
