//! The KIE.AI API client. Owns every call to KIE's API: the `{code, msg, data}` envelope,
//! bearer auth and the User-Agent, mapping KIE's codes to typed [`KieError`]s, lenient parsing
//! of KIE's inconsistent answers, and the client-side rate limit shared by all calls.
//!
//! It must not touch the store, the filesystem or image downloads: callers decide what a
//! result means for a task. The API key never appears in logs, errors or `Debug` output.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde_json::Value;
use tokio::time::Instant;
use url::Url;

use crate::config::{KieConfig, Secret};
use crate::metrics::Metrics;

/// Limit on one whole KIE API request (connect, send, answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit on establishing the connection to KIE.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The sliding window of the client-side rate limit, and the pause after a 429.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Answers longer than this are refused: every KIE answer is a small JSON object.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

const GENERATE_PATH: &str = "/api/v1/suno/cover/generate";
const RECORD_INFO_PATH: &str = "/api/v1/suno/cover/record-info";
const DOWNLOAD_URL_PATH: &str = "/api/v1/common/download-url";

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

/// Which KIE endpoint a call went to; decides what endpoint-specific codes mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Generate,
    RecordInfo,
    DownloadUrl,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Generate => "cover/generate",
            Endpoint::RecordInfo => "cover/record-info",
            Endpoint::DownloadUrl => "common/download-url",
        }
    }
}

/// Client-side rate limit: at most `limit` calls started in any sliding window, and a pause
/// of one whole window for everybody after KIE answered 429. Uses `tokio::time`, so it works
/// under paused test time. Waiters are served in arrival order.
pub struct RateLimiter {
    limit: usize,
    window: Duration,
    starts: tokio::sync::Mutex<VecDeque<Instant>>,
    paused_until: std::sync::Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// `limit` calls per `window`; a limit of 0 is treated as 1.
    pub fn new(limit: u32, window: Duration) -> RateLimiter {
        RateLimiter {
            limit: usize::try_from(limit.max(1)).unwrap_or(usize::MAX),
            window,
            starts: tokio::sync::Mutex::new(VecDeque::new()),
            paused_until: std::sync::Mutex::new(None),
        }
    }

    /// Waits until a call may start, and counts it as started.
    pub async fn acquire(&self) {
        // Holding the lock while sleeping queues later callers fairly behind this one.
        let mut starts = self.starts.lock().await;
        loop {
            let now = Instant::now();
            if let Some(until) = self.paused_until() {
                if until > now {
                    tokio::time::sleep_until(until).await;
                    continue;
                }
            }
            while starts.front().is_some_and(|&t| t + self.window <= now) {
                starts.pop_front();
            }
            if starts.len() < self.limit {
                starts.push_back(now);
                return;
            }
            if let Some(&oldest) = starts.front() {
                tokio::time::sleep_until(oldest + self.window).await;
            }
        }
    }

    /// Blocks every call for one whole window from now (KIE answered 429).
    pub fn pause(&self) {
        let until = Instant::now() + self.window;
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }

    /// When the current 429 pause ends, if one was ever set (it may lie in the past).
    pub fn paused_until(&self) -> Option<Instant> {
        *self.paused_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limit", &self.limit)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// The KIE API client. Cheap to clone; clones share the HTTP connection pool and the rate
/// limiter.
#[derive(Clone)]
pub struct KieClient {
    http: reqwest::Client,
    base_url: String,
    key: Secret,
    auth: HeaderValue,
    limiter: Arc<RateLimiter>,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for KieClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KieClient")
            .field("base_url", &self.base_url)
            .field("api_key", &"***")
            .field("limiter", &self.limiter)
            .finish()
    }
}

impl KieClient {
    /// A client for `cfg.base_url` with the standard timeouts (30 s whole request, 10 s
    /// connect). Fails with [`KieError::NoApiKey`] when no API key is configured.
    pub fn new(cfg: &KieConfig, user_agent: &str) -> Result<KieClient, KieError> {
        KieClient::with_timeouts(cfg, user_agent, REQUEST_TIMEOUT, CONNECT_TIMEOUT)
    }

