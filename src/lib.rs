//! coverd: makes sure every Suno cover task submitted to KIE.AI ends with its images safely on
//! local disk, or with a clear reason why not. See ARCHITECTURE.md for the map.

// No unsafe code in the library; the binary's one `export_name` (jemalloc's settings) is
// in main.rs.
#![forbid(unsafe_code)]

pub mod admin;
pub mod broken;
pub mod callback;
pub mod config;
pub mod daemon;
pub mod dirsync;
pub mod download;
pub mod fetch;
pub mod guard;
pub mod kie;
pub mod kind;
pub mod logline;
pub mod machine;
pub mod manual;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod poll;
pub mod retry;
pub mod schedule;
pub mod server;
pub mod sharing;
pub mod signature;
pub mod storage;
pub mod store;
pub mod submit;
