//! Where stored files live: the [`FileStore`] trait at the seam where a checked, hashed
//! temporary file becomes a stored file, its two implementations ([`local`]: the data
//! directory's `images/` and `files/`; [`object`]: an S3-compatible object store), and
//! [`Files`], which picks the one new files go to and the one a record names.
//! Owns the stored places (relative paths, `s3://bucket/key` locations, object keys);
//! must not fetch, decide state transitions or touch the task store.

pub mod local;
pub mod object;
pub mod slot;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{Config, StorageKind};
use crate::fetch::Ext;
use crate::model::{Image, Kind};
pub use slot::Slot;

pub use local::LocalDir;
pub use object::ObjectStore;

pub use crate::model::{OBJECT_SCHEME, is_object_location};

/// A stored file read back (streaming): its size, sha256 (hex) and first 16 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBack {
    pub bytes: u64,
    pub sha256: String,
    pub head: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The data directory's filesystem (disk full, permissions, I/O error).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The object store did not answer, or refused (down, unreachable, wrong key, no such
    /// bucket): uploads pause; nothing is the file's fault.
    #[error("the object store {endpoint} {what}: {detail}")]
    Unavailable {
        endpoint: String,
        what: String,
        detail: String,
    },
    /// What the store holds after an upload is not what was sent (read back and hashed).
    #[error(
        "the object {location} read back as {got}, not the uploaded {expected}; uploaded again later"
    )]
    Mismatch {
        location: String,
        expected: String,
        got: String,
    },
    /// The temporary file no longer matches the sha256 its fetch computed.
    #[error(
        "the fetched file changed on disk before its upload (sha256 {got}, fetched {expected})"
    )]
    TempChanged { expected: String, got: String },
    /// A configuration the object store client refuses.
    #[error("cannot set up the object store client: {0}; check the [storage] keys")]
    Setup(String),
}

impl StorageError {
    /// Whether this is the object store being down or refusing (pause, no attempt used).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StorageError::Unavailable { .. })
    }

    /// Whether the data directory's filesystem is full (pause, no attempt used).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StorageError::Io(e) if e.raw_os_error() == Some(libc_enospc()))
    }
}

fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

/// One place files are stored. Every place is built from a [`Slot`] (a valid task id and a
/// name its kind gives) and an extension, never taken from a record.
#[async_trait]
pub trait FileStore: Send + Sync {
    /// The place of the file of `slot` with `ext`, as a record holds it.
    fn place(&self, slot: &Slot, ext: Ext) -> String;

    /// Stores the complete, synced temporary file `temp` (`bytes` long, `sha256` as its fetch
    /// computed) at `slot`'s place with `ext`, durably: once this returns `Ok` the file is
    /// whole there and matches `sha256`. The temporary file is gone afterwards either way.
    /// Returns the place.
    async fn put(
        &self,
        temp: &Path,
        slot: &Slot,
        ext: Ext,
        bytes: u64,
        sha256: &str,
    ) -> Result<String, StorageError>;

    /// Reads the file at `place` (one of this store's) back, streaming; `None` when there is
    /// none.
    async fn read(&self, place: &str) -> Result<Option<ReadBack>, StorageError>;

    /// The size of the file at `place`; `None` when there is none.
    async fn size(&self, place: &str) -> Result<Option<u64>, StorageError>;

    /// The places where a file of `slot` is stored, any extension of its type.
    async fn existing(&self, slot: &Slot) -> Result<Vec<(Ext, String)>, StorageError>;

    /// Removes the file(s) of `slot`, any extension of its type (known damaged: `retry`).
    async fn discard(&self, slot: &Slot) -> Result<(), StorageError>;

    /// Removes every stored file of task `task_id` of `kind` (a valid id: `prune`,
    /// `forget`).
    async fn remove_task(&self, kind: Kind, task_id: &str) -> Result<(), StorageError>;

    /// Whether the store takes requests now (after it was down).
    async fn probe(&self) -> Result<(), StorageError>;

    /// The store in words, for messages (`the data directory`, `s3://bucket/prefix`).
    fn describe(&self) -> String;
}

/// The stores of one data directory: the local directory always (records written before a
/// switch to an object store, or before `migrate-files`, still name it) and the object
/// store when `storage.kind = "s3"`. New files go to [`Files::primary`].
#[derive(Clone)]
pub struct Files {
    local: Arc<LocalDir>,
    object: Option<Arc<ObjectStore>>,
}

