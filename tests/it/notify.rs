//! Outbound notifications (SPEC "Notifications (outbound)") against a receiver inside this
//! crate: signatures checked with the receiver example of docs/notifications.md (its own
//! HMAC, not coverd's), retries, 410, giving up, redeliver running and stopped, a SIGKILL
//! between the settling write and the delivery, notifications off, and `admin prune` taking
//! a task's notifications with it but keeping a task whose notification is still pending.
//! Its receiver also serves the kill and power loops (`kill_loop`), answering at random
//! ([`Answer::Mixed`]).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use coverd::admin::{self, AdminErrorKind, Reply, Request};
use coverd::config::{Config, Secret};
use coverd::model::{Notification, NotifyState};

use crate::bin_util::{Scratch, wait_admin};
use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, png};
use crate::harness::{Daemon, failure_body, success_body};

/// The signing secret of these tests (the Standard Webhooks reference secret).
pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WAIT: Duration = Duration::from_secs(20);

// ---- the receiver ----

/// What the receiver does with the next request.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Answer {
    Status(u16),
    /// Accept the connection and close it without a word (the receiver is down).
    Close,
    /// Read the request, then never answer.
    Hang,
    /// Drawn per request from the receiver's seeded generator: mostly 200 at once, else 500,
    /// else 200 after 50 ms to 1.5 s (slow; past a short `notify.timeout` coverd gives up
    /// on it and retries).
    Mixed,
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub(crate) struct Got {
    pub id: String,
    timestamp: String,
    signature: String,
    user_agent: String,
    pub body: Vec<u8>,
    /// The status it was (or is being) answered with.
    pub status: u16,
    /// Answered late on purpose ([`Answer::Mixed`]).
    pub slow: bool,
    /// Its signature verified (the docs' receiver example) when it arrived.
    pub verified: bool,
    /// The receiver's epoch when it arrived ([`Receiver::set_epoch`]).
    pub epoch: usize,
}

pub(crate) struct Receiver {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    got: Arc<Mutex<Vec<Got>>>,
    epoch: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(answer: Answer) -> Receiver {
        Receiver::start_seeded(answer, 0).await
    }

    /// A receiver whose [`Answer::Mixed`] draws from a generator seeded with `seed`.
    pub(crate) async fn start_seeded(answer: Answer, seed: u64) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer));
        let got = Arc::new(Mutex::new(Vec::new()));
        let epoch = Arc::new(AtomicUsize::new(0));
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
        let (a, g, e) = (answer.clone(), got.clone(), epoch.clone());
        let a2 = a.clone();
        let take = move || !matches!(*a2.lock().unwrap(), Answer::Close);
        let task = crate::fake_kie::serve(listener, take, move |req: hyper::Request<Incoming>| {
            let (a, g, e, rng) = (a.clone(), g.clone(), e.clone(), rng.clone());
            async move {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let (id, timestamp, signature, user_agent) = (
                    header("webhook-id"),
                    header("webhook-timestamp"),
                    header("webhook-signature"),
                    header("user-agent"),
                );
                let answer = |status: u16| {
                    hyper::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from_static(b"{}")))
                        .unwrap()
                };
                // A body cut short (the sender was killed mid-request) is no delivery.
                let Ok(body) = req.into_body().collect().await else {
                    return answer(400);
                };
                let body = body.to_bytes().to_vec();
                let how = *a.lock().unwrap();
                let (status, delay) = match how {
                    Answer::Status(s) => (s, None),
                    Answer::Close | Answer::Hang => (500, Some(Duration::MAX)),
                    Answer::Mixed => {
                        let mut rng = rng.lock().unwrap();
                        match rng.random_range(0..100) {
                            0..65 => (200, None),
                            65..85 => (500, None),
                            _ => (200, Some(Duration::from_millis(rng.random_range(50..1500)))),
                        }
                    }
                };
                let verified = verify(SECRET, &id, &timestamp, &signature, &body);
                g.lock().unwrap().push(Got {
                    id,
                    timestamp,
                    signature,
                    user_agent,
                    body,
                    status,
                    slow: delay.is_some(),
                    verified,
                    epoch: e.load(Ordering::SeqCst),
                });
                match delay {
                    Some(Duration::MAX) => std::future::pending::<()>().await,
                    Some(d) => tokio::time::sleep(d).await,
                    None => {}
                }
                answer(status)
            }
        });
        Receiver {
            addr,
            answer,
            got,
            epoch,
            task,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/hooks/coverd?token=abc", self.addr)
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Tags the requests that arrive from now on (the kill loop: one epoch per daemon run).
    pub(crate) fn set_epoch(&self, epoch: usize) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    pub(crate) fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_requests(&self, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "receiver got {} request(s), expected {n}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// BEGIN receiver example (docs/notifications.md shows this text; a test keeps them equal)
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// True if `signatures` (the `webhook-signature` header) holds a valid `v1` signature of
/// this message and `timestamp` is within 5 minutes of now.
fn verify(secret: &str, id: &str, timestamp: &str, signatures: &str, body: &[u8]) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|k| b64.decode(k).ok())
    else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    match timestamp.parse::<i64>() {
        Ok(ts) if (now - ts).abs() <= 300 => {}
        _ => return false, // stale or from the future: maybe a replay
    }
    signatures
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|s| b64.decode(s).ok())
        .any(|sig| {
            let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key");
            mac.update(format!("{id}.{timestamp}.").as_bytes());
            mac.update(body);
            mac.verify_slice(&sig).is_ok()
        })
}
// END receiver example