    /// Like [`KieClient::new`] with explicit timeouts (tests use short ones).
    pub fn with_timeouts(
        cfg: &KieConfig,
        user_agent: &str,
        request_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<KieClient, KieError> {
        let key = match &cfg.api_key {
            Some(k) if !k.expose().trim().is_empty() => Secret::new(k.expose().trim()),
            _ => return Err(KieError::NoApiKey),
        };
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                KieError::Setup(
                    "the KIE API key contains characters that cannot go in an HTTP header \
                 (a stray newline or quote?): check kie.api_key"
                        .into(),
                )
            })?;
        auth.set_sensitive(true);

        let base_url = cfg.base_url.trim().trim_end_matches('/').to_string();
        let parsed = Url::parse(&base_url).map_err(|e| {
            KieError::Setup(format!(
                "kie.base_url {base_url:?} is not a valid URL ({e}): fix kie.base_url"
            ))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(KieError::Setup(format!(
                "kie.base_url {base_url:?} must be an http(s) URL with a host, e.g. https://api.kie.ai"
            )));
        }

        let user_agent = user_agent.trim();
        if user_agent.is_empty() {
            return Err(KieError::Setup(
                "the User-Agent is empty and KIE's Cloudflare refuses such requests: set download.user_agent"
                    .into(),
            ));
        }
        let ua = HeaderValue::from_str(user_agent).map_err(|_| {
            KieError::Setup(format!(
                "the User-Agent {user_agent:?} is not a valid HTTP header value: fix download.user_agent"
            ))
        })?;

        let http = reqwest::Client::builder()
            .user_agent(ua)
            .timeout(request_timeout)
            .connect_timeout(connect_timeout)
            // KIE's API does not redirect; following one could carry the key elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                KieError::Setup(format!("cannot build the HTTP client: {}", error_chain(&e)))
            })?;

