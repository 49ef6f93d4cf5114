//! The daemon's side of `admin.sock`: `POST /v1` with a JSON [`Request`], answered by
//! [`Exec`]. Must not print or exit.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, StatusCode};
use tokio::sync::Notify;

use super::{AdminError, Exec, MAX_REQUEST_BYTES, Request};
use crate::callback::Answer;
use crate::config::Config;
use crate::kie::KieClient;
use crate::server::{self, Resp};
use crate::store::Store;

/// Answers admin requests on the daemon's Unix socket: `POST /v1` with a JSON [`Request`].
pub struct Service {
    exec: Exec,
}

impl Service {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        kie: Option<Arc<KieClient>>,
        wake: Vec<Arc<Notify>>,
    ) -> Service {
        Service {
            exec: Exec {
                store,
                config,
                kie,
                daemon_running: true,
                wake,
                progress: None,
            },
        }
    }

    pub async fn handle(&self, req: hyper::Request<Incoming>) -> Resp {
        if req.method() != Method::POST || req.uri().path() != "/v1" {
            return server::answer(Answer::error(StatusCode::NOT_FOUND, "use POST /v1"));
        }
        let (parts, body) = req.into_parts();
        let bytes = match server::read_body(&parts, body, MAX_REQUEST_BYTES).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let result = match serde_json::from_slice::<Request>(&bytes) {
            Ok(request) => self.exec.execute(request).await,
            Err(e) => Err(AdminError::usage(format!("bad admin request: {e}"))),
        };
        let (status, body) = match result {
            Ok(reply) => (StatusCode::OK, serde_json::to_string(&reply)),
            Err(err) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::to_string(&err),
            ),
        };
        server::answer(Answer {
            status,
            body: body.unwrap_or_else(|e| {
                format!(r#"{{"exit":1,"message":"cannot encode reply: {e}"}}"#)
            }),
        })
    }
}
