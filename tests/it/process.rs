//! The daemon process's edges that no in-process test can see, run as the real binary: every
//! directory and file it creates is private (0700 / 0600) from the moment it exists even
//! when started under umask 000, the admin socket included; SIGHUP is logged and survived;
//! out of file descriptors, the listener sheds idle connections instead of spinning.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::bin_util::{BIN, Daemon, PATIENCE, Scratch, coverd, files_under, tree};
use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, png};
use crate::harness::{callback_on_a_new_connection, success_body};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `coverd serve --config …` started by a shell that first runs `setup` (e.g. `umask 000`).
pub(crate) fn serve_after(setup: &str, scratch: &Scratch) -> Command {
    coverd_after(setup, scratch, &["serve"])
}

/// `coverd --config … ARGS` started by a shell that first runs `setup`.
fn coverd_after(setup: &str, scratch: &Scratch, args: &[&str]) -> Command {
    let clean = coverd(); // the scrubbed environment, applied to the shell below
    let mut cmd = Command::new("sh");
    for (k, v) in clean.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.arg("-c")
        .arg(format!(r#"{setup} && exec "$0" "$@""#))
        .arg(BIN)
        .arg("--config")
        .arg(scratch.config_path())
        .args(args)
        .stdin(std::process::Stdio::null());
    cmd
}

/// Every directory under `data` is 0700 and every other file 0600.
fn assert_private(data: &Path) {
    // (sled may replace a snapshot file meanwhile: one that vanished is skipped.)
    let loose: Vec<String> = tree(data)
        .iter()
        .filter_map(|p| {
            let meta = std::fs::symlink_metadata(p).ok()?;
            let want = if meta.is_dir() { 0o700 } else { 0o600 };
            let mode = meta.permissions().mode() & 0o777;
            (mode != want).then(|| format!("{} {mode:o}", p.display()))
        })
        .collect();
    assert!(loose.is_empty(), "not private under umask 000: {loose:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_is_private_from_the_start_even_under_umask_000() {
    let fake = FakeKie::start().await;
    let slow = png(8 * 1024);
    fake.files.set("/fast.png", Behaviour::Image(png(3000)));
    // Stalls long enough for its temp file to be seen.
    fake.files.set(
        "/slow.png",
        Behaviour::SlowBody {
            bytes: slow,
            first: 1024,
            stall: Duration::from_secs(2),
        },
    );
    let scratch = Scratch::new();
    scratch.write_config(&fake.base_url(), "", "");
    let data = scratch.data_dir();

    // Watches for the socket from before the daemon starts: its mode and its directory's
    // at the first moment it exists at its path.
    let socket = data.join("admin.sock");
    let watcher = {
        let (socket, data) = (socket.clone(), data.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + PATIENCE;
            loop {
                if let Ok(meta) = std::fs::symlink_metadata(&socket) {
                    return (meta.permissions().mode() & 0o777, mode(&data));
                }
                assert!(Instant::now() < deadline, "admin.sock never appeared");
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let d = Daemon::spawn(serve_after("umask 000", &scratch), data.clone()).await;
    let (socket_mode, dir_mode) = watcher.join().unwrap();
    assert_eq!(
        (socket_mode, dir_mode),
        (0o600, 0o700),
        "admin.sock and the data directory when the socket first appeared"
    );
    assert!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket()
    );

    let id = "modes1";
    let urls = [fake.files.url("/fast.png"), fake.files.url("/slow.png")];
    assert_eq!(d.callback(success_body(id, &urls)).await.unwrap().0, 200);
    // A partial download: private too.
    let tmp = data.join("tmp");
    let deadline = Instant::now() + PATIENCE;
    let part = loop {
        if let Some(f) = files_under(&tmp, &tmp).first() {
            break tmp.join(f);
        }
        assert!(Instant::now() < deadline, "no temp file ever seen in tmp/");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    if let Ok(meta) = std::fs::symlink_metadata(&part) {
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            part.display()
        );
    }
    crate::bin_util::wait_status(&scratch, "task downloaded", |s| {
        s["tasks"]["downloaded"] == 1
    })
    .await;

    let all = tree(&data);
    assert!(all.iter().any(|p| p.ends_with("images/modes1/1.png")));
    assert!(all.iter().any(|p| p.starts_with(data.join("db"))));
    assert_private(&data);
    d.stop().await;

    // The commands that open the store themselves create a data directory privately too.
    let offline = Scratch::new();
    offline.write_config(&fake.base_url(), "", "");
    let out = crate::bin_util::run(coverd_after(
        "umask 000",
        &offline,
        &["admin", "track", "modes2"],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(offline.data_dir().join("db").is_dir());
    assert_private(&offline.data_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_logged_and_the_daemon_keeps_serving() {
    let (_fake, scratch) = Scratch::with_fake().await;
    let d = scratch.serve().await;
    d.signal("HUP");
    d.wait_for_log("no configuration reload; restart to apply changes")
        .await;
    let logs = d.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("no configuration reload"))
        .unwrap();
    assert!(line.contains("WARN"), "not a warning: {line}");
    // Still alive and serving, the callback path included.
    assert_eq!(d.get("/healthz").await, (200, "ok".into()));
    assert_eq!(
        d.callback(crate::harness::failure_body("hup1", 501, "failed"))
            .await
            .unwrap()
            .0,
        200
    );
    // A second one too, and then a normal stop.
    d.signal("HUP");
    let deadline = Instant::now() + PATIENCE;
    while d.logs().matches("no configuration reload").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "second SIGHUP not logged:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(d.get("/healthz").await, (200, "ok".into()));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_listener_sheds_idle_connections_and_recovers() {
    let (_fake, scratch) = Scratch::with_fake().await;
    // 48 descriptors, soft and hard: the daemon holds about 15 of its own, so the
    // connections below run it out of descriptors well before its minimum cap of 64.
    let d = Daemon::spawn(serve_after("ulimit -n 48", &scratch), scratch.data_dir()).await;
    let mut crowd = Vec::new();
    for _ in 0..150 {
        let mut s = tokio::net::TcpStream::connect(d.addr)
            .await
            .expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: crowd\r\n\r\n")
            .await
            .expect("send");
        crowd.push(s);
    }
    d.wait_for_log("cannot accept connections").await;
    // Idle connections are shed to free descriptors, so a callback gets through long before
    // the crowd's idle timeout (10 s) would have freed them.
    // On a fresh connection (the daemon's test client keeps one from its start-up checks).
    let body = crate::harness::failure_body("fds1", 501, "failed");
    let (took, answer) = callback_on_a_new_connection(&d.base, body, PATIENCE).await;
    let answer = answer
        .expect("callback answered")
        .expect("callback sent")
        .status();
    assert_eq!(answer, 200);
    assert!(
        took < Duration::from_secs(5),
        "callback answered after {took:?}"
    );
    assert_eq!(d.get("/healthz").await, (200, "ok".into()));
    // One warning for the episode, not one per try.
    let warnings = d.logs().matches("cannot accept connections").count();
    assert!(warnings <= 2, "{warnings} warnings:\n{}", d.logs());
    drop(crowd);
    d.stop().await;
}
