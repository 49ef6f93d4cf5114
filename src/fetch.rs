//! The HTTP fetch of one image into a temp file under the data directory: guard check,
//! GET, status classification, size cap, image sniffing and sha256 while streaming, and
//! `sync_all` before returning. It must not touch the store or any final image path: the
//! caller decides whether and where the temp file becomes a stored image, and retries
//! (with `retry`'s backoff; [`FetchError::is_transient`] says which failures may clear).
//!
//! On every error the temp file is removed, also when the fetch future is dropped mid-way.
//! Error messages go into task records and logs, so they never contain a URL's query
//! string (signed URLs carry tokens there): URLs are shown as scheme://host/path.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use sha2::{Digest, Sha256};
use std::io::Write as _;
use url::Url;

use crate::config::DownloadConfig;
use crate::guard::{Refused, UrlGuard};
use crate::retry::{self, NoAnswer};

/// Time allowed to set up a TCP (and TLS) connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The window over which `download.min_bytes_per_second` is averaged once the body flows
/// (curl's `--speed-time`).
pub const SPEED_WINDOW: Duration = Duration::from_secs(30);

/// A file is not fetched while it would leave less than this free on the data directory's
/// filesystem (SPEC "Task kinds"): it waits as for a full disk.
pub const FREE_SPACE_RESERVE: u64 = 1 << 30;

/// Bytes of the body kept to recognise the image type and describe what was served.
const HEAD_LEN: usize = 16;

pub use crate::kind::{Ext, FileType};

/// One image fetched into a complete, synced temp file.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// `<tmp_dir>/<random hex>.part`; the caller moves or removes it.
    pub temp_path: PathBuf,
    pub bytes: u64,
    /// 64 lowercase hex digits.
    pub sha256: String,
    pub ext: Ext,
    /// The URL after redirects, in full: it may carry a token, so log [`display_url`] of it.
    pub final_url: String,
}

/// The HTTP client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FetchSetupError {
    #[error("download.user_agent is empty: KIE's file hosts refuse requests without one")]
    EmptyUserAgent,
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Why one fetch failed. `Display` is a short human reason for the task record.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The guard refused the URL, a redirect hop or every resolved address. Permanent.
    #[error("{0}")]
    Refused(#[from] Refused),
    /// 403, 404 or 410: the link may have expired; a refreshed URL may still work.
    #[error("HTTP {}", status_text(*status))]
    Gone { status: u16 },
    /// Any other non-2xx status, or 206 Partial Content. Transient for 206, 408, 425, 429
    /// and 5xx.
    #[error("HTTP {}", status_text(*status))]
    Status {
        status: u16,
        transient: bool,
        retry_after: Option<Duration>,
    },
    /// Content-Length or the streamed body exceeded the cap of the expected type
    /// (`download.max_image_bytes`, `max_audio_bytes`, …). Permanent.
    #[error("{} larger than {limit} bytes", expect.noun())]
    TooLarge { limit: u64, expect: FileType },
    /// The body is not of the expected type (for an image: PNG, JPEG, WebP or GIF).
    /// Permanent. `start` describes the first bytes, e.g. `starts with '<!DOCTYPE html>'`.
    #[error("not {}: content-type {content_type}, {start}", expect.describe())]
    WrongType {
        expect: FileType,
        content_type: String,
        start: String,
    },
    /// The declared size would leave less than [`FREE_SPACE_RESERVE`] free on the data
    /// directory's filesystem: not fetched; downloads wait as for a full disk.
    #[error(
        "{need} bytes would leave less than 1 GiB free on the data directory's filesystem ({free} bytes free)"
    )]
    NoRoom { need: u64, free: u64 },
    /// A 2xx answer with an empty body. Transient: KIE's hosts have answered so for files
    /// that exist.
    #[error("not {}: content-type {content_type}, empty body", expect.describe())]
    Empty {
        expect: FileType,
        content_type: String,
    },
    /// No connection could be made (refused, DNS failure, connect timeout, TLS).
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The request failed after connecting but before a response arrived.
    #[error("request to {url} failed: {reason}")]
    Request { url: String, reason: String },
    /// `stalled`: no data for `after` (the stall timeout, `download.timeout`); else no
    /// response headers within `after`.
    #[error("timed out after {}{}", humantime::format_duration(*after),
        if *stalled { " without data" } else { " waiting for the response headers" })]
    Timeout { after: Duration, stalled: bool },
    /// The body flowed slower than `download.min_bytes_per_second` over a whole window.
    #[error("too slow: {rate} bytes/s over {}, below download.min_bytes_per_second = {floor}",
        humantime::format_duration(*over))]
    TooSlow {
        rate: u64,
        floor: u64,
        over: Duration,
    },
    /// The body ended early or broke off mid-way.
    #[error("body cut off after {received}{} bytes",
        expected.map(|e| format!(" of {e}")).unwrap_or_default())]
    CutBody {
        received: u64,
        expected: Option<u64>,
    },
    /// Writing the temp file failed (local disk).
    #[error("local disk error writing the temp file: {0}")]
    Io(#[from] io::Error),
}

