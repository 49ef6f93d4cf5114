//! The HTTP plumbing shared by the callback listener and the admin socket: accept loops with a
//! connection bound derived from the file-descriptor limit, shedding of idle connections when
//! a listener is full, hyper with its timer (without one hyper's header timeout is silently
//! off), header, body and write-stall timeouts, routing of the public paths, graceful
//! shutdown. Owns sockets and HTTP framing; must not decide what a callback means (that is
//! `callback`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::http::request::Parts;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::callback::{Answer, Intake, MAX_BODY_BYTES};
use crate::metrics::{self, Metrics, Snapshot};
use crate::model::Millis;
use crate::store::Store;

/// File descriptors kept back from the callback listener for everything else: the admin
/// socket's and the metrics listener's connections (256 + 64), downloads (a socket and a
/// temp file each, at most 64 at once), the store's files, KIE calls, logs.
pub const RESERVED_FDS: u64 = 768;
/// The callback listener never holds more connections than this, whatever the fd limit
/// (each one can pin two [`MAX_BUF_BYTES`] buffers besides the kernel's).
pub const MAX_PUBLIC_CONNECTIONS: usize = 16_384;
/// ... nor fewer than this, even under a tiny fd limit (shedding then does the work).
pub const MIN_PUBLIC_CONNECTIONS: usize = 64;
/// How many connections a listener holds, and whether it sheds idle ones when full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    /// Close the least recently active idle connections to make room (a listener that
    /// strangers can reach); without it a full listener waits for a connection to end.
    pub shed_idle: bool,
}

impl Limits {
    /// The callback listener: reachable by anyone, sheds.
    pub fn public(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            shed_idle: true,
        }
    }

    /// The admin socket: only the daemon's user (and root) can connect, every connection
    /// is an operator's command that may wait in its handler (a submit behind the rate
    /// limiter), and one not yet sending must not be taken for a loiterer: no shedding.
    pub const ADMIN: Limits = Limits {
        max_connections: 256,
        shed_idle: false,
    };

    /// The metrics listener: scrapers, a TCP port; sheds like the public one.
    pub const METRICS: Limits = Limits {
        max_connections: 64,
        shed_idle: true,
    };
}
/// A client must send its request headers within this time; hyper starts the same timer
/// when a keep-alive connection goes idle, so it is also the idle timeout.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The same, for connections accepted while the listener is at least half full.
const CROWDED_HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// A client must send its whole body within this time, counted from the end of its headers.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The same, for requests that start while the listener is at least half full. A genuine
/// callback (a few KiB of JSON, 64 KiB at most) arrives in one or two segments; 3 s for
/// 64 KiB is 22 KiB/s, far below any real client's rate.
const CROWDED_BODY_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection whose answers make no progress into the socket for this long (the client
/// does not read them, e.g. it pipelines requests and never reads) is closed.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read and write buffers per connection: bounds the memory one client can pin.
const MAX_BUF_BYTES: usize = 64 * 1024;
/// In-flight requests get this long to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Back-off after a failed `accept` (out of file descriptors and the like), doubled up to
/// [`ACCEPT_BACKOFF_MAX`] while it keeps failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Raises the soft RLIMIT_NOFILE to the hard limit (best effort: a sandbox may refuse) and
/// returns the soft limit now in force (`None`: unlimited).
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return limit.maximum,
            Err(e) => tracing::warn!(
                "cannot raise the open-file limit from {} to {}: {e}; fewer callback connections fit",
                limit.current.unwrap_or(0),
                limit
                    .maximum
                    .map_or("unlimited".to_string(), |m| m.to_string()),
            ),
        }
    }
    limit.current
}

/// How many connections the callback listener may hold under a soft fd limit of `fds`:
/// the limit less [`RESERVED_FDS`], within
/// [`MIN_PUBLIC_CONNECTIONS`]..=[`MAX_PUBLIC_CONNECTIONS`].
pub fn public_connection_cap(fds: Option<u64>) -> usize {
    let Some(fds) = fds else {
        return MAX_PUBLIC_CONNECTIONS;
    };
    let spare = fds.saturating_sub(RESERVED_FDS);
    usize::try_from(spare)
        .unwrap_or(usize::MAX)
        .clamp(MIN_PUBLIC_CONNECTIONS, MAX_PUBLIC_CONNECTIONS)
}

