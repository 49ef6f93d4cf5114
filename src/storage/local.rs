//! The data directory as a [`FileStore`]: `images/<task_id>/<index>.<ext>` and
//! `files/<task_id>/<name>.<ext>`, installed in the order temp file → fsync → rename →
//! fsync of the task's directory and of `images/` (or `files/`), with the mode and group of
//! `storage.local_group`. Must not fetch or decide anything about a task.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::slot::{Slot, task_dir};
use super::{FileStore, ReadBack, StorageError};
use crate::config::Config;
use crate::dirsync::{DirSyncs, create_private_dir};
use crate::fetch::Ext;
use crate::model::Kind;
use crate::sharing::FileAccess;

/// The data directory's stored files.
pub struct LocalDir {
    data_dir: PathBuf,
    access: FileAccess,
    /// The directory fsyncs of installs, shared by files landing at once.
    syncs: Arc<DirSyncs>,
}

impl LocalDir {
    pub fn new(config: &Config) -> LocalDir {
        LocalDir::at(&config.data_dir, FileAccess::of(config))
    }

    pub fn at(data_dir: &Path, access: FileAccess) -> LocalDir {
        LocalDir {
            data_dir: data_dir.to_path_buf(),
            access,
            syncs: Arc::new(DirSyncs::default()),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

#[async_trait]
impl FileStore for LocalDir {
    fn place(&self, slot: &Slot, ext: Ext) -> String {
        slot.path(ext)
    }

    async fn put(
        &self,
        temp: &Path,
        slot: &Slot,
        ext: Ext,
        _bytes: u64,
        _sha256: &str,
    ) -> Result<String, StorageError> {
        install(
            self.syncs.clone(),
            self.access,
            &self.data_dir,
            temp,
            slot,
            ext,
        )
        .await?;
        Ok(slot.path(ext))
    }

    async fn read(&self, place: &str) -> Result<Option<ReadBack>, StorageError> {
        let path = self.data_dir.join(place);
        let read = tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .map_err(std::io::Error::other)?;
        match read {
            Ok((bytes, sha256, head)) => Ok(Some(ReadBack {
                bytes,
                sha256,
                head,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn size(&self, place: &str) -> Result<Option<u64>, StorageError> {
        match tokio::fs::metadata(self.data_dir.join(place)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn existing(&self, slot: &Slot) -> Result<Vec<(Ext, String)>, StorageError> {
        let mut found = Vec::new();
        for ext in slot.exts() {
            let place = slot.path(ext);
            if tokio::fs::symlink_metadata(self.data_dir.join(&place))
                .await
                .is_ok_and(|m| m.is_file())
            {
                found.push((ext, place));
            }
        }
        Ok(found)
    }

    async fn discard(&self, slot: &Slot) -> Result<(), StorageError> {
        let data_dir = self.data_dir.clone();
        let slot = slot.clone();
        tokio::task::spawn_blocking(move || discard(&data_dir, &slot))
            .await
            .map_err(std::io::Error::other)??;
        Ok(())
    }

    async fn remove_task(&self, kind: Kind, task_id: &str) -> Result<(), StorageError> {
        if !crate::model::valid_task_id(task_id) {
            return Ok(());
        }
        match tokio::fs::remove_dir_all(self.data_dir.join(task_dir(kind, task_id))).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn probe(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn describe(&self) -> String {
        format!("the data directory {}", self.data_dir.display())
    }
}

/// The bytes of the regular files directly in `dir` (a task's directory), 0 when unreadable.
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Moves a complete, synced temp file to its slot's path with `ext` (with the mode and group
/// of `access`) and syncs the directories, so that after this returns the file survives a
/// crash. Files of the same slot with another extension of its type (an earlier attempt)
/// are removed first. Each directory fsync starts after the rename and is shared with
/// installs landing at the same time (`dirsync`).
pub async fn install(
    syncs: Arc<DirSyncs>,
    access: FileAccess,
    data_dir: &Path,
    temp: &Path,
    slot: &Slot,
    ext: Ext,
) -> std::io::Result<()> {
    let kind_dir = data_dir.join(slot.kind().describe().dir);
    let dir = data_dir.join(slot.dir());
    let final_path = data_dir.join(slot.path(ext));
    let others: Vec<PathBuf> = slot
        .exts()
        .filter(|e| *e != ext)
        .map(|e| data_dir.join(slot.path(e)))
        .collect();
    let temp_owned = temp.to_path_buf();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let temp = temp_owned;
        if access != FileAccess::private() {
            // Readable by `storage.local_group` before it is at its final path, and durably
            // so: the sync of the temp file came before this change of its inode.
            let file = std::fs::File::open(&temp)?;
            access.set_file(&file)?;
            file.sync_all()?;
            create_private_dir(&dir)?;
            access.set_dir(&dir)?;
        } else {
            create_private_dir(&dir)?;
        }
        for p in others {
            if p.exists() {
                std::fs::remove_file(&p)?;
            }
        }
        std::fs::rename(&temp, &final_path)?;
        if crate::broken::active(crate::broken::Break::SkipImageDirsync) {
            // TEST ONLY (`COVERD_TEST_BREAK`): the rename is left to chance.
            return Ok(());
        }
        syncs.sync(&dir)?;
        // Always, not only when this call created `dir`: two files of a new task install at
        // once, and the second must not be recorded before the entry of `dir` in `images/`
        // (or `files/`) is durable, which only the first one's sync would otherwise
        // guarantee. Installs at the same time share this sync.
        syncs.sync(&kind_dir)?;
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?;
    if result.is_err() {
        // Never leave a partial download behind; it would be removed at the next start anyway.
        let _ = tokio::fs::remove_file(temp).await;
    }
    result
}

/// Removes the stored file(s) of `slot` — any extension of its type — because they are
/// known to be damaged (`admin retry`). Without this, the re-fetch would adopt a corrupt
/// file that still looks like its type as if a crash had left it (see
/// [`super::adopt_existing`]).
pub fn discard(data_dir: &Path, slot: &Slot) -> std::io::Result<()> {
    for ext in slot.exts() {
        match std::fs::remove_file(data_dir.join(slot.path(ext))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A file's size, sha256 (hex) and first 16 bytes, read in 128 KiB steps (bounded memory
/// for any size of file).
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String, Vec<u8>)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut head = Vec::with_capacity(16);
    let mut total: u64 = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if head.len() < 16 {
            let take = (16 - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize()), head))
}