impl FetchError {
    /// The local disk is full (or the user's quota used up) while writing the temp file:
    /// the disk's fault, not the image's, so it must not use up an attempt.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, FetchError::NoRoom { .. })
            || matches!(self, FetchError::Io(e) if matches!(
                e.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            ))
    }

    /// Worth retrying with backoff: connect errors, timeouts, cut bodies, 206 (a partial
    /// answer), 408/425/429/5xx and local disk errors.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Connect { .. }
            | FetchError::Request { .. }
            | FetchError::Timeout { .. }
            | FetchError::TooSlow { .. }
            | FetchError::CutBody { .. }
            | FetchError::Empty { .. }
            | FetchError::NoRoom { .. }
            | FetchError::Io(_) => true,
            FetchError::Status { transient, .. } => *transient,
            FetchError::Refused(_)
            | FetchError::Gone { .. }
            | FetchError::TooLarge { .. }
            | FetchError::WrongType { .. } => false,
        }
    }

    /// The server's `Retry-After`, when it sent one with a transient status.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// 403, 404 or 410: the caller may ask KIE for a refreshed URL and try that.
    pub fn is_gone(&self) -> bool {
        matches!(self, FetchError::Gone { .. })
    }
}

/// Fetches image URLs through one shared HTTP client that applies the [`UrlGuard`].
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    guard: UrlGuard,
    cfg: DownloadConfig,
    read_timeout: Duration,
    speed_window: Duration,
    /// The free space a fetch must leave on the filesystem of its temporary directory.
    free_space_reserve: u64,
}

impl Fetcher {
    /// A client with rustls, the guard's resolver and redirect policy, no proxy, no
    /// Referer, `cfg.user_agent`, [`CONNECT_TIMEOUT`], and `cfg.timeout` both to the response
    /// headers and as the longest stall between bytes. No limit on the whole request: a big
    /// file takes as long as it takes while it flows at `cfg.min_bytes_per_second` or more.
    pub fn new(cfg: &DownloadConfig, guard: UrlGuard) -> Result<Fetcher, FetchSetupError> {
        let client = build_client(cfg, &guard, cfg.timeout)?;
        Ok(Fetcher {
            client,
            guard,
            cfg: cfg.clone(),
            read_timeout: cfg.timeout,
            speed_window: SPEED_WINDOW,
            free_space_reserve: FREE_SPACE_RESERVE,
        })
    }

    /// The same fetcher with another stall timeout (tests use a fraction of a second).
    pub fn with_read_timeout(self, read_timeout: Duration) -> Result<Fetcher, FetchSetupError> {
        let client = build_client(&self.cfg, &self.guard, read_timeout)?;
        Ok(Fetcher {
            client,
            read_timeout,
            ..self
        })
    }

    /// The free space a fetch must leave (tests on a small filesystem; the daemon keeps
    /// [`FREE_SPACE_RESERVE`]).
    #[cfg(any(test, feature = "testing"))]
    pub fn with_free_space_reserve(self, reserve: u64) -> Fetcher {
        Fetcher {
            free_space_reserve: reserve,
            ..self
        }
    }

    /// The same fetcher averaging the speed floor over another window (tests use a fraction
    /// of a second instead of [`SPEED_WINDOW`]).
    pub fn with_speed_window(self, speed_window: Duration) -> Fetcher {
        Fetcher {
            speed_window,
            ..self
        }
    }

