//! The HTTP plumbing shared by the callback listener and the admin socket: accept loops with a
//! connection bound, hyper with its timer (without one hyper's header timeout is silently
//! off), bounded and timed body reads, routing of the public paths, graceful shutdown. Owns
//! sockets and HTTP framing; must not decide what a callback means (that is `callback`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::callback::{Answer, Intake, MAX_BODY_BYTES};
use crate::metrics::{self, Metrics, Snapshot};
use crate::model::Millis;
use crate::store::Store;

/// Open connections per listener; further clients wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send its whole body within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// In-flight requests get this long to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub type Resp = Response<Full<Bytes>>;

/// Liveness of the parts `/healthz` reports on.
#[derive(Debug, Default)]
pub struct Health {
    pub downloads_running: AtomicBool,
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
                let resp = match read_body(&parts.headers, body, MAX_BODY_BYTES).await {
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
        let store_ok = self.intake.store.get("").is_ok();
        let workers_ok = self.health.downloads_running.load(Ordering::SeqCst);
        if store_ok && workers_ok {
            text(StatusCode::OK, "ok")
        } else {
            let what = if store_ok {
                "download workers stopped"
            } else {
                "store unavailable"
            };
            answer(Answer::error(StatusCode::SERVICE_UNAVAILABLE, what))
        }
    }
}

/// Reads a whole request body, at most `limit` bytes, within [`BODY_TIMEOUT`]. On failure
/// returns the answer to send (413 without reading the rest, 408, 400).
pub async fn read_body(
    headers: &hyper::HeaderMap,
    body: Incoming,
    limit: usize,
) -> Result<Bytes, Resp> {
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
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
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

pub fn answer(a: Answer) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(a.body)));
    *r.status_mut() = a.status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn text(status: StatusCode, body: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
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
            let mut r = Response::new(Full::new(Bytes::from(metrics.render(&snapshot))));
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

/// Serves `listener` with `handler` until `shutdown` fires, then stops accepting and gives
/// in-flight requests [`SHUTDOWN_GRACE`] to finish.
pub async fn serve<L, H, F>(listener: L, handler: H, shutdown: CancellationToken)
where
    L: Accept,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let io = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(io) => io,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("cannot accept a connection: {e}; trying again in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let conn = http.serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
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
