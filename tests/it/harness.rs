//! Runs the real daemon in-process for a test: real sled in a temp dir, real hyper listener on
//! 127.0.0.1:0, the fake KIE for images and API. One helper per feature keeps tests short.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use coverd::admin::{self, AdminError, Request};
use coverd::config::{ApiKey, Config, KieBaseUrl, Secret};
use coverd::daemon::{self, Hooks};
use coverd::model::{ManualClock, Task, now_millis};
use coverd::store::Store;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::fake_kie::FakeKie;

/// A daemon under test.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub store: Store,
    pub base: String,
    pub clock: Arc<ManualClock>,
    shutdown: CancellationToken,
    waker: Option<daemon::Running>,
    join: Option<tokio::task::JoinHandle<()>>,
    http: reqwest::Client,
}

/// A config for tests: data in `dir`, any free port, plain http allowed, any host, private
/// networks refused except the fake's 127.0.0.1 (trusted through [`Hooks`]), fast backoff.
pub fn test_config(dir: &std::path::Path, fake: &FakeKie) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    c.kie.base_url = KieBaseUrl::parse("kie.base_url", &fake.base_url()).expect("base url");
    c.download.allow_http = true;
    c.download.allowed_hosts = vec![];
    c.download.allow_private_networks = false;
    c.download.backoff_base = Duration::from_millis(10);
    c.download.backoff_max = Duration::from_millis(50);
    c.download.timeout = Duration::from_secs(10);
    c
}

/// Adds an API key and a public URL, turning on polling, submit, confirmation and refresh.
#[allow(dead_code)] // for the poll, submit and refresh tests
pub fn with_api(c: &mut Config) {
    c.kie.api_key = Some(ApiKey::parse("kie.api_key", &Secret::new("test-api-key")).expect("key"));
    c.public_url = "https://coverd.example".into();
}

impl Daemon {
    /// Starts a daemon on a fresh temp dir; `tweak` adjusts the test config first.
    pub async fn start(fake: &FakeKie, tweak: impl FnOnce(&mut Config)) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path(), fake);
        tweak(&mut config);
        Daemon::start_in(dir, config).await
    }

    /// Starts a daemon on an existing data dir (a restart).
    pub async fn start_in(dir: tempfile::TempDir, config: Config) -> Daemon {
        Daemon::start_with(dir, config, |_| {}).await
    }

    /// Starts a daemon on `dir`; `tweak` adjusts the test hooks first.
    pub async fn start_with(
        dir: tempfile::TempDir,
        config: Config,
        tweak: impl FnOnce(&mut Hooks),
    ) -> Daemon {
        let clock = Arc::new(ManualClock::new(now_millis()));
        let mut hooks = Hooks {
            trusted_addrs: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            clock: Some(clock.clone()),
            ..Hooks::default()
        };
        tweak(&mut hooks);
        let running = daemon::start(config.clone(), hooks)
            .await
            .expect("daemon starts");
        let base = format!("http://{}", running.addr);
        let store = running.store.clone();
        let shutdown = running.shutdown_token();
        Daemon {
            dir,
            config,
            store,
            base,
            clock,
            shutdown,
            waker: Some(running),
            join: None,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    /// Moves the schedulers' clock (poller and downloader) forward and makes the loops look
    /// at their indexes.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.wake();
    }

    pub fn wake(&self) {
        if let Some(r) = &self.waker {
            r.wake();
        }
    }

    /// POSTs a callback body; returns status and body text.
    pub async fn post(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let mut req = self.http.post(format!("{}{path}", self.base)).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    pub async fn callback(&self, body: &str) -> (u16, String) {
        self.post(
            "/callbacks/cover",
            body.to_string(),
            &[("content-type", "application/json")],
        )
        .await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        get_text(&self.http, &format!("{}{path}", self.base)).await
    }

    pub fn task(&self, id: &str) -> Option<Task> {
        self.store.get(id).unwrap()
    }

    /// Waits (up to 15 s) until task `id` satisfies `pred`; panics with the task otherwise.
    pub async fn wait_for(&self, id: &str, pred: impl Fn(&Task) -> bool) -> Task {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(t) = self.task(id)
                && pred(&t)
            {
                return t;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("condition not reached for {id}: {:#?}", self.task(id));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the daemon stops by itself (a worker died, the store needs a restart)
    /// and returns what `Running::wait` said: `serve`'s exit status comes from it.
    #[allow(dead_code)] // for the worker tests
    pub async fn wait_stopped(mut self) -> Result<(), coverd::daemon::DaemonError> {
        let running = self.waker.take().expect("the daemon runs");
        running.wait().await
    }

    /// Stops the daemon as SIGTERM would and waits until it has.
    pub async fn stop(mut self) -> (tempfile::TempDir, Config) {
        self.shutdown.cancel();
        if let Some(r) = self.waker.take() {
            r.wait().await.expect("clean shutdown");
        }
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
        drop(self.store);
        (self.dir, self.config)
    }
}

/// `GET url`: status and body.
pub async fn get_text(http: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = http.get(url).send().await.expect("GET");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

/// POSTs `body` as a callback to `base` on a new connection (a pooled one could be
/// answered while new ones are not), waiting at most `patience`; how long the answer took,
/// and the answer (`None`: none in time).
pub async fn callback_on_a_new_connection(
    base: &str,
    body: String,
    patience: Duration,
) -> (Duration, Option<reqwest::Result<reqwest::Response>>) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let sent = http
        .post(format!("{base}/callbacks/cover"))
        .header("content-type", "application/json")
        .body(body)
        .send();
    let answer = tokio::time::timeout(patience, sent).await.ok();
    (started.elapsed(), answer)
}

/// Runs an admin request in-process and returns what `--json` prints, parsed.
pub async fn json_of(config: &Config, req: Request) -> Value {
    let reply = admin::run(config.clone(), req.clone())
        .await
        .unwrap_or_else(|e| panic!("{req:?}: {e}"));
    let text = admin::render(&reply, true);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{req:?}: not JSON ({e}): {text}"))
}

/// Runs an admin request in-process that must fail; its error.
pub async fn admin_err(config: &Config, req: Request) -> AdminError {
    match admin::run(config.clone(), req.clone()).await {
        Ok(reply) => panic!("{req:?} succeeded: {reply:?}"),
        Err(e) => e,
    }
}

/// A KIE success callback body.
pub fn success_body(task_id: &str, urls: &[String]) -> String {
    serde_json::json!({"code": 200, "msg": "success", "data": {"taskId": task_id, "images": urls}})
        .to_string()
}

/// A KIE failure callback body.
#[allow(dead_code)] // for the failure-path tests, not used by every test build
pub fn failure_body(task_id: &str, code: i64, msg: &str) -> String {
    serde_json::json!({"code": code, "msg": msg, "data": {"taskId": task_id, "images": null}})
        .to_string()
}
