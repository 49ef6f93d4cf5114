//! The fake file host: serves image files and misbehaves on demand.
//!
//! Tests register a [`Behaviour`] per path (`files.set("/s/a.png", Behaviour::Image(png(64)))`)
//! and read back how often each path was requested (`files.hits(path)`, query ignored) and
//! the last User-Agent seen. Unregistered paths answer 404. Helpers at the bottom build
//! small valid-looking PNG/JPEG/GIF/WebP byte strings and their sha256.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{
    CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT,
};
use hyper::{Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::Body;

/// What the fake answers on one path.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200 with these bytes and the content type their magic says (image/png, …).
    Image(Bytes),
    /// 200 with these bytes and the given Content-Type (e.g. a PNG as text/plain).
    ImageAs(Bytes, &'static str),
    /// This status with a short text body.
    Status(u16),
    /// This status (e.g. 429 or 503) with `Retry-After: <value>`.
    StatusRetryAfter(u16, String),
    /// 500 for the first `failures` requests, then serves the image.
    FailFirst { failures: u32, bytes: Bytes },
    /// Declares the full Content-Length, sends the first `sent` bytes, then ends the body.
    CutBody { bytes: Bytes, sent: usize },
    /// Chunked: sends the first `sent` bytes, then the body errors (connection aborted).
    BrokenBody { bytes: Bytes, sent: usize },
    /// Sends the first `first` bytes, stalls for `stall`, then sends the rest.
    SlowBody {
        bytes: Bytes,
        first: usize,
        stall: Duration,
    },
    /// Sends `chunk` bytes every `every`: never stalls long, but takes long in total.
    Trickle {
        bytes: Bytes,
        chunk: usize,
        every: Duration,
    },
    /// 200 text/html with this page.
    Html(String),
    /// A PNG-looking body of `len` bytes with that Content-Length, or, with `None`, an
    /// endless chunked one (capped at 1 GiB; it stops when the client hangs up).
    Oversized { len: Option<u64> },
    /// 302 to this URL.
    Redirect(String),
    /// 206 Partial Content with the first `sent` bytes and a matching `Content-Range`,
    /// although the request asked for no range (a misbehaving server or cache).
    Partial { bytes: Bytes, sent: usize },
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    hits: HashMap<String, u32>,
    last_user_agent: Option<String>,
}

struct Route {
    behaviour: Behaviour,
    expired: bool,
}

pub struct Files {
    addr: SocketAddr,
    state: Mutex<State>,
}

impl Files {
    pub fn new(addr: SocketAddr) -> Files {
        Files {
            addr,
            state: Mutex::new(State::default()),
        }
    }

    /// Registers (or replaces, un-expiring) the behaviour of `path`.
    pub fn set(&self, path: &str, behaviour: Behaviour) {
        let route = Route {
            behaviour,
            expired: false,
        };
        self.lock().routes.insert(path.to_owned(), route);
    }

    /// From now on `path` answers 404, like an expired KIE file link.
    pub fn expire(&self, path: &str) {
        if let Some(route) = self.lock().routes.get_mut(path) {
            route.expired = true;
        }
    }

    /// Requests seen for `path` (query string ignored), registered or not.
    pub fn hits(&self, path: &str) -> u32 {
        self.lock().hits.get(path).copied().unwrap_or(0)
    }

    /// The User-Agent of the last request (`Some("")` never: absent is `None`).
    pub fn last_user_agent(&self) -> Option<String> {
        self.lock().last_user_agent.clone()
    }

    /// `http://127.0.0.1:PORT<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let (behaviour, hit) = {
            let mut state = self.lock();
            state.last_user_agent = req
                .headers()
                .get(USER_AGENT)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let hits = state.hits.entry(path.clone()).or_insert(0);
            *hits += 1;
            let hit = *hits;
            let behaviour = match state.routes.get(&path) {
                Some(route) if !route.expired => Some(route.behaviour.clone()),
                _ => None,
            };
            (behaviour, hit)
        };
        match behaviour {
            None => status(404),
            Some(behaviour) => respond(behaviour, hit),
        }
    }
}

