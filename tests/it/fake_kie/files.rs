//! The fake file host: serves image files and misbehaves on demand.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::{Request, Response};

use super::Body;

pub struct Files {
    #[allow(dead_code)]
    addr: SocketAddr,
}

impl Files {
    pub fn new(addr: SocketAddr) -> Files {
        Files { addr }
    }

    pub async fn handle(&self, _req: Request<Incoming>) -> Response<Body> {
        todo!("files")
    }
}