impl Files {
    /// The stores `config` names (an object store client is only built, not contacted).
    pub fn new(config: &Config) -> Result<Files, StorageError> {
        let object = match config.storage.kind {
            StorageKind::Local => None,
            StorageKind::S3 => Some(Arc::new(ObjectStore::new(config)?)),
        };
        Ok(Files {
            local: Arc::new(LocalDir::new(config)),
            object,
        })
    }

    /// Where new files go.
    pub fn primary(&self) -> Arc<dyn FileStore> {
        match &self.object {
            Some(o) => o.clone(),
            None => self.local.clone(),
        }
    }

    pub fn local(&self) -> &Arc<LocalDir> {
        &self.local
    }

    pub fn object(&self) -> Option<&Arc<ObjectStore>> {
        self.object.as_ref()
    }

    /// Every store a record may name here, the primary first.
    pub fn all(&self) -> Vec<Arc<dyn FileStore>> {
        let mut all = vec![self.primary()];
        if self.object.is_some() {
            all.push(self.local.clone());
        }
        all
    }

    /// Where the stored file `img` of task `task_id` of `kind` is, and the store that holds
    /// it ([`recorded_place`], the one rule).
    pub fn recorded(
        &self,
        kind: Kind,
        task_id: &str,
        img: &Image,
    ) -> Result<Option<Recorded>, String> {
        let Some(found) = recorded_place(kind, task_id, img, self.object.as_deref())? else {
            return Ok(None);
        };
        let store: Arc<dyn FileStore> = match found.object {
            true => self
                .object
                .clone()
                .expect("an object place needs the object store"),
            false => self.local.clone(),
        };
        Ok(Some(Recorded {
            place: found.place,
            slot: found.slot,
            ext: found.ext,
            store,
        }))
    }

    /// Removes every object of a task (none without an object store).
    /// `prune` and `forget` call this before they remove the record (SPEC: a crash between
    /// leaves a record the next run finishes, never an orphaned object), and remove the
    /// task's directory in the data directory after it.
    pub async fn remove_objects(&self, kind: Kind, task_id: &str) -> Result<(), StorageError> {
        match &self.object {
            Some(o) => o.remove_task(kind, task_id).await,
            None => Ok(()),
        }
    }
}

/// A stored file's place as its record names it, checked ([`recorded_place`]).
pub struct Place {
    pub slot: Slot,
    pub ext: Ext,
    /// The place itself (as recorded, and as built from `slot` and `ext`).
    pub place: String,
    /// In the object store (else in the data directory).
    pub object: bool,
}

/// Where the stored file `img` of task `task_id` of `kind` is: its [`Slot`], the extension,
/// and whether in the data directory or in `object`. `Ok(None)` when the record names no
/// file; `Err` (why) unless `task_id` is valid, the name is one its kind gives, and the
/// recorded place is exactly the slot's place for one of its type's extensions: its path in
/// the data directory, or its location in `object` (an object's location with no object
/// store, or of another bucket or prefix, is refused). Every place a stored file is read,
/// copied or removed at is built from this, never taken from a record.
pub fn recorded_place(
    kind: Kind,
    task_id: &str,
    img: &Image,
    object: Option<&ObjectStore>,
) -> Result<Option<Place>, String> {
    let slot = Slot::of(kind, task_id, img)?;
    let Some(place) = &img.path else {
        return Ok(None);
    };
    let what = match kind {
        Kind::Cover => "image",
        _ => "file",
    };
    let exts: Vec<&str> = slot.exts().map(Ext::as_str).collect();
    // The store the record names, and the place it should have there but for the extension.
    let (object, stem) = if is_object_location(place) {
        let Some(object) = object else {
            return Err(format!(
                "{what} {} is the object {place:?}, and no object store is configured; use the [storage] settings that name its bucket and prefix",
                img.index
            ));
        };
        let stem = format!("{}{task_id}/{}", object.describe(), img.name);
        (Some(object), stem)
    } else {
        (None, format!("{}/{}", slot.dir(), img.name))
    };
    let place_with = |e: Ext| match object {
        Some(o) => o.place(&slot, e),
        None => slot.path(e),
    };
    let found = slot.exts().find(|e| *place == place_with(*e));
    match found {
        Some(ext) => Ok(Some(Place {
            place: place.clone(),
            slot,
            ext,
            object: object.is_some(),
        })),
        None => Err(format!(
            "{what} {} names {place:?}, not {stem}.<{}>",
            img.index,
            exts.join("|")
        )),
    }
}

