//! Issue 3 end to end: coverd talking to KIE itself — `submit`, the poll fallback, confirmed
//! callbacks, refresh of expired URLs, `admin retry` — against the fake KIE, with the poller's
//! clock moved by `d.advance(..)` instead of real sleeps for poll intervals.

use std::time::Duration;

use coverd::admin::{self, AdminError, AdminErrorKind, Reply, Request};
use coverd::config::Config;
use coverd::model::{EventKind, Failure, ImageState, Source, State, Task, now_millis};
use coverd::store::Store;
use coverd::submit::SubmitJson;

use crate::fake_kie::FakeKie;
use crate::fake_kie::api::{Endpoint, FlagForm, RecordStyle, Status};
use crate::fake_kie::files::{Behaviour, png, sha256_hex};
use crate::harness::{Daemon, success_body, test_config, with_api};

/// Defaults of `[poll]` (SPEC): the tests move the clock by these.
const POLL_AFTER: Duration = Duration::from_secs(120);
const POLL_INTERVAL: Duration = Duration::from_secs(30);
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Unresolved submit intents are retried once older than this (`poll::INTENT_MIN_AGE_MS`).
const INTENT_AGE: Duration = Duration::from_secs(61);
/// A little past a due time, so that a schedule stamped a moment after the clock was read is
/// due too.
const SLACK: Duration = Duration::from_secs(5);
const CALLBACK_URL: &str = "https://coverd.example/callbacks/cover";

async fn api_daemon(fake: &FakeKie, tweak: impl FnOnce(&mut Config)) -> Daemon {
    Daemon::start(fake, |c| {
        with_api(c);
        tweak(c);
    })
    .await
}

/// `coverd submit` through the library (the daemon's socket when it runs, else directly).
async fn submit(config: &Config, music: &str) -> Result<(SubmitJson, String), AdminError> {
    let req = Request::Submit {
        music_task_id: music.into(),
    };
    match admin::run(config.clone(), req).await? {
        Reply::Submitted { submitted, message } => Ok((submitted, message)),
        other => panic!("submit answered {other:?}"),
    }
}

async fn retry(config: &Config, task_id: &str) -> Reply {
    let req = Request::Retry {
        task_id: task_id.into(),
    };
    admin::run(config.clone(), req).await.expect("retry")
}

/// Waits (up to 15 s) for a condition on something other than a task.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still not true after 15 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Lets the daemon's loops run a pass after a wake-up, for checks that something did NOT
/// happen. Short and fixed: it stands for "the poller looked", not for a poll interval.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn events(d: &Daemon, id: &str) -> Vec<(EventKind, String)> {
    d.store
        .events(id)
        .expect("events")
        .into_iter()
        .map(|e| (e.kind, e.detail))
        .collect()
}

fn has_event(d: &Daemon, id: &str, kind: EventKind, needle: &str) -> bool {
    events(d, id)
        .iter()
        .any(|(k, detail)| *k == kind && detail.contains(needle))
}

fn downloaded(t: &Task) -> bool {
    t.state == State::Downloaded
}

fn failed(t: &Task) -> bool {
    t.state == State::Failed
}

/// Two images on the fake's file host; returns their URLs and bytes.
fn two_images(fake: &FakeKie, prefix: &str) -> (Vec<String>, Vec<bytes::Bytes>) {
    let bytes = vec![png(3000), png(4000)];
    let urls = bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let path = format!("/s/{prefix}-{i}.png");
            fake.files.set(&path, Behaviour::Image(b.clone()));
            fake.files.url(&path)
        })
        .collect();
    (urls, bytes)
}

fn path_of(url: &str) -> String {
    url::Url::parse(url).expect("url").path().to_string()
}

fn assert_stored(d: &Daemon, t: &Task, bytes: &[bytes::Bytes]) {
    assert_eq!(t.images.len(), bytes.len());
    for (img, b) in t.images.iter().zip(bytes) {
        assert_eq!(img.state, ImageState::Downloaded, "{img:?}");
        assert_eq!(img.sha256.as_deref(), Some(sha256_hex(b).as_str()));
        let on_disk = std::fs::read(d.dir.path().join(img.path.as_ref().expect("path")))
            .expect("image on disk");
        assert_eq!(&on_disk[..], &b[..]);
    }
}

/// Sends a success callback for `id` listing `urls`; coverd must accept it.
async fn deliver_success(d: &Daemon, id: &str, urls: &[String]) {
    assert_eq!(d.callback(&success_body(id, urls)).await.0, 200, "{id}");
}

/// Submits `music` through `d` and returns the new cover task's id.
async fn submitted(d: &Daemon, music: &str) -> String {
    submit(&d.config, music).await.expect("submit").0.task_id
}

/// None of `urls` was ever fetched from the fake's file host.
fn assert_never_fetched(fake: &FakeKie, urls: &[String]) {
    for url in urls {
        assert_eq!(fake.files.hits(&path_of(url)), 0, "{url} fetched");
    }
}

/// Moves the daemon's clock by `by`, lets its loops look, and counts KIE's calls at
/// `endpoint` since the start: for checks that nothing more was asked.
async fn calls_after(d: &Daemon, fake: &FakeKie, by: Duration, endpoint: Endpoint) -> usize {
    d.advance(by);
    settle().await;
    fake.api.calls(endpoint)
}

/// A config with an API key and a public URL in a fresh data directory, for `submit`
/// without a running daemon.
fn direct_config(fake: &FakeKie) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), fake);
    with_api(&mut config);
    (dir, config)
}

/// `t` is a submitted task made from `music`.
fn assert_submitted(t: &Task, music: &str) {
    assert_eq!(
        (t.state, t.music_task_id.as_deref()),
        (State::Submitted, Some(music))
    );
}

/// KIE's record-info status for a failed generation (code 501), and the error the task
/// records for it.
fn failed_501() -> Status {
    Status::Failed {
        code: 501,
        message: "Cover generation failed".into(),
    }
}
const FAILED_501: &str = "KIE code 501: Cover generation failed";

