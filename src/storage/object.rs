//! An S3-compatible object store as a [`FileStore`] (`storage.kind = "s3"`), through the
//! `object_store` crate: the object of a file is `<prefix><task_id>/<name>.<ext>` in the
//! bucket, its location `s3://<bucket>/<key>`. A file up to [`SINGLE_PUT_MAX`] goes in one
//! PUT with its SHA-256 checksum, which the store checks before it acknowledges; a larger
//! one in parts of [`PART_BYTES`] (one part in memory at a time), each with its checksum,
//! and is then read back and hashed, since stores need not check a whole-object checksum of
//! a multipart upload (Garage 2.5 does not). A failed multipart upload is aborted. Must not
//! fetch, decide anything about a task, or log credentials.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder, Checksum};
use object_store::path::Path as Key;
use object_store::{
    Attribute, Attributes, ClientOptions, ObjectStore as _, ObjectStoreExt as _, PutOptions,
    PutPayload, RetryConfig,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt as _;

use super::slot::Slot;
use super::{FileStore, OBJECT_SCHEME, ReadBack, StorageError};
use crate::config::Config;
use crate::fetch::Ext;
use crate::model::Kind;

/// Files up to this size go in one PUT (held in memory once); larger ones in parts.
pub const SINGLE_PUT_MAX: u64 = 8 << 20;
/// The size of each part of a multipart upload (S3's minimum is 5 MiB but for the last).
pub const PART_BYTES: usize = 8 << 20;
/// The key, under the prefix, whose absence `probe` asks about.
const PROBE_KEY: &str = ".coverd-probe";

/// The bucket and the client.
pub struct ObjectStore {
    client: Arc<AmazonS3>,
    endpoint: String,
    bucket: String,
    prefix: String,
}

impl ObjectStore {
    /// The client for `config`'s `[storage]` (S3 settings and credentials); nothing is
    /// contacted yet.
    pub fn new(config: &Config) -> Result<ObjectStore, StorageError> {
        let s3 = &config.storage.s3;
        let (Some(key_id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) else {
            return Err(StorageError::Setup(
                "the access key id or the secret access key is not set".into(),
            ));
        };
        let user_agent =
            reqwest::header::HeaderValue::from_str(config.download.user_agent.as_str())
                .map_err(|e| StorageError::Setup(e.to_string()))?;
        let options = ClientOptions::new()
            .with_user_agent(user_agent)
            .with_connect_timeout(Duration::from_secs(5))
            // One part or one small file per request: generous for a slow link, yet bounded.
            .with_timeout(Duration::from_secs(120))
            .with_allow_http(s3.endpoint.starts_with("http://"));
        let retry = RetryConfig {
            // A few quick retries for a blip; a store that stays down pauses uploads
            // (download's storage pause) instead of holding a fetch slot for minutes.
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
            ..RetryConfig::default()
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&s3.bucket)
            .with_region(&s3.region)
            .with_access_key_id(key_id.expose())
            .with_secret_access_key(secret.expose())
            .with_virtual_hosted_style_request(!s3.path_style)
            .with_checksum_algorithm(Checksum::SHA256)
            // The SHA-256 checksum header protects the body; signing the payload too would
            // hash every byte a second time.
            .with_unsigned_payload(true)
            .with_client_options(options)
            .with_retry(retry);
        if !s3.endpoint.is_empty() {
            builder = builder.with_endpoint(&s3.endpoint);
        }
        let client = builder
            .build()
            .map_err(|e| StorageError::Setup(e.to_string()))?;
        Ok(ObjectStore {
            client: Arc::new(client),
            endpoint: if s3.endpoint.is_empty() {
                format!("AWS S3 ({})", s3.region)
            } else {
                s3.endpoint.clone()
            },
            bucket: s3.bucket.clone(),
            prefix: s3.prefix.clone(),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The key of the file of `slot` with `ext`.
    pub fn key(&self, slot: &Slot, ext: Ext) -> String {
        format!("{}{}/{}", self.prefix, slot.task_id(), slot.file_name(ext))
    }

    /// The key of a location of this bucket; `None` for anything else.
    fn key_of<'a>(&self, place: &'a str) -> Option<&'a str> {
        place
            .strip_prefix(OBJECT_SCHEME)?
            .strip_prefix(self.bucket.as_str())?
            .strip_prefix('/')
    }

    fn location(&self, key: &str) -> String {
        format!("{OBJECT_SCHEME}{}/{key}", self.bucket)
    }

    fn path(&self, key: &str) -> Result<Key, StorageError> {
        Key::parse(key).map_err(|e| self.refused("takes no such key", e))
    }

    fn refused(&self, what: &str, e: impl std::fmt::Display) -> StorageError {
        StorageError::Unavailable {
            endpoint: self.endpoint.clone(),
            what: what.to_string(),
            detail: one_line(&e.to_string()),
        }
    }

    /// Streams the object at `key` through sha256; `None` when there is none.
    async fn read_key(&self, key: &str) -> Result<Option<ReadBack>, StorageError> {
        let path = self.path(key)?;
        let got = match self.client.get(&path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.refused("did not answer a read", e)),
        };
        let mut stream = got.into_stream();
        let mut hasher = Sha256::new();
        let mut head = Vec::with_capacity(16);
        let mut bytes: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.refused("cut a read short", e))?;
            if head.len() < 16 {
                let take = (16 - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
            }
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
        }
        Ok(Some(ReadBack {
            bytes,
            sha256: hex::encode(hasher.finalize()),
            head,
        }))
    }

    /// One PUT of the whole file, its checksum checked by the store.
    async fn put_whole(
        &self,
        temp: &Path,
        path: &Key,
        ext: Ext,
        sha256: &str,
    ) -> Result<(), StorageError> {
        let body = tokio::fs::read(temp).await?;
        unchanged(sha256, hex::encode(Sha256::digest(&body)))?;
        self.client
            .put_opts(path, PutPayload::from(body), put_options(ext))
            .await
            .map_err(|e| self.refused("refused an upload", e))?;
        Ok(())
    }

    /// A multipart upload in parts of [`PART_BYTES`], one at a time; aborted on failure.
    async fn put_parts(
        &self,
        temp: &Path,
        path: &Key,
        ext: Ext,
        sha256: &str,
    ) -> Result<(), StorageError> {
        let mut upload = self
            .client
            .put_multipart_opts(path, attributes(ext).into())
            .await
            .map_err(|e| self.refused("refused to start a multipart upload", e))?;
        let sent = async {
            let mut file = tokio::fs::File::open(temp).await?;
            let mut hasher = Sha256::new();
            loop {
                let mut part = Vec::with_capacity(PART_BYTES);
                while part.len() < PART_BYTES {
                    let n = (&mut file)
                        .take((PART_BYTES - part.len()) as u64)
                        .read_to_end(&mut part)
                        .await?;
                    if n == 0 {
                        break;
                    }
                }
                if part.is_empty() {
                    break;
                }
                hasher.update(&part);
                let last = part.len() < PART_BYTES;
                upload
                    .put_part(PutPayload::from(part))
                    .await
                    .map_err(|e| self.refused("refused a part of an upload", e))?;
                if last {
                    break;
                }
            }
            unchanged(sha256, hex::encode(hasher.finalize()))?;
            upload
                .complete()
                .await
                .map_err(|e| self.refused("refused to complete a multipart upload", e))?;
            Ok(())
        }
        .await;
        if let Err(e) = sent {
            if let Err(abort) = upload.abort().await {
                tracing::warn!(
                    "could not abort a failed multipart upload to {}: {}; the store's lifecycle rules remove it",
                    self.location(path.as_ref()),
                    one_line(&abort.to_string())
                );
            }
            return Err(e);
        }
        Ok(())
    }
}

/// `Err` when the temporary file read for the upload hashed to `got`, not the fetch's
/// `expected`.
fn unchanged(expected: &str, got: String) -> Result<(), StorageError> {
    if got == expected {
        Ok(())
    } else {
        Err(StorageError::TempChanged {
            expected: expected.to_string(),
            got,
        })
    }
}

/// The object's `Content-Type`, so that a bucket served over HTTP serves it right.
fn attributes(ext: Ext) -> Attributes {
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::ContentType, ext.media_type().into());
    attributes
}

