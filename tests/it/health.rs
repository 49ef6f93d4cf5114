//! What `/healthz` and the exit status say when part of the daemon can no longer do its
//! work (SPEC "Signals, failures, exit status"): a failed flush is final for the process
//! (in process here; with real syscall errors under strace in `fsyncgate.rs`), a stopped
//! worker (download, poll and notify loops, the store's writer and flusher threads) makes
//! `/healthz` 503 naming it at once and the daemon exit with status 70 within 5 s (in
//! process, and the real binary), and a store that cannot be opened says so promptly.

use std::time::{Duration, Instant};

use coverd::config::Secret;
use coverd::daemon::{DaemonError, Faults, Worker};
use coverd::store::{Store, StoreError};

use crate::bin_util::{PATIENCE, Scratch};
use crate::fake_kie::FakeKie;
use crate::harness::{Daemon, failure_body};

/// SPEC: a daemon whose worker died exits within this long.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// Polls `/healthz` until it answers 503 (a condition, not a sleep); its body.
async fn wait_unhealthy(d: &Daemon) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = d.get("/healthz").await;
        if status == 503 {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz stayed {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---- a failed flush is final ----

/// One round fails (as an `fdatasync` returning EIO would); the rounds after it would
/// succeed, as the kernel's would ("fsyncgate"), yet no later callback is answered 200, and
/// `/healthz` says why in words, not as a Rust `Debug` dump.
#[tokio::test]
async fn after_a_failed_flush_no_callback_is_acknowledged() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |c| c.accept_unknown_tasks = true).await;
    let (status, body) = d.callback(&failure_body("before", 501, "x")).await;
    assert_eq!(status, 200, "{body}");
    d.store.fail_next_flush_for_test();
    let (status, body) = d.callback(&failure_body("failed", 501, "x")).await;
    assert_eq!(status, 503, "{body}");
    for n in 0..5 {
        let (status, body) = d
            .callback(&failure_body(&format!("after{n}"), 501, "x"))
            .await;
        assert_eq!(status, 503, "a callback after a failed flush: {body}");
    }
    // Writes outside `apply` (intents, notifications, the health stamp) are refused too.
    let err = d.store.flush().await.unwrap_err();
    assert!(matches!(err, StoreError::Flush(_)), "{err}");
    let (status, body) = d.get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("Input/output error (os error 5)"), "{body}");
    assert!(!body.contains("Os {") && !body.contains("kind:"), "{body}");
    assert!(d.store.needs_reopen(), "only a restart clears it");
}

// ---- stopped workers ----

/// A daemon with every worker (a notification URL turns the notifier on) and test faults.
async fn daemon_with_faults(fake: &FakeKie) -> (Daemon, std::sync::Arc<Faults>) {
    let faults = std::sync::Arc::new(Faults::default());
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::harness::test_config(dir.path(), fake);
    config.accept_unknown_tasks = true;
    config.notify.url = Some(format!("{}/hook", fake.base_url()));
    config.notify.secret = Some(Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
    let hooks_faults = faults.clone();
    let d = Daemon::start_with(dir, config, move |h| h.faults = Some(hooks_faults)).await;
    (d, faults)
}

/// Each worker in turn panics: `/healthz` answers 503 naming it at once, and the daemon
/// stops by itself with the error whose exit status is 70, within 5 s.
#[tokio::test]
async fn a_stopped_worker_is_named_on_healthz_and_exits_70() {
    let fake = FakeKie::start().await;
    for worker in Worker::ALL {
        let (d, faults) = daemon_with_faults(&fake).await;
        let (status, body) = d.get("/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok"), "{worker:?}");
        faults.stop(worker);
        let stopped = Instant::now();
        let body = wait_unhealthy(&d).await;
        assert!(
            body.contains("worker stopped") && body.contains(worker.name()),
            "{worker:?}: {body}"
        );
        let result = d.wait_stopped().await;
        let took = stopped.elapsed();
        match result {
            Err(e @ DaemonError::WorkerStopped { .. }) => {
                assert_eq!(e.exit_status(), 70, "{e}");
                assert!(e.to_string().contains(worker.name()), "{e}");
            }
            other => panic!("{worker:?}: the daemon ended with {other:?}"),
        }
        assert!(
            took < EXIT_WITHIN,
            "{worker:?}: stopped only after {took:?}"
        );
    }
}

