//! The KIE.AI API: the public surface of this module. Owns every call to KIE's API through
//! [`KieClient`] (`client`), the lenient reading of KIE's inconsistent answers (`wire`), and
//! the client-side rate limit shared by all calls (`limiter`), what a record-info answer
//! means for a task still waiting (`verdict`), plus the types callers see: [`KieError`],
//! [`CoverStatus`], [`RecordInfo`].
//!
//! It must not touch the store, the filesystem or image downloads: callers decide what to
//! do with a result (`machine` applies it). The API key never appears in logs, errors or `Debug` output.

mod client;
mod limiter;
pub mod verdict;
mod wire;

pub use client::{CONNECT_TIMEOUT, KieClient, RATE_WINDOW, REQUEST_TIMEOUT};
pub use limiter::RateLimiter;
pub use wire::{parse_download_url, parse_record_info, parse_success_flag};

/// Everything that can go wrong talking to KIE. Each message says what happened and what the
/// operator should do; none contains the API key.
#[derive(thiserror::Error, Debug)]
pub enum KieError {
    #[error(
        "no KIE API key configured: set kie.api_key or kie.api_key_file in the config file, \
         the KIE_API_KEY environment variable, or the systemd credential kie-api-key"
    )]
    NoApiKey,
    #[error("KIE rejected the API key (401): check kie.api_key")]
    Unauthorized,
    #[error("KIE account has no credits left (402): top up at kie.ai")]
    NoCredits,
    #[error(
        "KIE rate limit hit (429): KIE calls pause for 10 s and are retried; \
         lower kie.requests_per_10s if this repeats"
    )]
    RateLimited,
    #[error(
        "KIE is under maintenance (455): the call is retried later; nothing to do unless it lasts"
    )]
    Maintenance,
    #[error("KIE server error (code {code}): {msg}; the call is retried later")]
    Server { code: i64, msg: String },
    #[error(
        "KIE already has a cover for this song: cover task {task_id} (adopt it instead of submitting again)"
    )]
    AlreadyExists { task_id: String },
    #[error(
        "KIE has no record of this cover task (yet): records appear shortly after creation; \
         if this persists, check the task id"
    )]
    NotFound,
    #[error("KIE refused to refresh the download URL (422): it is not a file KIE generated")]
    NotKieFile,
    #[error("KIE refused the request (code {code}): {msg}; check the task id and the request")]
    Invalid { code: i64, msg: String },
    #[error("could not reach KIE: {0}; check the network and kie.base_url (the call is retried)")]
    Transport(String),
    #[error("unexpected answer from KIE: {0}; check that kie.base_url points at KIE's API")]
    BadResponse(String),
    #[error("cannot set up the KIE client: {0}")]
    Setup(String),
}

impl KieError {
    /// A short, stable name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            KieError::NoApiKey => "no_api_key",
            KieError::Unauthorized => "unauthorized",
            KieError::NoCredits => "no_credits",
            KieError::RateLimited => "rate_limited",
            KieError::Maintenance => "maintenance",
            KieError::Server { .. } => "server_error",
            KieError::AlreadyExists { .. } => "already_exists",
            KieError::NotFound => "not_found",
            KieError::NotKieFile => "not_kie_file",
            KieError::Invalid { .. } => "invalid",
            KieError::Transport(_) => "transport",
            KieError::BadResponse(_) => "bad_response",
            KieError::Setup(_) => "setup",
        }
    }

    /// True for failures worth retrying later with backoff: transport errors (connect,
    /// timeout), 429, 455 and 5xx.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            KieError::Transport(_)
                | KieError::RateLimited
                | KieError::Maintenance
                | KieError::Server { .. }
        )
    }

    /// Replaces every occurrence of `key` in the free-text parts of the error.
    fn redacted(self, key: &str) -> KieError {
        if key.is_empty() {
            return self;
        }
        let clean = |s: String| s.replace(key, "***");
        match self {
            KieError::Server { code, msg } => KieError::Server {
                code,
                msg: clean(msg),
            },
            KieError::Invalid { code, msg } => KieError::Invalid {
                code,
                msg: clean(msg),
            },
            KieError::Transport(m) => KieError::Transport(clean(m)),
            KieError::BadResponse(m) => KieError::BadResponse(clean(m)),
            KieError::Setup(m) => KieError::Setup(clean(m)),
            KieError::AlreadyExists { task_id } => KieError::AlreadyExists {
                task_id: clean(task_id),
            },
            other => other,
        }
    }
}

