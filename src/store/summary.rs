//! What `admin status` shows of a store whose daemon is stopped, kept in a small file beside
//! sled (`db/coverd-status.json`) so that reading it does not open sled, which costs about
//! half a second on a store of a million tasks (sled reads its snapshot and writes a new one
//! at every open). Written at a clean close, after sled has let go of its lock, with the
//! identity of sled's log file at that moment; removed, and the removal synced, at every
//! open before anything is written, so that it never describes a store that changed since.
//! A file whose identity does not match sled's log (a build that does not know the file
//! wrote to the store), of another format or schema, or that fails any check is ignored:
//! the command then opens the store as before. Owns that file; must not decide how status
//! is shown (`admin::exec`), and nothing in it is trusted beyond what `status` prints.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Counts, MAX_QUARANTINED_SHOWN, NotifyCounts, SCHEMA_VERSION, Store, StoreError};
use crate::model::{Millis, State};

/// The file, inside the store's directory (`<data_dir>/db`).
pub const FILE: &str = "coverd-status.json";
/// Where it is written before it is renamed into place.
const TEMP: &str = "coverd-status.json.tmp";
/// sled's log, whose identity the file records.
const SLED_LOG: &str = "db";
/// Bumped when [`OnDisk`] changes; any other value is ignored.
const FORMAT: u32 = 1;
/// Far more than [`MAX_QUARANTINED_SHOWN`] entries of the longest reason take.
const MAX_BYTES: u64 = 256 * 1024;
/// Longest quarantined task id (lossy text of a key) and reason taken from the file.
const MAX_TEXT: usize = 1024;

/// The store's side of `admin status`: what the store holds, not what the daemon does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub counts: Counts,
    pub notify: NotifyCounts,
    pub oldest_unfinished: Option<Oldest>,
    /// The sizes recorded for the stored files.
    pub stored_bytes: u64,
    /// sled's files (its log and blobs).
    pub db_bytes: u64,
    /// At most [`MAX_QUARANTINED_SHOWN`] records that cannot be decoded.
    pub quarantined: Vec<QuarantinedShown>,
    /// How many the quarantine index holds.
    pub quarantined_total: u64,
}

/// The oldest task not yet finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oldest {
    pub task_id: String,
    pub state: State,
    pub created_at: Millis,
}

/// A record that cannot be decoded, with the callbacks kept aside for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedShown {
    pub task_id: String,
    pub reason: String,
    pub kept_callbacks: u64,
}

