//! The admin commands (issue "core daemon" part 8) through `coverd::admin::run`, as the CLI
//! runs them: first against the running daemon (over `admin.sock`), then, after a clean
//! stop, against the store directly. The `--json` output must have SPEC's shapes and be the
//! same both ways, except `daemon`.

use coverd::machine::Origin;
use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use coverd::admin::{self, AdminErrorKind, Reply, Request};
use coverd::config::Config;
use coverd::model::State;
use serde_json::{Value, json};

use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, jpeg, png, sha256_hex};
use crate::harness::{Daemon, admin_err, failure_body, json_of, success_body};

const SUBMITTED: &str = "adm-1-submitted";
const RECEIVED: &str = "adm-2-received";
const DOWNLOADED: &str = "adm-3-downloaded";
const FAILED: &str = "adm-4-failed";

const TASK_KEYS: &[&str] = &[
    "task_id",
    "kind",
    "music_task_id",
    "state",
    "source",
    "created_at",
    "updated_at",
    "callbacks",
    "polls",
    "error",
    "images",
    "files",
    "notify",
];
const IMAGE_KEYS: &[&str] = &[
    "index", "url", "state", "attempts", "path", "bytes", "sha256", "error",
];
/// A file entry: an image's keys, its name and, once stored, its media type.
const FILE_KEYS: &[&str] = &[
    "index", "name", "url", "state", "attempts", "path", "bytes", "sha256", "error",
];
const EVENT_KEYS: &[&str] = &["at", "kind", "detail"];

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set(names: &[&'static str]) -> BTreeSet<&'static str> {
    names.iter().copied().collect()
}

/// `2026-11-27T10:33:01Z`.
#[track_caller]
fn assert_time(v: &Value) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("time is not a string: {v}"));
    let ok = s.len() == 20
        && s.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            19 => c == 'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(ok, "not an RFC 3339 UTC second: {s}");
}

/// Checks one task object of `show` (with events) or `list` (without).
#[track_caller]
fn assert_task_shape(v: &Value, with_events: bool) {
    let mut want = set(TASK_KEYS);
    if with_events {
        want.insert("events");
    }
    assert_eq!(keys(v), want, "{v:#}");
    assert_time(&v["created_at"]);
    assert_time(&v["updated_at"]);
    assert!(v["callbacks"].is_u64() && v["polls"].is_u64(), "{v:#}");
    for img in v["images"].as_array().unwrap() {
        assert_eq!(keys(img), set(IMAGE_KEYS), "{img:#}");
        let state = img["state"].as_str().unwrap();
        assert!(
            ["pending", "downloaded", "failed"].contains(&state),
            "{img}"
        );
        assert_eq!(img["path"].is_string(), state == "downloaded", "{img}");
    }
    // A cover's `files` are its `images`, with their names (and types once stored).
    assert_eq!(v["kind"], "cover", "{v:#}");
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), v["images"].as_array().unwrap().len(), "{v:#}");
    for (file, img) in files.iter().zip(v["images"].as_array().unwrap()) {
        let mut want = set(FILE_KEYS);
        if file["state"] == "downloaded" {
            want.insert("media_type");
        }
        assert_eq!(keys(file), want, "{file:#}");
        for k in IMAGE_KEYS {
            assert_eq!(file[k], img[k], "{k}: {file:#}");
        }
    }
    if with_events {
        let events = v["events"].as_array().unwrap();
        assert!(!events.is_empty());
        for e in events {
            assert_eq!(keys(e), set(EVENT_KEYS), "{e:#}");
            assert_time(&e["at"]);
            assert!(e["kind"].is_string() && e["detail"].is_string(), "{e}");
        }
    }
}

fn event_kinds(v: &Value) -> Vec<&str> {
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect()
}

fn list(state: Option<&str>, limit: usize) -> Request {
    Request::List {
        state: state.map(str::to_string),
        limit,
        kind: None,
    }
}

fn show(id: &str) -> Request {
    Request::Show {
        task_id: id.to_string(),
    }
}

/// The read-only requests asked both while running and after the stop.
fn reads() -> Vec<Request> {
    let mut r = vec![
        Request::Status,
        list(None, admin::DEFAULT_LIST_LIMIT),
        list(None, 2),
        list(Some("submitted"), 100),
        list(Some("received"), 100),
        list(Some("downloaded"), 1),
        list(Some("failed"), 100),
    ];
    r.extend([SUBMITTED, RECEIVED, DOWNLOADED, FAILED].map(show));
    r
}

