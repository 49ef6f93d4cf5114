//! The outbox (`outbox` tree, three key spaces: `n` records, `h` latest seq per task, `d`
//! the `due_notify` index; counters `notify/<code>` in `meta`): enqueuing a settle's
//! notification inside the transaction that settles it, recording delivery attempts and
//! redeliveries through `machine`, dropping a pruned task's notifications, the notifier's
//! reads. Must not decide a notification's state (`machine`) nor send anything (`notify`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::error::{StoreError, TxResult};
use super::keys::{bump_key, event_key, ms_bytes, u32_from, u64_from};
use super::record::{decode_notification, encode};
use super::{NotifyCounts, Store, codec};
use crate::machine::{self, Delivery};
use crate::model::{Millis, Notification, NotifyState, Task};

/// First bytes of the outbox's key spaces (see the module doc).
const OUTBOX_RECORD: u8 = b'n';
const OUTBOX_HEAD: u8 = b'h';
const OUTBOX_DUE: u8 = b'd';

impl Store {
    /// Woken whenever a notification becomes due (a settle, a redeliver); the notifier
    /// waits on it.
    pub fn outbox_waker(&self) -> Arc<tokio::sync::Notify> {
        self.inner.outbox_wake.clone()
    }

    /// Notifications due at or before `now` as (task id, seq), earliest first, at most `limit`.
    pub fn due_notifications(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        let start = [OUTBOX_DUE].to_vec();
        let mut end = start.clone();
        end.extend_from_slice(&ms_bytes(now.saturating_add(1)));
        let mut out = Vec::new();
        for kv in self.inner.outbox.range(start..end).take(limit) {
            let (k, _) = kv?;
            if let Some(key) = k.get(9..).and_then(split_record_key) {
                out.push(key);
            }
        }
        Ok(out)
    }

    /// The earliest due time of any pending notification.
    pub fn next_notification_due(&self) -> Result<Option<Millis>, StoreError> {
        match self.inner.outbox.scan_prefix([OUTBOX_DUE]).next() {
            Some(kv) => {
                let (k, _) = kv?;
                Ok(Some(i64::try_from(u64_from(&k[1..])).unwrap_or(i64::MAX)))
            }
            None => Ok(None),
        }
    }

    /// One notification of a task.
    pub fn notification(
        &self,
        task_id: &str,
        seq: u32,
    ) -> Result<Option<Notification>, StoreError> {
        match self.inner.outbox.get(record_key(task_id, seq))? {
            Some(v) => Ok(Some(decode_notification(&v, task_id)?)),
            None => Ok(None),
        }
    }

    /// The notification of the task's latest settle, if one was made.
    pub fn latest_notification(&self, task_id: &str) -> Result<Option<Notification>, StoreError> {
        match self.inner.outbox.get(head_key(task_id))? {
            Some(v) => self.notification(task_id, u32_from(&v)),
            None => Ok(None),
        }
    }

    /// Records one delivery attempt of notification (`task_id`, `seq`) through
    /// `machine::notify_attempted`, atomically with its due-index entry and the counters.
    /// Returns the updated notification (`None` if it is gone).
    pub fn record_delivery(
        &self,
        task_id: &str,
        seq: u32,
        result: &Delivery,
        max_attempts: u32,
        now: Millis,
    ) -> Result<Option<Notification>, StoreError> {
        self.update_notification(task_id, Some(seq), |n| {
            machine::notify_attempted(n, result.clone(), max_attempts, now)
        })
    }

    /// `admin redeliver`: the task's latest notification is due again now (same webhook-id).
    /// `None` when the task has no notification.
    pub fn redeliver(
        &self,
        task_id: &str,
        now: Millis,
    ) -> Result<Option<Notification>, StoreError> {
        let n = self.update_notification(task_id, None, |n| machine::notify_redeliver(n, now))?;
        if n.is_some() {
            self.inner.outbox_wake.notify_one();
        }
        Ok(n)
    }

    /// Whether one of the task's notifications is still `pending` (or cannot be read):
    /// `admin prune` keeps such a task.
    pub fn has_pending_notification(&self, task_id: &str) -> Result<bool, StoreError> {
        let Some(latest) = self
            .inner
            .outbox
            .get(head_key(task_id))?
            .map(|v| u32_from(&v))
        else {
            return Ok(false);
        };
        for seq in 1..=latest {
            if let Some(bytes) = self.inner.outbox.get(record_key(task_id, seq))? {
                match decode_notification(&bytes, task_id) {
                    Ok(n) if n.state != NotifyState::Pending => {}
                    _ => return Ok(true),
                }
            }
        }
        Ok(false)
    }

    /// Notifications per delivery state.
    pub fn notify_counts(&self) -> Result<NotifyCounts, StoreError> {
        let get = |s: NotifyState| -> Result<u64, StoreError> {
            Ok(self
                .inner
                .meta
                .get(notify_count_key(s))?
                .map(|v| u64_from(&v))
                .unwrap_or(0))
        };
        Ok(NotifyCounts {
            pending: get(NotifyState::Pending)?,
            delivered: get(NotifyState::Delivered)?,
            undeliverable: get(NotifyState::Undeliverable)?,
        })
    }