fn respond(behaviour: Behaviour, hit: u32) -> Response<Body> {
    match behaviour {
        Behaviour::Image(bytes) => {
            let content_type = content_type_of(&bytes);
            full(200, content_type, bytes)
        }
        Behaviour::ImageAs(bytes, content_type) => full(200, content_type, bytes),
        Behaviour::Status(code) => status(code),
        Behaviour::StatusRetryAfter(code, value) => {
            let mut resp = status(code);
            let value = value.parse().expect("Retry-After value");
            resp.headers_mut().insert(RETRY_AFTER, value);
            resp
        }
        Behaviour::FailFirst { failures, bytes } if hit > failures => {
            let content_type = content_type_of(&bytes);
            full(200, content_type, bytes)
        }
        Behaviour::FailFirst { .. } => status(500),
        Behaviour::CutBody { bytes, sent } => {
            let (content_type, len) = (content_type_of(&bytes), bytes.len() as u64);
            let body = streamed(move |tx| async move {
                let _ = tx.send(Ok(bytes.slice(..sent))).await;
                // Dropping the sender ends the body short of its Content-Length.
            });
            with_length(body, content_type, len)
        }
        Behaviour::BrokenBody { bytes, sent } => {
            let content_type = content_type_of(&bytes);
            let body = streamed(move |tx| async move {
                let _ = tx.send(Ok(bytes.slice(..sent))).await;
                let _ = tx.send(Err(io::Error::other("fake: body broken"))).await;
            });
            response(200, content_type, body)
        }
        Behaviour::SlowBody {
            bytes,
            first,
            stall,
        } => {
            let (content_type, len) = (content_type_of(&bytes), bytes.len() as u64);
            let body = streamed(move |tx| async move {
                if tx.send(Ok(bytes.slice(..first))).await.is_err() {
                    return;
                }
                tokio::time::sleep(stall).await;
                let _ = tx.send(Ok(bytes.slice(first..))).await;
            });
            with_length(body, content_type, len)
        }
        Behaviour::Trickle {
            bytes,
            chunk,
            every,
        } => {
            let (content_type, len) = (content_type_of(&bytes), bytes.len() as u64);
            let body = streamed(move |tx| async move {
                for piece in bytes.chunks(chunk.max(1)) {
                    if tx.send(Ok(bytes.slice_ref(piece))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
            });
            with_length(body, content_type, len)
        }
        Behaviour::Html(page) => full(200, "text/html; charset=utf-8", Bytes::from(page)),
        Behaviour::Oversized { len } => {
            const CHUNK: usize = 64 * 1024;
            let total = len.unwrap_or(1 << 30);
            let body = streamed(move |tx| async move {
                let mut sent = 0u64;
                while sent < total {
                    let n = (total - sent).min(CHUNK as u64) as usize;
                    // Starts like a PNG so that only the size can make a fetch fail.
                    let data = if sent == 0 {
                        png(n)
                    } else {
                        Bytes::from(vec![0u8; n])
                    };
                    if tx.send(Ok(data)).await.is_err() {
                        return;
                    }
                    sent += n as u64;
                }
            });
            match len {
                Some(len) => with_length(body, "image/png", len),
                None => response(200, "image/png", body),
            }
        }
        Behaviour::Partial { bytes, sent } => {
            let (content_type, total) = (content_type_of(&bytes), bytes.len());
            let mut resp = full(206, content_type, bytes.slice(..sent));
            let range = format!("bytes 0-{}/{total}", sent.saturating_sub(1));
            resp.headers_mut()
                .insert(CONTENT_RANGE, range.parse().expect("content range"));
            resp
        }
        Behaviour::Redirect(to) => {
            let mut resp = status(302);
            resp.headers_mut()
                .insert(LOCATION, to.parse().expect("redirect target"));
            resp
        }
    }
}

fn status(code: u16) -> Response<Body> {
    let code = StatusCode::from_u16(code).expect("status code");
    let text = code.canonical_reason().unwrap_or("status").to_owned();
    full(code.as_u16(), "text/plain", Bytes::from(text))
}

fn full(code: u16, content_type: &str, bytes: Bytes) -> Response<Body> {
    let body = Full::new(bytes).map_err(|never| match never {}).boxed();
    response(code, content_type, body)
}

fn response(code: u16, content_type: &str, body: Body) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(CONTENT_TYPE, content_type)
        .body(body)
        .expect("response")
}

fn with_length(body: Body, content_type: &str, len: u64) -> Response<Body> {
    let mut resp = response(200, content_type, body);
    resp.headers_mut().insert(CONTENT_LENGTH, len.into());
    resp
}

type Sender = mpsc::Sender<io::Result<Bytes>>;

/// A body fed by a spawned task; the body ends when the task drops its sender.
fn streamed<F, Fut>(feed: F) -> Body
where
    F: FnOnce(Sender) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(feed(tx));
    ChannelBody(rx).boxed()
}