        Ok(KieClient {
            http,
            base_url,
            key,
            auth,
            limiter: Arc::new(RateLimiter::new(cfg.requests_per_10s, RATE_WINDOW)),
            metrics: None,
        })
    }

    /// Counts every call into the daemon's metrics (`coverd_kie_requests_total`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> KieClient {
        self.metrics = Some(metrics);
        self
    }

    /// The base URL calls go to, without trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The rate limiter shared by every call of this client and its clones.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Asks KIE for a cover of a finished song. Returns the new cover task id.
    /// When KIE already made a cover for that song it answers 400/409 with the existing
    /// cover task id: that is [`KieError::AlreadyExists`], for the caller to adopt.
    pub async fn generate_cover(
        &self,
        music_task_id: &str,
        callback_url: &str,
    ) -> Result<String, KieError> {
        let url = self.endpoint_url(GENERATE_PATH)?;
        let body = serde_json::json!({"taskId": music_task_id, "callBackUrl": callback_url});
        let data = self
            .call(Endpoint::Generate, url, Some(&body), music_task_id)
            .await?;
        match task_id_in(&data) {
            Some(task_id) => {
                tracing::debug!(
                    task_id,
                    music_task_id,
                    "task {task_id}: KIE accepted the cover request for music task {music_task_id}"
                );
                Ok(task_id)
            }
            None => Err(KieError::BadResponse(format!(
                "cover/generate for music task {music_task_id} succeeded without data.taskId"
            ))),
        }
    }

    /// Reads the state of a cover task. A record that does not exist (yet) is
    /// [`KieError::NotFound`]: right after creation that is normal for a while.
    pub async fn record_info(&self, cover_task_id: &str) -> Result<RecordInfo, KieError> {
        let mut url = self.endpoint_url(RECORD_INFO_PATH)?;
        url.query_pairs_mut().append_pair("taskId", cover_task_id);
        let data = self
            .call(Endpoint::RecordInfo, url, None, cover_task_id)
            .await?;
        let info = parse_record_info(&data)?;
        if let Some(got) = &info.task_id {
            if got != cover_task_id {
                return Err(KieError::BadResponse(format!(
                    "record-info for cover task {cover_task_id} answered about task {got}"
                )));
            }
        }
        tracing::debug!(
            task_id = cover_task_id,
            "task {cover_task_id}: record-info says {}, {} image(s)",
            info.status.as_str(),
            info.images.len()
        );
        Ok(info)
    }

    /// Asks KIE for a fresh (20 minute) download link to one of its own files. Files that
    /// KIE did not generate are [`KieError::NotKieFile`].
    pub async fn refresh_download_url(&self, file_url: &str) -> Result<String, KieError> {
        let url = self.endpoint_url(DOWNLOAD_URL_PATH)?;
        let body = serde_json::json!({"url": file_url});
        let data = self
            .call(Endpoint::DownloadUrl, url, Some(&body), "")
            .await?;
        parse_download_url(&data).ok_or_else(|| {
            KieError::BadResponse("download-url succeeded without a URL in data".into())
        })
    }

    fn endpoint_url(&self, path: &str) -> Result<Url, KieError> {
        let text = format!("{}{}", self.base_url, path);
        Url::parse(&text).map_err(|e| {
            KieError::Setup(format!(
                "cannot build the URL {text:?} ({e}): fix kie.base_url"
            ))
        })
    }

    /// One call: rate limit, send, read the (capped) answer, interpret the envelope.
    async fn call(
        &self,
        endpoint: Endpoint,
        url: Url,
        body: Option<&Value>,
        task_id: &str,
    ) -> Result<Value, KieError> {
        self.limiter.acquire().await;
        let name = endpoint.name();
        tracing::debug!(
            endpoint = name,
            task_id,
            "calling KIE {name} (task {task_id})"
        );
        let outcome = self.exchange(endpoint, url, body).await;
        let outcome = outcome.map_err(|e| e.redacted(self.key.expose()));
        if let Some(metrics) = &self.metrics {
            let result = match &outcome {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            };
            metrics.kie_request(name, result);
        }
        if let Err(e) = &outcome {
            if matches!(e, KieError::RateLimited) {
                self.limiter.pause();
            }
            // The caller logs what the failure means for its task, once.
            tracing::debug!(
                endpoint = name,
                task_id,
                "KIE {name} (task {task_id}) failed: {e}"
            );
        }
        outcome
    }

    async fn exchange(
        &self,
        endpoint: Endpoint,
        url: Url,
        body: Option<&Value>,
    ) -> Result<Value, KieError> {
        let request = match body {
            Some(body) => {
                let bytes = serde_json::to_vec(body)
                    .map_err(|e| KieError::Setup(format!("cannot encode the request body: {e}")))?;
                self.http.post(url).body(bytes)
            }
            None => self.http.get(url),
        };
        let mut response = request
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .send()
            .await
            .map_err(|e| transport_error(endpoint, &e))?;
        let status = response.status().as_u16();
        let mut answer = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport_error(endpoint, &e))?
        {
            if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(KieError::BadResponse(format!(
                    "{} answered with more than {MAX_ANSWER_BYTES} bytes",
                    endpoint.name()
                )));
            }
            answer.extend_from_slice(&chunk);
        }
        interpret(endpoint, status, &answer)
    }
}

fn transport_error(endpoint: Endpoint, e: &reqwest::Error) -> KieError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // The URL in reqwest's message holds no secret: the key travels in a header.
    KieError::Transport(format!("{} {what}: {}", endpoint.name(), error_chain(e)))
}

/// `e` and its sources, joined with ": ".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// KIE's `{code, msg, data}` answer.
#[derive(Debug, Clone, PartialEq)]
struct Envelope {
    code: i64,
    msg: String,
    data: Value,
}

/// Parses an envelope: a JSON object with an integer (or numeric string) `code`; `msg` or
/// `message`; `data` of any shape. Anything else is not an envelope.
fn parse_envelope(body: &[u8]) -> Option<Envelope> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let obj = value.as_object()?;
    let code = int_of(obj.get("code")?)?;
    let msg = ["msg", "message"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_str))
        .unwrap_or_default()
        .to_string();
    let data = obj.get("data").cloned().unwrap_or(Value::Null);
    Some(Envelope { code, msg, data })
}

