//! The one integration-test crate: real server on loopback, real sled in a temp dir, and a
//! fake KIE written in Rust (`fake_kie`). One binary keeps build times down.

mod fake_kie;
mod fetch;
mod kie_client;
