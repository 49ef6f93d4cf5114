//! Downloads through the running daemon (issue "core daemon" part 6): every failure class
//! of the fake file host, from callback to task record and files on disk, and the URL guard
//! on the daemon's own fetch path. After every run the data directory must hold no partial
//! download in `tmp/` and no file at a final path that does not match its record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use coverd::model::{ImageState, State, Task};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fake_kie::FakeKie;
use crate::fake_kie::api::Endpoint;
use crate::fake_kie::files::{Behaviour, jpeg, png, sha256_hex};
use crate::harness::{Daemon, success_body};

const RECEIVED: &str = r#"{"status":"received"}"#;

/// Tracks `id` and delivers a success callback with `urls`.
async fn deliver(d: &Daemon, id: &str, urls: &[String]) {
    crate::admin_track(d, id).await;
    assert_eq!(
        d.callback(&success_body(id, urls)).await,
        (200, RECEIVED.to_string()),
        "{id}"
    );
}

fn finished(t: &Task) -> bool {
    matches!(t.state, State::Downloaded | State::Failed)
}

/// SPEC "Data directory": nothing left in `tmp/`; every file under `images/` belongs to a
/// downloaded image record and matches its sha256 and size; every downloaded image's file
/// exists.
pub fn check_disk(d: &Daemon) {
    let root = d.dir.path();
    let leftovers: Vec<_> = std::fs::read_dir(root.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial downloads left: {leftovers:?}"
    );
    for dir in std::fs::read_dir(root.join("images")).unwrap() {
        let dir = dir.unwrap();
        let task_id = dir.file_name().into_string().unwrap();
        let task = d
            .task(&task_id)
            .unwrap_or_else(|| panic!("images/{task_id} has no task"));
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let file = file.unwrap();
            let rel = format!("images/{task_id}/{}", file.file_name().to_string_lossy());
            let img = task
                .images
                .iter()
                .find(|i| i.path.as_deref() == Some(rel.as_str()))
                .unwrap_or_else(|| panic!("{rel} is at a final path without a record: {task:#?}"));
            let bytes = std::fs::read(file.path()).unwrap();
            assert_eq!(img.state, ImageState::Downloaded, "{rel}");
            assert_eq!(
                img.sha256.as_deref(),
                Some(sha256_hex(&bytes).as_str()),
                "{rel}"
            );
            assert_eq!(img.bytes, Some(bytes.len() as u64), "{rel}");
        }
    }
    for scanned in d.store.all_tasks() {
        let coverd::store::Scanned::Task(task) = scanned.unwrap() else {
            panic!("a record that cannot be decoded");
        };
        for img in &task.images {
            match img.state {
                ImageState::Downloaded => {
                    let path = img.path.as_deref().expect("stored image has a path");
                    assert!(root.join(path).is_file(), "{path} missing");
                }
                _ => assert!(img.path.is_none(), "{task:#?}"),
            }
        }
    }
}

#[derive(Debug)]
enum Want {
    /// Stored after this many fetches, with this extension.
    Stored { attempts: u32, ext: &'static str },
    /// Failed for good after this many fetches; the error contains each string.
    Failed {
        attempts: u32,
        error: &'static [&'static str],
    },
}

struct Case {
    name: &'static str,
    behaviour: Behaviour,
    want: Want,
}