    /// Fetches image `url` into a new `<random hex>.part` file in `tmp_dir`: [`Fetcher::fetch_as`]
    /// an image.
    pub async fn fetch(&self, url: &str, tmp_dir: &Path) -> Result<Fetched, FetchError> {
        self.fetch_as(url, tmp_dir, FileType::Image).await
    }

    /// Fetches `url`, whose bytes must be of type `expect` within its size cap, into a new
    /// `<random hex>.part` file in `tmp_dir`. A refused URL makes no connection. On error
    /// no file is left behind.
    pub async fn fetch_as(
        &self,
        url: &str,
        tmp_dir: &Path,
        expect: FileType,
    ) -> Result<Fetched, FetchError> {
        let url =
            Url::parse(url).map_err(|e| Refused(format!("refused URL: not a valid URL ({e})")))?;
        self.guard.check_url(&url)?;
        tracing::debug!("fetching image {}", display_url(&url));

        let mut resp = tokio::time::timeout(self.cfg.timeout, self.client.get(url.clone()).send())
            .await
            .map_err(|_| FetchError::Timeout {
                after: self.cfg.timeout,
                stalled: false,
            })?
            .map_err(|e| self.request_error(e, &url))?;
        check_status(resp.status().as_u16(), resp.headers())?;
        let limit = self.cfg.max_bytes(expect);
        let expected = resp.content_length();
        if expected.is_some_and(|len| len > limit) {
            return Err(FetchError::TooLarge { limit, expect });
        }
        if let Some(need) = expected
            && let Ok(free) = crate::dirsync::free_bytes(tmp_dir)
            && need > free.saturating_sub(self.free_space_reserve)
        {
            return Err(FetchError::NoRoom { need, free });
        }
        let content_type = describe_content_type(resp.headers());
        let final_url = resp.url().to_string();

        let mut writer = PartWriter::start(tmp_dir);
        let body = self.receive(
            &mut resp,
            &mut writer,
            expect,
            limit,
            expected,
            &content_type,
        );
        let (received, ext) = match body.await {
            Ok(done) => done,
            Err(e) => {
                // Returns once the writer has stopped and removed its file: a failed fetch
                // leaves nothing in tmp/ behind it.
                writer.abandon().await;
                return Err(e);
            }
        };
        let (sha256, part) = writer.finish().await?;
        let temp_path = part.keep();
        tracing::debug!("fetched image {}: {received} bytes", display_url(&url));
        Ok(Fetched {
            temp_path,
            bytes: received,
            sha256,
            ext,
            final_url,
        })
    }

    /// Reads the body into `writer`: size cap, magic sniffing; returns the byte count and
    /// the type the bytes show.
    async fn receive(
        &self,
        resp: &mut reqwest::Response,
        writer: &mut PartWriter,
        expect: FileType,
        limit: u64,
        expected: Option<u64>,
        content_type: &str,
    ) -> Result<(u64, Ext), FetchError> {
        let content_type = content_type.to_string();
        let mut received: u64 = 0;
        let mut head: Vec<u8> = Vec::with_capacity(HEAD_LEN);
        let mut ext: Option<Ext> = None;
        let mut speed = SpeedFloor::new(self.cfg.min_bytes_per_second, self.speed_window);
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) if NoAnswer::of(&e).is_timeout() => {
                    return Err(FetchError::Timeout {
                        after: self.read_timeout,
                        stalled: true,
                    });
                }
                Err(_) => return Err(FetchError::CutBody { received, expected }),
            };
            let len = chunk.len() as u64;
            speed.received(len, Instant::now())?;
            if received.saturating_add(len) > limit {
                return Err(FetchError::TooLarge { limit, expect });
            }
            if ext.is_none() {
                let take = (HEAD_LEN - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
                if head.len() >= HEAD_LEN {
                    ext = Some(sniff_or_refuse(&head, &content_type, expect)?);
                }
            }
            writer.write(chunk).await?;
            received += len;
        }
        if expected.is_some_and(|len| received < len) {
            return Err(FetchError::CutBody { received, expected });
        }
        let ext = match ext {
            Some(ext) => ext,
            None => sniff_or_refuse(&head, &content_type, expect)?,
        };
        Ok((received, ext))
    }

    /// Classifies an error from sending the request (before a response arrived).
    fn request_error(&self, err: reqwest::Error, url: &Url) -> FetchError {
        if let Some(refused) = find_refused(&err) {
            return FetchError::Refused(refused);
        }
        let url = err.url().map_or_else(|| display_url(url), display_url);
        match NoAnswer::of(&err) {
            NoAnswer::ConnectTimedOut => FetchError::Connect {
                url,
                reason: format!(
                    "timed out after {}",
                    humantime::format_duration(CONNECT_TIMEOUT)
                ),
            },
            NoAnswer::CannotConnect => FetchError::Connect {
                url,
                reason: innermost_reason(err),
            },
            NoAnswer::TimedOut => FetchError::Timeout {
                after: self.cfg.timeout,
                stalled: false,
            },
            NoAnswer::Failed => FetchError::Request {
                url,
                reason: innermost_reason(err),
            },
        }
    }
}

