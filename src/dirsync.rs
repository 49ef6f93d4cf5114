//! Group commit for directory fsyncs: whoever renamed a file into a directory asks for an
//! fsync of it that starts after the rename, and callers that ask while one runs share the
//! next one, so images landing in one directory at once (the two images of a task, every
//! new task directory in `images/`) cost one fsync instead of one each. Owns the rounds and
//! their bookkeeping; must not decide what is synced when (that is `download`'s install
//! order). Blocking: call it from a blocking thread.
//!
//! Also the one fsync of a directory ([`sync_dir`]) and the one creation of a private
//! directory ([`create_private_dir`]), for every part that makes directories or their
//! entries durable (the store, downloads, backups, the daemon's data directory); and what
//! the filesystem holding a directory has free ([`free_bytes`]).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Makes `dir`'s entries durable (its fsync), at once, without group commit.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` and missing parents as 0700 (private whatever the process umask); an
/// existing `dir` is left as it is (`sharing` owns the modes of `images/`; the daemon checks
/// the data directory's own).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// How a directory is made durable; a test replaces it to hold a round open.
type SyncFn = dyn Fn(&Path) -> io::Result<()> + Send + Sync;

/// The directories being synced, and their rounds.
pub struct DirSyncs {
    dirs: Mutex<HashMap<PathBuf, Rounds>>,
    finished: Condvar,
    sync: Box<SyncFn>,
    /// fsyncs run since start (tests, and what the batching saves).
    runs: AtomicU64,
}

/// One directory's rounds. A caller's ask gets the next number; a round covers every ask
/// made before it started. Entries leave the map once nobody waits.
#[derive(Debug, Default)]
struct Rounds {
    asked: u64,
    /// Every ask up to this one is covered by a finished round.
    covered: u64,
    running: bool,
    /// Rounds of this directory that failed so far. A caller fails if any round failed
    /// while it waited: perhaps not its own, but a spurious error only makes the install
    /// fail and be retried, while a missed one could record an image whose directory entry
    /// is not durable.
    failures: u64,
    last_error: Option<String>,
    waiting: usize,
}

impl Default for DirSyncs {
    fn default() -> Self {
        DirSyncs::with_sync(Box::new(sync_dir))
    }
}

impl DirSyncs {
    fn with_sync(sync: Box<SyncFn>) -> DirSyncs {
        DirSyncs {
            dirs: Mutex::new(HashMap::new()),
            finished: Condvar::new(),
            sync,
            runs: AtomicU64::new(0),
        }
    }

    /// Returns once an fsync of `dir` that started after this call has finished, or with
    /// the error of a failed one.
    pub fn sync(&self, dir: &Path) -> io::Result<()> {
        let mut dirs = self.lock();
        let rounds = dirs.entry(dir.to_path_buf()).or_default();
        rounds.asked += 1;
        rounds.waiting += 1;
        let (me, failures_before) = (rounds.asked, rounds.failures);
        loop {
            let rounds = dirs.get_mut(dir).expect("entry kept while waiting");
            if rounds.covered >= me || rounds.failures > failures_before {
                let result = match rounds.failures > failures_before {
                    true => Err(io::Error::other(format!(
                        "cannot sync the directory {}: {}",
                        dir.display(),
                        rounds.last_error.as_deref().unwrap_or("unknown error")
                    ))),
                    false => Ok(()),
                };
                rounds.waiting -= 1;
                if rounds.waiting == 0 && !rounds.running {
                    dirs.remove(dir);
                }
                return result;
            }
            if rounds.running {
                dirs = self.finished.wait(dirs).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            rounds.running = true;
            let upto = rounds.asked;
            drop(dirs);
            self.runs.fetch_add(1, Ordering::SeqCst);
            let result = (self.sync)(dir);
            dirs = self.lock();
            let rounds = dirs.get_mut(dir).expect("entry kept while waiting");
            rounds.running = false;
            match result {
                Ok(()) => rounds.covered = upto,
                Err(e) => {
                    rounds.failures += 1;
                    rounds.last_error = Some(e.to_string());
                }
            }
            self.finished.notify_all();
        }
    }

    /// fsyncs run since start.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PathBuf, Rounds>> {
        // A poisoned map is still a valid map: no panic can leave it half updated.
        self.dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn waiting(&self, dir: &Path) -> usize {
        self.lock().get(dir).map_or(0, |r| r.waiting)
    }
}

/// Bytes an unprivileged process may still write on the filesystem holding `path` (what
/// `df` shows as available: root's reserve excluded).
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Waits until `cond` holds, failing after a generous bound (never a timing assertion).
    fn await_cond(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    /// A sync function whose first call blocks until the test releases it.
    fn held_first(release: mpsc::Receiver<()>) -> Box<SyncFn> {
        let release = Mutex::new(Some(release));
        Box::new(move |_| {
            if let Some(rx) = release.lock().unwrap().take() {
                rx.recv().unwrap();
            }
            Ok(())
        })
    }

    #[test]
    fn callers_during_a_round_share_the_next_one() {
        let (release, rx) = mpsc::channel();
        let syncs = Arc::new(DirSyncs::with_sync(held_first(rx)));
        let dir = Path::new("/images/task");
        let first = {
            let syncs = syncs.clone();
            std::thread::spawn(move || syncs.sync(dir))
        };
        await_cond("the first round to start", || syncs.runs() == 1);
        // Five renames land while that round runs: it started before them, so it cannot
        // cover them; one more round covers all five.
        let later: Vec<_> = (0..5)
            .map(|_| {
                let syncs = syncs.clone();
                std::thread::spawn(move || syncs.sync(dir))
            })
            .collect();
        await_cond("the five to wait", || syncs.waiting(dir) == 6);
        release.send(()).unwrap();
        first.join().unwrap().unwrap();
        for t in later {
            t.join().unwrap().unwrap();
        }
        assert_eq!(
            syncs.runs(),
            2,
            "one round for the first, one shared by the five"
        );
        assert!(syncs.lock().is_empty(), "no entry left once nobody waits");
        // Alone, a caller runs its own round.
        syncs.sync(dir).unwrap();
        assert_eq!(syncs.runs(), 3);
    }

    #[test]
    fn a_failed_round_fails_its_callers_and_the_next_can_succeed() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let syncs = {
            let fail = fail.clone();
            DirSyncs::with_sync(Box::new(move |_| match fail.load(Ordering::SeqCst) {
                true => Err(io::Error::other("disk gone")),
                false => Ok(()),
            }))
        };
        let err = syncs.sync(Path::new("/d")).unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
        assert!(err.to_string().contains("/d"), "{err}");
        fail.store(false, Ordering::SeqCst);
        syncs.sync(Path::new("/d")).unwrap();
    }

    #[test]
    fn different_directories_do_not_share_rounds() {
        let syncs = DirSyncs::default();
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        syncs.sync(a.path()).unwrap();
        syncs.sync(b.path()).unwrap();
        assert_eq!(syncs.runs(), 2);
        assert!(syncs.sync(&a.path().join("missing")).is_err());
    }
}