/// Decides the outcome of one answer: success is HTTP 2xx and envelope code 200; anything
/// else becomes a typed error (by envelope code, else by HTTP status).
fn interpret(endpoint: Endpoint, http_status: u16, body: &[u8]) -> Result<Value, KieError> {
    let http_ok = (200..300).contains(&http_status);
    match parse_envelope(body) {
        Some(env) if http_ok && env.code == 200 => Ok(env.data),
        Some(env) => {
            let code = if env.code != 200 {
                env.code
            } else {
                i64::from(http_status)
            };
            let msg = if env.msg.is_empty() {
                format!("no message (HTTP {http_status})")
            } else {
                env.msg
            };
            Err(map_code(endpoint, code, msg, Some(&env.data)))
        }
        None if http_ok => Err(KieError::BadResponse(format!(
            "{} answered HTTP {http_status} without a KIE JSON envelope: {}",
            endpoint.name(),
            snippet(body)
        ))),
        None => Err(map_code(
            endpoint,
            i64::from(http_status),
            format!(
                "HTTP {http_status} without a KIE JSON envelope: {}",
                snippet(body)
            ),
            None,
        )),
    }
}

/// Maps a KIE code to an error. `data` is `Some` when the code came from an envelope; the
/// endpoint-specific meanings (already exists, not found, not a KIE file) need one.
fn map_code(endpoint: Endpoint, code: i64, msg: String, data: Option<&Value>) -> KieError {
    match code {
        401 => return KieError::Unauthorized,
        402 => return KieError::NoCredits,
        429 => return KieError::RateLimited,
        455 => return KieError::Maintenance,
        500..=599 => return KieError::Server { code, msg },
        _ => {}
    }
    if let Some(data) = data {
        match (endpoint, code) {
            (Endpoint::Generate, 400 | 409) => {
                if let Some(task_id) = task_id_in(data) {
                    return KieError::AlreadyExists { task_id };
                }
            }
            (Endpoint::RecordInfo, 404 | 422) => return KieError::NotFound,
            (Endpoint::DownloadUrl, 422) => return KieError::NotKieFile,
            _ => {}
        }
    }
    KieError::Invalid { code, msg }
}

/// The first 200 characters of an answer, printable, for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    if out.trim().is_empty() {
        "(empty body)".into()
    } else {
        out
    }
}