struct ChannelBody(mpsc::Receiver<io::Result<Bytes>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }
}

/// The content type an image's magic bytes call for (application/octet-stream otherwise).
pub fn content_type_of(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(b"\x89PNG") {
        "image/png"
    } else if bytes.starts_with(b"\xff\xd8\xff") {
        "image/jpeg"
    } else if bytes.starts_with(b"GIF8") {
        "image/gif"
    } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WAVE" {
        "audio/wav"
    } else if bytes.starts_with(b"RIFF") {
        "image/webp"
    } else if bytes.starts_with(b"ID3") {
        "audio/mpeg"
    } else if bytes.len() >= 8 && &bytes[4..8] == b"ftyp" {
        "video/mp4"
    } else {
        "application/octet-stream"
    }
}

/// `len` bytes (at least the magic) after `magic`: a deterministic, non-constant filler.
fn with_magic(magic: &[u8], len: usize) -> Bytes {
    let mut v = magic.to_vec();
    let mut i = 0u32;
    while v.len() < len {
        v.push((i.wrapping_mul(31) % 251) as u8);
        i += 1;
    }
    Bytes::from(v)
}

/// An MP3-looking byte string (an ID3v2 tag) of `len` bytes.
#[allow(dead_code)] // for the kinds' tests
pub fn mp3(len: usize) -> Bytes {
    with_magic(b"ID3\x04\0\0\0\0\0\x0fTIT2", len)
}

/// A WAV-looking byte string (RIFF/WAVE) of `len` bytes.
#[allow(dead_code)] // for the kinds' tests
pub fn wav(len: usize) -> Bytes {
    with_magic(b"RIFF\x24\0\0\0WAVEfmt ", len)
}

/// An MP4-looking byte string (an `ftyp` box) of `len` bytes.
#[allow(dead_code)] // for the kinds' tests
pub fn mp4(len: usize) -> Bytes {
    with_magic(b"\0\0\0\x20ftypisom\0\0\x02\0", len)
}

/// A PNG-looking byte string of `len` bytes (at least its 8-byte signature).
pub fn png(len: usize) -> Bytes {
    with_magic(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", len)
}

/// A JPEG-looking byte string.
pub fn jpeg(len: usize) -> Bytes {
    with_magic(b"\xff\xd8\xff\xe0\0\x10JFIF\0", len)
}

/// A GIF89a-looking byte string.
pub fn gif(len: usize) -> Bytes {
    with_magic(b"GIF89a\x01\0\x01\0", len)
}

/// A WebP-looking byte string (RIFF container with the WEBP form type).
pub fn webp(len: usize) -> Bytes {
    let size = (len.max(16) as u32).saturating_sub(8).to_le_bytes();
    let mut magic = b"RIFF".to_vec();
    magic.extend_from_slice(&size);
    magic.extend_from_slice(b"WEBPVP8 ");
    with_magic(&magic, len)
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