impl Store {
    /// The store's side of `admin status`, from the counters and indexes kept beside the
    /// records (never a scan of them). Blocking.
    pub fn summary(&self) -> Result<Summary, StoreError> {
        let (quarantined, quarantined_total) = self.quarantined(MAX_QUARANTINED_SHOWN)?;
        let quarantined = quarantined
            .into_iter()
            .map(|q| {
                Ok(QuarantinedShown {
                    kept_callbacks: self.parked_count(&q.task_id)?,
                    task_id: q.task_id,
                    reason: q.reason,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Summary {
            counts: self.counts()?,
            notify: self.notify_counts()?,
            oldest_unfinished: self.oldest_unfinished()?.map(|t| Oldest {
                task_id: t.task_id,
                state: t.state,
                created_at: t.created_at,
            }),
            stored_bytes: self.stored_bytes()?,
            db_bytes: self.size_on_disk()?,
            quarantined,
            quarantined_total,
        })
    }
}

/// The file's contents.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    format: u32,
    schema: u32,
    log: LogIdentity,
    submitted: u64,
    received: u64,
    downloaded: u64,
    failed: u64,
    notify_pending: u64,
    notify_delivered: u64,
    notify_undeliverable: u64,
    oldest_unfinished: Option<OldestOnDisk>,
    stored_bytes: u64,
    db_bytes: u64,
    quarantined: Vec<QuarantinedOnDisk>,
    quarantined_total: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OldestOnDisk {
    task_id: String,
    state: String,
    created_at: Millis,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantinedOnDisk {
    task_id: String,
    reason: String,
    kept_callbacks: u64,
}

/// Which file sled's log is and when it last changed: any write to it changes its
/// modification and change times, a copy its inode.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
#[serde(deny_unknown_fields)]
struct LogIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl LogIdentity {
    fn of(m: &std::fs::Metadata) -> LogIdentity {
        LogIdentity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }
}

/// Removes the file from the store directory `db_dir` (sled's lock held, nothing written
/// yet), syncing the directory when there was one: after a power cut it must not come
/// back beside a store that changed.
pub(super) fn forget(db_dir: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(db_dir.join(TEMP));
    match std::fs::remove_file(db_dir.join(FILE)) {
        Ok(()) => crate::dirsync::sync_dir(db_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `summary` for the store in `db_dir`, which sled has closed: under sled's own lock
/// (an `flock` of its log), so that no one opens the store between the identity taken here
/// and the file in place. Returns `false`, writing nothing, when someone else holds it.
pub(super) fn write(db_dir: &Path, summary: &Summary) -> std::io::Result<bool> {
    use fs2::FileExt;
    let log = std::fs::File::open(db_dir.join(SLED_LOG))?;
    if log.try_lock_exclusive().is_err() {
        return Ok(false);
    }
    let log_meta = log.metadata()?;
    let on_disk = OnDisk {
        format: FORMAT,
        schema: SCHEMA_VERSION,
        log: LogIdentity::of(&log_meta),
        submitted: summary.counts.submitted,
        received: summary.counts.received,
        downloaded: summary.counts.downloaded,
        failed: summary.counts.failed,
        notify_pending: summary.notify.pending,
        notify_delivered: summary.notify.delivered,
        notify_undeliverable: summary.notify.undeliverable,
        oldest_unfinished: summary.oldest_unfinished.as_ref().map(|o| OldestOnDisk {
            task_id: o.task_id.clone(),
            state: o.state.as_str().to_string(),
            created_at: o.created_at,
        }),
        stored_bytes: summary.stored_bytes,
        // sled's files as closed (what an open would measure, less what the open adds).
        db_bytes: log_meta.len().saturating_add(blobs_bytes(db_dir)),
        quarantined: summary
            .quarantined
            .iter()
            .map(|q| QuarantinedOnDisk {
                task_id: q.task_id.clone(),
                reason: q.reason.clone(),
                kept_callbacks: q.kept_callbacks,
            })
            .collect(),
        quarantined_total: summary.quarantined_total,
    };
    let bytes = serde_json::to_vec(&on_disk).map_err(std::io::Error::other)?;
    let temp = db_dir.join(TEMP);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&temp, db_dir.join(FILE))?;
    crate::dirsync::sync_dir(db_dir)?;
    // The lock goes with `log`.
    Ok(true)
}

/// The bytes of sled's blobs (values too large for its log), as `sled::Db::size_on_disk`
/// counts them.
fn blobs_bytes(db_dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(db_dir.join("blobs")) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .fold(0, u64::saturating_add)
}

/// The summary of the store in `data_dir` if its file is there, intact and still describes
/// sled's log as it is; `None` otherwise (the caller opens the store). Never follows a
/// symbolic link to the file, reads at most [`MAX_BYTES`], and takes from it only text a
/// terminal shows as it is.
pub fn read(data_dir: &Path) -> Option<Summary> {
    let db_dir = data_dir.join("db");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(db_dir.join(FILE))
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    (&mut f).take(MAX_BYTES).read_to_end(&mut bytes).ok()?;
    let d: OnDisk = serde_json::from_slice(&bytes).ok()?;
    if d.format != FORMAT || d.schema != SCHEMA_VERSION {
        return None;
    }
    let log = std::fs::symlink_metadata(db_dir.join(SLED_LOG)).ok()?;
    if !log.is_file() || LogIdentity::of(&log) != d.log {
        return None;
    }
    let oldest_unfinished = match d.oldest_unfinished {
        None => None,
        Some(o) => {
            let state = State::parse(&o.state).filter(|s| !s.is_finished())?;
            if !crate::model::valid_task_id(&o.task_id) {
                return None;
            }
            Some(Oldest {
                task_id: o.task_id,
                state,
                created_at: o.created_at,
            })
        }
    };
    if d.quarantined.len() > MAX_QUARANTINED_SHOWN
        || (d.quarantined.len() as u64) > d.quarantined_total
        || !d
            .quarantined
            .iter()
            .all(|q| shows_as_is(&q.task_id) && shows_as_is(&q.reason))
    {
        return None;
    }
    Some(Summary {
        counts: Counts {
            submitted: d.submitted,
            received: d.received,
            downloaded: d.downloaded,
            failed: d.failed,
        },
        notify: NotifyCounts {
            pending: d.notify_pending,
            delivered: d.notify_delivered,
            undeliverable: d.notify_undeliverable,
        },
        oldest_unfinished,
        stored_bytes: d.stored_bytes,
        db_bytes: d.db_bytes,
        quarantined: d
            .quarantined
            .into_iter()
            .map(|q| QuarantinedShown {
                task_id: q.task_id,
                reason: q.reason,
                kept_callbacks: q.kept_callbacks,
            })
            .collect(),
        quarantined_total: d.quarantined_total,
    })
}

/// Short, and no control character (a terminal escape in a crafted file).
fn shows_as_is(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TEXT && !s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Ctx, Event, Report};
    use crate::store::IfMissing;

    fn ctx(now: Millis) -> Ctx {
        Ctx {
            now,
            max_attempts: 3,
            poll_after_ms: 1000,
            notify: true,
        }
    }

    /// A store with a task in each of three states and one quarantined record.
    fn filled(dir: &Path) -> Store {
        let store = Store::open(dir).unwrap();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let track = Event::Track {
                music_task_id: Some(format!("m-{id}")),
            };
            store
                .apply(id, &track, &ctx(10 + i as Millis), IfMissing::Create)
                .unwrap();
        }
        let callback = Event::Callback(Report::Success {
            images: vec!["https://h/0.png".into()],
        });
        store
            .apply("b", &callback, &ctx(20), IfMissing::Reject)
            .unwrap();
        let failed = Event::Callback(Report::Failure {
            reason: "KIE code 501: nope".into(),
        });
        store
            .apply("c", &failed, &ctx(30), IfMissing::Reject)
            .unwrap();
        store.put_raw_task("d", b"\xffdamaged").unwrap();
        // A read finds the damage and puts it in the quarantine index.
        assert!(store.get("d").is_err());
        store
    }

    fn file(dir: &Path) -> std::path::PathBuf {
        dir.join("db").join(FILE)
    }

    #[tokio::test]
    async fn a_clean_close_leaves_what_status_would_read_and_an_open_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        let live = store.summary().unwrap();
        assert_eq!(live.counts.submitted, 1, "{live:?}");
        assert_eq!(live.quarantined.len(), 1, "{live:?}");
        store.close().await.unwrap();

        let found = read(dir.path()).expect("a summary after a clean close");
        let expected = Summary {
            db_bytes: found.db_bytes,
            ..live
        };
        assert_eq!(found, expected);
        assert!(found.db_bytes > 0);

        let store = Store::open(dir.path()).unwrap();
        assert!(!file(dir.path()).exists(), "an open removes it");
        assert_eq!(read(dir.path()), None);
        store.close().await.unwrap();
        assert!(read(dir.path()).is_some());
    }

    #[tokio::test]
    async fn no_summary_while_another_handle_may_still_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        let other = store.clone();
        store.close().await.unwrap();
        assert!(!file(dir.path()).exists());
        other.close().await.unwrap();
        assert!(file(dir.path()).exists(), "the last handle writes it");
    }

    #[tokio::test]
    async fn no_summary_after_a_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        store.inject_write_failures(true);
        store.close().await.unwrap();
        assert!(!file(dir.path()).exists());
    }

    #[tokio::test]
    async fn a_store_changed_by_a_build_that_does_not_know_the_file_is_read_anew() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path()).close().await.unwrap();
        assert!(read(dir.path()).is_some());
        // An older coverd opens sled without removing the file, and writes.
        let db = sled::open(dir.path().join("db")).unwrap();
        db.open_tree("tasks").unwrap().insert("e", b"x").unwrap();
        db.flush().unwrap();
        drop(db);
        assert!(file(dir.path()).exists());
        assert_eq!(read(dir.path()), None);
    }

    #[tokio::test]
    async fn a_copied_store_is_read_anew() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path()).close().await.unwrap();
        let db = dir.path().join("db").join(SLED_LOG);
        let copy = dir.path().join("db").join("copy");
        std::fs::copy(&db, &copy).unwrap();
        std::fs::rename(&copy, &db).unwrap();
        assert_eq!(read(dir.path()), None);
    }

    /// What a crafted or damaged file holds is never shown: each is ignored.
    #[tokio::test]
    async fn a_crafted_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path()).close().await.unwrap();
        let path = file(dir.path());
        let good = std::fs::read_to_string(&path).unwrap();
        assert!(read(dir.path()).is_some());
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        let crafted = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = v.clone();
            f(&mut c);
            serde_json::to_string(&c).unwrap()
        };
        let cases = [
            crafted(&|c| c["quarantined"][0]["reason"] = "\u{1b}]0;owned\u{7}".into()),
            crafted(&|c| c["quarantined"][0]["task_id"] = "x".repeat(MAX_TEXT + 1).into()),
            crafted(&|c| c["quarantined_total"] = 0.into()),
            crafted(&|c| c["oldest_unfinished"]["state"] = "downloaded".into()),
            crafted(&|c| c["oldest_unfinished"]["task_id"] = "../x".into()),
            crafted(&|c| c["format"] = 2.into()),
            crafted(&|c| c["schema"] = (SCHEMA_VERSION + 1).into()),
            crafted(&|c| c["extra"] = 1.into()),
            crafted(&|c| c["log"]["len"] = 1.into()),
            format!("{good}{}", " ".repeat(MAX_BYTES as usize)),
            good[..good.len() / 2].to_string(),
        ];
        for case in &cases {
            std::fs::write(&path, case).unwrap();
            assert_eq!(read(dir.path()), None, "{}", &case[..case.len().min(300)]);
        }
        // Not followed: a link to a good copy.
        v["format"] = FORMAT.into();
        let elsewhere = dir.path().join("elsewhere.json");
        std::fs::write(&elsewhere, serde_json::to_string(&v).unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        assert_eq!(read(dir.path()), None);
        std::fs::remove_file(&path).unwrap();
        std::fs::rename(&elsewhere, &path).unwrap();
        assert!(read(dir.path()).is_some());
    }
}
