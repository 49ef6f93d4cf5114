//! Who may read the stored files: private to the daemon's user by default (0700 / 0600), or
//! readable by the group of `[storage] local_group` (`images/` and what is in it 0750 /
//! 0640, the data directory 0710 so that the group can reach `images/` by name but list or
//! open nothing else). Owns the modes and group of `images/`, of what is in it, and of the
//! data directory itself; must not touch `db/`, `tmp/`, `admin.sock` or any file's content.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::config::Config;

/// At most this many entries of `images/` (tasks) and of one task's directory (files) are
/// brought to the configured mode at start; a directory with more is not ours to walk.
const MAX_TASK_DIRS: usize = 50_000_000;
const MAX_FILES_PER_TASK: usize = 1_000;

/// The modes and group every stored file and directory gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileAccess {
    /// `Some`: shared with this group; `None`: private, the group left as created.
    gid: Option<u32>,
}

impl FileAccess {
    pub fn of(config: &Config) -> FileAccess {
        FileAccess {
            gid: config.storage.local_group.as_ref().map(|g| g.gid),
        }
    }

    /// Private: what every directory and file was before `local_group` existed.
    pub fn private() -> FileAccess {
        FileAccess { gid: None }
    }

    pub fn dir_mode(self) -> u32 {
        if self.gid.is_some() { 0o750 } else { 0o700 }
    }

    pub fn file_mode(self) -> u32 {
        if self.gid.is_some() { 0o640 } else { 0o600 }
    }

    /// The data directory's own mode: only traversable by the group, never listable.
    pub fn data_dir_mode(self) -> u32 {
        if self.gid.is_some() { 0o710 } else { 0o700 }
    }

    fn group(self) -> Option<rustix::fs::Gid> {
        self.gid.map(rustix::fs::Gid::from_raw)
    }

    /// Gives an open file (a download before it is synced and renamed into `images/`) the
    /// mode and group of a stored file. Private: nothing to do, it was created 0600.
    pub fn set_file(self, file: &File) -> io::Result<()> {
        if let Some(group) = self.group() {
            rustix::fs::fchown(file, None, Some(group))?;
            file.set_permissions(std::fs::Permissions::from_mode(self.file_mode()))?;
        }
        Ok(())
    }

    /// Gives a directory of `images/` (or the data directory, with `mode`) its mode and
    /// group. Does not follow a symbolic link: only the daemon's own directories are passed.
    fn set(self, path: &Path, mode: u32) -> io::Result<()> {
        if let Some(group) = self.group() {
            rustix::fs::chown(path, None, Some(group))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }

    pub fn set_dir(self, path: &Path) -> io::Result<()> {
        self.set(path, self.dir_mode())
    }

    fn matches(self, meta: &std::fs::Metadata, mode: u32) -> bool {
        meta.mode() & 0o7777 == mode && self.gid.is_none_or(|gid| meta.gid() == gid)
    }

    /// At start: brings the data directory, `images/` and everything in it to this access.
    /// Walks `images/` only when `images/` itself differs (the setting changed since the
    /// last start, or a restore wrote the directory), so a normal start costs two `stat`s.
    /// Entries that are neither directories nor regular files are left alone (never
    /// followed). Returns how many entries were changed.
    /// `images` is the data directory's `images/` (`download` names it).
    pub fn reconcile(self, data_dir: &Path, images: &Path) -> io::Result<usize> {
        let meta = std::fs::metadata(data_dir)?;
        if !self.matches(&meta, self.data_dir_mode()) {
            self.set(data_dir, self.data_dir_mode())?;
        }
        let meta = std::fs::symlink_metadata(images)?;
        if self.matches(&meta, self.dir_mode()) {
            return Ok(0);
        }
        let mut changed = 0;
        for task in std::fs::read_dir(images)?.take(MAX_TASK_DIRS) {
            let task = task?;
            let meta = task.metadata()?; // of the entry itself: read_dir does not follow
            if !meta.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(task.path())?.take(MAX_FILES_PER_TASK) {
                let file = file?;
                let meta = file.metadata()?;
                if meta.is_file() && !self.matches(&meta, self.file_mode()) {
                    self.set(&file.path(), self.file_mode())?;
                    changed += 1;
                }
            }
            if !self.matches(&meta, self.dir_mode()) {
                self.set_dir(&task.path())?;
                changed += 1;
            }
        }
        // Last: a start cut short before this walks again.
        self.set_dir(images)?;
        Ok(changed + 1)
    }
}