/// An answer's body: whole (`full`) or streamed (the admin socket's `/v2`).
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;
pub type Resp = Response<Body>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    Full::new(bytes.into()).boxed_unsync()
}

/// Liveness of the workers `/healthz` reports on: the first one that stopped (returned or
/// panicked) while the daemon runs, named, and how.
#[derive(Debug, Default)]
pub struct Health {
    stopped: std::sync::Mutex<Option<String>>,
}

impl Health {
    /// Records that a worker stopped (`how`: "download loop panicked: …"); `false` if one
    /// had already (only the first is kept).
    pub fn worker_stopped(&self, how: String) -> bool {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        if stopped.is_some() {
            return false;
        }
        *stopped = Some(how);
        true
    }

    /// The first worker that stopped, and how.
    pub fn stopped_worker(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The public listener's routes.
pub struct Public {
    pub intake: Intake,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
}

impl Public {
    pub async fn route(&self, req: Request<Incoming>) -> Resp {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/callbacks/cover") => {
                let received = std::time::Instant::now();
                let (parts, body) = req.into_parts();
                let resp = match read_body(&parts, body, MAX_BODY_BYTES).await {
                    Ok(bytes) => answer(self.intake.handle(&parts.headers, &bytes).await),
                    Err(resp) => resp,
                };
                self.metrics
                    .callback_answered(resp.status().as_u16(), received.elapsed());
                resp
            }
            (_, "/callbacks/cover") => method_not_allowed("POST"),
            (&Method::GET | &Method::HEAD, "/healthz") => self.healthz().await,
            (_, "/healthz") => method_not_allowed("GET, HEAD"),
            _ => answer(Answer::error(StatusCode::NOT_FOUND, "no such path")),
        }
    }

    async fn healthz(&self) -> Resp {
        let store = &self.intake.store;
        let problem = if let Some(how) = self.health.stopped_worker() {
            Some(format!("worker stopped: {how}"))
        } else if let Some(how) = store.stopped_thread() {
            // Named at once, before the daemon's watcher has recorded it.
            Some(format!("worker stopped: {how}"))
        } else if let Some(reason) = store.write_failure() {
            Some(format!("store cannot take writes: {reason}"))
        } else if let Err(e) = store.get("") {
            Some(format!("store unavailable: {e}"))
        } else {
            None
        };
        match problem {
            None => text(StatusCode::OK, "ok"),
            Some(what) => answer(Answer::error(StatusCode::SERVICE_UNAVAILABLE, what)),
        }
    }
}

/// Reads a whole request body, at most `limit` bytes, within [`BODY_TIMEOUT`] (or
/// [`CROWDED_BODY_TIMEOUT`]: the deadline `serve` put in the request's extensions). On
/// failure returns the answer to send (413 without reading the rest, 408, 400, 503 if the
/// connection was shed meanwhile).
///
/// While the body arrives the connection may be shed (nothing has been done with the
/// request yet); once it is complete the request is in its handler and never shed.
pub async fn read_body(parts: &Parts, body: Incoming, limit: usize) -> Result<Bytes, Resp> {
    let too_large = || {
        let mut r = answer(Answer::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {limit} bytes"),
        ));
        // The rest of the body is never read, so the connection cannot be reused.
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        r
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let arrival = parts.extensions.get::<BodyArrival>();
    let deadline = arrival.map_or(BODY_TIMEOUT, |a| a.timeout);
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => {
            if arrival.is_some_and(|a| !a.complete()) {
                return Err(shed_answer());
            }
            Ok(collected.to_bytes())
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(answer(Answer::error(
            StatusCode::BAD_REQUEST,
            format!("could not read the body: {e}"),
        ))),
        Err(_) => {
            let mut r = answer(Answer::error(
                StatusCode::REQUEST_TIMEOUT,
                "body not received in time",
            ));
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            Err(r)
        }
    }
}

/// The answer on a connection shed a moment ago (it is being closed; usually never sent).
fn shed_answer() -> Resp {
    let mut r = answer(Answer::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many connections; try again",
    ));
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