/// A cover task `id` that KIE knows in `status`, tracked by coverd, and a success callback
/// for it listing two images that record-info does not list. Returns the callback's URLs.
async fn forged_callback(fake: &FakeKie, d: &Daemon, id: &str, status: Status) -> Vec<String> {
    fake.api.add_task(id, &format!("music-{id}"));
    fake.api.set_status(id, status);
    crate::admin_track(d, id).await;
    let (forged, _) = two_images(fake, &format!("{id}-forged"));
    deliver_success(d, id, &forged).await;
    forged
}

/// The task's images are at `urls`, in order.
fn assert_urls(t: &Task, urls: &[String]) {
    let got: Vec<&str> = t.images.iter().map(|i| i.url.as_str()).collect();
    assert_eq!(got, urls.iter().map(String::as_str).collect::<Vec<_>>());
}

/// A daemon that fetches a callback's URLs without confirming them, with task `id` tracked.
async fn unconfirmed_daemon(fake: &FakeKie, id: &str, tweak: impl FnOnce(&mut Config)) -> Daemon {
    let d = api_daemon(fake, |c| {
        c.kie.confirm_callbacks = false;
        tweak(c);
    })
    .await;
    crate::admin_track(&d, id).await;
    d
}

/// An image at `path` on the fake's file host whose link has expired, and the fresh copy
/// KIE's download-url points at (`/fresh` + `path`). Returns the expired URL.
fn expired_image(fake: &FakeKie, path: &str, bytes: &bytes::Bytes) -> String {
    fake.files.set(path, Behaviour::Image(bytes.clone()));
    fake.files.expire(path);
    fake.files
        .set(&format!("/fresh{path}"), Behaviour::Image(bytes.clone()));
    fake.files.url(path)
}

// ---- submit ----

#[tokio::test]
async fn submit_through_the_daemon_records_the_task_and_sends_the_callback_url() {
    let fake = FakeKie::start().await;
    fake.api.require_api_key(Some("test-api-key"));
    let d = api_daemon(&fake, |_| {}).await;

    let (answer, message) = submit(&d.config, "music-happy").await.expect("submit");

    assert_eq!(answer.music_task_id.as_deref(), Some("music-happy"));
    assert_eq!(
        fake.api.cover_task_for("music-happy").as_deref(),
        Some(answer.task_id.as_str())
    );
    assert!(message.contains("accepted"), "{message}");
    assert_eq!(fake.api.calls(Endpoint::Generate), 1);
    let req = fake.api.last_request(Endpoint::Generate).expect("generate");
    assert_eq!(req.json()["callBackUrl"], CALLBACK_URL);
    assert_eq!(req.json()["taskId"], "music-happy");
    let t = d.task(&answer.task_id).expect("task recorded");
    assert_submitted(&t, "music-happy");
    assert!(has_event(&d, &answer.task_id, EventKind::Submitted, ""));
    // `--json` prints exactly SPEC's object.
    let json = admin::render(
        &Reply::Submitted {
            submitted: answer.clone(),
            message,
        },
        true,
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&json).expect("json"),
        serde_json::json!({"task_id": answer.task_id, "music_task_id": "music-happy"})
    );

    // The intent is resolved: the poller never asks KIE for this song again.
    eventually("intent dropped", || {
        d.store.intents(10).expect("intents").is_empty()
    })
    .await;
    d.advance(INTENT_AGE);
    settle().await;
    assert_eq!(
        calls_after(&d, &fake, INTENT_AGE, Endpoint::Generate).await,
        1
    );
    d.stop().await;
}

#[tokio::test]
async fn submit_without_a_daemon_works_directly_and_the_daemon_takes_over() {
    let fake = FakeKie::start().await;
    let (dir, config) = direct_config(&fake);

    let (answer, _) = submit(&config, "music-direct").await.expect("submit");
    assert_eq!(fake.api.calls(Endpoint::Generate), 1);

    let d = Daemon::start_in(dir, config).await;
    let t = d
        .task(&answer.task_id)
        .expect("recorded by the direct submit");
    assert_submitted(&t, "music-direct");
    assert!(
        d.store.intents(10).unwrap().is_empty(),
        "intent left behind"
    );
    assert_eq!(
        calls_after(&d, &fake, INTENT_AGE, Endpoint::Generate).await,
        1
    );
    d.stop().await;
}

#[tokio::test]
async fn submit_refuses_without_public_url_or_api_key() {
    let fake = FakeKie::start().await;

    // No public_url (directly, daemon stopped).
    let (_dir, mut config) = direct_config(&fake);
    config.public_url = String::new();
    let err = submit(&config, "music-1").await.expect_err("refused");
    assert_eq!(err.kind, AdminErrorKind::Usage, "{err:?}");
    assert!(err.message.contains("public_url"), "{}", err.message);

    // No API key (through the running daemon).
    let d = Daemon::start(&fake, |c| c.public_url = "https://coverd.example".into()).await;
    let err = submit(&d.config, "music-1").await.expect_err("refused");
    assert_eq!(err.kind, AdminErrorKind::Usage, "{err:?}");
    for hint in ["kie.api_key", "KIE_API_KEY"] {
        assert!(err.message.contains(hint), "{}", err.message);
    }
    assert_eq!(fake.api.calls(Endpoint::Any), 0);
    assert!(d.store.intents(10).unwrap().is_empty());
    d.stop().await;
}

#[tokio::test]
async fn repeat_submit_returns_the_known_task_without_calling_kie() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let (first, _) = submit(&d.config, "music-rep").await.expect("first");
    let (again, message) = submit(&d.config, "music-rep").await.expect("again");
    assert_eq!(again, first);
    assert!(message.contains("already requested"), "{message}");
    assert_eq!(fake.api.calls(Endpoint::Generate), 1);
    // Another song is another cover.
    let (other, _) = submit(&d.config, "music-other").await.expect("other");
    assert_ne!(other.task_id, first.task_id);
    assert_eq!(fake.api.calls(Endpoint::Generate), 2);
    d.stop().await;
}

