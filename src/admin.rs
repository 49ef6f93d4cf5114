//! `coverd admin …` and `coverd submit`: one set of requests executed against the store, either
//! inside the running daemon (reached over `admin.sock`, mode 0600, in the data directory) or,
//! when the daemon is stopped, by opening the store directly — the same code answers both
//! ways. Its parts: `wire` (requests, replies, errors), `exec` (running a request on the
//! store), `service` and `client` (the two ends of the socket), `render` (printing),
//! `access` (which data directory, as whom), `backup` (backup, restore, prune). Must not
//! change a task except through `store::apply` (the state machine).

pub mod access;
pub mod backup;
mod client;
mod exec;
mod render;
mod service;
mod wire;

pub use client::*;
pub use exec::*;
pub use render::*;
pub use service::*;
pub use wire::*;

use std::time::Duration;

/// The admin socket's file name in the data directory. `admin` owns both ends: the daemon
/// binds it for [`Service`], [`run`] connects to it.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// Largest admin request body.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest an admin command waits for the daemon.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest `admin verify` or `admin export` waits for the daemon.
const WHOLE_STORE_TIMEOUT: Duration = Duration::from_secs(3600);
/// `admin list` without `--limit`.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// `admin list --limit` at most.
pub const MAX_LIST_LIMIT: usize = 10_000;