/// An integer from a JSON number or a numeric string.
fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A non-empty string field.
fn str_field(obj: &serde_json::Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// `data.taskId` (or `data.task_id`), non-empty.
/// The task id in `data`, only if it is a safe name: it becomes a directory under `images/`.
fn task_id_in(data: &Value) -> Option<String> {
    let obj = data.as_object()?;
    str_field(obj, "taskId")
        .or_else(|| str_field(obj, "task_id"))
        .filter(|id| crate::model::valid_task_id(id))
}

/// Reads `successFlag` in either of KIE's forms: integer 0 pending, 1 success, 2 generating,
/// 3 failed; or text `PENDING`, `GENERATING`, `SUCCESS`, `CREATE_TASK_FAILED`,
/// `GENERATE_COVER_FAILED` (any case), or a numeric string. Missing or null is pending;
/// unrecognised values are `None`.
pub fn parse_success_flag(flag: Option<&Value>) -> Option<CoverStatus> {
    let flag = match flag {
        None | Some(Value::Null) => return Some(CoverStatus::Pending),
        Some(f) => f,
    };
    if let Some(n) = int_of(flag) {
        return match n {
            0 => Some(CoverStatus::Pending),
            1 => Some(CoverStatus::Success),
            2 => Some(CoverStatus::Generating),
            3 => Some(CoverStatus::Failed),
            _ => None,
        };
    }
    let text = flag.as_str()?.trim().to_ascii_uppercase();
    match text.as_str() {
        "" | "PENDING" | "WAITING" | "QUEUED" => Some(CoverStatus::Pending),
        "GENERATING" | "RUNNING" | "PROCESSING" => Some(CoverStatus::Generating),
        "SUCCESS" | "SUCCEEDED" | "COMPLETE" | "COMPLETED" => Some(CoverStatus::Success),
        "CREATE_TASK_FAILED" | "GENERATE_COVER_FAILED" | "FAILED" => Some(CoverStatus::Failed),
        t if t.contains("FAIL") || t.contains("ERROR") => Some(CoverStatus::Failed),
        _ => None,
    }
}

/// Reads `response.images`: `response` may be an object, a JSON string, missing or null;
/// `images` may be missing or null. Non-string entries are skipped (objects with a `url` or
/// `imageUrl` are read). Falls back to `data.images`.
fn parse_images(data: &serde_json::Map<String, Value>) -> Result<Vec<String>, String> {
    let response = match data.get("response") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() || s.trim() == "null" => None,
        Some(Value::String(s)) => Some(
            serde_json::from_str::<Value>(s)
                .map_err(|e| format!("record-info response is a string but not JSON ({e})"))?,
        ),
        Some(v) => Some(v.clone()),
    };
    let images = response
        .as_ref()
        .and_then(|r| r.get("images"))
        .filter(|v| !v.is_null())
        .or_else(|| data.get("images"));
    let list = match images {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(Value::String(one)) if !one.trim().is_empty() => {
            return Ok(vec![one.trim().to_string()]);
        }
        Some(other) => return Err(format!("record-info images is not a list: {other}")),
    };
    let urls: Vec<String> = list
        .iter()
        .filter_map(|item| match item {
            Value::String(s) => Some(s.trim().to_string()),
            Value::Object(o) => str_field(o, "url").or_else(|| str_field(o, "imageUrl")),
            _ => None,
        })
        .filter(|s| !s.is_empty())
        .collect();
    // The same bounds as a callback's: a task record stays small whatever KIE sends.
    if urls.len() > crate::callback::MAX_IMAGES {
        return Err(format!(
            "record-info lists {} images, more than {}",
            urls.len(),
            crate::callback::MAX_IMAGES
        ));
    }
    if urls
        .iter()
        .any(|u| u.len() > crate::callback::MAX_URL_BYTES)
    {
        return Err(format!(
            "record-info lists an image URL longer than {} bytes",
            crate::callback::MAX_URL_BYTES
        ));
    }
    Ok(urls)
}

/// Parses record-info's `data` leniently (see [`RecordInfo`]). `data` null or missing means
/// the record does not exist (yet): [`KieError::NotFound`].
pub fn parse_record_info(data: &Value) -> Result<RecordInfo, KieError> {
    let parsed;
    let data = match data {
        Value::Null => return Err(KieError::NotFound),
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s).map_err(|e| {
                KieError::BadResponse(format!("record-info data is a string but not JSON ({e})"))
            })?;
            &parsed
        }
        other => other,
    };
    let Some(obj) = data.as_object() else {
        return Err(KieError::BadResponse(format!(
            "record-info data is not an object: {}",
            snippet(data.to_string().as_bytes())
        )));
    };
    let flag = obj.get("successFlag").or_else(|| obj.get("status"));
    let status = match parse_success_flag(flag) {
        Some(s) => s,
        None => {
            let flag =
                flag.map_or_else(|| "none".to_string(), |f| snippet(f.to_string().as_bytes()));
            tracing::warn!(
                "unknown successFlag {flag} in KIE's record-info answer; treating the task as pending"
            );
            CoverStatus::Pending
        }
    };
    let images = parse_images(obj).map_err(KieError::BadResponse)?;
    let (error_code, error_message) = if status == CoverStatus::Failed {
        (
            obj.get("errorCode").and_then(int_of),
            str_field(obj, "errorMessage").or_else(|| str_field(obj, "errorMsg")),
        )
    } else {
        (None, None)
    };
    Ok(RecordInfo {
        task_id: str_field(obj, "taskId"),
        parent_task_id: str_field(obj, "parentTaskId"),
        status,
        images,
        error_code,
        error_message,
    })
}

