//! Full disks, on real small tmpfs mounts. With the real binary: the data directory fills up
//! while callbacks arrive; callbacks then get 503 and `/healthz` 503; no callback that got a
//! 200 is lost; once space is freed the daemon exits with status 75 (never 0), and
//! restarted, as systemd's `Restart=on-failure` would, it takes callbacks again, all within
//! 30 s. In process: a full `tmp/` while an image is written uses up no attempt.
//! Mounting needs root (CI has it); where `mount` is refused a test says why and skips.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use coverd::model::{ImageState, State};

use crate::bin_util::{Daemon, PATIENCE, Scratch};
use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, png};
use crate::harness::{self, failure_body, success_body, test_config};

/// The tmpfs: room for sled's first log segments; a filler file takes the rest.
const TMPFS_SIZE: &str = "size=24m";
/// SPEC: callbacks are taken again within this long after the cause is gone.
const RECOVERY: Duration = Duration::from_secs(30);

/// Unmounts the tmpfs when the test ends, whatever happened.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &Path, size: &str) -> Result<Unmount, String> {
    std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("{size},mode=0700")])
        .arg("coverd-diskfull")
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if out.status.success() {
        Ok(Unmount(at.to_path_buf()))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Writes zeros to `path` until the file system is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

/// One callback for a new task `full<n>` (a failure report: no download, only the store is
/// exercised); its status, and its id in `acked` on a 200.
async fn send(daemon: &Daemon, n: &mut u32, acked: &mut BTreeSet<String>) -> u16 {
    *n += 1;
    let id = format!("full{n:05}");
    let (status, _) = daemon
        .callback(failure_body(&id, 501, "generation failed"))
        .await
        .expect("callback answered");
    if status == 200 {
        acked.insert(id);
    }
    status
}

#[tokio::test]
async fn a_full_disk_is_503_then_exit_75_and_no_200_is_lost() {
    let scratch = Scratch::new();
    let data = scratch.data_dir();
    let _unmount = match mount_tmpfs(&data, TMPFS_SIZE) {
        Ok(guard) => guard,
        Err(reason) => {
            eprintln!(
                "skipped: cannot mount a tmpfs at {} ({reason})",
                data.display()
            );
            return;
        }
    };
    let fake = FakeKie::start().await;
    scratch.write_config(&fake.base_url(), "", "");
    let daemon = scratch.serve().await;

    let mut acked = BTreeSet::new();
    let mut n = 0;
    for _ in 0..20 {
        assert_eq!(send(&daemon, &mut n, &mut acked).await, 200);
    }

    // The disk fills up while callbacks keep coming: they get 503 (so KIE retries).
    let filler = data.join("filler");
    fill(&filler);
    let deadline = Instant::now() + PATIENCE;
    let mut refused = 0;
    while refused < 5 {
        match send(&daemon, &mut n, &mut acked).await {
            200 => {}
            503 => refused += 1,
            other => panic!(
                "callback answered {other} on a full disk:\n{}",
                daemon.logs()
            ),
        }
        assert!(
            Instant::now() < deadline,
            "no 503 on a full disk after {n} callbacks:\n{}",
            daemon.logs()
        );
    }
    let (status, body) = daemon.get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot take writes"), "{body}");
    // In words, not as a Rust `Debug` dump of sled's copy of the error.
    assert!(body.contains("No space left on device"), "{body}");
    for dump in ["Os {", "kind:", "Custom {"] {
        assert!(!body.contains(dump), "a Debug dump on /healthz: {body}");
    }

    // Space comes back: the daemon notices and exits 75 to reopen its store.
    std::fs::remove_file(&filler).expect("remove filler");
    let freed = Instant::now();
    let (status, logs) = daemon.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(75),
        "exit status after a store failure:\n{logs}"
    );
    for pause in ["polls paused", "downloads paused", "failed to flush"] {
        assert!(
            logs.matches(pause).count() <= 1,
            "logged in a loop:\n{logs}"
        );
    }
    // One failure, one line (SPEC "Logs"): sled's own reports of it (a Debug dump per tree
    // when the store closes) are not repeated.
    assert_eq!(
        logs.matches("the store cannot take writes;").count(),
        1,
        "{logs}"
    );
    for dump in ["Os {", "kind:", "Custom {"] {
        assert!(!logs.contains(dump), "a Debug dump in the log:\n{logs}");
    }

    // Restarted (systemd adds RestartSec): callbacks are taken again within 30 s.
    let daemon = scratch.serve().await;
    assert_eq!(send(&daemon, &mut n, &mut acked).await, 200);
    let took = freed.elapsed();
    assert!(took < RECOVERY, "callbacks taken again only after {took:?}");

    // Every callback that got a 200 is there.
    let out = scratch.run(&["admin", "export"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let stored: BTreeSet<String> = out
        .stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("export line");
            v["task_id"].as_str().unwrap().to_string()
        })
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let logs = daemon.stop().await;
    assert!(!logs.contains("panicked"), "{logs}");
}

/// ENOSPC while an image's temp file is written is the disk's fault: with
/// `download.max_attempts = 1` the image is neither failed nor charged an attempt; downloads
/// pause and try again, and once there is room the image is stored.
#[tokio::test]
async fn a_full_disk_writing_an_image_uses_up_no_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let unmount = match mount_tmpfs(dir.path(), TMPFS_SIZE) {
        Ok(guard) => guard,
        Err(reason) => {
            eprintln!(
                "skipped: cannot mount a tmpfs at {} ({reason})",
                dir.path().display()
            );
            return;
        }
    };
    let fake = FakeKie::start().await;
    let bytes = png(2 * 1024 * 1024);
    fake.files
        .set("/s/big.png", Behaviour::Image(bytes.clone()));
    let mut config = test_config(dir.path(), &fake);
    config.download.max_attempts = 1;
    config.accept_unknown_tasks = true;
    let filler = dir.path().join("filler");
    // The tmpfs is far smaller than the 1 GiB a fetch must leave free: this test is about
    // a disk that fills during the write, so the reserve is off.
    let d = harness::Daemon::start_with(dir, config, |h| h.free_space_reserve = Some(0)).await;
    // Room for the store's few writes, not for the image.
    fill(&filler);
    let full = std::fs::metadata(&filler).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&filler)
        .and_then(|f| f.set_len(full.saturating_sub(512 * 1024)))
        .expect("shrink filler");
    let id = "tmpfull";
    let (status, body) = d
        .callback(&success_body(id, &[fake.files.url("/s/big.png")]))
        .await;
    assert_eq!(status, 200, "{body}");

    // Tried, hit the full disk, paused, tried again: not one attempt used.
    let deadline = Instant::now() + PATIENCE;
    while fake.files.hits("/s/big.png") < 2 {
        let t = d.task(id).unwrap();
        assert_eq!(t.images[0].state, ImageState::Pending, "{t:?}");
        assert!(Instant::now() < deadline, "no second try: {t:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = d.task(id).unwrap();
    assert_eq!(
        (t.images[0].state, t.images[0].attempts),
        (ImageState::Pending, 0)
    );
    assert_eq!(d.store.write_failure(), None, "the store itself had room");

    // Room again: stored at the next try.
    std::fs::remove_file(&filler).expect("remove filler");
    let t = d.wait_for(id, |t| t.state == State::Downloaded).await;
    assert_eq!(t.images[0].attempts, 1);
    let (dir, _) = d.stop().await;
    drop(unmount);
    drop(dir);
}
