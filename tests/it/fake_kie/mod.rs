//! A fake KIE.AI written for the tests: one hyper server on loopback that serves both KIE's
//! API (`/api/...`, see `api.rs`) and image files (everything else, see `files.rs`), and can
//! misbehave on demand. Tests configure it through the shared `Files` and `Api` handles.

pub mod api;
pub mod files;
pub mod kinds;

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

/// Serves HTTP/1 on `listener` until the returned task is aborted: each connection `take`
/// agrees to (it may drop some) gets `handle` for every request.
pub fn serve<H, F, B>(
    listener: TcpListener,
    take: impl Fn() -> bool + Send + 'static,
    handle: H,
) -> tokio::task::JoinHandle<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            if !take() {
                drop(stream);
                continue;
            }
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

pub struct FakeKie {
    pub addr: SocketAddr,
    #[allow(dead_code)] // read by the file-host tests, not by every test build
    pub files: Arc<files::Files>,
    #[allow(dead_code)] // until the API tests read it
    pub api: Arc<api::Api>,
    /// The other kinds' endpoints.
    #[allow(dead_code)] // for the kinds' tests
    pub kinds: Arc<kinds::Kinds>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeKie {
    /// A fake KIE whose file host serves each `(path, image)`; the images, for comparing.
    #[allow(dead_code)] // not every test build serves images
    pub async fn serving<const N: usize>(images: [(&str, Bytes); N]) -> (FakeKie, [Bytes; N]) {
        let fake = FakeKie::start().await;
        let images = images.map(|(path, image)| {
            fake.files.set(path, files::Behaviour::Image(image.clone()));
            image
        });
        (fake, images)
    }

    /// Binds 127.0.0.1:0 and serves until dropped.
    pub async fn start() -> FakeKie {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake KIE");
        let addr = listener.local_addr().expect("fake KIE address");
        let files = Arc::new(files::Files::new(addr));
        let api = Arc::new(api::Api::new(addr));
        let kinds = Arc::new(kinds::Kinds::new());
        let (f, a, k) = (files.clone(), api.clone(), kinds.clone());
        let task = serve(
            listener,
            || true,
            move |req: Request<Incoming>| {
                let (f, a, k) = (f.clone(), a.clone(), k.clone());
                async move {
                    if kinds::Kinds::route(req.uri().path()).is_some() {
                        k.handle(req).await
                    } else if req.uri().path().starts_with("/api/") {
                        a.handle(req).await
                    } else {
                        f.handle(req).await
                    }
                }
            },
        );
        FakeKie {
            addr,
            files,
            api,
            kinds,
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