/// Runs each case as a task with one image at `/case/<n>.png`, all at once in one daemon,
/// then checks records, fetch counts and the data directory.
async fn run_cases(fake: &FakeKie, d: &Daemon, prefix: &str, cases: Vec<Case>) {
    let path = |n: usize| format!("/{prefix}/{n}.png");
    for (n, case) in cases.iter().enumerate() {
        fake.files.set(&path(n), case.behaviour.clone());
    }
    for n in 0..cases.len() {
        deliver(d, &format!("{prefix}-{n}"), &[fake.files.url(&path(n))]).await;
    }
    for (n, case) in cases.iter().enumerate() {
        let id = format!("{prefix}-{n}");
        let t = d.wait_for(&id, finished).await;
        let img = &t.images[0];
        let name = case.name;
        match case.want {
            Want::Stored { attempts, ext } => {
                assert_eq!(t.state, State::Downloaded, "{name}: {t:#?}");
                assert_eq!(img.state, ImageState::Downloaded, "{name}");
                assert_eq!(img.attempts, attempts, "{name}: {t:#?}");
                assert_eq!(
                    img.path.as_deref(),
                    Some(format!("images/{id}/0.{ext}").as_str()),
                    "{name}"
                );
                assert_eq!((t.error.as_deref(), img.error.as_deref()), (None, None));
            }
            Want::Failed { attempts, error } => {
                assert_eq!(t.state, State::Failed, "{name}: {t:#?}");
                assert_eq!(img.state, ImageState::Failed, "{name}");
                assert_eq!(img.attempts, attempts, "{name}: {t:#?}");
                let img_err = img.error.as_deref().unwrap_or_default();
                let task_err = t.error.as_deref().unwrap_or_default();
                for part in error {
                    assert!(img_err.contains(part), "{name}: image error {img_err:?}");
                    assert!(task_err.contains(part), "{name}: task error {task_err:?}");
                }
                assert!(img.path.is_none() && img.sha256.is_none(), "{name}");
            }
        }
        let attempts = match case.want {
            Want::Stored { attempts, .. } | Want::Failed { attempts, .. } => attempts,
        };
        assert_eq!(fake.files.hits(&path(n)), attempts, "{name}: fetches");
    }
    check_disk(d);
}

#[tokio::test]
async fn every_failure_class() {
    const MAX: u64 = 16 * 1024;
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |c| {
        c.download.max_attempts = 3;
        c.download.max_image_bytes = MAX;
    })
    .await;
    let img = || png(3000);
    let gave_up: &[&str] = &["gave up after 3 attempts"];
    let cases = vec![
        Case {
            name: "plain image",
            behaviour: Behaviour::Image(img()),
            want: Want::Stored {
                attempts: 1,
                ext: "png",
            },
        },
        Case {
            name: "500 twice, then the image",
            behaviour: Behaviour::FailFirst {
                failures: 2,
                bytes: img(),
            },
            want: Want::Stored {
                attempts: 3,
                ext: "png",
            },
        },
        Case {
            name: "500 for good",
            behaviour: Behaviour::Status(500),
            want: Want::Failed {
                attempts: 3,
                error: &["HTTP 500", "gave up after 3 attempts"],
            },
        },
        Case {
            name: "503 for good",
            behaviour: Behaviour::Status(503),
            want: Want::Failed {
                attempts: 3,
                error: &["HTTP 503", "gave up after 3 attempts"],
            },
        },
        Case {
            name: "408 for good",
            behaviour: Behaviour::Status(408),
            want: Want::Failed {
                attempts: 3,
                error: &["HTTP 408"],
            },
        },
        Case {
            name: "429 with Retry-After",
            behaviour: Behaviour::StatusRetryAfter(429, "1".into()),
            want: Want::Failed {
                attempts: 3,
                error: &["HTTP 429"],
            },
        },
        Case {
            name: "404",
            behaviour: Behaviour::Status(404),
            want: Want::Failed {
                attempts: 1,
                error: &["HTTP 404"],
            },
        },
        Case {
            name: "403",
            behaviour: Behaviour::Status(403),
            want: Want::Failed {
                attempts: 1,
                error: &["HTTP 403"],
            },
        },
        Case {
            name: "410",
            behaviour: Behaviour::Status(410),
            want: Want::Failed {
                attempts: 1,
                error: &["HTTP 410"],
            },
        },
        Case {
            name: "400 is permanent",
            behaviour: Behaviour::Status(400),
            want: Want::Failed {
                attempts: 1,
                error: &["HTTP 400"],
            },
        },
        Case {
            name: "body cut short of its Content-Length",
            behaviour: Behaviour::CutBody {
                bytes: img(),
                sent: 1000,
            },
            want: Want::Failed {
                attempts: 3,
                error: &["cut off", "gave up after 3 attempts"],
            },
        },
        Case {
            name: "chunked body broken off",
            behaviour: Behaviour::BrokenBody {
                bytes: img(),
                sent: 1000,
            },
            want: Want::Failed {
                attempts: 3,
                error: gave_up,
            },
        },
        Case {
            name: "HTML page",
            behaviour: Behaviour::Html(
                "<!DOCTYPE html><html><body>Just a moment…</body></html>".into(),
            ),
            want: Want::Failed {
                attempts: 1,
                error: &["not an image"],
            },
        },
        Case {
            name: "oversized with Content-Length",
            behaviour: Behaviour::Oversized {
                len: Some(10 * MAX),
            },
            want: Want::Failed {
                attempts: 1,
                error: &["larger than 16384 bytes"],
            },
        },
        Case {
            name: "oversized endless chunked",
            behaviour: Behaviour::Oversized { len: None },
            want: Want::Failed {
                attempts: 1,
                error: &["larger than 16384 bytes"],
            },
        },
        Case {
            name: "image one byte over the limit",
            behaviour: Behaviour::Image(png(MAX as usize + 1)),
            want: Want::Failed {
                attempts: 1,
                error: &["larger than"],
            },
        },
        Case {
            name: "image exactly at the limit",
            behaviour: Behaviour::Image(png(MAX as usize)),
            want: Want::Stored {
                attempts: 1,
                ext: "png",
            },
        },
        Case {
            name: "PNG served as text/plain",
            behaviour: Behaviour::ImageAs(img(), "text/plain"),
            want: Want::Stored {
                attempts: 1,
                ext: "png",
            },
        },
        Case {
            name: "JPEG behind a .png URL, as octet-stream",
            behaviour: Behaviour::ImageAs(jpeg(3000), "application/octet-stream"),
            want: Want::Stored {
                attempts: 1,
                ext: "jpg",
            },
        },
    ];
    run_cases(&fake, &d, "class", cases).await;
    // No API key: a 403/404/410 is not refreshed through KIE's download-url.
    assert_eq!(fake.api.calls(Endpoint::DownloadUrl), 0);
    assert_eq!(fake.api.calls(Endpoint::Any), 0);
    d.stop().await;
}