fn verified(g: &Got) -> bool {
    verify(SECRET, &g.id, &g.timestamp, &g.signature, &g.body)
}

// ---- helpers ----

fn notify_to(c: &mut Config, url: &str) {
    c.accept_unknown_tasks = true;
    c.notify.url = Some(url.to_string());
    c.notify.secret = Some(Secret::new(SECRET));
    c.notify.timeout = Duration::from_secs(5);
}

/// Waits until the latest notification of `id` satisfies `pred`.
async fn wait_notify(d: &Daemon, id: &str, pred: impl Fn(&Notification) -> bool) -> Notification {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = d.store.latest_notification(id).unwrap();
        if let Some(n) = &n
            && pred(n)
        {
            return n.clone();
        }
        assert!(
            Instant::now() < deadline,
            "notification of {id} never reached the condition: {n:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Settles `id` as failed through a failure callback.
async fn settle_failed(d: &Daemon, id: &str) {
    let (status, body) = d
        .callback(&failure_body(id, 501, "Cover generation failed"))
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn show(config: &Config, id: &str) -> Value {
    match admin::run(config.clone(), Request::Show { task_id: id.into() }).await {
        Ok(Reply::Task { task, .. }) => serde_json::to_value(task).unwrap(),
        other => panic!("admin show {id}: {other:?}"),
    }
}

async fn status(config: &Config) -> Value {
    match admin::run(config.clone(), Request::Status).await {
        Ok(Reply::Status { status }) => serde_json::to_value(status).unwrap(),
        other => panic!("admin status: {other:?}"),
    }
}

async fn redeliver(config: &Config, id: &str) -> Result<Reply, admin::AdminError> {
    admin::run(config.clone(), Request::Redeliver { task_id: id.into() }).await
}

/// `admin redeliver` on a stopped daemon's data directory. sled 0.34 can hold its file lock
/// for a moment after the last handle is dropped (its I/O threads finish a write), so a
/// refusal because the directory is still locked is retried, for a bounded time; nothing is
/// written in that case.
async fn redeliver_stopped(config: &Config, id: &str) -> Result<Reply, admin::AdminError> {
    let deadline = Instant::now() + WAIT;
    loop {
        match redeliver(config, id).await {
            Err(e) if e.message.contains("does not answer") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

// ---- the tests ----

#[tokio::test]
async fn happy_path_is_signed_and_verifies_independently() {
    let fake = FakeKie::start().await;
    let rx = Receiver::start(Answer::Status(204)).await;
    let d = Daemon::start(&fake, |c| notify_to(c, &rx.url())).await;
    let id = "notifyhappy";
    fake.files.set("/img/n/0.png", Behaviour::Image(png(4096)));
    let url = fake.files.url("/img/n/0.png");
    let (code, _) = d.callback(&success_body(id, &[url])).await;
    assert_eq!(code, 200);

    let got = rx.wait_requests(1).await;
    let n = wait_notify(&d, id, |n| n.state == NotifyState::Delivered).await;
    assert_eq!((n.attempts, got.len()), (1, 1));
    let g = &got[0];
    assert!(verified(g), "signature does not verify: {g:?}");
    let settled = d.store.latest_notification(id).unwrap().unwrap().created_at;
    assert_eq!(g.id, format!("msg_{id}_1_{settled}"));
    assert!(g.user_agent.starts_with("coverd/"), "{}", g.user_agent);
    // A tampered body or another secret does not verify.
    let mut bad = g.clone();
    bad.body.push(b' ');
    assert!(!verified(&bad));
    assert!(!verify(
        "whsec_c2VjcmV0",
        &g.id,
        &g.timestamp,
        &g.signature,
        &g.body
    ));

    let body: Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(body["type"], "cover.downloaded");
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    let data = &body["data"];
    assert_eq!(data["task_id"], id);
    assert_eq!(data["state"], "downloaded");
    assert_eq!(data["images"][0]["state"], "downloaded");
    assert_eq!(data["images"][0]["path"], format!("images/{id}/0.png"));
    assert!(data.get("events").is_none(), "{data}");

    let shown = show(&d.config, id).await;
    assert_eq!(
        shown["notify"],
        serde_json::json!({"state": "delivered", "attempts": 1})
    );
    let st = status(&d.config).await;
    assert_eq!(st["notifications"]["pending"], 0);
    assert_eq!(st["notifications"]["undeliverable"], 0);

    python_example_accepts(g);
    d.stop().await;
}

#[tokio::test]
async fn receiver_down_then_up() {
    let fake = FakeKie::start().await;
    let rx = Receiver::start(Answer::Close).await;
    let d = Daemon::start(&fake, |c| notify_to(c, &rx.url())).await;
    let id = "notifydown";
    settle_failed(&d, id).await;
    let n = wait_notify(&d, id, |n| n.attempts >= 1).await;
    assert_eq!(n.state, NotifyState::Pending);
    assert!(n.error.is_some(), "{n:?}");
    let st = status(&d.config).await;
    assert_eq!(st["notifications"]["pending"], 1);
    assert!(rx.got().is_empty());

    rx.set(Answer::Status(200));
    d.advance(Duration::from_secs(3600));
    let got = rx.wait_requests(1).await;
    let n = wait_notify(&d, id, |n| n.state == NotifyState::Delivered).await;
    assert_eq!(n.attempts, 2);
    assert_eq!(got.len(), 1);
    assert!(verified(&got[0]));
    let body: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["type"], "cover.failed");
    assert_eq!(
        body["data"]["error"],
        "KIE code 501: Cover generation failed"
    );
    d.stop().await;
}

#[tokio::test]
async fn errors_are_retried_with_the_same_id_until_2xx() {
    let fake = FakeKie::start().await;
    let rx = Receiver::start(Answer::Status(500)).await;
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", crate::bin_util::free_port())
        .parse()
        .unwrap();
    let d = Daemon::start(&fake, |c| {
        notify_to(c, &rx.url());
        c.metrics_listen = Some(metrics_addr);
    })
    .await;
    let id = "notify500";
    settle_failed(&d, id).await;
    for attempt in 1..=2 {
        let n = wait_notify(&d, id, |n| n.attempts >= attempt).await;
        assert_eq!(n.state, NotifyState::Pending);
        assert_eq!(n.error.as_deref(), Some("the receiver answered HTTP 500"));
        // The next attempt is not before 5 s: nothing more arrives until the clock moves.
        assert!(n.next_attempt_at >= n.updated_at + 5000, "{n:?}");
        if attempt == 2 {
            rx.set(Answer::Status(200));
        }
        d.advance(Duration::from_secs(3600));
    }
    let n = wait_notify(&d, id, |n| n.state == NotifyState::Delivered).await;
    assert_eq!(n.attempts, 3);
    let got = rx.got();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(verified));
    assert!(
        got.iter()
            .all(|g| g.id == got[0].id && g.body == got[0].body)
    );
    d.stop().await;
}

#[tokio::test]
async fn gone_stops_at_once() {
    let fake = FakeKie::start().await;
    let rx = Receiver::start(Answer::Status(410)).await;
    let d = Daemon::start(&fake, |c| notify_to(c, &rx.url())).await;
    let id = "notify410";
    settle_failed(&d, id).await;
    let n = wait_notify(&d, id, |n| n.state != NotifyState::Pending).await;
    assert_eq!(n.state, NotifyState::Undeliverable);
    assert_eq!((n.attempts, n.error.as_deref()), (1, Some("410 Gone")));
    // Nothing is left to send.
    assert_eq!(d.store.next_notification_due().unwrap(), None);
    let st = status(&d.config).await;
    assert_eq!(st["notifications"]["undeliverable"], 1);
    assert_eq!(
        show(&d.config, id).await["notify"]["state"],
        "undeliverable"
    );
    assert_eq!(rx.got().len(), 1);
    d.stop().await;
}

/// `admin prune` forgets a finished task's notifications with it (no outbox entry left, the
/// counters of `admin status` down by them) and keeps a task whose notification is still
/// pending: it is not done for the operator yet.
#[tokio::test]
async fn prune_takes_notifications_along_and_keeps_a_pending_one() {
    let fake = FakeKie::start().await;
    let rx = Receiver::start(Answer::Status(200)).await;
    let d = Daemon::start(&fake, |c| {
        notify_to(c, &rx.url());
        c.notify.max_attempts = 1000;
    })
    .await;
    settle_failed(&d, "prune-ok").await;
    wait_notify(&d, "prune-ok", |n| n.state == NotifyState::Delivered).await;
    rx.set(Answer::Status(410));
    settle_failed(&d, "prune-gone").await;
    wait_notify(&d, "prune-gone", |n| n.state == NotifyState::Undeliverable).await;
    rx.set(Answer::Status(503));
    settle_failed(&d, "prune-wait").await;
    wait_notify(&d, "prune-wait", |n| n.attempts >= 1).await;
    // `admin status` shows pending and undeliverable; the store counts delivered too.
    let counts = |st: &Value| {
        let n = &st["notifications"];
        let delivered = d.store.notify_counts().unwrap().delivered;
        [
            n["pending"].as_u64(),
            Some(delivered),
            n["undeliverable"].as_u64(),
        ]
    };
    assert_eq!(counts(&status(&d.config).await), [Some(1); 3]);
    let start = coverd::model::now_millis();
    while coverd::model::now_millis() <= start + 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let prune = |dry_run| Request::Prune {
        older_than_secs: 0,
        dry_run,
    };
    for dry_run in [true, false] {
        match admin::run(d.config.clone(), prune(dry_run)).await {
            Ok(Reply::Pruned { prune }) => assert_eq!(prune.tasks, 2, "dry run {dry_run}"),
            other => panic!("admin prune: {other:?}"),
        }
    }
    for id in ["prune-ok", "prune-gone"] {
        assert!(d.task(id).is_none(), "{id} was not pruned");
        assert_eq!(d.store.latest_notification(id).unwrap(), None, "{id}");
        assert_eq!(d.store.notification(id, 1).unwrap(), None, "{id}");
    }
    assert!(d.task("prune-wait").is_some());
    let n = d.store.latest_notification("prune-wait").unwrap().unwrap();
    assert_eq!(n.state, NotifyState::Pending);
    assert!(d.store.next_notification_due().unwrap().is_some());
    assert_eq!(
        counts(&status(&d.config).await),
        [Some(1), Some(0), Some(0)]
    );
    d.stop().await;
}

#[tokio::test]
async fn undeliverable_after_max_attempts_then_redelivered_while_running() {
    let fake = FakeKie::start().await;
    let rx = Receiver::start(Answer::Status(503)).await;
    let d = Daemon::start(&fake, |c| {
        notify_to(c, &rx.url());
        c.notify.max_attempts = 3;
    })
    .await;
    let id = "notifymax";
    settle_failed(&d, id).await;
    for attempt in 1..=2 {
        wait_notify(&d, id, |n| n.attempts >= attempt).await;
        d.advance(Duration::from_secs(2 * 3600));
    }
    let n = wait_notify(&d, id, |n| n.state != NotifyState::Pending).await;
    assert_eq!((n.state, n.attempts), (NotifyState::Undeliverable, 3));
    assert!(
        n.error
            .as_deref()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{n:?}"
    );
    assert_eq!(d.store.next_notification_due().unwrap(), None);
    assert_eq!(rx.got().len(), 3);

    rx.set(Answer::Status(200));
    let reply = redeliver(&d.config, id).await.expect("redeliver");
    let Reply::Task { message, .. } = reply else {
        panic!("{reply:?}")
    };
    assert!(message.contains(&n.webhook_id), "{message}");
    let n = wait_notify(&d, id, |n| n.state == NotifyState::Delivered).await;
    assert_eq!(n.attempts, 4);
    let got = rx.got();
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|g| g.id == n.webhook_id) && got.iter().all(verified));
    d.stop().await;
}

#[tokio::test]
async fn redeliver_while_stopped_and_its_errors() {
    let fake = FakeKie::start().await;
    let rx = Receiver::start(Answer::Status(410)).await;
    let d = Daemon::start(&fake, |c| notify_to(c, &rx.url())).await;
    let id = "notifystopped";
    settle_failed(&d, id).await;
    wait_notify(&d, id, |n| n.state == NotifyState::Undeliverable).await;
    crate::admin_track(&d, "notifyunsettled").await;
    let (dir, config) = d.stop().await;

    // Stopped: the command opens the store itself.
    let reply = redeliver_stopped(&config, id)
        .await
        .expect("redeliver while stopped");
    let Reply::Task { task, message } = reply else {
        panic!("{reply:?}")
    };
    assert!(message.contains("queued again"), "{message}");
    assert_eq!(task.notify.as_ref().unwrap().state, "pending");
    let err = redeliver_stopped(&config, "nosuchtask").await.unwrap_err();
    assert_eq!(err.kind, AdminErrorKind::Missing, "{err}");
    let err = redeliver_stopped(&config, "notifyunsettled")
        .await
        .unwrap_err();
    assert_eq!(err.kind, AdminErrorKind::Missing, "{err}");
    assert!(err.message.contains("no notification"), "{err}");
    assert!(
        err.message
            .contains("has not settled yet (it is submitted)"),
        "{err}"
    );

    rx.set(Answer::Status(200));
    let d = Daemon::start_in(dir, config).await;
    let n = wait_notify(&d, id, |n| n.state == NotifyState::Delivered).await;
    assert_eq!(n.attempts, 2);
    let got = rx.got();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|g| g.id == got[0].id));
    // Running: the same errors through the socket.
    let err = redeliver(&d.config, "nosuchtask").await.unwrap_err();
    assert_eq!(err.kind, AdminErrorKind::Missing, "{err}");
    let err = redeliver(&d.config, "notifyunsettled").await.unwrap_err();
    assert_eq!(err.kind, AdminErrorKind::Missing, "{err}");
    d.stop().await;
}

