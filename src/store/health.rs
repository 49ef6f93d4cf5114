//! Whether the store can take writes: `Health` (the first write or flush failure, sticky
//! until the process restarts; a test's injected failure, which is not), what it answers
//! (`write_failure`, `writable`, `needs_reopen`, a stopped writer thread), the health
//! check's write–flush–read-back, and a failed transaction's error marking it. Must not
//! retry, repair or reopen anything (the daemon restarts to reopen).

use std::sync::atomic::{AtomicBool, Ordering};

use sled::transaction::TransactionError;

use super::Store;
use super::error::{StoreError, describe};

/// The reason given while a test injects write failures.
const INJECTED: &str = "write failure injected by a test";

/// Whether the store can take writes. sled 0.34 keeps an I/O error (a full disk) until the
/// process restarts, so a real failure is sticky; the test injection is not.
#[derive(Debug)]
pub(super) struct Health {
    /// The first write or flush failure's reason, if one happened.
    failed: tokio::sync::watch::Sender<Option<String>>,
    /// Fault injection for tests: every update fails as if the disk were gone.
    injected: AtomicBool,
}

impl Health {
    pub(super) fn new() -> Health {
        let (failed, _) = tokio::sync::watch::channel(None);
        Health {
            failed,
            injected: AtomicBool::new(false),
        }
    }

    /// Makes every update fail (`on = true`) until called with `false` (a test hook).
    #[cfg(any(test, feature = "testing"))]
    pub(super) fn inject(&self, on: bool) {
        self.injected.store(on, Ordering::SeqCst);
        // Wakes whoever waits in `writable`.
        self.failed.send_modify(|_| {});
    }

    /// Whether an update may be applied: not after a write or flush failed (a failed flush is
    /// final: the kernel may have dropped the pages it could not write and reports that only
    /// once, so a later write that seems to succeed proves nothing), nor while a test injects
    /// failures.
    pub(super) fn check(&self) -> Result<(), StoreError> {
        if self.injected.load(Ordering::SeqCst) {
            return Err(injected());
        }
        match &*self.failed.borrow() {
            Some(reason) => Err(StoreError::Unwritable(reason.clone())),
            None => Ok(()),
        }
    }

    pub(super) fn mark(&self, reason: &str) {
        self.failed.send_modify(|f| {
            if f.is_none() {
                tracing::error!(
                    reason,
                    "the store cannot take writes; callbacks get 503, downloads and polls pause"
                );
                *f = Some(reason.to_string());
            }
        });
    }
}

fn injected() -> StoreError {
    StoreError::Io(sled::Error::Io(std::io::Error::other(INJECTED)))
}

impl Store {
    /// A failed transaction's error; a storage failure marks the store as unable to take
    /// writes ([`Store::write_failure`]), whichever transaction met it.
    pub(super) fn tx_error(&self, e: TransactionError<StoreError>) -> StoreError {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => {
                self.inner.health.mark(&describe(&e));
                StoreError::Io(e)
            }
        }
    }

    /// Why the store cannot take writes now, if it cannot: a write or flush failed (sticky:
    /// sled keeps the error until the process restarts), or a test injects failures.
    pub fn write_failure(&self) -> Option<String> {
        if self.inner.health.injected.load(Ordering::SeqCst) {
            return Some(INJECTED.to_string());
        }
        if let Some(failed) = self.inner.health.failed.borrow().clone() {
            return Some(failed);
        }
        self.stopped_thread()
    }

    /// Which of the store's threads (writer, flusher) stopped or panicked, and how, if one
    /// did: the store then takes no write until the process restarts.
    pub fn stopped_thread(&self) -> Option<String> {
        self.inner.writer.stopped()
    }

    /// Waits until one of the store's threads stops or panics (never, while they run);
    /// returns what [`Store::stopped_thread`] says then.
    pub async fn thread_stopped(&self) -> String {
        self.inner.writer.wait_stopped().await
    }

    /// Whether a real write or flush failed: only reopening the store (a restart) clears it.
    pub fn needs_reopen(&self) -> bool {
        self.inner.health.failed.borrow().is_some()
    }

    /// Waits until [`Store::write_failure`] is `None`: at once when the store is fine,
    /// never in this process after a real failure (see [`Store::needs_reopen`]).
    pub async fn writable(&self) {
        let mut rx = self.inner.health.failed.subscribe();
        while self.write_failure().is_some() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Health: a write, a flush and a read-back succeed.
    pub async fn check_health(&self) -> Result<(), StoreError> {
        if let Some(reason) = self.write_failure() {
            return Err(StoreError::Unwritable(reason));
        }
        let stamp = crate::model::now_millis().to_be_bytes();
        if let Err(e) = self.inner.meta.insert("health", &stamp) {
            self.inner.health.mark(&describe(&e));
            return Err(e.into());
        }
        self.flush().await?;
        match self.inner.meta.get("health")? {
            Some(v) if v.as_ref() == stamp => Ok(()),
            _ => Err(StoreError::Corrupt {
                what: "health check".into(),
                reason: "read-back differs from what was written".into(),
            }),
        }
    }
}
