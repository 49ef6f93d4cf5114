//! A fake KIE.AI written for the tests: one hyper server on loopback that serves both KIE's
//! API (`/api/...`, see `api.rs`) and image files (everything else, see `files.rs`), and can
//! misbehave on demand. Tests configure it through the shared `Files` and `Api` handles.

pub mod api;
pub mod files;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Every fake response body: may stream slowly, be cut off, or error mid-way.
pub type Body = BoxBody<Bytes, std::io::Error>;

pub struct FakeKie {
    pub addr: SocketAddr,
    #[allow(dead_code)] // read by the file-host tests, not by every test build
    pub files: Arc<files::Files>,
    #[allow(dead_code)] // until the API tests read it
    pub api: Arc<api::Api>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeKie {
    /// Binds 127.0.0.1:0 and serves until dropped.
    pub async fn start() -> FakeKie {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake KIE");
        let addr = listener.local_addr().expect("fake KIE address");
        let files = Arc::new(files::Files::new(addr));
        let api = Arc::new(api::Api::new(addr));
        let (f, a) = (files.clone(), api.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (f, a) = (f.clone(), a.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (f, a) = (f.clone(), a.clone());
                        async move {
                            let resp = if req.uri().path().starts_with("/api/") {
                                a.handle(req).await
                            } else {
                                f.handle(req).await
                            };
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeKie {
            addr,
            files,
            api,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeKie {
    fn drop(&mut self) {
        self.task.abort();
    }
}