#[tokio::test]
async fn notifications_off_send_nothing_and_show_null() {
    let fake = FakeKie::start().await;
    let rx = Receiver::start(Answer::Status(200)).await;
    let d = Daemon::start(&fake, |c| c.accept_unknown_tasks = true).await;
    let id = "notifyoff";
    settle_failed(&d, id).await;
    let shown = show(&d.config, id).await;
    assert_eq!(shown["state"], "failed");
    assert!(shown["notify"].is_null(), "{shown}");
    assert!(shown.as_object().unwrap().contains_key("notify"));
    assert_eq!(d.store.latest_notification(id).unwrap(), None);
    assert_eq!(d.store.next_notification_due().unwrap(), None);
    let st = status(&d.config).await;
    assert_eq!(st["notifications"]["enabled"], false);
    assert_eq!(st["notifications"]["pending"], 0);
    let err = redeliver(&d.config, id).await.unwrap_err();
    assert_eq!(err.kind, AdminErrorKind::Usage, "{err}");
    assert!(rx.got().is_empty());
    d.stop().await;
}

/// The real binary is SIGKILLed while the first delivery is in flight (the settle is on
/// disk, the attempt not recorded): after the restart the notification is delivered, and
/// every request for that settle carried one and the same webhook-id.
#[tokio::test]
async fn sigkill_between_settle_and_delivery_delivers_after_restart_with_one_id() {
    let fake = FakeKie::start().await;
    let rx = Receiver::start(Answer::Hang).await;
    let scratch = Scratch::new();
    let secret_file = scratch.dir.path().join("notify-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let notify = format!(
        "[notify]\nurl = {:?}\nsecret_file = {:?}\ntimeout = \"30s\"\n",
        rx.url(),
        secret_file.display().to_string()
    );
    scratch.write_config(&fake.base_url(), "", &notify);
    let daemon = scratch.serve().await;
    let id = "notifykill";
    let (status, body) = daemon
        .callback(failure_body(id, 501, "Cover generation failed"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    rx.wait_requests(1).await;
    daemon.kill();

    rx.set(Answer::Status(200));
    let daemon = scratch.serve().await;
    let delivered = |shown: &Value| shown["notify"]["state"] == "delivered";
    wait_admin(
        &scratch,
        &["show", id],
        "delivered after the restart",
        delivered,
    )
    .await;
    let got = rx.got();
    assert!(got.len() >= 2, "{got:?}");
    let ids: BTreeSet<&str> = got.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(
        got[0].id.starts_with(&format!("msg_{id}_1_")),
        "{}",
        got[0].id
    );
    assert!(got.iter().all(verified));
    assert!(got.iter().all(|g| g.body == got[0].body));
    let logs = daemon.stop().await;
    assert!(
        logs.contains(&format!("task {id}: cover.failed notification delivered")),
        "{logs}"
    );
    assert!(
        !logs.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "secret in the logs"
    );
}

// ---- the docs ----

/// The code blocks of docs/notifications.md in a language.
fn doc_blocks(lang: &str) -> Vec<String> {
    let doc = include_str!("../../docs/notifications.md");
    let fence = format!("```{lang}\n");
    doc.split(&fence)
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .map(str::to_string)
        .collect()
}

/// The Rust receiver example in the docs is the `verify` above, character for character.
#[test]
fn rust_receiver_example_in_the_docs_is_the_tested_one() {
    let src = include_str!("notify.rs");
    let start = src.find("// BEGIN receiver example").unwrap();
    let start = start + src[start..].find('\n').unwrap() + 1;
    let end = src.find("// END receiver example").unwrap();
    let tested = &src[start..end];
    assert!(
        doc_blocks("rust").iter().any(|b| b == tested),
        "docs/notifications.md must show the tested receiver example verbatim:\n{tested}"
    );
}

/// Runs the Python receiver example of docs/notifications.md on a real request.
fn python_example_accepts(g: &Got) {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped the Python receiver example: python3 is not installed");
        return;
    }
    let block = doc_blocks("python")
        .into_iter()
        .find(|b| b.contains("def verify("))
        .expect("a Python block with def verify( in docs/notifications.md");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("check.py");
    std::fs::write(
        &script,
        format!(
            "{block}\nimport json, sys\nheaders = json.load(open(sys.argv[1]))\nbody = open(sys.argv[2], 'rb').read()\nsys.exit(0 if verify(sys.argv[3], headers, body) else 1)\n"
        ),
    )
    .unwrap();
    let run = |body: &[u8]| {
        let headers = dir.path().join("headers.json");
        let body_file = dir.path().join("body");
        std::fs::write(
            &headers,
            serde_json::json!({
                "webhook-id": g.id, "webhook-timestamp": g.timestamp, "webhook-signature": g.signature
            })
            .to_string(),
        )
        .unwrap();
        std::fs::write(&body_file, body).unwrap();
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg(&headers)
            .arg(&body_file)
            .arg(SECRET)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&g.body);
    assert_eq!(
        code,
        Some(0),
        "the Python example refused coverd's notification: {stderr}"
    );
    let mut tampered = g.body.clone();
    tampered[0] = b' ';
    let (code, stderr) = run(&tampered);
    assert_eq!(
        code,
        Some(1),
        "the Python example accepted a tampered body: {stderr}"
    );
}

/// While the store cannot record an attempt, nothing is sent (it would be sent again and
/// again); once it takes writes, delivery resumes.
#[tokio::test]
async fn store_failure_pauses_notifications() {
    let fake = FakeKie::start().await;
    let rx = Receiver::start(Answer::Status(500)).await;
    let d = Daemon::start(&fake, |c| notify_to(c, &rx.url())).await;
    let id = "notifystore";
    settle_failed(&d, id).await;
    wait_notify(&d, id, |n| n.attempts >= 1).await;
    d.store.inject_write_failures(true);
    rx.set(Answer::Status(200));
    d.advance(Duration::from_secs(3600));
    // Absence cannot be awaited: give a send a second to show itself.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        rx.got().len(),
        1,
        "sent while the store could not record it"
    );
    d.store.inject_write_failures(false);
    let n = wait_notify(&d, id, |n| n.state == NotifyState::Delivered).await;
    assert_eq!((n.attempts, rx.got().len()), (2, 2));
    d.stop().await;
}
