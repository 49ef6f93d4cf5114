//! Crash tests on the real binary: a burst of concurrent callbacks, SIGKILL in the middle of
//! it while image downloads are mid-flight, restart on the same data directory, and then:
//! every callback that got a 200 before the kill is in the store, every image of every task
//! is on disk and matches its recorded sha256 and the fake's bytes, no file under `images/`
//! lacks a record (nothing partial at a final path), and `tmp/` is empty.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use crate::bin_util::{Daemon, PATIENCE, Scratch, files_under, tmp_entries, wait_status};
use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, png, sha256_hex};
use crate::harness::success_body;

const IMAGES_PER_TASK: usize = 2;
/// Callbacks in flight at once during a burst.
const PARALLEL: usize = 32;

/// The tasks of one test: ids, and per task its image paths on the fake and their bytes.
struct Workload {
    ids: Vec<String>,
    images: HashMap<String, Vec<(String, Bytes)>>,
}

impl Workload {
    /// `n` tasks `<prefix>000…`, each with two distinct PNGs on the fake. A quarter of the
    /// tasks have a first image that trickles in (~1.6 s), another quarter a second image
    /// that stalls for 2 s after its first kilobyte: downloads are mid-flight at the kill.
    fn new(fake: &FakeKie, prefix: &str, n: usize) -> Workload {
        let mut ids = Vec::new();
        let mut images = HashMap::new();
        for t in 0..n {
            let id = format!("{prefix}{t:03}");
            let mut list = Vec::new();
            for i in 0..IMAGES_PER_TASK {
                let path = format!("/img/{id}/{i}.png");
                // Distinct lengths make distinct contents: a mix-up cannot go unnoticed.
                let bytes = png(4096 + (t * IMAGES_PER_TASK + i) * 16);
                fake.files.set(&path, slow(t, i, bytes.clone()));
                list.push((path, bytes));
            }
            images.insert(id.clone(), list);
            ids.push(id);
        }
        Workload { ids, images }
    }

    fn body(&self, fake: &FakeKie, id: &str) -> String {
        let urls: Vec<String> = self.images[id]
            .iter()
            .map(|(path, _)| fake.files.url(path))
            .collect();
        success_body(id, &urls)
    }

    fn bodies<'a>(
        &self,
        fake: &FakeKie,
        ids: impl IntoIterator<Item = &'a String>,
    ) -> Vec<(String, String)> {
        ids.into_iter()
            .map(|id| (id.clone(), self.body(fake, id)))
            .collect()
    }

    /// From now on every image is served at once.
    fn serve_fast(&self, fake: &FakeKie) {
        for list in self.images.values() {
            for (path, bytes) in list {
                fake.files.set(path, Behaviour::Image(bytes.clone()));
            }
        }
    }
}

fn slow(task: usize, index: usize, bytes: Bytes) -> Behaviour {
    match (task % 4, index) {
        (0, 0) => Behaviour::Trickle {
            chunk: bytes.len() / 16 + 1,
            every: Duration::from_millis(100),
            bytes,
        },
        (2, 1) => Behaviour::SlowBody {
            bytes,
            first: 1024,
            stall: Duration::from_secs(2),
        },
        _ => Behaviour::Image(bytes),
    }
}

/// What a burst did.
#[derive(Debug, Default)]
struct Burst {
    /// Task ids whose callback got 200 `{"status":"received"}`.
    acked: BTreeSet<String>,
    /// Answers other than that, or transport errors, before the kill: always a failure.
    unexpected: Vec<String>,
    /// Requests that failed after the kill (expected).
    cut: usize,
    kill: Option<KillReport>,
}

#[derive(Debug, Clone)]
struct KillReport {
    /// Acknowledgements when the kill was decided.
    acks: usize,
    /// Partial downloads in `tmp/` right after the kill.
    parts: usize,
    /// Files at final paths right after the kill.
    stored: usize,
}