fn put_options(ext: Ext) -> PutOptions {
    PutOptions {
        attributes: attributes(ext),
        ..PutOptions::default()
    }
}

/// An error's text on one line (the store's XML answers span several).
fn one_line(text: &str) -> String {
    let mut out: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.len() > 400 {
        let mut end = 400;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

#[async_trait]
impl FileStore for ObjectStore {
    fn place(&self, slot: &Slot, ext: Ext) -> String {
        self.location(&self.key(slot, ext))
    }

    async fn put(
        &self,
        temp: &Path,
        slot: &Slot,
        ext: Ext,
        bytes: u64,
        sha256: &str,
    ) -> Result<String, StorageError> {
        let key = self.key(slot, ext);
        let path = self.path(&key)?;
        let sent = if bytes <= SINGLE_PUT_MAX {
            self.put_whole(temp, &path, ext, sha256).await
        } else {
            match self.put_parts(temp, &path, ext, sha256).await {
                // The whole object's checksum was not checked by the store: read it back.
                Ok(()) => match self.read_key(&key).await {
                    Ok(Some(back)) if back.sha256 == sha256 && back.bytes == bytes => Ok(()),
                    Ok(back) => {
                        let got = back.map(|b| b.sha256).unwrap_or_else(|| "nothing".into());
                        let _ = self.client.delete(&path).await;
                        Err(StorageError::Mismatch {
                            location: self.location(&key),
                            expected: sha256.to_string(),
                            got,
                        })
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        };
        let _ = tokio::fs::remove_file(temp).await;
        sent?;
        // Other extensions of the same slot (an earlier attempt with another type): one
        // listing rather than a delete per extension; best effort, as the file is stored.
        if slot.exts().nth(1).is_some()
            && let Ok(found) = self.existing(slot).await
        {
            for (_, place) in found.iter().filter(|(e, _)| *e != ext) {
                if let Some(key) = self.key_of(place) {
                    let _ = self.client.delete(&self.path(key)?).await;
                }
            }
        }
        Ok(self.location(&key))
    }

    async fn read(&self, place: &str) -> Result<Option<ReadBack>, StorageError> {
        match self.key_of(place) {
            Some(key) => self.read_key(key).await,
            None => Ok(None),
        }
    }

    async fn size(&self, place: &str) -> Result<Option<u64>, StorageError> {
        let Some(key) = self.key_of(place) else {
            return Ok(None);
        };
        match self.client.head(&self.path(key)?).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.refused("did not answer", e)),
        }
    }

    async fn existing(&self, slot: &Slot) -> Result<Vec<(Ext, String)>, StorageError> {
        let dir = self.path(&format!("{}{}", self.prefix, slot.task_id()))?;
        let mut listed = self.client.list(Some(&dir));
        let mut found = Vec::new();
        let mut seen = 0;
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(|e| self.refused("did not answer a listing", e))?;
            seen += 1;
            if seen > 1000 {
                break;
            }
            for ext in slot.exts() {
                if meta.location.as_ref() == self.key(slot, ext) {
                    found.push((ext, self.location(meta.location.as_ref())));
                }
            }
        }
        Ok(found)
    }

    async fn discard(&self, slot: &Slot) -> Result<(), StorageError> {
        for ext in slot.exts() {
            match self.client.delete(&self.path(&self.key(slot, ext))?).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.refused("refused a delete", e)),
            }
        }
        Ok(())
    }

    async fn remove_task(&self, _kind: Kind, task_id: &str) -> Result<(), StorageError> {
        if !crate::model::valid_task_id(task_id) {
            return Ok(());
        }
        let dir = self.path(&format!("{}{task_id}", self.prefix))?;
        let listed: Vec<_> = self.client.list(Some(&dir)).collect().await;
        for meta in listed {
            let meta = meta.map_err(|e| self.refused("did not answer a listing", e))?;
            match self.client.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.refused("refused a delete", e)),
            }
        }
        Ok(())
    }

    async fn probe(&self) -> Result<(), StorageError> {
        let key = format!("{}{PROBE_KEY}", self.prefix);
        match self.client.head(&self.path(&key)?).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.refused("did not answer", e)),
        }
    }

    fn describe(&self) -> String {
        format!("{OBJECT_SCHEME}{}/{}", self.bucket, self.prefix)
    }
}