/// Asserts the answers to [`reads`] for the four tasks; `daemon` is "running" or "stopped".
fn check_reads(answers: &[Value], daemon: &str, a0: &[u8], a1: &[u8]) {
    let [
        status,
        all,
        two,
        submitted,
        received,
        downloaded,
        failed,
        s1,
        s2,
        s3,
        s4,
    ] = answers
    else {
        panic!("{} answers", answers.len());
    };

    // status --json: at least daemon and the four counts.
    assert_eq!(status["daemon"], daemon, "{status:#}");
    assert_eq!(
        status["tasks"],
        json!({"submitted": 1, "received": 1, "downloaded": 1, "failed": 1}),
        "{status:#}"
    );
    assert_eq!(status["oldest_unfinished"]["task_id"], SUBMITTED);

    // list --json: arrays of task objects without events, newest first.
    assert_eq!(ids(all), [FAILED, DOWNLOADED, RECEIVED, SUBMITTED]);
    assert_eq!(ids(two), [FAILED, DOWNLOADED]);
    assert_eq!(ids(submitted), [SUBMITTED]);
    assert_eq!(ids(received), [RECEIVED]);
    assert_eq!(ids(downloaded), [DOWNLOADED]);
    assert_eq!(ids(failed), [FAILED]);
    let shows = [s1, s2, s3, s4];
    for (listed, shown) in all.as_array().unwrap().iter().rev().zip(shows) {
        assert_task_shape(listed, false);
        assert_task_shape(shown, true);
        // The same object, but for the events.
        let mut without = shown.clone();
        without.as_object_mut().unwrap().remove("events");
        assert_eq!(listed, &without);
    }

    // show --json of each.
    assert_eq!(s1["state"], "submitted");
    assert_eq!(s1["music_task_id"], "music-1");
    assert_eq!(
        (&s1["source"], &s1["error"], &s1["images"]),
        (&Value::Null, &Value::Null, &json!([]))
    );
    assert_eq!((&s1["callbacks"], &s1["polls"]), (&json!(0), &json!(0)));
    // The second `track` is recorded, and changed nothing.
    assert_eq!(event_kinds(s1), ["submitted", "tracked"]);

    assert_eq!(s2["state"], "received");
    assert_eq!(s2["music_task_id"], Value::Null);
    assert_eq!(s2["source"], "callback");
    let img = &s2["images"][0];
    assert_eq!(
        (&img["state"], &img["attempts"]),
        (&json!("pending"), &json!(1))
    );
    assert_eq!(
        (&img["path"], &img["bytes"], &img["sha256"]),
        (&Value::Null, &Value::Null, &Value::Null)
    );
    assert!(img["error"].as_str().unwrap().contains("HTTP 503"), "{img}");

    assert_eq!(s3["state"], "downloaded");
    assert_eq!(s3["music_task_id"], "music-3");
    assert_eq!(s3["source"], "callback");
    assert_eq!((&s3["callbacks"], &s3["polls"]), (&json!(1), &json!(0)));
    assert_eq!(s3["error"], Value::Null);
    for (i, (bytes, ext)) in [(a0, "png"), (a1, "jpg")].into_iter().enumerate() {
        let img = &s3["images"][i];
        assert_eq!(img["index"], i);
        assert!(
            img["url"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/a/{i}.png"))
        );
        assert_eq!(img["state"], "downloaded");
        assert_eq!(img["attempts"], 1);
        assert_eq!(img["path"], format!("images/{DOWNLOADED}/{i}.{ext}"));
        assert_eq!(img["bytes"], bytes.len());
        assert_eq!(img["sha256"], sha256_hex(bytes));
        assert_eq!(img["error"], Value::Null);
    }
    assert_eq!(
        event_kinds(s3),
        [
            "submitted",
            "callback",
            "received",
            "image_stored",
            "image_stored",
            "downloaded"
        ]
    );

    assert_eq!(s4["state"], "failed");
    assert_eq!(s4["callbacks"], 1);
    assert_eq!(s4["error"], "KIE code 501: Cover generation failed");
    assert_eq!(event_kinds(s4), ["submitted", "callback", "failed"]);
}

/// Unknown id: exit 1; bad state or id: exit 2.
async fn check_errors(config: &Config) {
    let e = admin_err(config, show("no-such-task")).await;
    assert_eq!(e.kind, AdminErrorKind::Missing, "{e:?}");
    assert!(e.message.contains("no-such-task"), "{e:?}");
    let e = admin_err(config, list(Some("bogus"), 10)).await;
    assert_eq!(e.kind, AdminErrorKind::Usage, "{e:?}");
    assert!(e.message.contains("bogus"), "{e:?}");
    let e = admin_err(
        config,
        Request::Track {
            task_id: "../x".into(),
            music_task_id: None,
            kind: None,
            audio_id: None,
        },
    )
    .await;
    assert_eq!(e.kind, AdminErrorKind::Usage, "{e:?}");
}

async fn track(config: &Config, id: &str, music: Option<&str>) -> (Value, String) {
    let reply = admin::run(
        config.clone(),
        Request::Track {
            task_id: id.into(),
            music_task_id: music.map(str::to_string),
            kind: None,
            audio_id: None,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("track {id}: {e}"));
    let Reply::Task { task, message } = &reply else {
        panic!("track {id}: {reply:?}");
    };
    assert_eq!(task.task_id, id);
    let v: Value = serde_json::from_str(&admin::render(&reply, true)).unwrap();
    (v, message.clone())
}

#[tokio::test]
async fn admin_commands_running_then_stopped() {
    let (fake, [a0, a1]) =
        FakeKie::serving([("/a/0.png", png(3000)), ("/a/1.png", jpeg(2000))]).await;
    // Keeps its task `received`: the next attempt is an hour away.
    fake.files
        .set("/d/0.png", Behaviour::StatusRetryAfter(503, "3600".into()));
    let d = Daemon::start(&fake, |c| {
        c.download.backoff_max = Duration::from_secs(3600);
    })
    .await;
    let cfg = d.config.clone();

    // The socket is the daemon's, for its user only.
    let meta = std::fs::metadata(d.dir.path().join("admin.sock")).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // admin track, in creation order (ids sort the same way, for ties in the same ms).
    for (id, music) in [
        (SUBMITTED, Some("music-1")),
        (RECEIVED, None),
        (DOWNLOADED, Some("music-3")),
        (FAILED, None),
    ] {
        let (v, message) = track(&cfg, id, music).await;
        assert_task_shape(&v, false);
        assert_eq!(v["state"], "submitted");
        assert_eq!(v["music_task_id"], music.map_or(Value::Null, Value::from));
        assert!(message.contains("tracking"), "{message}");
    }
    // Tracking again changes nothing.
    let (v, message) = track(&cfg, SUBMITTED, Some("other-music")).await;
    assert!(message.contains("already known"), "{message}");
    assert_eq!(v["music_task_id"], "music-1");

    let ok = (200, r#"{"status":"received"}"#.to_string());
    assert_eq!(
        d.callback(&success_body(RECEIVED, &[fake.files.url("/d/0.png")]))
            .await,
        ok
    );
    let urls = [fake.files.url("/a/0.png"), fake.files.url("/a/1.png")];
    assert_eq!(d.callback(&success_body(DOWNLOADED, &urls)).await, ok);
    assert_eq!(
        d.callback(&failure_body(FAILED, 501, "Cover generation failed"))
            .await,
        ok
    );
    d.wait_for(RECEIVED, |t| {
        t.images.first().is_some_and(|i| i.attempts == 1)
    })
    .await;
    d.wait_for(DOWNLOADED, |t| t.state == State::Downloaded)
        .await;

    let mut running = Vec::new();
    for req in reads() {
        running.push(json_of(&cfg, req).await);
    }
    check_reads(&running, "running", &a0, &a1);
    check_errors(&cfg).await;

    let (dir, config) = d.stop().await;
    assert!(
        !dir.path().join("admin.sock").exists(),
        "admin.sock left behind by a clean stop"
    );
    let mut stopped = Vec::new();
    for req in reads() {
        stopped.push(json_of(&config, req).await);
    }
    check_reads(&stopped, "stopped", &a0, &a1);
    // Same answers both ways: status differs only in `daemon` (and the data size, which a
    // stop changes by flushing).
    // `polling` is the daemon's to say: unknown (null) while it is stopped.
    for (r, s) in running.iter_mut().zip(stopped.iter_mut()).take(1) {
        assert_eq!(
            (&r["polling"], &s["polling"]),
            (&json!(false), &Value::Null)
        );
        for v in [&mut *r, &mut *s] {
            let o = v.as_object_mut().unwrap();
            o.remove("daemon");
            o.remove("data_bytes");
            o.remove("polling");
        }
    }
    assert_eq!(running, stopped);
    check_errors(&config).await;

    // admin track works on a stopped daemon too, and the next reads see it.
    let (v, message) = track(&config, "adm-5-offline", None).await;
    assert!(message.contains("tracking"), "{message}");
    assert_eq!(v["state"], "submitted");
    let status = json_of(&config, Request::Status).await;
    assert_eq!(status["daemon"], "stopped");
    assert_eq!(status["tasks"]["submitted"], 2);
    let shown = json_of(&config, show("adm-5-offline")).await;
    assert_task_shape(&shown, true);
    assert_eq!(event_kinds(&shown), ["submitted"]);
    drop(dir);
}

/// `admin verify` and `admin export`: same answers running and stopped; damage is reported
/// with exit code 1 (repair by `admin retry` is in binary.rs).
#[tokio::test]
async fn verify_and_export() {
    let fake = FakeKie::start().await;
    let a = png(3000);
    fake.files.set("/v/a.png", Behaviour::Image(a.clone()));
    fake.files.set("/v/b.jpg", Behaviour::Image(jpeg(4000)));
    let d = Daemon::start(&fake, |c| c.accept_unknown_tasks = true).await;
    let urls = [fake.files.url("/v/a.png"), fake.files.url("/v/b.jpg")];
    assert_eq!(d.callback(&success_body("vt1", &urls)).await.0, 200);
    assert_eq!(d.callback(&failure_body("vt2", 501, "failed")).await.0, 200);
    d.wait_for("vt1", |t| t.state == State::Downloaded).await;

    let verify = |config: Config| async move {
        match admin::run(config, Request::Verify).await.expect("verify") {
            Reply::Verified { verify } => verify,
            other => panic!("{other:?}"),
        }
    };
    let export = |config: Config| async move {
        let reply = admin::run(config, Request::Export).await.expect("export");
        admin::render(&reply, false)
    };
    let v = verify(d.config.clone()).await;
    assert_eq!((v.checked, v.ok), (2, 2));
    assert!(v.missing.is_empty() && v.corrupt.is_empty());
    let lines = export(d.config.clone()).await;
    let objs: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs.len(), 2);
    for o in &objs {
        let mut want = set(TASK_KEYS);
        want.insert("events");
        assert_eq!(keys(o), want, "{o}");
        assert!(!o["events"].as_array().unwrap().is_empty());
    }

    // Damage one file, delete the other.
    let t = d.task("vt1").unwrap();
    let root = d.dir.path().to_path_buf();
    let p0 = root.join(t.images[0].path.as_ref().unwrap());
    let p1 = root.join(t.images[1].path.as_ref().unwrap());
    std::fs::write(&p0, &a[..100]).unwrap();
    std::fs::remove_file(&p1).unwrap();
    let v = verify(d.config.clone()).await;
    assert_eq!((v.checked, v.ok), (2, 0));
    assert_eq!(v.corrupt, vec![t.images[0].path.clone().unwrap()]);
    assert_eq!(v.missing, vec![t.images[1].path.clone().unwrap()]);
    assert_eq!(Reply::Verified { verify: v.clone() }.exit_code(), 1);

    // Same answers with the daemon stopped.
    let (dir, config) = d.stop().await;
    assert_eq!(verify(config.clone()).await, v);
    assert_eq!(export(config.clone()).await, lines);
    drop(dir);
}

/// Issue 15 item 6: through the daemon, a whole-store command streams its progress (the
/// same callback, so the same bar, as offline), then its reply.
#[tokio::test]
async fn progress_of_a_whole_store_command_streams_from_the_daemon() {
    use coverd::machine::{Ctx, Event};
    use coverd::store::IfMissing;
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |_| {}).await;
    let ctx = Ctx::from_config(&d.config, coverd::model::now_millis());
    for i in 0..600 {
        let event = Event::Track(Origin::cover(None));
        d.store
            .apply(&format!("p-{i:03}"), &event, &ctx, IfMissing::Create)
            .unwrap();
    }
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let progress = {
        let seen = seen.clone();
        std::sync::Arc::new(move |done: u64, total: u64| seen.lock().unwrap().push((done, total)))
            as coverd::admin::backup::Progress
    };
    let reply = admin::run_with(d.config.clone(), Request::Export, Some(progress))
        .await
        .unwrap();
    let Reply::Export { tasks, .. } = reply else {
        panic!("not an export: {reply:?}");
    };
    assert_eq!(tasks.len(), 600);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(256, 600), (512, 600)],
        "progress frames from the daemon"
    );
    d.stop().await;
}