/// With the writer thread dead, callbacks are answered by what the store can do: 503, never
/// a hang or a 200 that was not stored.
#[tokio::test]
async fn with_the_writer_dead_callbacks_get_503() {
    let fake = FakeKie::start().await;
    let (d, faults) = daemon_with_faults(&fake).await;
    faults.stop(Worker::StoreWriter);
    wait_unhealthy(&d).await;
    let (status, body) = d.callback(&failure_body("late", 501, "x")).await;
    assert_eq!(status, 503, "{body}");
    assert!(d.store.write_failure().is_some());
    let _ = d.wait_stopped().await;
}

/// The real binary: with the test-only `COVERD_TEST_STOP_WORKER`, SIGUSR2 makes the named
/// worker panic; `serve` exits with status 70 within 5 s and its log names the worker.
#[tokio::test]
async fn the_binary_exits_70_when_a_worker_dies() {
    let (fake, scratch) = Scratch::with_fake().await;
    let secret_file = scratch.dir.path().join("notify-secret");
    std::fs::write(&secret_file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
    let notify = format!(
        "[notify]\nurl = \"http://127.0.0.1:9/hook\"\nsecret_file = {:?}\n",
        secret_file.display().to_string()
    );
    scratch.write_config(&fake.base_url(), "", &notify);
    for (short, worker) in [
        ("download", Worker::Downloads),
        ("poll", Worker::Polls),
        ("notify", Worker::Notifications),
        ("writer", Worker::StoreWriter),
        ("flusher", Worker::StoreFlusher),
    ] {
        let mut cmd = scratch.serve_command();
        cmd.env("COVERD_TEST_STOP_WORKER", short);
        let daemon = crate::bin_util::Daemon::spawn(cmd, scratch.data_dir()).await;
        daemon.wait_for_log("test hook: SIGUSR2").await;
        daemon.signal("USR2");
        let signalled = Instant::now();
        let (status, logs) = daemon.wait_exit().await;
        let took = signalled.elapsed();
        assert_eq!(status.code(), Some(70), "{short}:\n{logs}");
        assert!(
            took < EXIT_WITHIN,
            "{short}: exited only after {took:?}:\n{logs}"
        );
        assert!(
            logs.contains(&format!("{} panicked", worker.name())),
            "{short}:\n{logs}"
        );
    }
}

// ---- a failed open ----

/// `Store::open` of `dir` right after a raw `sled::Db` of the test was dropped: sled's own
/// threads hold its lock a moment longer (nothing to await: a file lock sends no event), so
/// `Locked` is tried again; the refusal that counts is timed.
fn open_after_raw_sled(dir: &std::path::Path) -> (Result<Store, StoreError>, Duration) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let started = Instant::now();
        match Store::open(dir) {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return (other, started.elapsed()),
        }
    }
}

/// A store that cannot be opened (written by a newer coverd, or not by coverd) is refused at
/// once: the wait for sled's lock to be released used to run before sled let go of it, and
/// took its whole 10 s limit on every failed open.
#[test]
fn a_failed_open_returns_promptly() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    {
        let db = sled::open(dir.path().join("db")).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema_version", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let (result, took) = open_after_raw_sled(dir.path());
    let err = result.err().expect("a newer schema is refused");
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    // A correctness bound, not a benchmark: the bug took 10 s.
    assert!(took < Duration::from_secs(5), "refused only after {took:?}");

    let foreign = tempfile::tempdir().unwrap();
    {
        let db = sled::open(foreign.path().join("db")).unwrap();
        db.open_tree("tasks").unwrap().insert("x", "y").unwrap();
        db.flush().unwrap();
    }
    let (result, took) = open_after_raw_sled(foreign.path());
    let err = result.err().expect("a foreign db is refused");
    assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
    assert!(took < Duration::from_secs(5), "refused only after {took:?}");
    // A failed open lets go of sled's lock before it returns: opened again at once, it is
    // refused for what it is, not as locked.
    let started = Instant::now();
    let again = Store::open(foreign.path());
    assert!(
        matches!(again, Err(StoreError::Foreign { .. })),
        "{:?}",
        again.err()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}
