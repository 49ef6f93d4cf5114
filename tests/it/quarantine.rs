//! Undecodable records (SPEC "Signals, failures, exit status"): a task record that is
//! damaged, or written by a newer coverd, is quarantined. The workers skip it without
//! retrying in a loop, every other task goes on, and `admin status`, `admin verify` and
//! `admin export` name it and exit 1 after finishing the rest, with the daemon running
//! (through its socket) or stopped.

use coverd::machine::Origin;
use coverd::model::Kind;
use std::path::Path;
use std::time::Duration;

use coverd::machine::{Ctx, Event, Report};
use coverd::model::{Millis, State, Task, now_millis};
use coverd::store::{IfMissing, Store};
use serde_json::Value;

use crate::bin_util::{Outcome, Scratch, coverd, run};
use crate::fake_kie::FakeKie;
use crate::fake_kie::api::Status;
use crate::fake_kie::files::{Behaviour, png};
use crate::harness::{Daemon, test_config, with_api};

/// Bytes no coverd ever wrote.
const GARBAGE: &[u8] = b"\xde\xad\xbe\xef this is not a task record";
/// Received tasks whose records are replaced by garbage. More of them than a download
/// worker pool of one looks at in a pass (4 tasks), so skipping them must look past them.
const BAD_DOWNLOADS: [&str; 6] = [
    "bad-dl-0", "bad-dl-1", "bad-dl-2", "bad-dl-3", "bad-dl-4", "bad-dl-5",
];
/// A received task whose record a newer coverd wrote.
const NEWER_DOWNLOAD: &str = "bad-newer-dl";
/// Submitted tasks (in the poll index): one garbage, one from a newer coverd.
const BAD_POLL: &str = "bad-garbage-poll";
const NEWER_POLL: &str = "bad-newer-poll";
const GOOD: [&str; 2] = ["good-0", "good-1"];

/// A record in the next envelope version (bincode variant index `ENVELOPE_VERSION`, one
/// past this build's newest), as a newer coverd would write it: this build cannot read it.
fn newer_record() -> Vec<u8> {
    let mut bytes = coverd::store::codec::ENVELOPE_VERSION
        .to_le_bytes()
        .to_vec();
    bytes.extend_from_slice(b"fields of a shape this build does not know");
    bytes
}

fn bad_ids() -> Vec<&'static str> {
    let mut ids = BAD_DOWNLOADS.to_vec();
    ids.extend([NEWER_DOWNLOAD, BAD_POLL, NEWER_POLL]);
    ids
}

fn ctx(now: Millis) -> Ctx {
    Ctx {
        now,
        max_attempts: 8,
        poll_after_ms: 120_000,
        notify: false,
    }
}

fn apply(store: &Store, id: &str, event: Event, now: Millis) -> Task {
    store
        .apply(id, &event, &ctx(now), IfMissing::Create)
        .expect("apply")
        .expect("task")
        .task
}

fn track(store: &Store, id: &str, now: Millis) -> Task {
    let music_task_id = Some(format!("music-{id}"));
    apply(store, id, Event::Track(Origin::cover(music_task_id)), now)
}

fn receive(store: &Store, id: &str, url: String, now: Millis) -> Task {
    track(store, id, now);
    let report = Report::images(vec![url]);
    apply(store, id, Event::Callback(Kind::Cover, report), now)
}

/// Writes the tasks into the store of `data_dir` (daemon stopped): the bad ones first and
/// earlier, so that they lead both due indexes, then the good received ones, then
/// `submitted` tracked now. Returns once the store is closed and its lock released.
async fn plant(data_dir: &Path, fake: &FakeKie, submitted: &[&str]) {
    let store = Store::open(data_dir).expect("open store");
    let long_ago = now_millis() - 600_000;
    for id in BAD_DOWNLOADS.iter().chain([&NEWER_DOWNLOAD]) {
        let path = format!("/s/{id}.png");
        fake.files.set(&path, Behaviour::Image(png(2000)));
        let t = receive(&store, id, fake.files.url(&path), long_ago);
        assert_eq!(t.state, State::Received);
    }
    for id in [BAD_POLL, NEWER_POLL] {
        // Tracked long ago: its first poll is due now.
        assert_eq!(track(&store, id, long_ago).state, State::Submitted);
    }
    for id in GOOD {
        let path = format!("/s/{id}.png");
        fake.files.set(&path, Behaviour::Image(png(3000)));
        receive(&store, id, fake.files.url(&path), now_millis());
    }
    for id in BAD_DOWNLOADS.iter().chain([&BAD_POLL]) {
        store.put_raw_task(id, GARBAGE).expect("plant garbage");
    }
    for id in [NEWER_DOWNLOAD, NEWER_POLL] {
        store
            .put_raw_task(id, &newer_record())
            .expect("plant newer");
    }
    for id in submitted {
        track(&store, id, now_millis());
    }
    drop(store);
    lock_released(data_dir).await;
}

