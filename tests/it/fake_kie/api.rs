//! The fake KIE API: cover/generate, record-info and download-url, each able to misbehave.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::{Request, Response};

use super::Body;

pub struct Api {
    #[allow(dead_code)]
    addr: SocketAddr,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Api {
        Api { addr }
    }

    pub async fn handle(&self, _req: Request<Incoming>) -> Response<Body> {
        todo!("api")
    }
}
