//! What the public listener and the metrics listener answer at which path:
//! `POST /callbacks/<kind>` (the body read here, its meaning `callback`'s), `/healthz` from
//! [`Health`] and the store, `GET /metrics`. Owns the routes; must not interpret a
//! callback or change state.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::answer::{Resp, answer, full, method_not_allowed, read_body, text};
use crate::callback::{Answer, Intake, MAX_BODY_BYTES};
use crate::metrics::{self, Metrics, Snapshot};
use crate::model::{Kind, Millis};
use crate::store::Store;

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
        let path = req.uri().path();
        let callback_kind = path.strip_prefix("/callbacks/").and_then(Kind::parse);
        match (req.method(), callback_kind, path) {
            (&Method::POST, Some(kind), _) => {
                let received = std::time::Instant::now();
                let (parts, body) = req.into_parts();
                let resp = match read_body(&parts, body, MAX_BODY_BYTES).await {
                    Ok(bytes) => answer(self.intake.handle(kind, &parts.headers, &bytes).await),
                    Err(resp) => resp,
                };
                self.metrics
                    .callback_answered(kind, resp.status().as_u16(), received.elapsed());
                resp
            }
            (_, Some(_), _) => method_not_allowed("POST"),
            (&Method::GET | &Method::HEAD, None, "/healthz") => self.healthz().await,
            (_, None, "/healthz") => method_not_allowed("GET, HEAD"),
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
            // Callbacks are still taken: healthy, but the body says uploads wait.
            None if !self.metrics.storage_is_up() => text(
                StatusCode::OK,
                "ok; the object store does not answer: uploads paused (coverd_storage_up 0)",
            ),
            None => text(StatusCode::OK, "ok"),
            Some(what) => answer(Answer::error(StatusCode::SERVICE_UNAVAILABLE, what)),
        }
    }
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