/// State of a cover task as KIE reports it in record-info.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoverStatus {
    Pending,
    Generating,
    Success,
    Failed,
}

impl CoverStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CoverStatus::Pending => "pending",
            CoverStatus::Generating => "generating",
            CoverStatus::Success => "success",
            CoverStatus::Failed => "failed",
        }
    }
}

/// A details answer of any kind: a cover's record-info as `wire` reads it, the other kinds'
/// as `kind::read` reads them.
#[derive(Debug, Clone, PartialEq)]
pub enum Details {
    Cover(RecordInfo),
    Other(crate::kind::read::Reading),
}

/// One record-info answer, parsed leniently. Every field KIE may omit is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    pub task_id: Option<String>,
    /// The music task the cover was made from.
    pub parent_task_id: Option<String>,
    pub status: CoverStatus,
    /// Image URLs; empty unless KIE listed some (normally only on success).
    pub images: Vec<String>,
    /// Only read when `status` is `Failed` (KIE sends 200 here on success).
    pub error_code: Option<i64>,
    /// Only read when `status` is `Failed`.
    pub error_message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `metrics` exports every result a call can end with from the start, at 0: its list
    /// must name each kind (all but the two that never reach a call) and each endpoint.
    #[test]
    fn metrics_know_every_call_result_and_endpoint() {
        let reachable = [
            KieError::Unauthorized,
            KieError::NoCredits,
            KieError::RateLimited,
            KieError::Maintenance,
            KieError::Server {
                code: 500,
                msg: String::new(),
            },
            KieError::AlreadyExists {
                task_id: "t".into(),
            },
            KieError::NotFound,
            KieError::NotKieFile,
            KieError::Invalid {
                code: 422,
                msg: String::new(),
            },
            KieError::Transport(String::new()),
            KieError::BadResponse(String::new()),
        ];
        for e in &reachable {
            // Exhaustive: a new variant must be placed here or among the unreachable.
            match e {
                KieError::NoApiKey | KieError::Setup(_) => unreachable!(),
                _ => assert!(crate::metrics::KIE_RESULTS.contains(&e.kind()), "{e:?}"),
            }
        }
        assert_eq!(crate::metrics::KIE_RESULTS.len(), reachable.len() + 1);
        let per_kind = crate::model::Kind::ALL
            .into_iter()
            .flat_map(|k| [wire::Endpoint::Create(k), wire::Endpoint::Details(k)]);
        for endpoint in per_kind.chain([wire::Endpoint::DownloadUrl]) {
            assert!(
                crate::metrics::KIE_ENDPOINTS.contains(&endpoint.name()),
                "{endpoint:?}"
            );
        }
    }

    #[test]
    fn transient_classification() {
        assert!(KieError::Transport("x".into()).is_transient());
        assert!(KieError::RateLimited.is_transient());
        assert!(KieError::Maintenance.is_transient());
        assert!(
            KieError::Server {
                code: 500,
                msg: String::new()
            }
            .is_transient()
        );
        for e in [
            KieError::NoApiKey,
            KieError::Unauthorized,
            KieError::NoCredits,
            KieError::NotFound,
            KieError::NotKieFile,
            KieError::AlreadyExists {
                task_id: "t".into(),
            },
            KieError::Invalid {
                code: 422,
                msg: String::new(),
            },
            KieError::BadResponse(String::new()),
        ] {
            assert!(!e.is_transient(), "{e:?}");
        }
    }
}
