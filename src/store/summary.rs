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
pub(super) const SLED_LOG: &str = "db";
/// Bumped when [`OnDisk`] changes; any other value is ignored.
pub(super) const FORMAT: u32 = 1;
/// Far more than [`MAX_QUARANTINED_SHOWN`] entries of the longest reason take.
pub(super) const MAX_BYTES: u64 = 256 * 1024;
/// Longest quarantined task id (lossy text of a key) and reason taken from the file.
pub(super) const MAX_TEXT: usize = 1024;

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