    /// Read–change–write of one notification (`seq`, or the latest) in one transaction.
    fn update_notification(
        &self,
        task_id: &str,
        seq: Option<u32>,
        change: impl Fn(&mut Notification),
    ) -> Result<Option<Notification>, StoreError> {
        let i = &*self.inner;
        i.health.check()?;
        let result = (&i.meta, &i.outbox).transaction(|(meta, outbox)| {
            let seq = match seq {
                Some(s) => s,
                None => match outbox.get(head_key(task_id))? {
                    Some(v) => u32_from(&v),
                    None => return Ok(None),
                },
            };
            let Some(bytes) = outbox.get(record_key(task_id, seq))? else {
                return Ok(None);
            };
            let old = decode_notification(&bytes, task_id)
                .map_err(ConflictableTransactionError::Abort)?;
            let mut n = old.clone();
            change(&mut n);
            write_notification(outbox, meta, Some(&old), &n)?;
            Ok(Some(n))
        });
        let n = result.map_err(|e| self.tx_error(e))?;
        if n.is_some() {
            self.inner.written.fetch_add(1, Ordering::SeqCst);
        }
        Ok(n)
    }
}

/// Enqueues the notification of `task`'s settle: the next seq, the record, its due entry.
pub(super) fn enqueue(
    outbox: &TransactionalTree,
    meta: &TransactionalTree,
    task: &Task,
    kind: crate::model::NotifyType,
    now: Millis,
) -> TxResult<()> {
    let head = head_key(&task.task_id);
    let seq = outbox
        .get(&head)?
        .map(|v| u32_from(&v))
        .unwrap_or(0)
        .saturating_add(1);
    outbox.insert(head, &seq.to_be_bytes())?;
    write_notification(outbox, meta, None, &Notification::new(task, seq, kind, now))
}

/// Writes notification `n` (replacing `old`), keeping its due entry and the per-state
/// counters in step.
pub(super) fn write_notification(
    outbox: &TransactionalTree,
    meta: &TransactionalTree,
    old: Option<&Notification>,
    n: &Notification,
) -> TxResult<()> {
    let key = record_key(&n.task_id, n.seq);
    let due_key = |at: Millis| notify_due_key(at, &key);
    let (old_due, new_due) = (old.and_then(Notification::due), n.due());
    if old_due != new_due {
        if let Some(at) = old_due {
            outbox.remove(due_key(at))?;
        }
        if let Some(at) = new_due {
            outbox.insert(due_key(at), &[])?;
        }
    }
    if old.map(|o| o.state) != Some(n.state) {
        if let Some(o) = old {
            bump_key(meta, notify_count_key(o.state), -1)?;
        }
        bump_key(meta, notify_count_key(n.state), 1)?;
    }
    outbox.insert(key, encode(codec::encode_notification(n), &n.task_id)?)?;
    Ok(())
}

/// Removes all of a task's notifications (records, head, due entries) and takes them off
/// the counters, for `admin prune`. Removes nothing and returns `false` if one of them is
/// still `pending` or cannot be read: the task is not finished for the operator yet.
pub(super) fn drop_notifications(
    outbox: &TransactionalTree,
    meta: &TransactionalTree,
    task_id: &str,
    even_pending: bool,
) -> TxResult<bool> {
    let head = head_key(task_id);
    let Some(latest) = outbox.get(&head)?.map(|v| u32_from(&v)) else {
        return Ok(true);
    };
    let mut found = Vec::new();
    for seq in 1..=latest {
        let Some(bytes) = outbox.get(record_key(task_id, seq))? else {
            continue;
        };
        match decode_notification(&bytes, task_id) {
            Ok(n) if even_pending || n.state != NotifyState::Pending => found.push(n),
            _ => return Ok(false),
        }
    }
    for n in found {
        let key = record_key(task_id, n.seq);
        if let Some(at) = n.due() {
            outbox.remove(notify_due_key(at, &key))?;
        }
        bump_key(meta, notify_count_key(n.state), -1)?;
        outbox.remove(key)?;
    }
    outbox.remove(head)?;
    Ok(true)
}

/// The `due_notify` entry of the notification whose record key is `record_key`, due at
/// `at`: `d`, due ms, then the record key without its `n`.
pub(super) fn notify_due_key(at: Millis, record_key: &[u8]) -> Vec<u8> {
    let mut k = vec![OUTBOX_DUE];
    k.extend_from_slice(&ms_bytes(at));
    k.extend_from_slice(&record_key[1..]);
    k
}

pub(super) fn record_key(task_id: &str, seq: u32) -> Vec<u8> {
    let mut k = vec![OUTBOX_RECORD];
    k.extend_from_slice(&event_key(task_id, seq));
    k
}

pub(super) fn head_key(task_id: &str) -> Vec<u8> {
    let mut k = vec![OUTBOX_HEAD];
    k.extend_from_slice(task_id.as_bytes());
    k
}

/// (task id, seq) from the part of a key after its tag (and due time): task id, 0x00, seq.
fn split_record_key(k: &[u8]) -> Option<(String, u32)> {
    let (rest, seq) = k.split_last_chunk::<4>()?;
    let (0, id) = rest.split_last()? else {
        return None;
    };
    Some((
        String::from_utf8_lossy(id).into_owned(),
        u32::from_be_bytes(*seq),
    ))
}

pub(super) fn notify_count_key(state: NotifyState) -> Vec<u8> {
    let mut k = b"notify/".to_vec();
    k.push(state.code());
    k
}