pub fn answer(a: Answer) -> Resp {
    let mut r = Response::new(full(a.body));
    *r.status_mut() = a.status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn text(status: StatusCode, body: &'static str) -> Resp {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The metrics listener's one route: `GET /metrics`; `now` on the schedulers' clock.
pub async fn metrics_route(
    req: Request<Incoming>,
    metrics: &Metrics,
    store: &Store,
    now: Millis,
) -> Resp {
    if req.uri().path() != "/metrics" {
        return answer(Answer::error(
            StatusCode::NOT_FOUND,
            "no such path; use /metrics",
        ));
    }
    if req.method() != Method::GET {
        return method_not_allowed("GET");
    }
    match Snapshot::read(store, now) {
        Ok(snapshot) => {
            let mut r = Response::new(full(metrics.render(&snapshot)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            r
        }
        Err(e) => answer(Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
    }
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut r = answer(Answer::error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed",
    ));
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// Something that accepts connections: a TCP or a Unix listener.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (s, _) = tokio::net::TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (s, _) = tokio::net::UnixListener::accept(self).await?;
        Ok(s)
    }
}

/// Serves `listener` with `handler`, holding at most `limits.max_connections` connections,
/// until `shutdown` fires; then stops accepting and gives in-flight requests
/// [`SHUTDOWN_GRACE`].
///
/// With `limits.shed_idle`, a (nearly) full listener does not stop accepting (that would
/// leave a real callback waiting in the kernel's backlog behind a crowd): it closes the
/// least recently active idle connections first (keep-alive between requests, headers
/// still trickling in, a body still arriving, or answers stuck unread in the socket),
/// never one whose request is being handled.
///
/// A request is "being handled" from the moment its whole body has arrived ([`read_body`]
/// has it) or, without a body, from the end of its headers: only then has the daemon
/// started to act on it, so only then would closing the connection lose work or leave
/// the client unsure what happened. Until then the client has only sent bytes and must
/// send them again anyway, as after any reset. So a client trickling its body (say
/// `Content-Length: 60000` at a byte a second) holds no more than one trickling its
/// headers: it is shed when room is needed, oldest request first (its age counts from the
/// end of its headers, not from its last byte, so trickling does not keep it young).
/// The body's deadline ([`BODY_TIMEOUT`], [`CROWDED_BODY_TIMEOUT`] for a request that
/// starts while the listener is at least half full) bounds it even when nobody needs the
/// room; no separate minimum rate is enforced, as a whole-body deadline is stricter.
///
/// Connections accepted while the listener is at least half full get a shorter
/// header/idle timeout, and every connection whose answers stop moving into the socket
/// for [`WRITE_STALL_TIMEOUT`] is closed.
pub async fn serve<L, H, F>(listener: L, handler: H, limits: Limits, shutdown: CancellationToken)
where
    L: Accept,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    let max_connections = limits.max_connections.max(1);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    let conns = Arc::new(Conns::default());
    // Shedding starts when fewer than `batch / 2` slots are free and closes `batch` idle
    // connections at once: the accept loop rarely has to wait for a slot (the shed ones
    // free theirs a moment later), and the scan for the oldest idle ones stays rare.
    let batch = (max_connections / 32).max(2);
    let builder = |header_timeout: Duration| {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_BUF_BYTES)
            .keep_alive(true);
        http
    };
    let (http, crowded_http) = (builder(HEADER_TIMEOUT), builder(CROWDED_HEADER_TIMEOUT));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut failing = AcceptFailures::default();
    loop {
        if limits.shed_idle && slots.available_permits() < batch / 2 {
            conns.evict_idle(batch);
        }
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: make room by closing idle connections, then wait for a slot (a
                // closed one frees its slot at once; busy ones within the body timeout),
                // looking again every SHED_RETRY while nothing was past its grace.
                let mut acquired = None;
                while acquired.is_none() {
                    let shed = limits.shed_idle && conns.evict_idle(batch) > 0;
                    let retry = async {
                        if limits.shed_idle && !shed {
                            tokio::time::sleep(SHED_RETRY).await
                        } else {
                            std::future::pending().await
                        }
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        p = slots.clone().acquire_owned() => match p {
                            Ok(p) => acquired = Some(p),
                            Err(_) => break,
                        },
                        () = retry => {}
                    }
                }
                match acquired {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let io = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let io = match io {
            Ok(io) => {
                failing.succeeded();
                backoff = ACCEPT_BACKOFF_MIN;
                io
            }
            Err(e) => {
                // Out of file descriptors and the like: free some by shedding idle
                // connections (the connection stays in the kernel's queue), back off
                // instead of spinning, and say so once per episode.
                if limits.shed_idle && is_fd_exhaustion(&e) {
                    conns.evict_idle(batch.max(EMFILE_SHED));
                }
                failing.failed(&e);
                drop(permit);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let crowded = slots.available_permits() < max_connections / 2;
        let slot = conns.register();
        let service = {
            let (handler, slot, slots) = (handler.clone(), slot.clone(), slots.clone());
            service_fn(move |mut req: Request<Incoming>| {
                let (handler, slot) = (handler.clone(), slot.clone());
                let crowded = slots.available_permits() < max_connections / 2;
                async move {
                    let has_body = !req.body().is_end_stream();
                    let Some(_request) = InFlight::begin(&slot, has_body) else {
                        // Shed a moment ago; the connection is being closed.
                        return Ok::<_, Infallible>(shed_answer());
                    };
                    if has_body {
                        req.extensions_mut().insert(BodyArrival {
                            slot: slot.clone(),
                            timeout: if crowded {
                                CROWDED_BODY_TIMEOUT
                            } else {
                                BODY_TIMEOUT
                            },
                        });
                    }
                    Ok::<_, Infallible>(handler(req).await)
                }
            })
        };
        let io = TokioIo::new(StallTimeout::new(io, WRITE_STALL_TIMEOUT));
        let http = if crowded { &crowded_http } else { &http };
        let conn = graceful.watch(http.serve_connection(io, service));
        let conns = conns.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                // Dropping the connection closes its socket.
                _ = slot.shed.cancelled() => {}
            }
            conns.remove(slot.id);
            drop(permit);
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "shutting down: some connections did not finish within {SHUTDOWN_GRACE:?}; closed"
        );
    }
}

/// Idle connections shed at least, per failed accept for want of file descriptors.
const EMFILE_SHED: usize = 8;
/// An episode of failing accepts ends after this long without a failure.
const ACCEPT_QUIET: Duration = Duration::from_secs(10);

/// Failing accepts, logged once per episode rather than once per try.
#[derive(Default)]
struct AcceptFailures {
    /// (first failure, last failure, failures) of the current episode.
    episode: Option<(Instant, Instant, u64)>,
}

impl AcceptFailures {
    fn failed(&mut self, e: &io::Error) {
        let now = Instant::now();
        match &mut self.episode {
            Some((_, last, failures)) => {
                *last = now;
                *failures += 1;
            }
            None => {
                tracing::warn!("cannot accept connections: {e}; backing off and retrying");
                self.episode = Some((now, now, 1));
            }
        }
    }

    fn succeeded(&mut self) {
        if let Some((first, last, failures)) = self.episode
            && last.elapsed() >= ACCEPT_QUIET
        {
            tracing::info!(
                "accepting connections again; {failures} accepts had failed over {:.1}s",
                (last - first).as_secs_f64()
            );
            self.episode = None;
        }
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let code = e.raw_os_error();
    [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
        .iter()
        .any(|errno| code == Some(errno.raw_os_error()))
}

/// How long a connection is safe from shedding after it starts a phase (accepted, request
/// headers in, answer out). Well under the 2 s a callback must be answered in, so a
/// genuine request waiting in the kernel's queue behind a crowd gets a slot within it.
const SHED_GRACE: Duration = Duration::from_millis(500);
/// How often a full listener that found nothing to shed (everything within its grace)
/// looks again, besides waking when a slot frees.
const SHED_RETRY: Duration = Duration::from_millis(50);

/// A connection between requests (keep-alive, headers arriving, answer being written).
const IDLE: u8 = 0;
/// A connection whose request is in the handler, its body (if any) complete: never shed.
const BUSY: u8 = 1;
/// Chosen for shedding; its task drops it.
const SHED: u8 = 2;
/// A connection whose request's headers have arrived but whose body is still arriving:
/// nothing has been done with the request yet, so it may be shed like an idle one.
const RECEIVING: u8 = 3;

/// One open connection, as the shedder sees it.
struct Slot {
    id: u64,
    epoch: Instant,
    state: AtomicU8,
    /// Milliseconds since the listener's epoch at which a request last started (its headers
    /// arrived) or ended; body bytes do not count, so a trickled body does not stay young.
    last_active: AtomicU64,
    shed: CancellationToken,
}

/// The open connections of one listener.
struct Conns {
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Slot>>>,
}

impl Default for Conns {
    fn default() -> Self {
        Conns {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl Slot {
    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active.store(now, Ordering::Relaxed);
    }
}

impl Conns {
    fn register(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            epoch: self.epoch,
            state: AtomicU8::new(IDLE),
            last_active: AtomicU64::new(0),
            shed: CancellationToken::new(),
        });
        slot.touch();
        self.lock().insert(slot.id, slot.clone());
        slot
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes up to `n` sheddable connections (idle, or receiving a body), least recently
    /// active first; returns how many. A connection that started its current phase (its
    /// accept, its request's headers, the end of its last answer) less than
    /// [`SHED_GRACE`] ago is left alone: a genuine request gets that long to arrive whole,
    /// however fast a crowd reconnects (with shedding by age alone, a crowd reconnecting
    /// at once made every new connection the oldest within milliseconds).
    fn evict_idle(&self, n: usize) -> usize {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.evict_idle_at(n, now)
    }

    fn evict_idle_at(&self, n: usize, now_ms: u64) -> usize {
        let grace = u64::try_from(SHED_GRACE.as_millis()).unwrap_or(u64::MAX);
        let mut idle: Vec<(u64, Arc<Slot>)> = self
            .lock()
            .values()
            .filter(|s| sheddable(s.state.load(Ordering::Acquire)))
            .map(|s| (s.last_active.load(Ordering::Relaxed), s.clone()))
            .filter(|(at, _)| now_ms.saturating_sub(*at) >= grace)
            .collect();
        if idle.len() > n {
            idle.select_nth_unstable_by_key(n, |(at, _)| *at);
            idle.truncate(n);
        }
        let mut shed = 0;
        for (_, slot) in idle {
            // A request that entered its handler meanwhile keeps its connection.
            let taken = slot
                .state
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                    sheddable(s).then_some(SHED)
                })
                .is_ok();
            if taken {
                slot.shed.cancel();
                shed += 1;
            }
        }
        if shed > 0 {
            tracing::debug!(shed, "listener full: closed idle connections");
        }
        shed
    }
}

fn sheddable(state: u8) -> bool {
    state == IDLE || state == RECEIVING
}

/// Marks a connection's request as started (receiving its body, or in its handler if it
/// has none); idle again when dropped.
struct InFlight<'a>(&'a Slot);

impl<'a> InFlight<'a> {
    /// `None` if the connection was shed.
    fn begin(slot: &'a Slot, has_body: bool) -> Option<InFlight<'a>> {
        let state = if has_body { RECEIVING } else { BUSY };
        slot.state
            .compare_exchange(IDLE, state, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        slot.touch();
        Some(InFlight(slot))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Recorded before going idle, so a shedder never sees a fresh idle connection as old.
        self.0.touch();
        // A shed connection stays shed.
        let _ = self
            .0
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != SHED).then_some(IDLE)
            });
    }
}

/// Put in a request's extensions by [`serve`] while its body is arriving: the body's
/// deadline, and the connection to mark busy once the body is complete.
#[derive(Clone)]
struct BodyArrival {
    slot: Arc<Slot>,
    timeout: Duration,
}

impl BodyArrival {
    /// The body is complete: the request enters its handler and its connection can no
    /// longer be shed. `false` if it was shed first.
    fn complete(&self) -> bool {
        self.slot
            .state
            .compare_exchange(RECEIVING, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// An IO stream whose writes fail with `TimedOut` once they have made no progress for
/// `limit`: hyper has no write timeout, and a client that never reads its answers would
/// otherwise hold its connection (and its buffers) for as long as it likes.
struct StallTimeout<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> StallTimeout<S> {
    fn new(inner: S, limit: Duration) -> Self {
        StallTimeout {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes a write-side poll through, arming the stall timer while it is pending and
    /// disarming it on progress.
    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>>
    where
        S: Unpin,
    {
        match poll(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = self.limit;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client read none of its answer for {limit:?}"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().guard(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .guard(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().guard(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().guard(cx, |s, cx| s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_callback_cap_follows_the_fd_limit_within_bounds() {
        assert_eq!(public_connection_cap(Some(8192)), 8192 - 768);
        assert_eq!(public_connection_cap(Some(1024)), 256);
        assert_eq!(public_connection_cap(Some(512)), MIN_PUBLIC_CONNECTIONS);
        assert_eq!(public_connection_cap(Some(1 << 20)), MAX_PUBLIC_CONNECTIONS);
        assert_eq!(public_connection_cap(None), MAX_PUBLIC_CONNECTIONS);
    }

    #[test]
    fn shedding_takes_the_least_recently_active_idle_connections_never_a_busy_one() {
        let conns = Conns::default();
        let (busy, newer, older) = (conns.register(), conns.register(), conns.register());
        let in_handler = InFlight::begin(&busy, false).unwrap();
        for (slot, at) in [(&busy, 1), (&newer, 500), (&older, 300)] {
            slot.last_active.store(at, Ordering::Relaxed);
        }
        let late = 10_000;
        assert_eq!(conns.evict_idle_at(1, late), 1);
        assert!(older.shed.is_cancelled() && !newer.shed.is_cancelled());
        // A request arriving on a shed connection is not handled.
        assert!(InFlight::begin(&older, false).is_none());
        assert_eq!(conns.evict_idle_at(10, late), 1);
        assert!(newer.shed.is_cancelled());
        assert!(
            !busy.shed.is_cancelled(),
            "a connection in its handler is never shed"
        );
        drop(in_handler);
        busy.last_active.store(1, Ordering::Relaxed);
        assert_eq!(conns.evict_idle_at(10, late), 1);
        assert!(busy.shed.is_cancelled());
    }

    #[test]
    fn a_body_still_arriving_is_shed_oldest_first_and_a_complete_one_never() {
        let conns = Conns::default();
        let (trickling, fresh, complete) = (conns.register(), conns.register(), conns.register());
        let arrival = |slot: &Arc<Slot>| BodyArrival {
            slot: slot.clone(),
            timeout: BODY_TIMEOUT,
        };
        let _t = InFlight::begin(&trickling, true).unwrap();
        let _f = InFlight::begin(&fresh, true).unwrap();
        let c = InFlight::begin(&complete, true).unwrap();
        assert!(arrival(&complete).complete(), "its body arrived");
        // Headers long ago, a byte a moment ago: the age counts from the headers.
        for (slot, at) in [(&trickling, 1), (&fresh, 900), (&complete, 0)] {
            slot.last_active.store(at, Ordering::Relaxed);
        }
        let late = 10_000;
        assert_eq!(conns.evict_idle_at(1, late), 1);
        assert!(trickling.shed.is_cancelled() && !fresh.shed.is_cancelled());
        // The shed body completes too late: the request is not handled.
        assert!(!arrival(&trickling).complete());
        assert_eq!(
            conns.evict_idle_at(10, late),
            1,
            "only the other body still arriving"
        );
        assert!(fresh.shed.is_cancelled() && !complete.shed.is_cancelled());
        // Once handled, the connection is idle again and sheddable.
        drop(c);
        complete.last_active.store(0, Ordering::Relaxed);
        assert_eq!(conns.evict_idle_at(10, late), 1);
        assert!(complete.shed.is_cancelled());
    }

    #[test]
    fn a_connection_within_its_grace_is_never_shed() {
        let conns = Conns::default();
        let (young, old) = (conns.register(), conns.register());
        let _r = InFlight::begin(&young, true).unwrap();
        let grace = u64::try_from(SHED_GRACE.as_millis()).unwrap();
        young
            .last_active
            .store(10_000 - grace + 1, Ordering::Relaxed);
        old.last_active.store(10_000 - grace, Ordering::Relaxed);
        assert_eq!(conns.evict_idle_at(10, 10_000), 1);
        assert!(old.shed.is_cancelled() && !young.shed.is_cancelled());
        assert_eq!(conns.evict_idle_at(10, 10_000), 0, "the young one waits");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_never_reads_times_out_and_progress_resets_the_timer() {
        let limit = Duration::from_secs(10);
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut io = StallTimeout::new(ours, limit);
        // Slow but steady reader: a byte every 6 s keeps every stall under the limit.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut b = [0u8; 1];
            while got < 80 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                got += theirs.read(&mut b).await.unwrap();
            }
            theirs
        });
        io.write_all(&[7; 80])
            .await
            .expect("progress keeps the write alive");
        let _theirs = reader.await.unwrap();
        // Nobody reads any more: once the pipe is full, the write fails after the limit.
        let started = Instant::now();
        let err = io.write_all(&[7; 200]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= limit);
    }
}