/// `download.min_bytes_per_second`, as curl's `--speed-limit` with `--speed-time`: once the
/// body flows, the bytes of each whole window of `window` must average at least `floor` a
/// second. A body that stops altogether is the stall timeout's business.
struct SpeedFloor {
    floor: u64,
    window: Duration,
    /// Start of the current window and the bytes received in it.
    since: Option<Instant>,
    bytes: u64,
}

impl SpeedFloor {
    fn new(floor: u64, window: Duration) -> SpeedFloor {
        SpeedFloor {
            floor,
            window,
            since: None,
            bytes: 0,
        }
    }

    /// Counts `len` bytes arrived at `now`; an error when the window just ended below the
    /// floor.
    fn received(&mut self, len: u64, now: Instant) -> Result<(), FetchError> {
        if self.floor == 0 {
            return Ok(());
        }
        let Some(since) = self.since else {
            // The window starts with the first bytes (the wait for them is the stall
            // timeout's).
            self.since = Some(now);
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= self.window {
            let rate = (u128::from(self.bytes) * 1000 / elapsed.as_millis().max(1)) as u64;
            if rate < self.floor {
                return Err(FetchError::TooSlow {
                    rate,
                    floor: self.floor,
                    over: elapsed,
                });
            }
            self.since = Some(now);
            self.bytes = 0;
        }
        self.bytes = self.bytes.saturating_add(len);
        Ok(())
    }
}

fn build_client(
    cfg: &DownloadConfig,
    guard: &UrlGuard,
    read_timeout: Duration,
) -> Result<reqwest::Client, FetchSetupError> {
    if cfg.user_agent.as_str().trim().is_empty() {
        return Err(FetchSetupError::EmptyUserAgent);
    }
    let client = reqwest::Client::builder()
        .user_agent(cfg.user_agent.as_str())
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(read_timeout)
        .redirect(guard.redirect_policy())
        .dns_resolver(guard.resolver())
        // A proxy would connect for us, past the resolver's address check.
        .no_proxy()
        // The Referer on a redirect would carry the previous URL's token to another host.
        .referer(false)
        .build()?;
    Ok(client)
}

/// 2xx passes, except 206; an unfollowed 3xx is refused; 403/404/410 are
/// [`FetchError::Gone`]; 206, 408/425/429/5xx are transient.
fn check_status(status: u16, headers: &HeaderMap) -> Result<(), FetchError> {
    match status {
        // coverd never sends `Range`, so a 206 carries only part of the file however
        // image-like its first bytes look: not a complete image. Transient, like a cut body
        // (a cache or server that answered with a fragment may serve the whole file next
        // time), and bounded by `download.max_attempts` like every transient failure.
        206 => Err(FetchError::Status {
            status,
            transient: true,
            retry_after: None,
        }),
        200..=299 => Ok(()),
        // A redirect the client did not follow points somewhere it cannot go (file://, no
        // Location): that is the guard's business, and permanent.
        300..=399 => Err(FetchError::Refused(Refused(format!(
            "refused URL: HTTP {status} redirect to a location that is not http(s)"
        )))),
        403 | 404 | 410 => Err(FetchError::Gone { status }),
        _ if retry::transient_status(status) => Err(FetchError::Status {
            status,
            transient: true,
            retry_after: headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, time::OffsetDateTime::now_utc())),
        }),
        _ => Err(FetchError::Status {
            status,
            transient: false,
            retry_after: None,
        }),
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date (a date in the past gives zero).
fn parse_retry_after(value: &str, now: time::OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at =
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

/// "404 Not Found", or just the number for codes without a canonical reason.
fn status_text(status: u16) -> String {
    match reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
    {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

fn describe_content_type(headers: &HeaderMap) -> String {
    match headers.get(CONTENT_TYPE) {
        None => "none".to_owned(),
        Some(v) => String::from_utf8_lossy(v.as_bytes())
            .chars()
            .take(80)
            .collect(),
    }
}

/// The type of a body from its first bytes, if it is `expect`.
fn sniff_or_refuse(head: &[u8], content_type: &str, expect: FileType) -> Result<Ext, FetchError> {
    if head.is_empty() {
        return Err(FetchError::Empty {
            expect,
            content_type: content_type.to_owned(),
        });
    }
    match Ext::sniff(head) {
        Some(ext) if ext.file_type() == expect => Ok(ext),
        found => Err(FetchError::WrongType {
            expect,
            content_type: content_type.to_owned(),
            start: match found {
                Some(other) => format!("its bytes are {}", other.file_type().describe()),
                None => format!("starts with '{}'", head.escape_ascii()),
            },
        }),
    }
}

/// A URL for messages: scheme://host[:port]/path, without userinfo, query or fragment.
pub fn display_url(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
        None => format!("{}://{host}{}", url.scheme(), url.path()),
    }
}

fn find_refused(err: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused.clone());
        }
        current = e.source();
    }
    None
}