#[tokio::test]
async fn slow_and_stalled_bodies() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |c| {
        c.download.timeout = Duration::from_millis(800);
        c.download.max_attempts = 2;
    })
    .await;
    let stall = Duration::from_secs(5);
    let cases = vec![
        Case {
            name: "stalls after its first bytes",
            behaviour: Behaviour::SlowBody {
                bytes: png(3000),
                first: 500,
                stall,
            },
            want: Want::Failed {
                attempts: 2,
                error: &["timed out", "gave up after 2 attempts"],
            },
        },
        // `download.timeout` is a stall timeout, not a limit on the whole request: a body
        // that keeps flowing is stored however long it takes (below
        // `download.min_bytes_per_second` over 30 s it would fail: `fetch::a_body_below_the_
        // speed_floor_is_too_slow`).
        Case {
            name: "trickles for longer than the timeout",
            behaviour: Behaviour::Trickle {
                bytes: png(3000),
                chunk: 100,
                every: Duration::from_millis(100),
            },
            want: Want::Stored {
                attempts: 1,
                ext: "png",
            },
        },
        Case {
            name: "short stall within the timeout",
            behaviour: Behaviour::SlowBody {
                bytes: png(3000),
                first: 500,
                stall: Duration::from_millis(50),
            },
            want: Want::Stored {
                attempts: 1,
                ext: "png",
            },
        },
    ];
    run_cases(&fake, &d, "slow", cases).await;
    d.stop().await;
}

#[tokio::test]
async fn one_failed_image_fails_the_task_and_keeps_the_other() {
    let fake = FakeKie::start().await;
    let good = png(5000);
    fake.files
        .set("/m/good.png", Behaviour::Image(good.clone()));
    fake.files.set("/m/gone.png", Behaviour::Status(404));
    fake.files
        .set("/m/html.png", Behaviour::Html("<html></html>".into()));
    let d = Daemon::start(&fake, |_| {}).await;
    let id = "mixed";
    let urls = [
        fake.files.url("/m/good.png"),
        fake.files.url("/m/gone.png"),
        fake.files.url("/m/html.png"),
    ];
    deliver(&d, id, &urls).await;
    let t = d.wait_for(id, finished).await;
    assert_eq!(t.state, State::Failed, "{t:#?}");
    let states: Vec<_> = t.images.iter().map(|i| i.state).collect();
    assert_eq!(
        states,
        [
            ImageState::Downloaded,
            ImageState::Failed,
            ImageState::Failed
        ]
    );
    let err = t.error.as_deref().unwrap();
    assert!(
        err.contains("image 1: HTTP 404") && err.contains("image 2: not an image"),
        "{err}"
    );
    let kept = d.dir.path().join(format!("images/{id}/0.png"));
    assert_eq!(std::fs::read(&kept).unwrap(), good.to_vec());
    assert_eq!(
        t.images[0].sha256.as_deref(),
        Some(sha256_hex(&good).as_str())
    );
    check_disk(&d);
    // Only a generation failure is revived by a later success: a download failure stays,
    // and the delivery is only counted (`admin retry` is the way back).
    assert_eq!(
        d.callback(&success_body(id, &urls)).await,
        (200, RECEIVED.to_string())
    );
    let again = d.task(id).unwrap();
    assert_eq!((again.state, again.callbacks), (State::Failed, 2));
    assert_eq!(again.images, t.images);
    assert_eq!(fake.files.hits("/m/good.png"), 1);
    assert_eq!(fake.files.hits("/m/gone.png"), 1);
    // Stopping does not remove it either.
    let (dir, _) = d.stop().await;
    assert_eq!(
        std::fs::read(dir.path().join(format!("images/{id}/0.png"))).unwrap(),
        good.to_vec()
    );
}