/// A recorded file found in one of the stores ([`Files::recorded`]).
pub struct Recorded {
    pub place: String,
    pub slot: Slot,
    pub ext: Ext,
    pub store: Arc<dyn FileStore>,
}

/// A complete file already at one of `slot`'s places in `store` (stored before a crash that
/// came before its record): read back, its type checked from its bytes. `None` when there
/// is none, or it cannot be read now.
pub async fn adopt_existing(store: &dyn FileStore, slot: &Slot) -> Option<(String, Ext, ReadBack)> {
    let found = store.existing(slot).await.ok()?;
    for (ext, place) in found {
        let Ok(Some(back)) = store.read(&place).await else {
            continue;
        };
        if Ext::sniff(&back.head) == Some(ext) {
            return Some((place, ext, back));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Secret, StorageKind};

    fn object_store(prefix: &str) -> ObjectStore {
        let mut config = Config::default();
        config.storage.kind = StorageKind::S3;
        config.storage.s3.endpoint = "http://127.0.0.1:9".into();
        config.storage.s3.bucket = "coverd".into();
        config.storage.s3.prefix = prefix.into();
        config.storage.s3.access_key_id = Some(Secret::new("GKid"));
        config.storage.s3.secret_access_key = Some(Secret::new("secret"));
        ObjectStore::new(&config).expect("a client is built without contacting the store")
    }

    fn stored_at(index: u32, place: &str) -> Image {
        let mut img = Image::pending(index, "https://h/x.png".into(), 0);
        img.path = Some(place.into());
        img
    }

    /// A record names its file's own place exactly, in the data directory or in the object
    /// store of these settings; anything else is refused with the reason, before any place
    /// is read or removed.
    #[test]
    fn a_record_names_only_its_own_place() {
        let vm1 = object_store("vm1/");
        let ok = |place: &str, object: Option<&ObjectStore>| {
            recorded_place(Kind::Cover, "t1", &stored_at(0, place), object)
        };
        let local = ok("images/t1/0.png", None).unwrap().unwrap();
        assert!(!local.object);
        assert_eq!(local.ext, Ext::Png);
        let obj = ok("s3://coverd/vm1/t1/0.jpg", Some(&vm1)).unwrap().unwrap();
        assert!(obj.object);
        assert_eq!(obj.ext, Ext::Jpg);
        // Also a local place while an object store is configured (before migrate-files).
        assert!(!ok("images/t1/0.png", Some(&vm1)).unwrap().unwrap().object);
        for (place, object, why) in [
            (
                "s3://coverd/vm1/t1/0.png",
                None,
                "no object store is configured",
            ),
            (
                "s3://coverd/vm2/t1/0.png",
                Some(&vm1),
                "not s3://coverd/vm1/t1/0.<",
            ),
            (
                "s3://other/vm1/t1/0.png",
                Some(&vm1),
                "not s3://coverd/vm1/t1/0.<",
            ),
            (
                "s3://coverd/vm1/t2/0.png",
                Some(&vm1),
                "not s3://coverd/vm1/t1/0.<",
            ),
            (
                "s3://coverd/vm1/t1/0.mp3",
                Some(&vm1),
                "not s3://coverd/vm1/t1/0.<",
            ),
            ("images/t2/0.png", Some(&vm1), "not images/t1/0.<"),
            ("../../etc/passwd", None, "not images/t1/0.<"),
        ] {
            let err = ok(place, object)
                .err()
                .unwrap_or_else(|| panic!("{place} accepted"));
            assert!(err.contains(why), "{place}: {err}");
        }
        // An invalid task id is refused before any place is built from it.
        let err = recorded_place(
            Kind::Cover,
            "../t",
            &stored_at(0, "images/../t/0.png"),
            None,
        );
        assert!(err.is_err());
    }

    #[test]
    fn an_object_key_is_the_prefix_the_task_and_the_file_name() {
        let vm1 = object_store("vm1/");
        let img = Image::pending(1, "https://h/x.png".into(), 0);
        let slot = Slot::of(Kind::Cover, "t1", &img).unwrap();
        assert_eq!(vm1.key(&slot, Ext::Webp), "vm1/t1/1.webp");
        assert_eq!(vm1.place(&slot, Ext::Webp), "s3://coverd/vm1/t1/1.webp");
        assert_eq!(vm1.describe(), "s3://coverd/vm1/");
        assert_eq!(object_store("").key(&slot, Ext::Png), "t1/1.png");
    }
}