/// Reads download-url's `data`: the URL itself, or an object with `url` / `downloadUrl`.
pub fn parse_download_url(data: &Value) -> Option<String> {
    match data {
        Value::String(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
        Value::Object(o) => str_field(o, "url")
            .or_else(|| str_field(o, "downloadUrl"))
            .or_else(|| str_field(o, "download_url")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn success_flag_integer_forms() {
        let f = |v: Value| parse_success_flag(Some(&v));
        assert_eq!(f(json!(0)), Some(CoverStatus::Pending));
        assert_eq!(f(json!(1)), Some(CoverStatus::Success));
        assert_eq!(f(json!(2)), Some(CoverStatus::Generating));
        assert_eq!(f(json!(3)), Some(CoverStatus::Failed));
        assert_eq!(f(json!(7)), None);
    }

    #[test]
    fn success_flag_string_forms() {
        let f = |v: &str| parse_success_flag(Some(&json!(v)));
        assert_eq!(f("PENDING"), Some(CoverStatus::Pending));
        assert_eq!(f("GENERATING"), Some(CoverStatus::Generating));
        assert_eq!(f("SUCCESS"), Some(CoverStatus::Success));
        assert_eq!(f("success"), Some(CoverStatus::Success));
        assert_eq!(f("CREATE_TASK_FAILED"), Some(CoverStatus::Failed));
        assert_eq!(f("GENERATE_COVER_FAILED"), Some(CoverStatus::Failed));
        assert_eq!(f("SENSITIVE_WORD_ERROR"), Some(CoverStatus::Failed));
        assert_eq!(f("1"), Some(CoverStatus::Success));
        assert_eq!(f(" 3 "), Some(CoverStatus::Failed));
        assert_eq!(f("0"), Some(CoverStatus::Pending));
        assert_eq!(f("WHATEVER"), None);
    }

    #[test]
    fn success_flag_missing_or_null_is_pending() {
        assert_eq!(parse_success_flag(None), Some(CoverStatus::Pending));
        assert_eq!(
            parse_success_flag(Some(&Value::Null)),
            Some(CoverStatus::Pending)
        );
    }

    #[test]
    fn hostile_answers_are_bounded() {
        let many: Vec<String> = (0..17).map(|i| format!("https://h/{i}.png")).collect();
        let data = json!({"taskId": "c1", "successFlag": 1, "response": {"images": many}});
        assert!(matches!(
            parse_record_info(&data),
            Err(KieError::BadResponse(_))
        ));
        let long = format!("https://h/{}", "a".repeat(crate::callback::MAX_URL_BYTES));
        let data = json!({"taskId": "c1", "successFlag": 1, "response": {"images": [long]}});
        assert!(matches!(
            parse_record_info(&data),
            Err(KieError::BadResponse(_))
        ));
        // Task ids become directory names: unsafe ones are not taken from KIE's answers.
        for bad in ["../../etc", "a/b", ""] {
            assert_eq!(task_id_in(&json!({"taskId": bad})), None, "{bad}");
        }
        assert_eq!(
            task_id_in(&json!({"taskId": "c0ffee"})).as_deref(),
            Some("c0ffee")
        );
    }

    #[test]
    fn record_info_full_success() {
        let data = json!({
            "taskId": "c1", "parentTaskId": "m1", "callbackUrl": "https://x/cb",
            "createTime": "2026-11-27T10:33:01Z", "completeTime": "2026-11-27T10:35:01Z",
            "response": {"images": ["https://h/a.png", "https://h/b.png"]},
            "successFlag": 1, "errorCode": 200, "errorMessage": "", "extra": {"ignored": true}
        });
        let info = parse_record_info(&data).expect("parses");
        assert_eq!(
            info,
            RecordInfo {
                task_id: Some("c1".into()),
                parent_task_id: Some("m1".into()),
                status: CoverStatus::Success,
                images: vec!["https://h/a.png".into(), "https://h/b.png".into()],
                error_code: None,
                error_message: None,
            }
        );
    }

    #[test]
    fn record_info_response_as_json_string() {
        let data =
            json!({"successFlag": "SUCCESS", "response": "{\"images\":[\"https://h/a.png\"]}"});
        let info = parse_record_info(&data).expect("parses");
        assert_eq!(info.status, CoverStatus::Success);
        assert_eq!(info.images, vec!["https://h/a.png".to_string()]);
    }

    #[test]
    fn record_info_missing_and_null_pieces() {
        for data in [
            json!({}),
            json!({"response": null}),
            json!({"response": {}}),
            json!({"response": {"images": null}, "successFlag": null}),
            json!({"response": "", "taskId": null}),
        ] {
            let info = parse_record_info(&data).expect("parses");
            assert_eq!(info.status, CoverStatus::Pending, "{data}");
            assert!(info.images.is_empty(), "{data}");
            assert_eq!(info.task_id, None);
        }
    }

    #[test]
    fn record_info_bad_response_string_is_an_error() {
        let err = parse_record_info(&json!({"response": "{not json"})).expect_err("refused");
        assert!(matches!(err, KieError::BadResponse(_)), "{err:?}");
    }

    #[test]
    fn record_info_error_fields_only_when_failed() {
        let ok =
            parse_record_info(&json!({"successFlag": 2, "errorCode": 500, "errorMessage": "x"}))
                .expect("parses");
        assert_eq!((ok.error_code, ok.error_message), (None, None));
        let failed = parse_record_info(&json!({
            "successFlag": "GENERATE_COVER_FAILED", "errorCode": "501", "errorMessage": "Cover generation failed"
        }))
        .expect("parses");
        assert_eq!(failed.status, CoverStatus::Failed);
        assert_eq!(failed.error_code, Some(501));
        assert_eq!(
            failed.error_message.as_deref(),
            Some("Cover generation failed")
        );
    }

    #[test]
    fn record_info_null_data_is_not_found() {
        assert!(matches!(
            parse_record_info(&Value::Null),
            Err(KieError::NotFound)
        ));
        assert!(matches!(
            parse_record_info(&json!([1])),
            Err(KieError::BadResponse(_))
        ));
    }

    #[test]
    fn download_url_both_shapes() {
        assert_eq!(
            parse_download_url(&json!("https://h/x.png")).as_deref(),
            Some("https://h/x.png")
        );
        assert_eq!(
            parse_download_url(&json!({"url": "https://h/y"})).as_deref(),
            Some("https://h/y")
        );
        assert_eq!(
            parse_download_url(&json!({"downloadUrl": "https://h/z"})).as_deref(),
            Some("https://h/z")
        );
        assert_eq!(parse_download_url(&json!({})), None);
        assert_eq!(parse_download_url(&json!("")), None);
        assert_eq!(parse_download_url(&Value::Null), None);
    }

    #[test]
    fn envelope_msg_or_message_and_string_code() {
        let e =
            parse_envelope(br#"{"code":"200","message":"ok","data":{"a":1}}"#).expect("envelope");
        assert_eq!((e.code, e.msg.as_str()), (200, "ok"));
        assert_eq!(e.data, json!({"a": 1}));
        assert!(parse_envelope(b"<html>").is_none());
        assert!(parse_envelope(br#"{"status":"x"}"#).is_none());
    }

    #[test]
    fn interpret_success_needs_http_2xx_and_code_200() {
        let ok = interpret(
            Endpoint::Generate,
            200,
            br#"{"code":200,"msg":"success","data":{"taskId":"t"}}"#,
        );
        assert_eq!(ok.expect("success"), json!({"taskId": "t"}));
        let err = interpret(Endpoint::Generate, 200, br#"{"code":401,"msg":"bad key"}"#)
            .expect_err("401");
        assert!(matches!(err, KieError::Unauthorized));
        // HTTP 500 with an envelope that claims 200: the HTTP status wins.
        let err =
            interpret(Endpoint::Generate, 500, br#"{"code":200,"msg":"?"}"#).expect_err("500");
        assert!(matches!(err, KieError::Server { code: 500, .. }));
        let err = interpret(Endpoint::Generate, 200, b"hello").expect_err("not envelope");
        assert!(matches!(err, KieError::BadResponse(_)));
        let err = interpret(Endpoint::Generate, 502, b"<html>bad gateway</html>").expect_err("502");
        assert!(matches!(err, KieError::Server { code: 502, .. }) && err.is_transient());
        let err = interpret(Endpoint::Generate, 403, b"error code: 1010").expect_err("403");
        assert!(matches!(err, KieError::Invalid { code: 403, .. }));
    }

    #[test]
    fn interpret_endpoint_specific_codes() {
        let exists = br#"{"code":409,"msg":"record already exists","data":{"taskId":"old"}}"#;
        match interpret(Endpoint::Generate, 200, exists) {
            Err(KieError::AlreadyExists { task_id }) => assert_eq!(task_id, "old"),
            other => panic!("{other:?}"),
        }
        // The same as the HTTP status itself.
        assert!(matches!(
            interpret(Endpoint::Generate, 409, exists),
            Err(KieError::AlreadyExists { .. })
        ));
        let no_id = br#"{"code":400,"msg":"bad","data":null}"#;
        assert!(matches!(
            interpret(Endpoint::Generate, 200, no_id),
            Err(KieError::Invalid { code: 400, .. })
        ));
        let nf = br#"{"code":422,"msg":"record not found","data":null}"#;
        assert!(matches!(
            interpret(Endpoint::RecordInfo, 200, nf),
            Err(KieError::NotFound)
        ));
        assert!(matches!(
            interpret(Endpoint::Generate, 200, nf),
            Err(KieError::Invalid { code: 422, .. })
        ));
        assert!(matches!(
            interpret(Endpoint::DownloadUrl, 200, nf),
            Err(KieError::NotKieFile)
        ));
        // A bare HTTP 404 page is not KIE saying "no record": probably a wrong base URL.
        assert!(matches!(
            interpret(Endpoint::RecordInfo, 404, b"Not Found"),
            Err(KieError::Invalid { code: 404, .. })
        ));
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

    fn cfg(key: Option<&str>) -> KieConfig {
        KieConfig {
            base_url: "https://api.kie.ai/".into(),
            api_key: key.map(Secret::new),
            webhook_hmac_key: None,
            signature_tolerance: Duration::from_secs(300),
            confirm_callbacks: true,
            requests_per_10s: 18,
        }
    }

    #[test]
    fn new_requires_a_key_and_explains_where_to_set_it() {
        for key in [None, Some(""), Some("  ")] {
            let err = KieClient::new(&cfg(key), "coverd/test").expect_err("no key");
            assert!(matches!(err, KieError::NoApiKey));
            let text = err.to_string();
            for hint in [
                "kie.api_key",
                "KIE_API_KEY",
                "kie.api_key_file",
                "kie-api-key",
            ] {
                assert!(text.contains(hint), "{text}");
            }
        }
    }

    #[test]
    fn key_never_in_debug_or_errors() {
        let client = KieClient::new(&cfg(Some("sk-very-secret")), "coverd/test").expect("client");
        assert_eq!(client.base_url(), "https://api.kie.ai");
        assert!(!format!("{client:?}").contains("sk-very-secret"));
        let err = KieError::Invalid {
            code: 400,
            msg: "key sk-very-secret is odd".into(),
        }
        .redacted("sk-very-secret");
        assert!(!err.to_string().contains("sk-very-secret"));
        let err = KieClient::new(&cfg(Some("sk-bad\nkey")), "coverd/test").expect_err("bad header");
        assert!(!err.to_string().contains("sk-bad"));
    }

    #[test]
    fn bad_base_url_and_user_agent_are_setup_errors() {
        let mut c = cfg(Some("k"));
        c.base_url = "not a url".into();
        assert!(matches!(KieClient::new(&c, "ua"), Err(KieError::Setup(_))));
        assert!(matches!(
            KieClient::new(&cfg(Some("k")), ""),
            Err(KieError::Setup(_))
        ));
    }
}
