//! The KIE API client: one `reqwest` client with KIE's timeouts, bearer auth and the
//! User-Agent; one `call` path (rate limit, send, capped read, redaction of the key,
//! metrics); the endpoints coverd uses (each kind's create and details endpoints,
//! common/download-url).
//!
//! It must not parse KIE's answers itself (that is `wire`), validate settings (`config` hands
//! over checked [`KieBaseUrl`], [`UserAgent`] and [`ApiKey`]), or touch the store or files.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde_json::Value;
use url::Url;

use super::limiter::RateLimiter;
use super::wire::{Endpoint, interpret, parse_download_url, parse_record_info, task_id_in};
use super::{Details, KieError, RecordInfo};
use crate::config::{ApiKey, KieBaseUrl, KieConfig, UserAgent};
use crate::metrics::Metrics;
use crate::model::Kind;
use crate::retry::NoAnswer;

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

/// The KIE API client. Cheap to clone; clones share the HTTP connection pool and the rate
/// limiter.
#[derive(Clone)]
pub struct KieClient {
    http: reqwest::Client,
    base_url: KieBaseUrl,
    key: ApiKey,
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
    pub fn new(cfg: &KieConfig, user_agent: &UserAgent) -> Result<KieClient, KieError> {
        KieClient::with_timeouts(cfg, user_agent, REQUEST_TIMEOUT, CONNECT_TIMEOUT)
    }

    /// Like [`KieClient::new`] with explicit timeouts (tests use short ones). The base URL,
    /// the key and the User-Agent were validated by `config` (their types say so).
    pub fn with_timeouts(
        cfg: &KieConfig,
        user_agent: &UserAgent,
        request_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<KieClient, KieError> {
        let key = cfg.api_key.clone().ok_or(KieError::NoApiKey)?;
        // Both always fit in a header (the newtypes' rules are stricter than HTTP's); the
        // error arms only translate types.
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| KieError::Setup("the KIE API key cannot go in an HTTP header".into()))?;
        auth.set_sensitive(true);
        let ua = HeaderValue::from_str(user_agent.as_str())
            .map_err(|_| KieError::Setup("the User-Agent cannot go in an HTTP header".into()))?;
        let base_url = cfg.base_url.clone();

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
        self.base_url.as_str()
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
            .call(
                Endpoint::Create(Kind::Cover),
                url,
                Some(&body),
                music_task_id,
            )
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
            .call(Endpoint::Details(Kind::Cover), url, None, cover_task_id)
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

    /// Reads the details of a task of `kind`: a cover's record-info as [`record_info`] reads
    /// it, the other kinds' through `kind::read`. A record that does not exist (yet) is
    /// [`KieError::NotFound`].
    ///
    /// [`record_info`]: KieClient::record_info
    pub async fn details(&self, kind: Kind, task_id: &str) -> Result<Details, KieError> {
        if kind == Kind::Cover {
            return self.record_info(task_id).await.map(Details::Cover);
        }
        let path = format!("/api/v1/{}", kind.describe().details);
        let mut url = self.endpoint_url(&path)?;
        url.query_pairs_mut().append_pair("taskId", task_id);
        let data = self
            .call(Endpoint::Details(kind), url, None, task_id)
            .await?;
        if data.is_null() {
            return Err(KieError::NotFound);
        }
        let reading = crate::kind::read::details(kind, &data).map_err(KieError::BadResponse)?;
        tracing::debug!(
            task_id,
            "task {task_id}: {} says {reading:?}",
            kind.describe().details
        );
        Ok(Details::Other(reading))
    }

    /// Creates a task of `kind` (not a cover: [`generate_cover`] does, and may be resent) at
    /// `endpoint` (one of the kind's, under `/api/v1/`) with `body`. Returns the new task
    /// id; a 400/409 naming an existing task is [`KieError::AlreadyExists`].
    ///
    /// [`generate_cover`]: KieClient::generate_cover
    pub async fn create(
        &self,
        kind: Kind,
        endpoint: &str,
        body: &Value,
        what: &str,
    ) -> Result<String, KieError> {
        if !kind.describe().create.contains(&endpoint) {
            return Err(KieError::Setup(format!(
                "{endpoint} is not an endpoint that creates a {} task",
                kind.as_str()
            )));
        }
        let url = self.endpoint_url(&format!("/api/v1/{endpoint}"))?;
        let data = self
            .call(Endpoint::Create(kind), url, Some(body), what)
            .await?;
        task_id_in(&data).ok_or_else(|| {
            KieError::BadResponse(format!(
                "{endpoint} for {what} succeeded without data.taskId"
            ))
        })
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
        let text = format!("{}{}", self.base_url.as_str(), path);
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
    let what = match NoAnswer::of(e) {
        NoAnswer::ConnectTimedOut | NoAnswer::TimedOut => "timed out",
        NoAnswer::CannotConnect => "connection failed",
        NoAnswer::Failed => "request failed",
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::Secret;

    fn cfg(key: Option<&str>) -> KieConfig {
        KieConfig {
            base_url: KieBaseUrl::parse("kie.base_url", "https://api.kie.ai/").expect("url"),
            api_key: key.map(|k| ApiKey::parse("kie.api_key", &Secret::new(k)).expect("key")),
            webhook_hmac_key: None,
            signature_tolerance: Duration::from_secs(300),
            confirm_callbacks: true,
            requests_per_10s: 18,
        }
    }

    fn ua() -> UserAgent {
        UserAgent::parse("coverd/test".into()).expect("user agent")
    }

    #[test]
    fn new_requires_a_key_and_explains_where_to_set_it() {
        let err = KieClient::new(&cfg(None), &ua()).expect_err("no key");
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
        // An empty or blank key never reaches the client: config refuses it.
        for blank in ["", "  "] {
            assert!(ApiKey::parse("kie.api_key", &Secret::new(blank)).is_err());
        }
    }

    #[test]
    fn key_never_in_debug_or_errors() {
        let client = KieClient::new(&cfg(Some(" sk-very-secret ")), &ua()).expect("client");
        assert_eq!(client.base_url(), "https://api.kie.ai");
        assert!(!format!("{client:?}").contains("sk-very-secret"));
        assert_eq!(client.key.expose(), "sk-very-secret", "trimmed");
        let err = KieError::Invalid {
            code: 400,
            msg: "key sk-very-secret is odd".into(),
        }
        .redacted("sk-very-secret");
        assert!(!err.to_string().contains("sk-very-secret"));
        // A key that cannot go in a header is refused by config, without echoing it.
        let err = ApiKey::parse("kie.api_key", &Secret::new("sk-bad\nkey")).expect_err("bad");
        assert!(!err.to_string().contains("sk-bad"), "{err}");
    }

    #[test]
    fn bad_base_url_and_user_agent_never_reach_the_client() {
        assert!(KieBaseUrl::parse("kie.base_url", "not a url").is_err());
        assert!(KieBaseUrl::parse("kie.base_url", "ftp://h").is_err());
        assert!(UserAgent::parse(String::new()).is_err());
        assert!(UserAgent::parse("tab\there".into()).is_err());
    }
}
