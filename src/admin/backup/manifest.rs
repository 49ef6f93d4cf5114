//! `backup.json`: [`Manifest`] (format, version, what the backup holds), its name and format
//! string, and reading and checking it from SRC (at most 64 KiB, through `source`). Owns the
//! manifest's format; must not copy tasks or images.

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::AtFlags;
use serde::{Deserialize, Serialize};

use super::files::io_error;
use super::source::{open_src, open_under};
use crate::admin::AdminError;
use crate::admin::access::shown;

/// The manifest's file name in a backup.
pub const MANIFEST: &str = "backup.json";
/// The manifest's `format`.
pub const FORMAT: &str = "coverd-backup/1";
/// `backup.json` is a few hundred bytes.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// `backup.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    /// The coverd version that wrote the backup.
    pub version: String,
    pub created_at: String,
    pub tasks: u64,
    /// Stored images copied (and verified against their sha256).
    pub images: u64,
    /// Bytes of those images.
    pub bytes: u64,
    /// Files in the object store that records name (not copied: the store's to replicate).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub objects: u64,
    /// Where those objects are (never credentials); absent without object storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<ObjectsAt>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The object store a backup's records name: `restore` checks every object there.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ObjectsAt {
    pub endpoint: String,
    pub bucket: String,
    pub prefix: String,
}

/// Reads and checks `src/backup.json`.
pub fn read_manifest(src: &Path) -> Result<Manifest, AdminError> {
    read_manifest_at(&open_src(src)?, src)
}

/// Reads and checks `backup.json` in the opened SRC.
pub(super) fn read_manifest_at(src_dir: &OwnedFd, src: &Path) -> Result<Manifest, AdminError> {
    let path = src.join(MANIFEST);
    let opened = match rustix::fs::statat(src_dir, MANIFEST, AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => {
            return Err(AdminError::missing(format!(
                "{} has no {MANIFEST}: it is not a coverd backup, or an incomplete one; use a directory written by `coverd admin backup`",
                shown(src).display()
            )));
        }
        _ => open_under(src_dir, OsStr::new(MANIFEST), &path, false)?,
    };
    let (fd, size) = opened;
    if size > MAX_MANIFEST_BYTES {
        return Err(AdminError::failed(format!(
            "{} is {size} bytes, not a manifest coverd wrote; use another backup",
            shown(&path).display()
        )));
    }
    let mut text = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut text)
        .map_err(|e| io_error("read", &path, &e))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| {
        AdminError::failed(format!(
            "{} is damaged ({e}); use another backup",
            shown(&path).display()
        ))
    })?;
    if manifest.format != FORMAT {
        return Err(AdminError::failed(format!(
            "{} has format {:?}, which this coverd does not read ({FORMAT}); use a matching coverd version",
            shown(&path).display(),
            manifest.format
        )));
    }
    Ok(manifest)
}