/// The root cause's message, without the URL reqwest's own message would repeat in full.
fn innermost_reason(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut current: &(dyn std::error::Error + 'static) = &err;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// A `.part` file that is removed when dropped, unless kept.
///
/// Each `.part` file has two: the fetch's, in its [`PartWriter`], which removes the file at
/// once when the fetch is dropped; and the blocking writer's, made by [`write_part`] in the
/// statement right after the `open` succeeded (no await, so no cancellation, can come
/// between the file appearing and that guard existing), which removes the file when the
/// fetch went away before the open even ran. (The file used to be opened through
/// `tokio::fs` on the blocking pool, the only guard made when the open's result came back:
/// a fetch cancelled in between left a `.part` file that nobody removed until the next
/// start. A guard made before the open is not enough alone either: an open already queued
/// on the blocking pool still runs after the fetch and its guard are gone.)
struct PartFile {
    path: PathBuf,
    keep: bool,
}

impl PartFile {
    fn new(path: PathBuf) -> PartFile {
        PartFile { path, keep: false }
    }

    fn keep(mut self) -> PathBuf {
        self.keep = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.keep {
            // Blocking, but a single unlink; it also runs when a fetch is cancelled. The
            // name is random and the file created with `create_new`, so it is ours.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Chunks queued for one file's writer (each at most hyper's read buffer, ~400 KiB; usually
/// 16–64 KiB): the bound on what a fetch holds in memory beyond the write buffer.
const WRITE_QUEUE_CHUNKS: usize = 2;
/// Bytes gathered before one `write` system call.
const WRITE_BUF_BYTES: usize = 128 * 1024;

/// The async side of a `.part` file's blocking writer: one blocking-pool hop per file
/// instead of one per chunk (`tokio::fs`), and the hashing off the async workers.
///
/// The writer thread creates the file. Dropping a `PartWriter` (a failed or cancelled
/// fetch) removes the file at once if it exists; if the writer has not opened it yet, the
/// writer removes it itself when it finds the fetch gone (the channel closed without the
/// finish marker). A finished file comes back inside the writer's guard, in the task's
/// result, which is dropped, and so removes the file, if nobody takes it.
struct PartWriter {
    part: PartFile,
    /// `Some(chunk)` to write; `None` to finish (flush, `sync_all`). Dropping the sender
    /// without `None` (an error or a cancelled fetch) makes the writer stop and return.
    tx: Option<tokio::sync::mpsc::Sender<Option<Bytes>>>,
    /// The writer's task; taken when awaited (a finished task must not be polled again).
    done: Option<tokio::task::JoinHandle<io::Result<(String, PartFile)>>>,
}

impl PartWriter {
    /// Starts the writer of a new `<random hex>.part` file in `dir`. A failure to create
    /// it is reported by the next [`PartWriter::write`] or [`PartWriter::finish`].
    fn start(dir: &Path) -> PartWriter {
        let name = format!("{}.part", hex::encode(rand::random::<[u8; 16]>()));
        let path = dir.join(name);
        let (tx, rx) = tokio::sync::mpsc::channel(WRITE_QUEUE_CHUNKS);
        let part = PartFile::new(path.clone());
        let done = tokio::task::spawn_blocking(move || write_part(path, rx));
        PartWriter {
            part,
            tx: Some(tx),
            done: Some(done),
        }
    }

    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx.send(Some(chunk)).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The writer stopped: it failed; its error says why.
            self.tx = None;
            Err(self
                .join()
                .await
                .err()
                .unwrap_or_else(|| io::Error::other("writer stopped")))
        }
    }

    /// Flushes and syncs the file; returns its sha256 (hex) and the kept path's guard.
    async fn finish(mut self) -> io::Result<(String, PartFile)> {
        if let Some(tx) = self.tx.take() {
            // A closed channel means the writer failed; `join` reports its error.
            let _ = tx.send(None).await;
        }
        let (sha256, writers) = self.join().await?;
        // One guard is enough from here on.
        writers.keep();
        Ok((sha256, self.part))
    }

    async fn join(&mut self) -> io::Result<(String, PartFile)> {
        match self.done.take() {
            Some(done) => done.await.map_err(io::Error::other)?,
            None => Err(io::Error::other("writer already stopped")),
        }
    }

    /// A failed fetch: stops the writer and waits until it has removed its file (it may
    /// not have created it yet); then this guard removes whatever is left.
    async fn abandon(mut self) {
        self.tx = None;
        let _ = self.join().await;
    }
}

/// The blocking side: create the file at `path` (it must not exist), hash and write every
/// chunk through a large buffer; on the finish marker flush and `sync_all`. Returns the
/// sha256 in hex and the file's guard; on any error, or when the sender goes away without
/// the finish marker, the guard is dropped and the file removed.
fn write_part(
    path: PathBuf,
    mut rx: tokio::sync::mpsc::Receiver<Option<Bytes>>,
) -> io::Result<(String, PartFile)> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    // Nothing between the open and the guard: from here on the file is always removed
    // unless handed over finished.
    let part = PartFile::new(path);
    let mut out = io::BufWriter::with_capacity(WRITE_BUF_BYTES, file);
    let mut hasher = Sha256::new();
    loop {
        match rx.blocking_recv() {
            Some(Some(chunk)) => {
                hasher.update(&chunk);
                out.write_all(&chunk)?;
            }
            Some(None) => break,
            None => return Err(io::Error::other("fetch abandoned")),
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    Ok((hex::encode(hasher.finalize()), part))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor is judged per whole window, from the first bytes on; 0 turns it off.
    #[test]
    fn speed_floor_windows() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut f = SpeedFloor::new(1000, Duration::from_secs(1));
        f.received(10, at(0)).unwrap(); // starts the window, counts nothing
        f.received(600, at(500)).unwrap();
        f.received(600, at(999)).unwrap();
        // 1,200 bytes over 1 s: above the floor, a new window starts.
        f.received(100, at(1000)).unwrap();
        f.received(100, at(1500)).unwrap();
        let err = f.received(100, at(2100)).unwrap_err();
        assert!(
            matches!(
                err,
                FetchError::TooSlow {
                    rate: 181,
                    floor: 1000,
                    ..
                }
            ),
            "{err:?}"
        );
        let mut off = SpeedFloor::new(0, Duration::from_secs(1));
        for ms in [0, 5000, 60_000] {
            off.received(1, at(ms)).unwrap();
        }
    }

    /// A runtime whose blocking pool has one thread, so a `spawn_blocking` awaited after a
    /// writer was started runs only once that writer has returned.
    fn one_blocking_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .unwrap()
    }

    /// Waits until every blocking task queued so far has run.
    async fn blocking_pool_drained() {
        tokio::task::spawn_blocking(|| ()).await.unwrap();
    }

    fn entries(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_fetch_cancelled_before_its_file_is_created_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        one_blocking_thread().block_on(async {
            // The only blocking thread is busy, so the writer's open is still queued when
            // the fetch goes away; it runs afterwards all the same.
            let (release, gate) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || gate.recv());
            drop(PartWriter::start(dir.path()));
            release.send(()).unwrap();
            busy.await.unwrap().unwrap();
            blocking_pool_drained().await;
        });
        assert_eq!(entries(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_fetch_cancelled_after_its_file_was_created_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        one_blocking_thread().block_on(async {
            let mut writer = PartWriter::start(dir.path());
            // One chunk more than the queue holds: the last send returns only once the
            // writer has taken the first, which it does after creating the file.
            for _ in 0..=WRITE_QUEUE_CHUNKS {
                writer.write(Bytes::from_static(b"chunk")).await.unwrap();
            }
            assert_eq!(entries(dir.path()).len(), 1, "the file exists");
            drop(writer);
            // Removed by the drop itself, not later by the writer thread.
            assert_eq!(entries(dir.path()), Vec::<String>::new());
            blocking_pool_drained().await;
        });
        assert_eq!(entries(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_fetch_cancelled_while_its_file_is_synced_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        one_blocking_thread().block_on(async {
            let mut writer = PartWriter::start(dir.path());
            writer.write(Bytes::from_static(b"chunk")).await.unwrap();
            // The finish marker is queued (there is room), then `finish` waits for the
            // writer's result; the fetch goes away there, before it takes the file.
            let mut finish = Box::pin(writer.finish());
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let early = finish.as_mut().poll(&mut cx);
            drop(early);
            drop(finish);
            blocking_pool_drained().await;
        });
        assert_eq!(entries(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_finished_file_is_kept_with_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = one_blocking_thread().block_on(async {
            let mut writer = PartWriter::start(dir.path());
            writer.write(Bytes::from_static(b"abc")).await.unwrap();
            let (sha256, part) = writer.finish().await.unwrap();
            assert_eq!(
                sha256,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            );
            part.keep()
        });
        assert_eq!(std::fs::read(path).unwrap(), b"abc");
    }

    #[test]
    fn a_file_that_cannot_be_created_fails_the_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        one_blocking_thread().block_on(async {
            let mut writer = PartWriter::start(&missing);
            let mut failed = None;
            for _ in 0..=WRITE_QUEUE_CHUNKS {
                if let Err(e) = writer.write(Bytes::from_static(b"chunk")).await {
                    failed = Some(e);
                    break;
                }
            }
            let err = match failed {
                Some(e) => e,
                None => writer.finish().await.err().expect("finish fails"),
            };
            assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        });
    }

    #[test]
    fn a_full_disk_is_the_disks_fault_not_the_images() {
        for errno in [28 /* ENOSPC */, 122 /* EDQUOT */] {
            let e = FetchError::Io(io::Error::from_raw_os_error(errno));
            assert!(e.is_disk_full(), "{e}");
        }
        let other = FetchError::Io(io::Error::from_raw_os_error(5 /* EIO */));
        assert!(!other.is_disk_full());
        assert!(
            !FetchError::TooLarge {
                limit: 1,
                expect: FileType::Image
            }
            .is_disk_full()
        );
    }

    #[test]
    fn sniff_table() {
        let table: &[(&[u8], Option<Ext>)] = &[
            (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", Some(Ext::Png)),
            (b"\xff\xd8\xff\xe0\0\x10JFIF", Some(Ext::Jpg)),
            (b"RIFF\x24\0\0\0WEBPVP8 ", Some(Ext::Webp)),
            (b"GIF87a\x01\0", Some(Ext::Gif)),
            (b"GIF89a\x01\0", Some(Ext::Gif)),
            (b"RIFF\x24\0\0\0WAVEfmt ", Some(Ext::Wav)),
            (b"ID3\x04\0\0\0\0\0\0", Some(Ext::Mp3)),
            (b"\0\0\0\x20ftypisom", Some(Ext::Mp4)),
            (b"\x89PNG\r\n", None),
            (b"<!DOCTYPE html>", None),
            (b"", None),
        ];
        for (head, ext) in table {
            assert_eq!(Ext::sniff(head), *ext, "{}", head.escape_ascii());
        }
        let names: Vec<_> = Ext::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(names, ["png", "jpg", "webp", "gif", "mp3", "wav", "mp4"]);
    }

    #[test]
    fn status_classes() {
        let none = HeaderMap::new();
        assert!(check_status(200, &none).is_ok());
        assert!(check_status(203, &none).is_ok());
        for status in [403, 404, 410] {
            let err = check_status(status, &none).unwrap_err();
            assert!(err.is_gone() && !err.is_transient(), "{status}");
        }
        for status in [206, 408, 425, 429, 500, 502, 503, 504, 599] {
            let err = check_status(status, &none).unwrap_err();
            assert!(err.is_transient() && !err.is_gone(), "{status}");
        }
        for status in [301, 400, 401, 405, 413, 451] {
            let err = check_status(status, &none).unwrap_err();
            assert!(!err.is_transient() && !err.is_gone(), "{status}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        let err = check_status(503, &headers).unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(err.to_string(), "HTTP 503 Service Unavailable");
    }

    #[test]
    fn retry_after_forms() {
        let now = time::macros::datetime!(2015-10-21 07:28:00 UTC);
        let table: &[(&str, Option<Duration>)] = &[
            ("120", Some(Duration::from_secs(120))),
            (" 0 ", Some(Duration::ZERO)),
            (
                "Wed, 21 Oct 2015 07:28:30 GMT",
                Some(Duration::from_secs(30)),
            ),
            (
                "Wed, 21 Oct 2015 08:28:00 GMT",
                Some(Duration::from_secs(3600)),
            ),
            ("Wed, 21 Oct 2015 07:00:00 GMT", Some(Duration::ZERO)),
            ("-5", None),
            ("soon", None),
            ("", None),
        ];
        for (value, expected) in table {
            assert_eq!(parse_retry_after(value, now), *expected, "{value:?}");
        }
    }

    #[test]
    fn messages() {
        let table: Vec<(FetchError, &str)> = vec![
            (FetchError::Gone { status: 404 }, "HTTP 404 Not Found"),
            (
                FetchError::Status {
                    status: 599,
                    transient: true,
                    retry_after: None,
                },
                "HTTP 599",
            ),
            (
                FetchError::Timeout {
                    after: Duration::from_secs(30),
                    stalled: true,
                },
                "timed out after 30s without data",
            ),
            (
                FetchError::Timeout {
                    after: Duration::from_secs(120),
                    stalled: false,
                },
                "timed out after 2m waiting for the response headers",
            ),
            (
                FetchError::CutBody {
                    received: 1234,
                    expected: Some(5000),
                },
                "body cut off after 1234 of 5000 bytes",
            ),
            (
                FetchError::CutBody {
                    received: 7,
                    expected: None,
                },
                "body cut off after 7 bytes",
            ),
            (
                FetchError::TooLarge {
                    limit: 26214400,
                    expect: FileType::Image,
                },
                "image larger than 26214400 bytes",
            ),
            (
                sniff_or_refuse(b"<!DOCTYPE html>\n<h", "text/html", FileType::Image).unwrap_err(),
                "not an image: content-type text/html, starts with '<!DOCTYPE html>\\n<h'",
            ),
            (
                sniff_or_refuse(b"", "image/png", FileType::Image).unwrap_err(),
                "not an image: content-type image/png, empty body",
            ),
        ];
        for (err, text) in table {
            assert_eq!(err.to_string(), text);
        }
    }

    #[test]
    fn display_url_drops_secrets() {
        let url = Url::parse("https://u:p@h.example:8443/s/a.png?token=SECRET#frag").unwrap();
        assert_eq!(display_url(&url), "https://h.example:8443/s/a.png");
        let url = Url::parse("https://h.example/a.png?X-Amz-Signature=SECRET").unwrap();
        assert_eq!(display_url(&url), "https://h.example/a.png");
    }
}