/// Waits until sled's lock on the store is free: its I/O threads may hold it for a moment
/// after the last handle is dropped (sled #1289), and the daemon opening the directory next
/// would find it "in use by another coverd process".
async fn lock_released(data_dir: &Path) {
    let file = std::fs::File::open(data_dir.join("db").join("db")).expect("sled's db file");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fs2::FileExt::try_lock_exclusive(&file).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sled kept its lock for 30 s after the store was dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fs2::FileExt::unlock(&file).expect("unlock");
}

fn bad_urls_fetched(fake: &FakeKie) -> u32 {
    BAD_DOWNLOADS
        .iter()
        .chain([&NEWER_DOWNLOAD])
        .map(|id| fake.files.hits(&format!("/s/{id}.png")))
        .sum()
}

/// Lets the loops run a pass after a wake-up, for checks that something did NOT happen.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn workers_skip_undecodable_records_without_a_loop_and_the_rest_goes_on() {
    let fake = FakeKie::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &fake);
    with_api(&mut config);
    config.kie.confirm_callbacks = false;
    // 4 tasks in flight at most: the 7 quarantined received tasks lead the index.
    config.download.concurrency = 1;
    // A good submitted task behind the bad ones in the poll index.
    let polled = "good-polled";
    plant(dir.path(), &fake, &[polled]).await;
    fake.api.add_task(polled, "music-good-polled");
    fake.files.set("/s/polled.png", Behaviour::Image(png(2500)));
    fake.api.set_status(
        polled,
        Status::Success(vec![fake.files.url("/s/polled.png")]),
    );

    let d = Daemon::start_in(dir, config).await;
    for id in GOOD {
        d.wait_for(id, |t| t.state == State::Downloaded).await;
    }
    d.advance(Duration::from_secs(130));
    d.wait_for(polled, |t| t.state == State::Downloaded).await;

    // Each bad record was read about once (by the worker that found it), not in a loop.
    let reads = d.store.undecodable_reads();
    let bad = bad_ids().len() as u64;
    assert!(
        reads <= 2 * bad,
        "{reads} reads of {bad} undecodable records"
    );
    for _ in 0..5 {
        d.advance(Duration::from_secs(60));
        settle().await;
    }
    assert_eq!(
        d.store.undecodable_reads(),
        reads,
        "the workers kept reading quarantined records"
    );
    assert_eq!(bad_urls_fetched(&fake), 0);
    d.stop().await;
}

/// `coverd --config … admin <args>`.
async fn admin(scratch: &Scratch, args: &[&str]) -> Outcome {
    let mut all = vec!["admin"];
    all.extend_from_slice(args);
    scratch.run(&all).await
}

fn json(out: &Outcome) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {out:?}"))
}