#[tokio::test]
async fn submit_adopts_the_cover_kie_already_has_on_409_and_400() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    for (code, music, existing) in [
        (409, "music-409", "cover409"),
        (400, "music-400", "cover400"),
    ] {
        fake.api.set_repeat_code(code);
        // Made elsewhere (another tool, an earlier coverd): KIE knows it, coverd does not.
        fake.api.add_task(existing, music);
        let (answer, message) = submit(&d.config, music).await.expect("adopted");
        assert_eq!(answer.task_id, existing, "{code}");
        assert!(message.contains("adopted"), "{message}");
        let t = d.task(existing).expect("adopted task recorded");
        assert_submitted(&t, music);
    }
    assert_eq!(fake.api.calls(Endpoint::Generate), 2);
    assert_eq!(fake.api.task_ids().len(), 2, "no duplicate cover at KIE");
    d.stop().await;
}

#[tokio::test]
async fn crash_after_kie_created_the_cover_is_resolved_by_adoption() {
    let fake = FakeKie::start().await;
    let (dir, config) = direct_config(&fake);
    // `submit` stored its intent, KIE created the cover, the process died before the answer
    // was stored.
    {
        let store = Store::open(dir.path()).expect("store");
        assert_eq!(
            store.record_intent("music-crash", now_millis()).unwrap(),
            None
        );
        store.flush().await.unwrap();
    }
    fake.api.add_task("coverfromcrash", "music-crash");

    let d = Daemon::start_in(dir, config).await;
    // A fresh intent may still belong to a live `submit`: left alone.
    d.wake();
    settle().await;
    assert_eq!(fake.api.calls(Endpoint::Generate), 0);

    d.advance(INTENT_AGE);
    let t = d.wait_for("coverfromcrash", |_| true).await;
    assert_submitted(&t, "music-crash");
    assert_eq!(fake.api.calls(Endpoint::Generate), 1, "asked once, got 409");
    assert_eq!(fake.api.task_ids(), vec!["coverfromcrash".to_string()]);
    eventually("intent dropped", || d.store.intents(10).unwrap().is_empty()).await;
    // Later passes leave it alone, and a repeat submit knows the task.
    d.advance(INTENT_AGE);
    settle().await;
    let (again, _) = submit(&d.config, "music-crash").await.expect("repeat");
    assert_eq!(again.task_id, "coverfromcrash");
    assert_eq!(fake.api.calls(Endpoint::Generate), 1);
    d.stop().await;
}

#[tokio::test]
async fn crash_while_generate_is_in_flight_leaves_exactly_one_cover() {
    let fake = FakeKie::start().await;
    let (dir, config) = direct_config(&fake);
    fake.api
        .set_delay(Endpoint::Generate, Duration::from_secs(3));
    // The process dies while KIE is still answering: the intent is on disk, the task is not.
    let cfg = config.clone();
    let running = tokio::spawn(async move { submit(&cfg, "music-inflight").await });
    eventually("generate sent", || fake.api.calls(Endpoint::Generate) == 1).await;
    running.abort();
    let _ = running.await;
    fake.api.set_delay(Endpoint::Generate, Duration::ZERO);
    // Whether KIE finished creating the cover or not, the restart must end with one.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let d = Daemon::start_in(dir, config).await;
    assert_eq!(d.store.intents(10).unwrap().len(), 1, "the intent survived");
    d.advance(INTENT_AGE);
    eventually("cover recorded", || {
        fake.api
            .cover_task_for("music-inflight")
            .is_some_and(|id| d.task(&id).is_some())
    })
    .await;
    let id = fake.api.cover_task_for("music-inflight").unwrap();
    assert_eq!(fake.api.task_ids(), vec![id.clone()], "one cover at KIE");
    let t = d.task(&id).unwrap();
    assert_submitted(&t, "music-inflight");
    assert_eq!(fake.api.calls(Endpoint::Generate), 2);
    eventually("intent dropped", || d.store.intents(10).unwrap().is_empty()).await;
    assert_eq!(
        calls_after(&d, &fake, INTENT_AGE, Endpoint::Generate).await,
        2
    );
    d.stop().await;
}

#[tokio::test]
async fn transient_kie_failure_during_submit_is_resolved_by_the_daemon() {
    let fake = FakeKie::start().await;
    let (dir, config) = direct_config(&fake);
    // An HTTP-200 answer with an error envelope: KIE's usual way of saying 500.
    fake.api.fail_next(Endpoint::Generate, 500, 1);
    let err = submit(&config, "music-5xx").await.expect_err("500");
    assert_eq!(err.kind, AdminErrorKind::Failed);
    assert!(err.message.contains("music-5xx"), "{}", err.message);
    assert!(err.message.contains("500"), "{}", err.message);
    assert!(fake.api.task_ids().is_empty());

    let d = Daemon::start_in(dir, config).await;
    d.advance(INTENT_AGE);
    eventually("resolved", || {
        fake.api
            .cover_task_for("music-5xx")
            .is_some_and(|id| d.task(&id).is_some())
    })
    .await;
    assert_eq!(fake.api.task_ids().len(), 1);
    d.stop().await;
}

#[tokio::test]
async fn a_song_whose_cover_failed_can_be_submitted_again() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let (first, _) = submit(&d.config, "music-531").await.expect("submit");
    let failure =
        crate::harness::failure_body(&first.task_id, 531, "generation failed, credits refunded");
    assert_eq!(d.callback(&failure).await.0, 200);
    fake.api.set_status(
        &first.task_id,
        Status::Failed {
            code: 531,
            message: "refunded".into(),
        },
    );
    d.wait_for(&first.task_id, failed).await;

    let (second, message) = submit(&d.config, "music-531").await.expect("resubmit");
    assert_ne!(second.task_id, first.task_id, "{message}");
    assert_eq!(fake.api.calls(Endpoint::Generate), 2);
    let t = d.task(&second.task_id).unwrap();
    assert_submitted(&t, "music-531");
    // The song now maps to the new task: a repeat does not ask KIE again.
    let (third, _) = submit(&d.config, "music-531").await.expect("repeat");
    assert_eq!(third.task_id, second.task_id);
    assert_eq!(fake.api.calls(Endpoint::Generate), 2);
    d.stop().await;
}

