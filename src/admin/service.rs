//! The daemon's side of `admin.sock`: `POST /v2` with a JSON [`Request`], answered by
//! [`Exec`] as a stream of [`Frame`]s (newline-delimited JSON: a sign of life every
//! [`ALIVE_EVERY`], progress, then the reply); `POST /v1` answers with the reply alone, for
//! a command of an earlier release. The request runs to its end even if the command goes
//! away. Must not print or exit.

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, StatusCode};
use tokio::sync::Notify;

use super::{ALIVE_EVERY, AdminError, Exec, Frame, MAX_REQUEST_BYTES, Request};
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
        let streamed = match (req.method(), req.uri().path()) {
            (&Method::POST, "/v2") => true,
            (&Method::POST, "/v1") => false,
            _ => return server::answer(Answer::error(StatusCode::NOT_FOUND, "use POST /v2")),
        };
        let (parts, body) = req.into_parts();
        let bytes = match server::read_body(&parts, body, MAX_REQUEST_BYTES).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        if streamed {
            return self.stream(&bytes);
        }
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

    /// `/v2`: the request runs on its own task (to its end, even if the command goes away);
    /// the answer's body is its frames, the last one the reply or the error.
    fn stream(&self, bytes: &[u8]) -> Resp {
        let request = match serde_json::from_slice::<Request>(bytes) {
            Ok(r) => r,
            Err(e) => {
                let err = AdminError::usage(format!("bad admin request: {e}"));
                let mut r = hyper::Response::new(server::full(line(&Frame::Error(err))));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/x-ndjson"),
                );
                return r;
            }
        };
        // Progress is lossy (a full channel drops a frame); the last frame is not.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(FRAMES_WAITING);
        let mut exec = self.exec.clone();
        let progress_tx = tx.clone();
        exec.progress = Some(Arc::new(move |done, total| {
            let _ = progress_tx.try_send(line(&Frame::Progress { done, total }));
        }));
        tokio::spawn(async move {
            let work = exec.execute(request);
            tokio::pin!(work);
            let mut alive = tokio::time::interval(ALIVE_EVERY);
            let last = loop {
                tokio::select! {
                    result = &mut work => break match result {
                        Ok(reply) => Frame::Reply(Box::new(reply)),
                        Err(e) => Frame::Error(e),
                    },
                    _ = alive.tick() => { let _ = tx.try_send(line(&Frame::Alive)); }
                }
            };
            let _ = tx.send(line(&last)).await;
        });
        let mut r = hyper::Response::new(http_body_util::BodyExt::boxed_unsync(Frames(rx)));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-ndjson"),
        );
        r
    }
}

/// Frames waiting to be written to the command.
const FRAMES_WAITING: usize = 16;

/// One frame as a line of JSON.
fn line(frame: &Frame) -> Bytes {
    let mut text = serde_json::to_vec(frame).unwrap_or_else(|e| {
        format!(r#"{{"error":{{"kind":"Failed","message":"cannot encode reply: {e}"}}}}"#)
            .into_bytes()
    });
    text.push(b'\n');
    Bytes::from(text)
}

/// The streamed body: the frames as the request's task sends them; ends when it is done.
struct Frames(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}
