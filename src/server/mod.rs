//! The HTTP plumbing shared by the callback listener and the admin socket: accept loops with a
//! connection bound derived from the file-descriptor limit, shedding of idle connections when
//! a listener is full, hyper with its timer (without one hyper's header timeout is silently
//! off), header, body and write-stall timeouts, routing of the public paths, graceful
//! shutdown. Owns sockets and HTTP framing; must not decide what a callback means (that is
//! `callback`). This file holds the accept loop ([`serve`]) and the timeouts; its parts:
//! `limits` (connection caps), `shed` (which connections are closed when a listener is
//! full), `stall` (the write-stall timeout), `answer` (answers and reading bodies),
//! `routes` (the public and metrics listeners' paths).

mod answer;
mod limits;
mod routes;
mod shed;
mod stall;

pub use answer::{Body, Resp, answer, full, read_body, text};
pub use limits::{
    Limits, MAX_PUBLIC_CONNECTIONS, MIN_PUBLIC_CONNECTIONS, RESERVED_FDS, public_connection_cap,
    raise_fd_limit,
};
pub use routes::{Health, Public, metrics_route};

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::answer::shed_answer;
use self::shed::{BodyArrival, Conns, InFlight, SHED_RETRY};
use self::stall::StallTimeout;

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