#[tokio::test]
async fn submit_surfaces_401_and_402_as_clear_errors() {
    let fake = FakeKie::start().await;
    let (dir, config) = direct_config(&fake);
    for (code, hints) in [
        (401, ["401", "check kie.api_key"]),
        (402, ["402", "top up"]),
    ] {
        fake.api.fail_next(Endpoint::Generate, code, 1);
        let err = submit(&config, "music-auth").await.expect_err("refused");
        // A refused key is a configuration error (2); no credits is a failure (1).
        assert_eq!(
            err.kind,
            if code == 401 {
                AdminErrorKind::Usage
            } else {
                AdminErrorKind::Failed
            },
            "{code}"
        );
        assert!(err.message.contains("music-auth"), "{}", err.message);
        for hint in hints {
            assert!(err.message.contains(hint), "{code}: {}", err.message);
        }
        assert!(!err.message.contains("test-api-key"));
    }
    // A definite refusal keeps nothing: once fixed, the next submit asks KIE again.
    let (answer, _) = submit(&config, "music-auth").await.expect("then accepted");
    assert_eq!(fake.api.calls(Endpoint::Generate), 3);
    assert_eq!(
        fake.api.cover_task_for("music-auth"),
        Some(answer.task_id.clone())
    );
    let store = Store::open(dir.path()).unwrap();
    assert!(store.intents(10).unwrap().is_empty());
}

/// While the store cannot take writes, `/healthz` says so (503 with the reason) and polls
/// pause: no record-info call whose answer could not be recorded. Once it recovers, the poll
/// goes ahead and the task is downloaded.
#[tokio::test]
async fn polls_pause_while_the_store_cannot_take_writes() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = submitted(&d, "music-storefail").await;
    let (urls, bytes) = two_images(&fake, "storefail");
    fake.api.set_status(&id, Status::Success(urls));

    d.store.inject_write_failures(true);
    let (status, body) = d.get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot take writes"), "{body}");
    // The poll falls due again and again: nothing is asked of KIE meanwhile.
    for _ in 0..4 {
        d.advance(POLL_AFTER + POLL_INTERVAL);
        d.wake();
        settle().await;
    }
    assert_eq!(fake.api.calls(Endpoint::RecordInfo), 0);

    d.store.inject_write_failures(false);
    assert_eq!(d.get("/healthz").await.0, 200);
    d.wake();
    let t = d.wait_for(&id, downloaded).await;
    assert_eq!(t.polls, 1);
    assert_eq!(fake.api.calls(Endpoint::RecordInfo), 1);
    assert_stored(&d, &t, &bytes);
    d.stop().await;
}

// ---- polling ----

#[tokio::test]
async fn poll_success_downloads_with_source_poll() {
    let fake = FakeKie::start().await;
    // KIE's other answer shapes: successFlag as text, `response` as a JSON string.
    fake.api.set_record_style(RecordStyle {
        flag: FlagForm::Text,
        response_as_string: true,
        omit_response: false,
    });
    let d = api_daemon(&fake, |_| {}).await;
    let id = submitted(&d, "music-poll").await;
    let (urls, bytes) = two_images(&fake, "poll");
    fake.api.set_status(&id, Status::Success(urls.clone()));

    // No callback comes. Before poll.after nothing is asked.
    d.advance(POLL_AFTER - SLACK);
    settle().await;
    assert_eq!(fake.api.calls(Endpoint::RecordInfo), 0);
    d.advance(SLACK * 2);
    let t = d.wait_for(&id, downloaded).await;
    assert_eq!(t.source, Some(Source::Poll));
    assert_eq!(t.polls, 1);
    assert_eq!(
        fake.api.calls(Endpoint::RecordInfo),
        1,
        "no confirmation call"
    );
    let req = fake.api.last_request(Endpoint::RecordInfo).unwrap();
    assert_eq!(req.query_param("taskId").as_deref(), Some(id.as_str()));
    assert_stored(&d, &t, &bytes);
    for url in &urls {
        assert_eq!(fake.files.hits(&path_of(url)), 1);
    }
    assert!(has_event(&d, &id, EventKind::Received, "from poll"));
    assert_eq!(
        calls_after(&d, &fake, POLL_INTERVAL * 4, Endpoint::RecordInfo).await,
        1,
        "finished: never polled again",
    );
    d.stop().await;
}

#[tokio::test]
async fn poll_failure_records_kies_error() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = submitted(&d, "music-fail").await;
    fake.api.set_status(&id, failed_501());
    d.advance(POLL_AFTER + SLACK);
    let t = d.wait_for(&id, failed).await;
    assert_eq!(t.failure, Some(Failure::Generation));
    assert_eq!(t.error.as_deref(), Some(FAILED_501));
    assert_eq!(t.polls, 1);
    assert_eq!(
        calls_after(&d, &fake, POLL_INTERVAL * 4, Endpoint::RecordInfo).await,
        1,
        "failed: polling stops"
    );
    d.stop().await;
}

#[tokio::test]
async fn poll_gives_up_after_give_up_after() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = submitted(&d, "music-never").await;
    d.advance(POLL_AFTER + SLACK);
    d.wait_for(&id, |t| t.polls == 1).await;
    d.advance(GIVE_UP_AFTER);
    let t = d.wait_for(&id, failed).await;
    assert_eq!(t.failure, Some(Failure::NoResult));
    assert_eq!(t.error.as_deref(), Some("no result from KIE"));
    let polls = fake.api.calls(Endpoint::RecordInfo);
    assert_eq!(
        calls_after(&d, &fake, POLL_INTERVAL * 4, Endpoint::RecordInfo).await,
        polls,
        "polled after giving up",
    );
    // A late success callback still revives it (SPEC: failed (generation) → received).
    let (urls, bytes) = two_images(&fake, "late");
    fake.api.set_status(&id, Status::Success(urls.clone()));
    deliver_success(&d, &id, &urls).await;
    let t = d.wait_for(&id, downloaded).await;
    assert_stored(&d, &t, &bytes);
    d.stop().await;
}