/// A listener on 127.0.0.2 that serves a PNG to anyone who connects and counts them: a
/// forbidden target that would succeed if the guard let the daemon through.
struct Trap {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Trap {
    async fn start() -> Trap {
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0")
            .await
            .expect("bind 127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback)");
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            let body: Bytes = png(2000);
            while let Ok((mut s, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                });
            }
        });
        Trap { addr, hits, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Delivers one task per URL and expects each image refused at once, with `reason` in its
/// error; returns nothing, panics otherwise.
async fn expect_refused(d: &Daemon, prefix: &str, urls: &[String], reason: &str) {
    for (n, url) in urls.iter().enumerate() {
        deliver(d, &format!("{prefix}-{n}"), std::slice::from_ref(url)).await;
    }
    for (n, url) in urls.iter().enumerate() {
        let t = d.wait_for(&format!("{prefix}-{n}"), finished).await;
        assert_eq!(t.state, State::Failed, "{url}: {t:#?}");
        let img = &t.images[0];
        assert_eq!(img.attempts, 1, "{url}: a refusal is permanent");
        let err = img.error.as_deref().unwrap_or_default();
        assert!(
            err.contains("refused") && err.contains(reason),
            "{url}: {err:?}"
        );
    }
    check_disk(d);
}

#[tokio::test]
async fn url_guard_refuses_forbidden_targets() {
    let fake = FakeKie::start().await;
    let trap = Trap::start().await;
    let port = trap.addr.port();
    fake.files
        .set("/r/to-trap", Behaviour::Redirect(trap.url("/x.png")));
    fake.files.set(
        "/r/to-metadata",
        Behaviour::Redirect("http://169.254.169.254/latest/meta-data".into()),
    );
    fake.files.set(
        "/r/to-file",
        Behaviour::Redirect("file:///etc/passwd".into()),
    );
    let d = Daemon::start(&fake, |_| {}).await;

    let direct = [
        trap.url("/x.png"),
        format!("http://[::ffff:127.0.0.2]:{port}/x.png"),
        format!("http://[::1]:{port}/x.png"),
        "http://10.0.0.1/x.png".to_string(),
        "http://192.168.1.1/x.png".to_string(),
        "http://169.254.169.254/latest/meta-data".to_string(),
        "http://0.0.0.0/x.png".to_string(),
        "file:///etc/passwd".to_string(),
        "ftp://example.com/x.png".to_string(),
        format!("http://user:pw@{}/x.png", fake.addr),
    ];
    expect_refused(&d, "guard", &direct, "").await;

    let redirects = [
        fake.files.url("/r/to-trap"),
        fake.files.url("/r/to-metadata"),
    ];
    expect_refused(&d, "redirect", &redirects, "redirect target").await;
    // reqwest does not follow (nor show the redirect policy) a hop to a scheme it cannot
    // fetch: the unfollowed 302 is refused, permanently.
    deliver(&d, "redirect-file", &[fake.files.url("/r/to-file")]).await;
    let t = d.wait_for("redirect-file", finished).await;
    assert_eq!(t.state, State::Failed, "{t:#?}");
    assert_eq!(t.images[0].attempts, 1);
    assert_eq!(
        t.images[0].error.as_deref(),
        Some("refused URL: HTTP 302 redirect to a location that is not http(s)")
    );
    check_disk(&d);
    for p in ["/r/to-trap", "/r/to-metadata", "/r/to-file"] {
        assert_eq!(fake.files.hits(p), 1, "{p}");
    }
    assert_eq!(trap.hits(), 0, "the daemon connected to a forbidden target");
    // The credentials case never reached the fake either.
    assert_eq!(fake.files.hits("/x.png"), 0);
    d.stop().await;
}

#[tokio::test]
async fn url_guard_follows_the_config() {
    let fake = FakeKie::start().await;
    fake.files.set("/h/a.png", Behaviour::Image(png(2000)));
    fake.files.set("/h/b.png", Behaviour::Image(png(2000)));

    let d = Daemon::start(&fake, |c| c.download.allow_http = false).await;
    expect_refused(&d, "nohttp", &[fake.files.url("/h/a.png")], "plain http").await;
    d.stop().await;
    assert_eq!(fake.files.hits("/h/a.png"), 0);

    let d = Daemon::start(&fake, |c| {
        c.download.allowed_hosts = vec!["tempfile.aiquickdraw.com".into()];
    })
    .await;
    expect_refused(
        &d,
        "hosts",
        &[fake.files.url("/h/b.png")],
        "not in download.allowed_hosts",
    )
    .await;
    d.stop().await;
    assert_eq!(fake.files.hits("/h/b.png"), 0);
}

/// The store fails while an image is being fetched: the file lands at its final path but its
/// record cannot be written. The worker backs off instead of spinning, and once the store is
/// back the file on disk is adopted, not fetched again.
#[tokio::test]
async fn a_store_failure_after_the_fetch_is_healed_by_adoption() {
    let fake = FakeKie::start().await;
    let bytes = png(20_000);
    fake.files.set(
        "/s/slow.png",
        Behaviour::SlowBody {
            bytes: bytes.clone(),
            first: 100,
            stall: Duration::from_millis(300),
        },
    );
    let d = Daemon::start(&fake, |_| {}).await;
    let id = "storeflaky";
    deliver(&d, id, &[fake.files.url("/s/slow.png")]).await;
    // The fetch is under way (first bytes sent); make the store fail before it completes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.files.hits("/s/slow.png") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fetch never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.store.inject_write_failures(true);
    let final_path = d.dir.path().join(format!("images/{id}/0.png"));
    while !final_path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "file never installed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(d.task(id).unwrap().images[0].state, ImageState::Pending);
    d.store.inject_write_failures(false);

    let t = d.wait_for(id, |t| t.state == State::Downloaded).await;
    assert_eq!(
        fake.files.hits("/s/slow.png"),
        1,
        "adopted, not fetched twice"
    );
    assert_eq!(
        t.images[0].sha256.as_deref(),
        Some(sha256_hex(&bytes).as_str())
    );
    check_disk(&d);
    d.stop().await;
}

/// While the store cannot take writes, no image is fetched whose result could not be
/// recorded, however often its retry falls due; afterwards it goes ahead.
#[tokio::test]
async fn downloads_pause_while_the_store_cannot_take_writes() {
    let fake = FakeKie::start().await;
    let bytes = png(2500);
    fake.files.set(
        "/s/later.png",
        Behaviour::FailFirst {
            failures: 1,
            bytes: bytes.clone(),
        },
    );
    // The retry waits for the test's clock, not for real time.
    let d = Daemon::start(&fake, |c| {
        c.download.backoff_base = Duration::from_secs(3600);
        c.download.backoff_max = Duration::from_secs(3600);
    })
    .await;
    let id = "storepause";
    deliver(&d, id, &[fake.files.url("/s/later.png")]).await;
    // The first fetch gets a 500: the image waits for its retry.
    let t = d.wait_for(id, |t| t.images[0].attempts == 1).await;
    assert_eq!(t.images[0].state, ImageState::Pending);
    assert_eq!(fake.files.hits("/s/later.png"), 1);

    d.store.inject_write_failures(true);
    for _ in 0..4 {
        d.advance(Duration::from_secs(2 * 3600));
        d.wake();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        fake.files.hits("/s/later.png"),
        1,
        "nothing fetched while its result could not be recorded"
    );

    d.store.inject_write_failures(false);
    let t = d.wait_for(id, |t| t.state == State::Downloaded).await;
    assert_eq!(t.images[0].attempts, 2);
    assert_eq!(fake.files.hits("/s/later.png"), 2);
    d.stop().await;
}
