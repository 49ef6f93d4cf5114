//! The store's test hooks (`testing` feature, or unit tests): failures injected on demand,
//! a writer held or stopped, a failed flush round, records planted byte for byte, counts
//! of undecodable reads and concurrent rounds. Compiled only for tests (`mod hooks` is behind
//! `cfg(any(test, feature = "testing"))`); must not be reached from coverd's own code.

use std::sync::atomic::Ordering;

use super::error::StoreError;
use super::writer::{StoreThread, WritesPaused};
use super::{Store, codec, stats};

impl Store {
    /// Makes every later update fail (`on = true`) until called with `false`: lets tests
    /// prove what callers do when the store is unavailable. Not used by coverd itself.
    pub fn inject_write_failures(&self, on: bool) {
        self.inner.health.inject(on);
    }

    /// Makes the store's writer or flusher thread panic at once, as a bug would (tests of
    /// what the daemon does when one dies). Not used by coverd itself.
    pub fn stop_thread_for_test(&self, which: StoreThread) {
        self.inner.writer.stop_for_test(which);
    }

    /// Makes the next flush round fail as if `fdatasync` had returned EIO (tests; the
    /// process tests inject real syscall errors with strace). Not used by coverd itself.
    pub fn fail_next_flush_for_test(&self) {
        self.inner.writer.fail_next_round();
    }

    /// Stores `bytes` as the record of `task_id`, bypassing the codec and the indexes: lets
    /// tests plant a damaged record, or one written by a newer coverd. Not used by coverd.
    pub fn put_raw_task(&self, task_id: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.put_raw_record(task_id.as_bytes(), bytes)
    }

    /// [`Store::put_raw_task`] under any key, UTF-8 or not: lets tests plant records keyed
    /// by what no task id can be (a crafted backup). Not used by coverd.
    /// Like damage, an undecodable record is not added to the quarantine index (a read
    /// finds it); a readable one leaves it (a repair).
    pub fn put_raw_record(&self, key: &[u8], bytes: &[u8]) -> Result<(), StoreError> {
        self.inner
            .stats_gate
            .changing(|| -> Result<(), StoreError> {
                self.inner.tasks.insert(key, bytes)?;
                if codec::decode_task(bytes).is_ok() {
                    self.inner.meta.remove(stats::quarantine_key(key))?;
                }
                Ok(())
            })?;
        self.inner.db.flush()?;
        Ok(())
    }

    /// How many times a task record could not be decoded since open (tests).
    pub fn undecodable_reads(&self) -> u64 {
        self.inner.undecodable_reads.load(Ordering::SeqCst)
    }

    /// Stops the writer from taking updates until the guard is dropped (it finishes the
    /// batch it is in, and holds at most one update it took): lets tests fill its queue or
    /// form one batch from many updates. Not used by coverd itself.
    pub fn pause_writes(&self) -> WritesPaused {
        self.inner.writer.pause()
    }

    /// The most flush rounds ever running at once (one flusher thread: at most 1).
    pub fn max_concurrent_flushes(&self) -> u32 {
        self.inner.writer.max_concurrent_rounds()
    }
}