#[tokio::test]
async fn pending_not_found_and_api_errors_keep_waiting_and_count_polls() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    // Tracked before KIE's record exists: "record not found" for a while.
    let id = "trackedbeforekieknowsit";
    crate::admin_track(&d, id).await;
    d.advance(POLL_AFTER + SLACK);
    let t = d.wait_for(id, |t| t.polls == 1).await;
    assert_eq!(t.state, State::Submitted);
    assert!(has_event(&d, id, EventKind::Polled, "not found yet"));

    fake.api.add_task(id, "music-late");
    d.advance(POLL_INTERVAL);
    let t = d.wait_for(id, |t| t.polls == 2).await;
    assert_eq!(t.state, State::Submitted);
    assert!(has_event(&d, id, EventKind::Polled, "pending"));

    fake.api.set_status(id, Status::Generating);
    d.advance(POLL_INTERVAL);
    d.wait_for(id, |t| t.polls == 3).await;
    assert!(has_event(&d, id, EventKind::Polled, "generating"));

    // HTTP 200 with an error envelope (455 maintenance), then a 5xx: transient, keep going.
    fake.api.fail_next(Endpoint::RecordInfo, 455, 1);
    d.advance(POLL_INTERVAL);
    d.wait_for(id, |t| t.polls == 4).await;
    assert!(has_event(&d, id, EventKind::Polled, "maintenance"));
    fake.api.fail_next_with(
        Endpoint::RecordInfo,
        502,
        1,
        crate::fake_kie::api::Delivery::HttpPlain,
    );
    d.advance(POLL_INTERVAL);
    let t = d.wait_for(id, |t| t.polls == 5).await;
    assert_eq!(t.state, State::Submitted);

    // Not yet due: no call.
    d.advance(POLL_INTERVAL / 2);
    settle().await;
    assert_eq!(fake.api.calls(Endpoint::RecordInfo), 5);

    let (urls, bytes) = two_images(&fake, "pending");
    fake.api.set_status(id, Status::Success(urls));
    d.advance(POLL_INTERVAL);
    let t = d.wait_for(id, downloaded).await;
    assert_eq!(t.polls, 6);
    assert_stored(&d, &t, &bytes);
    d.stop().await;
}

/// A 429 pauses every KIE call for one whole window (10 s of real time: the window is not
/// configurable), and the task just waits for its next poll.
#[tokio::test]
async fn a_429_on_record_info_pauses_kie_calls_and_the_task_keeps_waiting() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = submitted(&d, "music-429").await;
    fake.api.fail_next(Endpoint::RecordInfo, 429, 1);
    d.advance(POLL_AFTER + SLACK);
    let t = d.wait_for(&id, |t| t.polls == 1).await;
    assert_eq!(t.state, State::Submitted);
    assert!(has_event(&d, &id, EventKind::Polled, "rate limit"));

    let (urls, bytes) = two_images(&fake, "after429");
    fake.api.set_status(&id, Status::Success(urls));
    d.advance(POLL_INTERVAL);
    eventually("the poll after the pause", || {
        fake.api.calls(Endpoint::RecordInfo) == 2
    })
    .await;
    let t = d.wait_for(&id, downloaded).await;
    assert_stored(&d, &t, &bytes);
    let times = fake.api.call_times(Endpoint::RecordInfo);
    assert_eq!(times.len(), 2);
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(9_900),
        "next call after {gap:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn callback_during_a_poll_in_flight_gives_one_result_and_one_download() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = submitted(&d, "music-race").await;
    let (urls, bytes) = two_images(&fake, "race");
    fake.api.set_status(&id, Status::Success(urls.clone()));
    fake.api
        .set_delay(Endpoint::RecordInfo, Duration::from_millis(1500));

    d.advance(POLL_AFTER + SLACK);
    eventually("poll in flight", || {
        fake.api.calls(Endpoint::RecordInfo) == 1
    })
    .await;
    assert_eq!(d.task(&id).unwrap().state, State::Submitted);
    let (status, _) = d.callback(&success_body(&id, &urls)).await;
    assert_eq!(status, 200);

    // Two record-info calls: the poll in flight, and the confirmation of the callback's URLs.
    let t = d.wait_for(&id, |t| downloaded(t) && t.polls == 2).await;
    assert_eq!(t.source, Some(Source::Callback));
    assert_eq!(t.callbacks, 1);
    assert_stored(&d, &t, &bytes);
    for (url, img) in urls.iter().zip(&t.images) {
        assert_eq!(fake.files.hits(&path_of(url)), 1, "{url} fetched twice");
        assert_eq!(img.attempts, 1);
    }
    let received = events(&d, &id)
        .iter()
        .filter(|(k, d)| *k == EventKind::Received && d.contains("image URL(s)"))
        .count();
    assert_eq!(received, 1, "{:#?}", events(&d, &id));
    assert!(has_event(
        &d,
        &id,
        EventKind::Ignored,
        "poll answer arrived"
    ));
    d.stop().await;
}

#[tokio::test]
async fn without_an_api_key_polling_is_off_and_the_task_gives_up() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |_| {}).await;
    let id = "nokeytask";
    crate::admin_track(&d, id).await;
    d.advance(POLL_AFTER + SLACK);
    eventually("wait recorded", || {
        has_event(&d, id, EventKind::Ignored, "no KIE API key")
    })
    .await;
    assert_eq!(d.task(id).unwrap().state, State::Submitted);
    d.advance(GIVE_UP_AFTER);
    let t = d.wait_for(id, failed).await;
    assert_eq!(t.error.as_deref(), Some("no result from KIE"));
    assert_eq!(fake.api.calls(Endpoint::Any), 0);
    d.stop().await;
}

// ---- confirmed callbacks ----

