//! Configuration: the TOML file, environment overrides and command-line flags, resolved into
//! one validated [`Config`]. Owns parsing and validation of every key in SPEC's table; must
//! not open the store, the network or any socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A secret string (API key, HMAC key). Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The fully resolved configuration every other module reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// How KIE reaches this daemon, without trailing slash; empty when unset.
    pub public_url: String,
    pub accept_unknown_tasks: bool,
    pub metrics_listen: Option<SocketAddr>,
    pub kie: KieConfig,
    pub download: DownloadConfig,
    pub poll: PollConfig,
}

#[derive(Debug, Clone)]
pub struct KieConfig {
    /// Without trailing slash, e.g. `https://api.kie.ai`.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub webhook_hmac_key: Option<Secret>,
    pub signature_tolerance: Duration,
    pub confirm_callbacks: bool,
    pub requests_per_10s: u32,
}

#[derive(Debug, Clone)]
pub struct DownloadConfig {
    pub concurrency: usize,
    pub max_image_bytes: u64,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub timeout: Duration,
    /// Lower-cased host names; empty means any host.
    pub allowed_hosts: Vec<String>,
    pub allow_http: bool,
    pub allow_private_networks: bool,
    pub user_agent: String,
}

#[derive(Debug, Clone)]
pub struct PollConfig {
    pub after: Duration,
    pub interval: Duration,
    pub give_up_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./coverd-data"),
            listen: "127.0.0.1:8787".parse().expect("valid default address"),
            public_url: String::new(),
            accept_unknown_tasks: false,
            metrics_listen: None,
            kie: KieConfig {
                base_url: "https://api.kie.ai".into(),
                api_key: None,
                webhook_hmac_key: None,
                signature_tolerance: Duration::from_secs(5 * 60),
                confirm_callbacks: true,
                requests_per_10s: 18,
            },
            download: DownloadConfig {
                concurrency: 4,
                max_image_bytes: 26_214_400,
                max_attempts: 8,
                backoff_base: Duration::from_secs(2),
                backoff_max: Duration::from_secs(5 * 60),
                timeout: Duration::from_secs(120),
                allowed_hosts: vec!["tempfile.aiquickdraw.com".into()],
                allow_http: false,
                allow_private_networks: false,
                user_agent: concat!("coverd/", env!("CARGO_PKG_VERSION")).into(),
            },
            poll: PollConfig {
                after: Duration::from_secs(2 * 60),
                interval: Duration::from_secs(30),
                give_up_after: Duration::from_secs(24 * 3600),
            },
        }
    }
}