/// When a burst SIGKILLs the daemon.
#[derive(Debug, Clone, Copy)]
struct KillAt {
    /// After this many acknowledgements (or at the end of the burst, if it has fewer).
    acks: usize,
    /// And only once a partial download sits in `tmp/` (downloads mid-flight).
    mid_download: bool,
}

/// Sends `bodies` as callbacks, `PARALLEL` at a time; with `kill`, SIGKILLs the daemon as
/// soon as its condition holds (checked after every acknowledgement, and after the burst).
async fn burst(d: Arc<Daemon>, bodies: Vec<(String, String)>, kill: Option<KillAt>) -> Burst {
    let queue = Arc::new(Mutex::new(VecDeque::from(bodies)));
    let result = Arc::new(Mutex::new(Burst::default()));
    let killed = Arc::new(AtomicBool::new(false));
    let maybe_kill = {
        let (d, result, killed) = (d.clone(), result.clone(), killed.clone());
        move |acks: usize, burst_over: bool| {
            let Some(at) = kill else { return };
            if (acks < at.acks && !burst_over)
                || (at.mid_download && tmp_entries(&d.data_dir).is_empty())
            {
                return;
            }
            if !killed.swap(true, Ordering::SeqCst) {
                d.kill();
                let report = KillReport {
                    acks,
                    parts: tmp_entries(&d.data_dir).len(),
                    stored: files_under(&d.data_dir, &d.data_dir.join("images")).len(),
                };
                result.lock().unwrap().kill = Some(report);
            }
        }
    };
    if kill.is_some_and(|k| k.mid_download) {
        // Send callbacks one at a time until a download is mid-flight, so that the kill can
        // come at the chosen acknowledgement even on a machine that starts downloads late.
        let deadline = Instant::now() + PATIENCE;
        while tmp_entries(&d.data_dir).is_empty() {
            assert!(Instant::now() < deadline, "no download ever started");
            let next = queue.lock().unwrap().pop_front();
            match next {
                Some((id, body)) => match d.callback(body).await {
                    Ok((200, answer)) if answer == r#"{"status":"received"}"# => {
                        result.lock().unwrap().acked.insert(id);
                    }
                    other => panic!("{id}: {other:?}"),
                },
                None => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..PARALLEL {
        let (d, queue, result, killed, maybe_kill) = (
            d.clone(),
            queue.clone(),
            result.clone(),
            killed.clone(),
            maybe_kill.clone(),
        );
        workers.spawn(async move {
            loop {
                if killed.load(Ordering::SeqCst) {
                    return;
                }
                let Some((id, body)) = queue.lock().unwrap().pop_front() else {
                    return;
                };
                let answer = d.callback(body).await;
                // Anything that arrives after the kill was decided may be cut short by it.
                let after_kill = killed.load(Ordering::SeqCst);
                let acks = {
                    let mut r = result.lock().unwrap();
                    match answer {
                        Ok((200, body)) if body == r#"{"status":"received"}"# => {
                            r.acked.insert(id);
                        }
                        _ if after_kill => r.cut += 1,
                        other => r.unexpected.push(format!("{id}: {other:?}")),
                    }
                    r.acked.len()
                };
                maybe_kill(acks, false);
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.expect("burst worker");
    }
    if kill.is_some() && !killed.load(Ordering::SeqCst) {
        // The burst is over before the condition held: kill at the first partial download.
        let deadline = Instant::now() + PATIENCE;
        let acks = result.lock().unwrap().acked.len();
        while !killed.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "no download ever started");
            maybe_kill(acks, true);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut r = result.lock().unwrap();
    std::mem::take(&mut *r)
}

/// Every task the daemon knows, through `coverd admin list --json` (over the admin socket).
async fn all_tasks(scratch: &Scratch) -> HashMap<String, Value> {
    let list = scratch
        .admin_json(&["list", "--limit", "10000"])
        .await
        .as_array()
        .expect("admin list --json prints an array")
        .clone();
    list.into_iter()
        .map(|t| (t["task_id"].as_str().expect("task_id").to_string(), t))
        .collect()
}

/// Asserts every acknowledged task survived the kill.
async fn assert_acked_present(scratch: &Scratch, acked: &BTreeSet<String>) {
    let tasks = all_tasks(scratch).await;
    let lost: Vec<&String> = acked.iter().filter(|id| !tasks.contains_key(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged callbacks lost by the crash: {lost:?}",
        lost.len(),
        acked.len()
    );
    for id in acked {
        assert!(
            tasks[id]["callbacks"].as_u64().unwrap_or(0) >= 1,
            "{id} has no callback recorded: {}",
            tasks[id]
        );
    }
}

/// Waits until nothing is left to do, then checks every task, every file and `tmp/`.
async fn assert_all_downloaded(scratch: &Scratch, w: &Workload) {
    let status = wait_status(scratch, "every task finished", |s| {
        s["tasks"]["submitted"] == 0 && s["tasks"]["received"] == 0
    })
    .await;
    assert_eq!(status["daemon"], "running", "{status}");
    assert_eq!(status["tasks"]["failed"], 0, "{status}");
    assert_eq!(status["tasks"]["downloaded"], w.ids.len(), "{status}");

    let data = scratch.data_dir();
    let tasks = all_tasks(scratch).await;
    assert_eq!(tasks.len(), w.ids.len());
    let mut recorded = BTreeSet::new();
    for id in &w.ids {
        let task = &tasks[id];
        assert_eq!(task["state"], "downloaded", "{task}");
        let images = task["images"].as_array().expect("images");
        assert_eq!(images.len(), IMAGES_PER_TASK, "{task}");
        for (i, (img, (_, bytes))) in images.iter().zip(&w.images[id]).enumerate() {
            assert_eq!(img["index"], i, "{task}");
            assert_eq!(img["state"], "downloaded", "{task}");
            let path = img["path"].as_str().expect("path of a stored image");
            assert_eq!(path, format!("images/{id}/{i}.png"));
            let sha = img["sha256"].as_str().expect("sha256");
            assert_eq!(
                sha,
                sha256_hex(bytes),
                "{id}/{i}: recorded hash is not the fake's"
            );
            assert_eq!(img["bytes"], bytes.len(), "{task}");
            let on_disk = std::fs::read(data.join(path))
                .unwrap_or_else(|e| panic!("{id}/{i}: stored file missing: {e}"));
            assert_eq!(
                sha256_hex(&on_disk),
                sha,
                "{id}/{i}: file differs from its record"
            );
            assert!(
                on_disk == bytes[..],
                "{id}/{i}: file differs from the fake's bytes"
            );
            recorded.insert(path.to_string());
        }
    }
    // Nothing at a final path without a record: no partial or orphaned files.
    let files: BTreeSet<String> = files_under(&data, &data.join("images"))
        .into_iter()
        .collect();
    let extra: Vec<_> = files.difference(&recorded).collect();
    assert!(
        extra.is_empty(),
        "files under images/ without a record: {extra:?}"
    );
    assert_eq!(files, recorded);
    assert_eq!(tmp_entries(&data), Vec::<PathBuf>::new(), "tmp/ not empty");
}

/// Runs the workload on one data directory through one daemon run per entry of `kills`,
/// each ending in SIGKILL, then a last run that finishes everything and checks it. Every run
/// first checks that every callback acknowledged so far is stored, then (as KIE retries)
/// sends every callback not yet acknowledged plus ten duplicates of acknowledged ones. Images
/// are slow in the first `slow_runs` runs, fast afterwards.
async fn scenario(prefix: &str, kills: &[KillAt], slow_runs: usize) {
    let started = Instant::now();
    let fake = FakeKie::start().await;
    let w = Workload::new(&fake, prefix, 200);
    let scratch = Scratch::new();
    scratch.write_config(&fake.base_url(), "concurrency = 8", "");
    let mut acked = BTreeSet::new();
    for run in 0..=kills.len() {
        if run == slow_runs {
            w.serve_fast(&fake);
        }
        let d = Arc::new(scratch.serve().await);
        assert_acked_present(&scratch, &acked).await;
        let mut send: Vec<&String> = w.ids.iter().filter(|id| !acked.contains(*id)).collect();
        send.extend(acked.iter().take(10));
        let kill = kills.get(run).copied();
        let sent = send.len();
        let b = burst(d.clone(), w.bodies(&fake, send), kill).await;
        if let Some(k) = &b.kill {
            eprintln!(
                "{prefix} run {run}: SIGKILL at {} acks with {} partial downloads in tmp/ and {} files installed",
                k.acks, k.parts, k.stored
            );
        }
        eprintln!(
            "{prefix} run {run}: {} acknowledged, {} cut by the kill, {} installed images adopted after a restart, {:?} since start",
            b.acked.len(),
            b.cut,
            d.logs()
                .matches("adopting the file stored before a restart")
                .count(),
            started.elapsed()
        );
        assert!(b.unexpected.is_empty(), "run {run}: {:?}", b.unexpected);
        let acked_now = b.acked.len();
        acked.extend(b.acked);
        match kill {
            Some(at) => {
                let report = b.kill.expect("killed");
                assert!(report.acks >= at.acks.min(w.ids.len()), "{report:?}");
                if at.mid_download {
                    assert!(report.parts > 0, "downloads mid-flight: {report:?}");
                }
                if at.acks < w.ids.len() / 2 {
                    assert!(acked_now < sent, "run {run}: the kill cut the burst short");
                }
                // The stale admin.sock of a killed daemon does not fool `admin status`.
                let status = scratch.admin_json(&["status"]).await;
                assert_eq!(status["daemon"], "stopped", "{status}");
            }
            None => {
                assert_eq!(acked.len(), w.ids.len());
                assert_all_downloaded(&scratch, &w).await;
                finish(d, &scratch).await;
            }
        }
    }
    eprintln!("{prefix} took {:?}", started.elapsed());
}

/// Stops the daemon with SIGTERM (exit 0) and checks what a clean stop leaves.
async fn finish(d: Arc<Daemon>, scratch: &Scratch) {
    let d = Arc::try_unwrap(d).unwrap_or_else(|_| panic!("daemon still shared"));
    d.stop().await;
    let data = scratch.data_dir();
    assert!(!data.join("admin.sock").exists(), "admin.sock left behind");
    assert_eq!(tmp_entries(&data), Vec::<PathBuf>::new(), "tmp/ not empty");
}

/// SIGKILL early in the burst (30 acknowledgements) with slow downloads mid-flight; restart
/// with images still slow and SIGKILL again after 60 more acknowledgements, while downloads
/// recovered from the first run and new ones are mid-flight; then finish with fast images.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_twice_loses_nothing_acknowledged() {
    let kills = [
        KillAt {
            acks: 30,
            mid_download: true,
        },
        KillAt {
            acks: 60,
            mid_download: true,
        },
    ];
    scenario("twice-", &kills, 2).await;
}

/// The whole burst is acknowledged, then SIGKILL while its downloads are mid-flight (partial
/// files in tmp/, some images already installed); finish with fast images.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_downloading_after_the_burst() {
    let kills = [KillAt {
        acks: usize::MAX,
        mid_download: true,
    }];
    scenario("dl-", &kills, 1).await;
}

/// SIGKILL at the very first acknowledgement; then, with fast images, SIGKILL after 150
/// acknowledgements while many downloads are being installed and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_first_ack_then_late_in_a_fast_burst() {
    let kills = [
        KillAt {
            acks: 1,
            mid_download: false,
        },
        KillAt {
            acks: 150,
            mid_download: false,
        },
    ];
    scenario("late-", &kills, 1).await;
}