#[tokio::test]
async fn confirm_callbacks_downloads_record_infos_urls_and_records_the_mismatch() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = "confirmedtask";
    let (kie_urls, bytes) = two_images(&fake, "kie");
    // A replayed delivery with someone else's URLs (the signature does not cover them).
    let forged = forged_callback(&fake, &d, id, Status::Success(kie_urls.clone())).await;

    let t = d.wait_for(id, downloaded).await;
    assert_urls(&t, &kie_urls);
    assert_stored(&d, &t, &bytes);
    assert_never_fetched(&fake, &forged);
    assert!(has_event(&d, id, EventKind::Mismatch, &forged[0]));
    assert!(has_event(&d, id, EventKind::Mismatch, &kie_urls[0]));
    assert_eq!(fake.api.calls(Endpoint::RecordInfo), 1);
    // Replayed again after the download: counted, never processed.
    deliver_success(&d, id, &forged).await;
    let t = d.wait_for(id, |t| t.callbacks == 2).await;
    assert_eq!(t.state, State::Downloaded);
    assert!(has_event(&d, id, EventKind::DuplicateCallback, "success"));
    assert_eq!(fake.files.hits(&path_of(&forged[0])), 0);
    assert_eq!(fake.api.calls(Endpoint::RecordInfo), 1);

    // Matching URLs: confirmed, no mismatch.
    let same = "confirmedsame";
    fake.api.add_task(same, "music-same");
    let (urls, bytes) = two_images(&fake, "same");
    fake.api.set_status(same, Status::Success(urls.clone()));
    crate::admin_track(&d, same).await;
    deliver_success(&d, same, &urls).await;
    let t = d.wait_for(same, downloaded).await;
    assert_stored(&d, &t, &bytes);
    assert!(!has_event(&d, same, EventKind::Mismatch, ""));
    assert!(has_event(&d, same, EventKind::Received, "confirms"));
    d.stop().await;
}

#[tokio::test]
async fn confirmation_waits_out_a_kie_hiccup_before_fetching_anything() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = "confirmlater";
    let (kie_urls, bytes) = two_images(&fake, "laterkie");
    fake.api.fail_next(Endpoint::RecordInfo, 500, 2);
    let forged = forged_callback(&fake, &d, id, Status::Success(kie_urls.clone())).await;

    let t = d.wait_for(id, downloaded).await;
    assert_eq!(
        t.images[0].url, kie_urls[0],
        "record-info's URLs, not the callback's"
    );
    assert_stored(&d, &t, &bytes);
    assert_never_fetched(&fake, &forged);
    assert_eq!(t.polls, 3, "two failed confirmations and one good one");
    assert!(has_event(&d, id, EventKind::Polled, "confirming again"));
    assert!(has_event(&d, id, EventKind::Mismatch, &kie_urls[0]));
    d.stop().await;
}

/// record-info is the truth (SPEC "Downloads"): when it says the task failed, the task fails
/// with KIE's reason and the callback's URLs are never fetched, also when the success
/// callback is replayed later (it revives the generation failure, and the revived task is
/// confirmed again before anything is fetched).
#[tokio::test]
async fn confirmation_that_kie_failed_fails_the_task_and_fetches_no_callback_url() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = "confirmfailed";
    let forged = forged_callback(&fake, &d, id, failed_501()).await;

    let t = d.wait_for(id, failed).await;
    assert_eq!(t.failure, Some(Failure::Generation));
    assert_eq!(t.error.as_deref(), Some(FAILED_501));
    assert!(t.images.iter().all(|i| i.state != ImageState::Pending));
    assert_eq!(fake.api.calls(Endpoint::RecordInfo), 1);

    // The same success body again (a replay, or a forgery without a webhook key).
    deliver_success(&d, id, &forged).await;
    let t = d
        .wait_for(id, |t| {
            failed(t) && t.callbacks == 2 && fake.api.calls(Endpoint::RecordInfo) == 2
        })
        .await;
    assert_eq!(t.error.as_deref(), Some(FAILED_501));
    // Nothing comes due later either.
    for _ in 0..3 {
        d.advance(POLL_INTERVAL + SLACK);
        settle().await;
    }
    assert_never_fetched(&fake, &forged);
    assert_eq!(fake.api.calls(Endpoint::RecordInfo), 2);
    assert_eq!(d.task(id).unwrap().state, State::Failed);
    d.stop().await;
}

/// Covers take 30–150 s: while record-info says generating, coverd asks again on the poll
/// schedule (more often than the old 5 tries), fetches nothing meanwhile, and then takes
/// record-info's URLs, not the callback's.
#[tokio::test]
async fn confirmation_waits_while_kie_is_generating_then_takes_kies_urls() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = "confirmgenerating";
    let forged = forged_callback(&fake, &d, id, Status::Generating).await;
    d.wait_for(id, |t| t.polls == 1).await;

    for n in 2..=8 {
        // Not due before poll.interval: no call.
        settle().await;
        assert_eq!(fake.api.calls(Endpoint::RecordInfo), n - 1, "early call");
        d.advance(POLL_INTERVAL + SLACK);
        let t = d.wait_for(id, |t| t.polls as usize == n).await;
        assert_eq!(t.state, State::Received);
        assert_eq!(fake.api.calls(Endpoint::RecordInfo), n);
        assert_never_fetched(&fake, &forged);
    }
    assert!(has_event(&d, id, EventKind::Polled, "generating"));

    let (kie_urls, bytes) = two_images(&fake, "generatingkie");
    fake.api.set_status(id, Status::Success(kie_urls.clone()));
    d.advance(POLL_INTERVAL + SLACK);
    let t = d.wait_for(id, downloaded).await;
    assert_urls(&t, &kie_urls);
    assert_stored(&d, &t, &bytes);
    assert_never_fetched(&fake, &forged);
    assert!(has_event(&d, id, EventKind::Mismatch, &kie_urls[0]));
    d.stop().await;
}

/// Still generating at `poll.give_up_after`: failed with "no result from KIE", nothing
/// fetched.
#[tokio::test]
async fn confirmation_gives_up_after_give_up_after_without_fetching() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = "confirmgiveup";
    let forged = forged_callback(&fake, &d, id, Status::Generating).await;
    d.wait_for(id, |t| t.polls == 1).await;
    d.advance(POLL_INTERVAL + SLACK);
    d.wait_for(id, |t| t.polls == 2).await;

    d.advance(GIVE_UP_AFTER);
    let t = d.wait_for(id, failed).await;
    assert_eq!(t.failure, Some(Failure::NoResult));
    assert_eq!(t.error.as_deref(), Some("no result from KIE"));
    let calls = fake.api.calls(Endpoint::RecordInfo);
    assert_eq!(
        calls_after(&d, &fake, POLL_INTERVAL * 4, Endpoint::RecordInfo).await,
        calls,
        "asked after giving up",
    );
    assert_never_fetched(&fake, &forged);
    d.stop().await;
}