/// The ids a `quarantined` JSON array names, with their reasons.
fn quarantined(v: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = v["quarantined"]
        .as_array()
        .unwrap_or_else(|| panic!("no quarantined array in {v}"))
        .iter()
        .map(|q| {
            (
                q["task_id"].as_str().expect("task_id").to_string(),
                q["reason"].as_str().expect("reason").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Every bad record named once, with the right kind of reason.
fn assert_names_every_bad_record(v: &Value) {
    let got = quarantined(v);
    let mut want: Vec<String> = bad_ids().iter().map(|s| s.to_string()).collect();
    want.sort();
    let ids: Vec<String> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, want, "{v}");
    for (id, reason) in &got {
        if id.starts_with("bad-newer") {
            assert!(
                reason.contains("written by a newer coverd"),
                "{id}: {reason}"
            );
            assert!(!reason.contains("corrupt"), "{id}: {reason}");
        } else {
            assert!(reason.contains("corrupt"), "{id}: {reason}");
            assert!(!reason.contains("newer"), "{id}: {reason}");
        }
    }
}

/// Text output names every bad record after the rest of the answer (`after` occurs first).
fn assert_text_names_after(out: &Outcome, text: &str, after: &str) {
    let at = text
        .find(after)
        .unwrap_or_else(|| panic!("{after:?} missing: {out:?}"));
    for id in bad_ids() {
        let named = text
            .find(&format!("{id}:"))
            .unwrap_or_else(|| panic!("{id} not named: {out:?}"));
        assert!(named > at, "{id} named before {after:?}: {out:?}");
    }
    assert!(text.contains("written by a newer coverd"), "{out:?}");
}

/// status, verify and export: exit 1, everything else answered, every bad record named.
async fn check_admin(scratch: &Scratch, daemon: &str) {
    let out = admin(scratch, &["status", "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let v = json(&out);
    assert_eq!(v["daemon"], daemon, "{v}");
    assert_eq!(v["tasks"]["downloaded"], 2, "{v}");
    assert_names_every_bad_record(&v);
    let out = admin(scratch, &["status"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_text_names_after(&out, &out.stdout, "polling:");

    let out = admin(scratch, &["verify", "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let v = json(&out);
    assert_eq!(
        (v["checked"].as_u64(), v["ok"].as_u64()),
        (Some(2), Some(2)),
        "{v}"
    );
    assert_names_every_bad_record(&v);
    let out = admin(scratch, &["verify"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_text_names_after(&out, &out.stdout, "checked 2 stored image(s): 2 ok");

    // Export: every readable task on stdout, one JSON object per line; the bad ones on
    // stderr.
    let out = admin(scratch, &["export"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let mut exported: Vec<String> = out
        .stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            assert!(v["events"].is_array(), "{v}");
            v["task_id"].as_str().unwrap().to_string()
        })
        .collect();
    exported.sort();
    assert_eq!(exported, GOOD.to_vec(), "{out:?}");
    for id in bad_ids() {
        assert!(out.stderr.contains(&format!("{id}:")), "{id}: {out:?}");
    }
    assert!(out.stderr.contains("written by a newer coverd"), "{out:?}");

    // Listing and showing good tasks still work.
    let out = admin(scratch, &["list", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = admin(scratch, &["show", GOOD[0], "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // Showing a bad one says why, exit 1.
    let out = admin(scratch, &["show", NEWER_DOWNLOAD]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("written by a newer coverd"), "{out:?}");
}

#[tokio::test]
async fn the_real_binary_quarantines_and_admin_names_the_records_running_and_stopped() {
    let fake = FakeKie::start().await;
    let scratch = Scratch::new();
    scratch.write_config(&fake.base_url(), "concurrency = 1", "");
    std::fs::create_dir_all(scratch.data_dir()).unwrap();
    plant(&scratch.data_dir(), &fake, &[]).await;

    let daemon = scratch.serve().await;
    for id in GOOD {
        let deadline = tokio::time::Instant::now() + crate::bin_util::PATIENCE;
        loop {
            let out = admin(&scratch, &["show", id, "--json"]).await;
            if json(&out)["state"] == "downloaded" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{id}: {out:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // One log line per quarantined record, however long the workers run.
    for id in bad_ids() {
        daemon.wait_for_log(id).await;
    }
    check_admin(&scratch, "running").await;
    let logs = daemon.logs();
    for id in bad_ids() {
        let lines = logs.lines().filter(|l| l.contains(id)).count();
        assert_eq!(lines, 1, "{id} logged {lines} times:\n{logs}");
    }
    assert!(logs.lines().count() < 200, "{logs}");
    assert_eq!(bad_urls_fetched(&fake), 0);
    daemon.stop().await;

    check_admin(&scratch, "stopped").await;
    // Also without a config file: --data-dir alone.
    let mut cmd = coverd();
    cmd.args(["admin", "status", "--data-dir"])
        .arg(scratch.data_dir());
    let out = run(cmd).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains(NEWER_POLL), "{out:?}");
}

/// SPEC "Signals, failures, exit status" (issue 14 item 8): a callback for a quarantined
/// task is kept durably as it arrived (200, not a 503 that KIE retries three times and then
/// drops), counted beside the record in `admin status`, kept across restarts while the
/// record still cannot be read, and applied once it can (here: the record repaired).
#[tokio::test]
async fn a_callback_for_a_quarantined_task_is_kept_aside_and_applied_once_readable() {
    use crate::harness::{json_of, success_body};
    use coverd::admin::{self, Request};
    let fake = FakeKie::start().await;
    fake.files.set("/q/1.png", Behaviour::Image(png(2100)));
    let url = fake.files.url("/q/1.png");
    let d = Daemon::start(&fake, |c| c.kie.confirm_callbacks = false).await;
    let id = "quarantined-1";
    let task = track(&d.store, id, now_millis());
    let readable = coverd::store::codec::encode_task(&task, &d.store.events(id).unwrap()).unwrap();
    d.store.put_raw_task(id, &newer_record()).unwrap();

    for n in 1..=2 {
        let (status, body) = d
            .callback(&success_body(id, std::slice::from_ref(&url)))
            .await;
        assert_eq!((status, body.as_str()), (200, r#"{"status":"received"}"#));
        assert_eq!(d.store.parked_count(id).unwrap(), n);
    }
    let status = json_of(&d.config, Request::Status).await;
    let q = &status["quarantined"][0];
    assert_eq!(
        (q["task_id"].as_str(), q["kept_callbacks"].as_u64()),
        (Some(id), Some(2))
    );
    let reply = admin::run(d.config.clone(), Request::Status).await.unwrap();
    let text = admin::render(&reply, false);
    assert!(text.contains("2 callback(s) kept aside"), "{text}");

    // Restarted with the record still unreadable: both stay kept.
    let (dir, config) = d.stop().await;
    let d = Daemon::start_in(dir, config).await;
    assert_eq!(d.store.parked_count(id).unwrap(), 2);
    let (dir, config) = d.stop().await;

    // Repaired (as an upgrade would make it readable): applied at the next start.
    let store = Store::open(dir.path()).unwrap();
    store.put_raw_task(id, &readable).unwrap();
    store.close().await.unwrap();
    let d = Daemon::start_in(dir, config).await;
    assert_eq!(d.store.parked_count(id).unwrap(), 0);
    let t = d.wait_for(id, |t| t.state == State::Downloaded).await;
    assert_eq!(t.images.len(), 1);
    d.stop().await;
}

/// Kept-aside callbacks come from the store, which may come from a backup: one whose key
/// is no valid task id, or whose body is larger than the intake takes, is dropped at the
/// replay, never applied, even with `accept_unknown_tasks`.
#[tokio::test]
async fn a_crafted_kept_aside_callback_is_dropped_not_applied() {
    use crate::harness::{success_body, test_config};
    let fake = FakeKie::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &fake);
    config.accept_unknown_tasks = true;
    let url = fake.files.url("/q/x.png");
    {
        let store = Store::open(dir.path()).unwrap();
        let hostile = "../../escape";
        let body = success_body(hostile, std::slice::from_ref(&url));
        store.park(hostile, "cover", body.as_bytes(), 1).unwrap();
        let mut big = success_body("big-1", std::slice::from_ref(&url)).into_bytes();
        big.resize(coverd::callback::MAX_BODY_BYTES + 1, b' ');
        store.park("big-1", "cover", &big, 1).unwrap();
        store.close().await.unwrap();
    }
    let d = Daemon::start_in(dir, config).await;
    assert_eq!(d.store.parked_count("../../escape").unwrap(), 0);
    assert_eq!(d.store.parked_count("big-1").unwrap(), 0);
    assert!(d.task("big-1").is_none(), "an oversized body was applied");
    assert!(d.store.get("../../escape").unwrap().is_none());
    d.stop().await;
}