#[tokio::test]
async fn without_an_api_key_the_callbacks_urls_are_used() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |_| {}).await;
    assert!(d.config.kie.confirm_callbacks);
    let id = "unconfirmedtask";
    fake.api.add_task(id, "music-noconfirm");
    let (kie_urls, _) = two_images(&fake, "kieonly");
    fake.api.set_status(id, Status::Success(kie_urls.clone()));
    crate::admin_track(&d, id).await;
    let (cb_urls, bytes) = two_images(&fake, "callback");
    deliver_success(&d, id, &cb_urls).await;
    let t = d.wait_for(id, downloaded).await;
    assert_eq!(t.images[0].url, cb_urls[0]);
    assert_stored(&d, &t, &bytes);
    assert_eq!(fake.api.calls(Endpoint::Any), 0);
    d.stop().await;
}

// ---- expired and refused URLs ----

#[tokio::test]
async fn expired_url_is_refreshed_through_download_url() {
    let fake = FakeKie::start().await;
    let id = "expiredtask";
    let d = unconfirmed_daemon(&fake, id, |_| {}).await;
    let bytes = png(5000);
    let old = expired_image(&fake, "/s/old.png", &bytes);
    let fresh = fake.files.url("/fresh/s/old.png");

    deliver_success(&d, id, std::slice::from_ref(&old)).await;
    let t = d.wait_for(id, downloaded).await;
    assert_stored(&d, &t, &[bytes]);
    let img = &t.images[0];
    assert_eq!(img.url, old);
    assert_eq!(img.refreshed_url.as_deref(), Some(fresh.as_str()));
    assert_eq!(fake.api.calls(Endpoint::DownloadUrl), 1);
    let req = fake.api.last_request(Endpoint::DownloadUrl).unwrap();
    assert_eq!(req.json(), serde_json::json!({"url": old}));
    assert_eq!(fake.files.hits("/s/old.png"), 1);
    assert_eq!(fake.files.hits("/fresh/s/old.png"), 1);
    assert!(has_event(&d, id, EventKind::UrlRefreshed, &old));
    assert!(has_event(&d, id, EventKind::UrlRefreshed, &fresh));
    d.stop().await;
}

#[tokio::test]
async fn refused_refresh_fails_the_image_with_the_original_status() {
    let fake = FakeKie::start().await;
    // A file host that is not KIE's: its download-url answers 422.
    let foreign = FakeKie::start().await;
    let id = "foreigntask";
    let d = unconfirmed_daemon(&fake, id, |_| {}).await;
    let gone = foreign.files.url("/s/gone.png");
    deliver_success(&d, id, std::slice::from_ref(&gone)).await;
    let t = d.wait_for(id, failed).await;
    assert_eq!(t.failure, Some(Failure::Download));
    assert_eq!(t.images[0].state, ImageState::Failed);
    let error = t.images[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("404"), "{error}");
    assert_eq!(t.images[0].refreshed_url, None);
    assert_eq!(fake.api.calls(Endpoint::DownloadUrl), 1);
    assert_eq!(foreign.files.hits("/s/gone.png"), 1, "no retries of a 404");
    assert!(!has_event(&d, id, EventKind::UrlRefreshed, ""));
    d.stop().await;
}

#[tokio::test]
async fn a_kie_error_on_download_url_is_retried_not_final() {
    let fake = FakeKie::start().await;
    let id = "refreshlatertask";
    let d = unconfirmed_daemon(&fake, id, |_| {}).await;
    let bytes = png(5000);
    let old = expired_image(&fake, "/s/late.png", &bytes);
    // KIE answers 500 (as HTTP 200 + error envelope) once: not KIE's 422 refusal.
    fake.api.fail_next(Endpoint::DownloadUrl, 500, 1);

    deliver_success(&d, id, std::slice::from_ref(&old)).await;
    let t = d.wait_for(id, downloaded).await;
    assert_stored(&d, &t, &[bytes]);
    assert_eq!(t.images[0].attempts, 2);
    assert_eq!(fake.api.calls(Endpoint::DownloadUrl), 2);
    assert!(has_event(&d, id, EventKind::ImageRetry, "download-url"));
    assert!(has_event(
        &d,
        id,
        EventKind::UrlRefreshed,
        "/fresh/s/late.png"
    ));
    d.stop().await;
}

// ---- the rate limiter ----

/// 100 concurrent submits through the daemon. The limiter's window is a constant 10 s of
/// real time, so at KIE's rate (18 per 10 s) this would take 50 s; with
/// `requests_per_10s = 50` it takes two windows (≈10 s) and shows the same thing: the first
/// 50 calls go at once, the other 50 wait for the window, nothing is refused. The limiter at
/// 18 per 10 s is proven on paused time in
/// `kie_client::limiter_never_exceeds_the_limit_in_any_window`.
#[tokio::test]
async fn a_burst_of_100_submits_stays_under_requests_per_10s() {
    const LIMIT: usize = 50;
    const SUBMITS: usize = 100;
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |c| c.kie.requests_per_10s = LIMIT as u32).await;
    let t0 = tokio::time::Instant::now();
    let mut handles = Vec::new();
    for i in 0..SUBMITS {
        let config = d.config.clone();
        handles.push(tokio::spawn(async move {
            submit(&config, &format!("music-burst-{i}")).await
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.unwrap().expect("every submit succeeds").0.task_id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), SUBMITS);
    assert_eq!(
        fake.api.calls(Endpoint::Generate),
        SUBMITS,
        "no 429, no retry"
    );
    let mut times = fake.api.call_times(Endpoint::Any);
    times.sort();
    assert_eq!(times.len(), SUBMITS);
    // The limiter counts a call when it starts; the fake sees it on arrival, a little later
    // and with jitter, so the window gets a small margin.
    let window = Duration::from_secs(10) - Duration::from_millis(500);
    for calls in times.windows(LIMIT + 1) {
        let spread = calls[LIMIT] - calls[0];
        assert!(spread >= window, "{} calls within {spread:?}", LIMIT + 1);
    }
    // And not slower than needed: two windows.
    assert!(t0.elapsed() < Duration::from_secs(14), "{:?}", t0.elapsed());
    d.stop().await;
}

// ---- admin retry ----

#[tokio::test]
async fn retry_of_a_generation_failure_polls_again() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = submitted(&d, "music-retry").await;
    fake.api.set_status(
        &id,
        Status::Failed {
            code: 531,
            message: "generation failed, credits refunded".into(),
        },
    );
    d.advance(POLL_AFTER + SLACK);
    d.wait_for(&id, failed).await;

    let (urls, bytes) = two_images(&fake, "retry");
    fake.api.set_status(&id, Status::Success(urls));
    match retry(&d.config, &id).await {
        Reply::Task { task, .. } => assert_eq!(task.state, "submitted"),
        other => panic!("{other:?}"),
    }
    let t = d.wait_for(&id, downloaded).await;
    assert_eq!(t.source, Some(Source::Poll));
    assert_eq!(t.polls, 2);
    assert_eq!(t.error, None);
    assert_stored(&d, &t, &bytes);
    assert!(has_event(&d, &id, EventKind::Retried, "polling KIE again"));
    d.stop().await;
}

#[tokio::test]
async fn retry_of_a_download_failure_refetches_refreshing_an_expired_url() {
    let fake = FakeKie::start().await;
    let id = "dlfailtask";
    let d = unconfirmed_daemon(&fake, id, |c| c.download.max_attempts = 2).await;
    fake.files.set("/s/flaky.png", Behaviour::Status(500));
    let url = fake.files.url("/s/flaky.png");
    deliver_success(&d, id, std::slice::from_ref(&url)).await;
    let t = d.wait_for(id, failed).await;
    assert_eq!(t.failure, Some(Failure::Download));
    assert_eq!(t.images[0].attempts, 2);
    assert_eq!(
        fake.api.calls(Endpoint::DownloadUrl),
        0,
        "500 is not expiry"
    );

    // Meanwhile the link expired; KIE's download-url has a fresh one.
    let bytes = png(6000);
    expired_image(&fake, "/s/flaky.png", &bytes);
    match retry(&d.config, id).await {
        Reply::Task { task, .. } => assert_eq!(task.state, "received"),
        other => panic!("{other:?}"),
    }
    let t = d.wait_for(id, downloaded).await;
    assert_stored(&d, &t, std::slice::from_ref(&bytes));
    assert_eq!(t.images[0].attempts, 3);
    assert_eq!(fake.api.calls(Endpoint::DownloadUrl), 1);
    assert_eq!(fake.files.hits("/fresh/s/flaky.png"), 1);
    assert!(has_event(&d, id, EventKind::Retried, "image(s) 0"));
    assert!(has_event(
        &d,
        id,
        EventKind::UrlRefreshed,
        "/fresh/s/flaky.png"
    ));
    d.stop().await;
}

#[tokio::test]
async fn retry_of_a_downloaded_task_refetches_a_deleted_file() {
    let fake = FakeKie::start().await;
    let id = "deletedfiletask";
    let d = unconfirmed_daemon(&fake, id, |_| {}).await;
    let (urls, bytes) = two_images(&fake, "del");
    deliver_success(&d, id, &urls).await;
    let t = d.wait_for(id, downloaded).await;

    // Nothing damaged: nothing to do.
    match retry(&d.config, id).await {
        Reply::Task { task, .. } => assert_eq!(task.state, "downloaded"),
        other => panic!("{other:?}"),
    }
    assert!(has_event(&d, id, EventKind::Ignored, "nothing to repair"));

    std::fs::remove_file(d.dir.path().join(t.images[0].path.as_ref().unwrap())).unwrap();
    retry(&d.config, id).await;
    let t = d
        .wait_for(id, |t| downloaded(t) && t.images[0].attempts == 2)
        .await;
    assert_stored(&d, &t, &bytes);
    assert_eq!(fake.files.hits(&path_of(&urls[0])), 2);
    assert_eq!(
        fake.files.hits(&path_of(&urls[1])),
        1,
        "intact image refetched"
    );
    assert_eq!(t.images[1].attempts, 1);

    // A corrupt file (still PNG-looking, other bytes) is fetched again, not adopted.
    let second = d.dir.path().join(t.images[1].path.as_ref().unwrap());
    std::fs::write(&second, png(1234)).unwrap();
    retry(&d.config, id).await;
    let t = d
        .wait_for(id, |t| downloaded(t) && t.images[1].attempts == 2)
        .await;
    assert_eq!(fake.files.hits(&path_of(&urls[1])), 2);
    assert_stored(&d, &t, &bytes);
    d.stop().await;
}

#[tokio::test]
async fn failure_callback_fails_the_task_and_stops_polling() {
    let fake = FakeKie::start().await;
    let d = api_daemon(&fake, |_| {}).await;
    let id = submitted(&d, "music-cbfail").await;
    let body = crate::harness::failure_body(&id, 501, "Cover generation failed");
    assert_eq!(d.callback(&body).await.0, 200);
    // KIE retries deliveries: the duplicate is counted, not processed.
    assert_eq!(d.callback(&body).await.0, 200);
    let t = d.wait_for(&id, |t| failed(t) && t.callbacks == 2).await;
    assert_eq!(t.failure, Some(Failure::Generation));
    assert_eq!(t.error.as_deref(), Some(FAILED_501));
    assert!(has_event(&d, &id, EventKind::DuplicateCallback, "failure"));
    d.advance(POLL_AFTER + SLACK);
    settle().await;
    assert_eq!(fake.api.calls(Endpoint::RecordInfo), 0);
    d.stop().await;
}
