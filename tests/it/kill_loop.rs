//! The kill loop: mixed load against the real binary, SIGKILLed at random moments for N
//! cycles, with every promise of SPEC checked after each crash and at the end.
//!
//! One data directory and one fake KIE live through the whole loop. Each cycle adds tasks of
//! every kind of result (covers, music tracks, WAV, video, stems: SPEC "Task kinds", each
//! called back on its own route, confirmed and polled through its own details endpoint,
//! stored under `images/` or `files/`) and every intake — callbacks for unknown tasks (`accept_unknown_tasks`), for tasks tracked with
//! `coverd admin track` and for tasks made with `coverd submit`; tracked and submitted tasks
//! whose callback never comes (the poll fallback must find their result); tasks KIE is still
//! generating until the next cycle; failures — with images served at once, after one to
//! three transient 500s, trickled or stalled. It sends the callbacks KIE would (again, for
//! those not yet acknowledged, while duplicates of acknowledged ones stream in back to back),
//! and SIGKILLs the daemon after a random
//! delay. Every settle is notified (`[notify]`) to a receiver in this process (`notify`'s,
//! answering 200, 500 or slowly at random, seeded) that checks each request's signature;
//! notifications are retried after 100 ms doubling (the test-only
//! `COVERD_TEST_NOTIFY_BACKOFF`), so retries cross the kills. Then, with the daemon
//! stopped, `coverd admin export` must show:
//! - every callback that got 200 stored with its delivery (`callbacks` ≥ its 200s), and every
//!   task whose `track`/`submit` answered 0;
//! - under `images/` and `files/` only complete files at final paths (`<task>/<i>.<ext>`,
//!   `<task>/<name>.<ext>`), each byte for byte the fake's file, and hashing to its record's
//!   sha256 once recorded;
//! - a settled task never changes its final state;
//! - every notification the receiver got (over all cycles) signed, for a task stored in the
//!   final state it announces (never one that has not settled), with the task's images, and
//!   one `webhook-id` per task across every kill; a settled task has its notification, an
//!   unsettled one none, and one shown `delivered` was answered 2xx.
//!
//! Halfway through, with the daemon stopped, every cover record is rewritten in the record
//! format of the release before task kinds (v2), and the load goes on on top of it.
//!
//! After each restart no partial download from before the crash is left in `tmp/`. After the
//! last cycle, a run without kill must settle every task (`downloaded` with every image, or
//! `failed` as KIE said) and deliver its notification within [`SETTLE_BOUND`]; a SIGTERM
//! then leaves `tmp/` empty and `admin verify` clean. Violations are collected (not the
//! first one only) and the summary printed before the test fails.
//!
//! `COVERD_KILL_CYCLES` (default 3) and `COVERD_KILL_SEED` (default: from the clock, printed)
//! drive it; `scripts/kill-loop N` runs it in release mode. The seed replays the workload and
//! the kill delays; where a kill lands in the daemon's work still depends on the machine.
//! It owns no daemon code; it reuses `bin_util` (the binary), `fake_kie` (KIE, files) and
//! `notify`'s receiver.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::bin_util::{Daemon, Scratch, files_under, tmp_entries};
use crate::fake_kie::FakeKie;
use crate::fake_kie::api::Status;
use crate::fake_kie::files::{Behaviour, gif, jpeg, mp3, mp4, png, sha256_hex, wav, webp};
use crate::faultfs::{FaultFs, FaultOp};
use crate::garage::Garage;
use crate::harness::{failure_body, success_body};
use crate::notify::{Answer, Got, Receiver, SECRET};
use coverd::model::Kind;

const CYCLES_VAR: &str = "COVERD_KILL_CYCLES";
const SEED_VAR: &str = "COVERD_KILL_SEED";
/// Cycles when `COVERD_KILL_CYCLES` is not set (what `cargo test` runs).
const DEFAULT_CYCLES: usize = 3;
/// New tasks per cycle.
const TASKS_PER_CYCLE: usize = 12;
/// Steps (track, submit, callback) in flight at once.
const PARALLEL: usize = 8;
/// Each step of a cycle's load starts this long after the daemon is up, uniformly at random
/// (milliseconds), so that callbacks, tracks and submits keep arriving during the cycle.
const ARRIVAL_MS: std::ops::Range<u64> = 0..1200;
/// The kill comes this long after the daemon is up, uniformly at random (milliseconds).
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 30..=1500;
/// Streams of duplicate deliveries (of callbacks acknowledged in earlier cycles), each
/// sending one after the other until the kill: a kill often lands between a delivery's
/// write and its 200.
const DUPLICATE_STREAMS: u64 = 2;
/// Every task must be final this long after the last (unkilled) start.
const SETTLE_BOUND: Duration = Duration::from_secs(60);
/// KIE's answer to a failed generation, in callbacks and record-info.
const FAILURE_CODE: i64 = 501;
const FAILURE_MSG: &str = "Cover generation failed";
const RECEIVED: &str = r#"{"status":"received"}"#;
/// What the daemon logs when it adopts an image installed before a crash (`download`).
const ADOPTED_LOG: &str = "adopting the file stored before a restart";
/// The first retry of a notification after a failed attempt (then doubling), instead of
/// SPEC's 5 s: `COVERD_TEST_NOTIFY_BACKOFF` (`coverd::broken`).
const NOTIFY_BACKOFF: &str = "100ms";

/// How coverd learns of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intake {
    /// Only through its callback (`accept_unknown_tasks = true`).
    Unknown,
    /// `coverd admin track ID --music-task-id M`.
    Track,
    /// `coverd submit M` (KIE's fake makes the id).
    Submit,
}

/// One file of a task on the fake file host.
struct Img {
    path: String,
    /// Its name in the task's directory once stored (`0.png`, `track-0.mp3`, `audio.wav`).
    name: String,
    bytes: Bytes,
}

/// A task of the workload: what KIE will say about it, and what the loop got so far.
struct Plan {
    /// Unique name: the task id for `Unknown`/`Track`, the base of the music id for `Submit`.
    label: String,
    /// What the task makes (only covers are submitted: the others are never resent, so a
    /// submit cut by a kill would leave an intent for the operator).
    kind: Kind,
    music: String,
    intake: Intake,
    success: bool,
    /// Whether KIE sends a callback at all (else only the poll fallback finds the result).
    callback: bool,
    images: Vec<Img>,
    /// Known for `Unknown`/`Track` from the start, for `Submit` once `submit` answered.
    task_id: Option<String>,
    /// `track`/`submit` answered 0 (always true for `Unknown`).
    registered: bool,
    /// KIE has finished the task (record-info answers its result, the callback may be sent).
    kie_done: bool,
    /// 200 `{"status":"received"}` answers to this task's callbacks, duplicates included.
    acks: u64,
    /// The final state first seen in the store; it must never change.
    settled: Option<String>,
}

impl Plan {
    fn urls(&self, fake: &FakeKie) -> Vec<String> {
        self.images
            .iter()
            .map(|i| fake.files.url(&i.path))
            .collect()
    }

    fn kie_status(&self, fake: &FakeKie) -> Status {
        match (self.kie_done, self.success) {
            (false, _) => Status::Generating,
            (true, true) => Status::Success(self.urls(fake)),
            (true, false) => Status::Failed {
                code: FAILURE_CODE,
                message: FAILURE_MSG.into(),
            },
        }
    }

    /// The task's files in the order its kind lists them, for the other kinds' shapes.
    fn kind_callback(&self, fake: &FakeKie, task_id: &str) -> Value {
        let urls = self.urls(fake);
        if !self.success {
            return match self.kind {
                Kind::Music => serde_json::json!({"code": FAILURE_CODE, "msg": FAILURE_MSG,
                    "data": {"callbackType": "error", "task_id": task_id, "data": null}}),
                _ => serde_json::json!({"code": FAILURE_CODE, "msg": FAILURE_MSG,
                    "data": {"task_id": task_id}}),
            };
        }
        let data = match self.kind {
            Kind::Music => serde_json::json!({"callbackType": "complete", "task_id": task_id,
                "data": [{"id": format!("{}-t0", self.label), "audio_url": urls[0],
                          "image_url": urls[1], "title": "t", "duration": 100.5}]}),
            Kind::Wav => serde_json::json!({"task_id": task_id, "audioWavUrl": urls[0]}),
            Kind::Video => serde_json::json!({"task_id": task_id, "video_url": urls[0]}),
            Kind::Stems => {
                let mut info = serde_json::json!({"origin_url": "https://file.example/origin.mp3"});
                for (url, stem) in urls.iter().zip(["vocal_url", "instrumental_url"]) {
                    info[stem] = url.clone().into();
                }
                serde_json::json!({"task_id": task_id, "vocal_separation_info": info})
            }
            Kind::Cover => unreachable!("covers use success_body"),
        };
        serde_json::json!({"code": 200, "msg": "success", "data": data})
    }

    /// What the kind's details endpoint answers for this task (the other kinds).
    fn kind_details(&self, fake: &FakeKie, task_id: &str) -> Value {
        let key = if self.kind == Kind::Music {
            "status"
        } else {
            "successFlag"
        };
        let urls = self.urls(fake);
        let (status, response) = match (self.kie_done, self.success) {
            (false, _) => ("PENDING", Value::Null),
            (true, false) => ("GENERATE_AUDIO_FAILED", Value::Null),
            (true, true) => (
                "SUCCESS",
                match self.kind {
                    Kind::Music => {
                        serde_json::json!({"sunoData": [{"id": format!("{}-t0", self.label),
                        "audioUrl": urls[0], "imageUrl": urls[1], "title": "t", "duration": 100.5}]})
                    }
                    Kind::Wav => serde_json::json!({"audioWavUrl": urls[0]}),
                    Kind::Video => serde_json::json!({"videoUrl": urls[0]}),
                    Kind::Stems => {
                        let mut r = serde_json::json!({});
                        for (url, stem) in urls.iter().zip(["vocalUrl", "instrumentalUrl"]) {
                            r[stem] = url.clone().into();
                        }
                        r
                    }
                    Kind::Cover => unreachable!("covers use record-info"),
                },
            ),
        };
        serde_json::json!({"taskId": task_id, key: status, "response": response,
            "errorCode": if status.contains("FAILED") { FAILURE_CODE.into() } else { Value::Null },
            "errorMessage": FAILURE_MSG})
    }

    fn callback_body(&self, fake: &FakeKie, task_id: &str) -> String {
        match (self.kind, self.success) {
            (Kind::Cover, true) => success_body(task_id, &self.urls(fake)),
            (Kind::Cover, false) => failure_body(task_id, FAILURE_CODE, FAILURE_MSG),
            _ => self.kind_callback(fake, task_id).to_string(),
        }
    }

    /// The directory its files are stored in.
    fn dir(&self) -> &'static str {
        self.kind.describe().dir
    }

    fn expected_state(&self) -> &'static str {
        if self.success { "downloaded" } else { "failed" }
    }

    /// Whether this task still needs a `track`/`submit` or its first acknowledged callback.
    fn needs_work(&self) -> bool {
        !self.registered || (self.callback && self.kie_done && self.acks == 0)
    }
}

#[derive(Debug, Default)]
struct Stats {
    cycles: usize,
    kills: usize,
    /// 200 answers to callbacks, and how many of those were duplicate deliveries.
    acks: u64,
    duplicate_acks: u64,
    /// Requests and commands cut short by a kill (expected).
    cut: usize,
    /// Partial downloads in `tmp/`, and installed images without a record yet, at the kills.
    parts_at_kill: usize,
    unrecorded_at_kill: usize,
    /// Images adopted after a restart (installed before the kill, recorded after it).
    adopted: usize,
    /// Cover records rewritten halfway in the record format before task kinds.
    downgraded: usize,
    max_recovery: Duration,
    settle: Duration,
    images: usize,
    notify: NotifyStats,
}

/// What the receiver saw, counted at the end.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct NotifyStats {
    /// Tasks whose notification the store shows delivered.
    pub delivered: usize,
    /// Requests the receiver got, those answered 500, and those answered slowly.
    pub requests: usize,
    pub answered_500: usize,
    pub slow: usize,
    /// Notifications sent by more than one daemon run (resumed after a kill or power cut),
    /// each under one `webhook-id`.
    pub resumed: usize,
}

/// Everything the loop knows, shared by the steps running at once.
#[derive(Default)]
struct World {
    plans: Vec<Plan>,
    stats: Stats,
    violations: Vec<String>,
    /// Which cycle (for messages); `None` in the final run.
    cycle: Option<usize>,
    /// The receiver's requests checked on their own (signature, body) so far, and the tasks
    /// already reported for more than one webhook-id: each is reported once.
    notify_checked: usize,
    many_ids: BTreeSet<String>,
}

impl World {
    fn violation(&mut self, what: String) {
        let when = match self.cycle {
            Some(c) => format!("cycle {c}"),
            None => "final run".into(),
        };
        eprintln!("kill loop VIOLATION ({when}): {what}");
        self.violations.push(format!("{when}: {what}"));
    }

    /// The plan a stored task belongs to: by task id, else by its music task id (a submit
    /// whose answer was cut by the kill).
    fn plan_of(&self, task_id: &str, task: Option<&Value>) -> Option<usize> {
        let music = task.and_then(|t| t["music_task_id"].as_str());
        self.plans
            .iter()
            .position(|p| p.task_id.as_deref() == Some(task_id))
            .or_else(|| {
                self.plans
                    .iter()
                    .position(|p| p.intake == Intake::Submit && Some(p.music.as_str()) == music)
            })
    }
}

/// What every step needs; cheap to clone.
#[derive(Clone)]
struct Cx {
    scratch: Arc<Scratch>,
    fake: Arc<FakeKie>,
    world: Arc<Mutex<World>>,
    daemon: Arc<Daemon>,
    killed: Arc<AtomicBool>,
    /// Set when the cut was armed before the kill (a targeted cut): from then on a step
    /// that fails is expected, like one cut by the kill.
    expect_failures: Arc<AtomicBool>,
    slots: Arc<Semaphore>,
}

impl Cx {
    /// The context of one run of `daemon`, with the fake KIE brought up to date for every
    /// plan; how many plans there are.
    fn new(
        scratch: &Arc<Scratch>,
        fake: &Arc<FakeKie>,
        world: &Arc<Mutex<World>>,
        daemon: &Arc<Daemon>,
    ) -> (Cx, usize) {
        let cx = Cx {
            scratch: scratch.clone(),
            fake: fake.clone(),
            world: world.clone(),
            daemon: daemon.clone(),
            killed: Arc::new(AtomicBool::new(false)),
            expect_failures: Arc::new(AtomicBool::new(false)),
            slots: Arc::new(Semaphore::new(PARALLEL)),
        };
        let n = cx.world().plans.len();
        for i in 0..n {
            cx.sync_kie(i);
        }
        (cx, n)
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A step that did not succeed: expected once the kill is decided, a violation before.
    fn failed(&self, what: String) {
        let killed =
            self.killed.load(Ordering::SeqCst) || self.expect_failures.load(Ordering::SeqCst);
        let mut w = self.world();
        if killed {
            w.stats.cut += 1;
        } else {
            w.violation(what);
        }
    }

    /// Tells the fake KIE what it knows about plan `i` (once the plan has a task id).
    fn sync_kie(&self, i: usize) {
        let w = self.world();
        let plan = &w.plans[i];
        if let Some(id) = &plan.task_id {
            if self.fake.api.task(id).is_some() {
                self.fake.api.set_status(id, plan.kie_status(&self.fake));
            }
            if self.fake.kinds.task(id).is_some() {
                self.fake
                    .kinds
                    .set_details(id, plan.kind_details(&self.fake, id));
            }
        }
    }

    /// At `at` after the start of the load, brings plan `i` one step further: `track` or
    /// `submit` if not done, then its callback (again, as a duplicate delivery, with
    /// `duplicate`).
    async fn drive(self, i: usize, duplicate: bool, at: Duration) {
        // Arrivals spread over the cycle, like KIE's callbacks over time.
        tokio::time::sleep(at).await;
        let Ok(_slot) = self.slots.clone().acquire_owned().await else {
            return;
        };
        if self.killed.load(Ordering::SeqCst) {
            return;
        }
        let (intake, registered, label, music, kind) = {
            let w = self.world();
            let p = &w.plans[i];
            (
                p.intake,
                p.registered,
                p.label.clone(),
                p.music.clone(),
                p.kind,
            )
        };
        if !registered {
            match intake {
                Intake::Unknown => {}
                Intake::Track => {
                    let mut args = vec!["admin", "track", &label, "--kind", kind.as_str()];
                    // A music task is made from no other task.
                    if kind != Kind::Music {
                        args.extend(["--music-task-id", &music]);
                    }
                    let out = self.scratch.run(&args).await;
                    if out.code != Some(0) {
                        return self.failed(format!("coverd {args:?}: {out:?}"));
                    }
                    self.world().plans[i].registered = true;
                }
                Intake::Submit => {
                    let args = ["submit", &music, "--json"];
                    let out = self.scratch.run(&args).await;
                    let id = serde_json::from_str::<Value>(&out.stdout)
                        .ok()
                        .and_then(|v| v["task_id"].as_str().map(str::to_string));
                    let (Some(0), Some(id)) = (out.code, id) else {
                        return self.failed(format!("coverd {args:?}: {out:?}"));
                    };
                    {
                        let mut w = self.world();
                        let known = w.plans[i].task_id.clone();
                        if known.as_ref().is_some_and(|known| *known != id) {
                            w.violation(format!(
                                "submit {music} answered {id}, an earlier submit {known:?}: two covers for one song"
                            ));
                            return;
                        }
                        w.plans[i].task_id = Some(id);
                        w.plans[i].registered = true;
                    }
                    self.sync_kie(i);
                }
            }
        }
        let body = {
            let w = self.world();
            let p = &w.plans[i];
            let send = p.callback && p.kie_done && (p.acks == 0 || duplicate);
            match (&p.task_id, send) {
                (Some(id), true) => Some((id.clone(), p.callback_body(&self.fake, id), p.acks > 0)),
                _ => None,
            }
        };
        let Some((id, body, repeat)) = body else {
            return;
        };
        if self.killed.load(Ordering::SeqCst) {
            return;
        }
        match self.daemon.callback_on(kind.as_str(), body).await {
            Ok((200, answer)) if answer == RECEIVED => {
                let mut w = self.world();
                w.plans[i].acks += 1;
                w.stats.acks += 1;
                if repeat {
                    w.stats.duplicate_acks += 1;
                }
            }
            other => self.failed(format!("callback for {id}: {other:?}")),
        }
    }
}

/// Distinct image bytes of the given format (0 png, 1 jpg, 2 webp, 3 gif): the fake's
/// image with the task's label and index written after the magic, so no two are alike.
fn image_bytes(format: u32, label: &str, index: usize, len: usize) -> (&'static str, Bytes) {
    let (ext, base) = match format {
        0 => ("png", png(len)),
        1 => ("jpg", jpeg(len)),
        2 => ("webp", webp(len)),
        _ => ("gif", gif(len)),
    };
    let mut v = base.to_vec();
    let tag = format!("{label}/{index}");
    v[32..32 + tag.len()].copy_from_slice(tag.as_bytes());
    (ext, Bytes::from(v))
}

/// How the fake serves one image: mostly at once, else after transient 500s, trickled over
/// about 0.6 s, or stalled for 0.4 s after its first kilobyte.
fn behaviour(rng: &mut StdRng, bytes: Bytes) -> Behaviour {
    match rng.random_range(0..100) {
        0..55 => Behaviour::Image(bytes),
        55..75 => Behaviour::FailFirst {
            failures: rng.random_range(1..=3),
            bytes,
        },
        75..90 => Behaviour::Trickle {
            chunk: bytes.len() / 10 + 1,
            every: Duration::from_millis(60),
            bytes,
        },
        _ => Behaviour::SlowBody {
            bytes,
            first: 1024,
            stall: Duration::from_millis(400),
        },
    }
}

/// Adds `TASKS_PER_CYCLE` new plans for cycle `cycle`, registering their images (and, for
/// tasks KIE made elsewhere, the task itself) with the fake.
fn add_plans(rng: &mut StdRng, fake: &FakeKie, world: &mut World, cycle: usize) {
    for n in 0..TASKS_PER_CYCLE {
        let label = format!("kl{cycle:03}x{n:02}");
        // Half covers, the rest spread over the other kinds.
        let kind = match rng.random_range(0..8) {
            0..4 => Kind::Cover,
            4 => Kind::Music,
            5 => Kind::Wav,
            6 => Kind::Video,
            _ => Kind::Stems,
        };
        let intake = match rng.random_range(0..10) {
            0..4 => Intake::Unknown,
            4..8 => Intake::Track,
            _ if kind == Kind::Cover => Intake::Submit,
            _ => Intake::Track,
        };
        let success = rng.random_bool(0.85);
        let callback = intake == Intake::Unknown || rng.random_bool(0.6);
        let late = intake != Intake::Unknown && rng.random_bool(0.25);
        let mut images = Vec::new();
        let mut add = |rng: &mut StdRng, name: String, bytes: Bytes| {
            let path = format!("/img/{label}/{name}");
            fake.files.set(&path, behaviour(rng, bytes.clone()));
            images.push(Img { path, name, bytes });
        };
        match kind {
            Kind::Cover => {
                for index in 0..rng.random_range(1..=2) {
                    let len = rng.random_range(2_000..60_000);
                    let (ext, bytes) = image_bytes(rng.random_range(0..4), &label, index, len);
                    add(rng, format!("{index}.{ext}"), bytes);
                }
            }
            Kind::Music => {
                let len = rng.random_range(20_000..120_000);
                add(rng, "track-0.mp3".into(), tagged(mp3(len), &label, 0));
                add(rng, "track-0.jpg".into(), tagged(jpeg(4_000), &label, 1));
            }
            Kind::Wav => {
                let len = rng.random_range(100_000..400_000);
                add(rng, "audio.wav".into(), tagged(wav(len), &label, 0));
            }
            Kind::Video => {
                let len = rng.random_range(100_000..500_000);
                add(rng, "video.mp4".into(), tagged(mp4(len), &label, 0));
            }
            Kind::Stems => {
                for (index, stem) in ["vocal", "instrumental"].iter().enumerate() {
                    let len = rng.random_range(20_000..80_000);
                    add(rng, format!("{stem}.mp3"), tagged(mp3(len), &label, index));
                }
            }
        }
        let music = format!("music{label}");
        let task_id = (intake != Intake::Submit).then(|| label.clone());
        let plan = Plan {
            label,
            kind,
            music,
            intake,
            success,
            callback,
            images,
            task_id,
            registered: intake == Intake::Unknown,
            kie_done: !late,
            acks: 0,
            settled: None,
        };
        if let Some(id) = &plan.task_id {
            // Made at KIE (elsewhere, for unknown and tracked tasks): its details know it.
            if kind == Kind::Cover {
                fake.api.add_task(id, &plan.music);
                fake.api.set_status(id, plan.kie_status(fake));
            } else {
                fake.kinds.add(kind, id);
                fake.kinds.set_details(id, plan.kind_details(fake, id));
            }
        }
        world.plans.push(plan);
    }
}

/// `bytes` with the task's label and the file's index written after the magic, so no two
/// files are alike.
fn tagged(bytes: Bytes, label: &str, index: usize) -> Bytes {
    let mut v = bytes.to_vec();
    let tag = format!("{label}/{index}");
    v[32..32 + tag.len()].copy_from_slice(tag.as_bytes());
    Bytes::from(v)
}

/// The loop's configuration: notifications to `rx`, signed with the key in `secret_file`,
/// a short timeout (the receiver's slow answers often outlast it: retried) and attempts
/// enough that none becomes undeliverable.
fn config(scratch: &Scratch, fake: &FakeKie, rx: &Receiver, secret_file: &Path) -> String {
    let added = [
        // Only `submit` reads it; the fake KIE never calls back.
        r#"public_url = "http://127.0.0.1:9""#,
        "api_key = \"kill-loop-key\"\nrequests_per_10s = 1000",
        "concurrency = 4",
    ];
    let poll = "[poll]\nafter = \"1s\"\ninterval = \"1s\"\ngive_up_after = \"1h\"";
    let notify = format!(
        "[notify]\nurl = {:?}\nsecret_file = {:?}\ntimeout = \"1s\"\nmax_attempts = 100",
        rx.url(),
        secret_file.display().to_string()
    );
    scratch.config_text(&fake.base_url(), added, &format!("{poll}\n\n{notify}"))
}

/// Starts the daemon and checks that no partial download from before the crash is left.
async fn restart(
    scratch: &Scratch,
    world: &Mutex<World>,
    tmp_before: &[PathBuf],
    env: &[(&str, &str)],
) -> Daemon {
    let started = Instant::now();
    let mut cmd = scratch.serve_command();
    cmd.env(coverd::broken::NOTIFY_BACKOFF_VAR, NOTIFY_BACKOFF);
    cmd.envs(env.iter().copied());
    let d = Daemon::spawn(cmd, scratch.data_dir()).await;
    let took = started.elapsed();
    let mut w = world.lock().unwrap();
    w.stats.max_recovery = w.stats.max_recovery.max(took);
    for left in tmp_before.iter().filter(|p| p.exists()) {
        w.violation(format!(
            "{} (a partial download from before the kill) survived the restart",
            left.display()
        ));
    }
    d
}

/// Starts one step for every plan that needs one, each at the offset `arrival` picks, and
/// `streams` streams of duplicate deliveries of the callbacks in `acked` (seeded by
/// `seed`); returns the steps.
fn launch(
    cx: &Cx,
    mut arrival: impl FnMut() -> Duration,
    acked: &[usize],
    streams: u64,
    seed: u64,
) -> tokio::task::JoinSet<()> {
    let todo: Vec<usize> = {
        let w = cx.world();
        (0..w.plans.len())
            .filter(|&i| w.plans[i].needs_work())
            .collect()
    };
    let mut steps = tokio::task::JoinSet::new();
    for i in todo {
        steps.spawn(cx.clone().drive(i, false, arrival()));
    }
    for stream in (0..streams).filter(|_| !acked.is_empty()) {
        let (cx, acked) = (cx.clone(), acked.to_vec());
        let mut rng = StdRng::seed_from_u64(seed ^ stream);
        steps.spawn(async move {
            while !cx.killed.load(Ordering::SeqCst) {
                let i = acked[rng.random_range(0..acked.len())];
                cx.clone().drive(i, true, Duration::ZERO).await;
            }
        });
    }
    steps
}

/// The checks on the store, `images/` and `files/` (after a kill with the daemon stopped, or at the
/// end with `final_run`). Returns how many images sat at a final path without a record.
fn check_store(world: &mut World, tasks: &[Value], stored: &Stored<'_>, final_run: bool) -> usize {
    let by_id: HashMap<&str, &Value> = tasks
        .iter()
        .filter_map(|t| Some((t["task_id"].as_str()?, t)))
        .collect();
    let mut problems = Vec::new();

    // Every acknowledged callback, track and submit is stored; a final state never changes.
    for plan in &mut world.plans {
        let Some(id) = plan.task_id.as_deref() else {
            continue;
        };
        let task = by_id.get(id);
        let answered = plan.acks > 0 || (plan.registered && plan.intake != Intake::Unknown);
        if answered && task.is_none() {
            problems.push(format!(
                "task {id} ({:?}, {} callbacks acknowledged) is not in the store",
                plan.intake, plan.acks
            ));
            continue;
        }
        let Some(task) = task else { continue };
        let stored = task["callbacks"].as_u64().unwrap_or(0);
        if stored < plan.acks {
            problems.push(format!(
                "task {id}: {} callbacks acknowledged but {stored} stored",
                plan.acks
            ));
        }
        let state = task["state"].as_str().unwrap_or("?").to_string();
        if state == "downloaded" || state == "failed" {
            if state != plan.expected_state() {
                problems.push(format!(
                    "task {id} is {state}, but KIE reported it {}: {task}",
                    if plan.success { "done" } else { "failed" }
                ));
            }
            match &plan.settled {
                Some(before) if *before != state => problems.push(format!(
                    "task {id} was {before} and is now {state}: a final state changed"
                )),
                Some(_) => {}
                None => plan.settled = Some(state.clone()),
            }
        } else if final_run {
            problems.push(format!("task {id} is still {state}: {task}"));
        } else if plan.settled.is_some() {
            problems.push(format!("task {id} was settled and is now {state}: {task}"));
        }
    }

    // Every stored file (under images/ and files/, or in the bucket) is a complete file of its
    // task at its final place, and its record (once written) names that place and its hash.
    let mut recorded = BTreeMap::new();
    for task in tasks {
        for img in task["files"].as_array().into_iter().flatten() {
            if img["state"] == "downloaded" {
                let place = stored.recorded(img).unwrap_or("?").to_string();
                recorded.insert(place, task["task_id"].to_string());
            }
        }
    }
    let mut unrecorded = 0;
    let mut on_disk = BTreeSet::new();
    for found in stored.list(&mut problems) {
        let rel = found.place.clone();
        on_disk.insert(rel.clone());
        let (dir, task_id, name) = (found.dir.as_str(), found.task.as_str(), found.name.as_str());
        let task = by_id.get(task_id).copied();
        let Some(plan) = world.plan_of(task_id, task).map(|i| &world.plans[i]) else {
            problems.push(format!("{rel}: belongs to no task of the workload"));
            continue;
        };
        let Some(task) = task else {
            problems.push(format!("{rel}: its task {task_id} is not in the store"));
            continue;
        };
        let found_img = plan
            .images
            .iter()
            .enumerate()
            .find(|(_, m)| m.name == name && (dir.is_empty() || dir == plan.dir()));
        let Some((index, img)) = found_img else {
            problems.push(format!("{rel}: no such file in task {task_id}"));
            continue;
        };
        let bytes = match stored.read(&found) {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("{rel}: unreadable: {e}"));
                continue;
            }
        };
        if bytes != img.bytes[..] {
            problems.push(format!(
                "{rel}: {} bytes that are not the file ({} bytes): a partial or corrupt file at a final place",
                bytes.len(),
                img.bytes.len()
            ));
            continue;
        }
        let record = &task["files"][index];
        if record["state"] == "downloaded" {
            if stored.recorded(record) != Some(rel.as_str())
                || record["sha256"] != sha256_hex(&bytes).as_str()
            {
                problems.push(format!(
                    "{rel}: its record does not match the file: {record}"
                ));
            }
        } else {
            // Stored, not yet recorded: the kill came between store and record.
            unrecorded += 1;
        }
    }
    for (path, task_id) in &recorded {
        if !on_disk.contains(path) {
            problems.push(format!(
                "{path}: recorded as downloaded for {task_id} but missing"
            ));
        }
    }

    if final_run {
        let count = by_id.len();
        if count != world.plans.len() {
            problems.push(format!(
                "{count} tasks in the store, {} in the workload",
                world.plans.len()
            ));
        }
        for plan in world.plans.iter().filter(|p| p.success) {
            let Some(task) = plan.task_id.as_deref().and_then(|id| by_id.get(id)) else {
                continue;
            };
            let images = task["files"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if images.len() != plan.images.len() {
                problems.push(format!("task {}: wrong files: {task}", plan.label));
            }
            for (img, want) in images.iter().zip(&plan.images) {
                let id = &task["task_id"];
                let path = stored.place(plan.dir(), id.as_str().unwrap_or("?"), &want.name);
                let ok = img["state"] == "downloaded"
                    && stored.recorded(img) == Some(path.as_str())
                    && img["sha256"] == sha256_hex(&want.bytes).as_str()
                    && img["bytes"] == want.bytes.len();
                if !ok {
                    problems.push(format!("{path}: record is not the image: {img}"));
                }
            }
        }
        if unrecorded > 0 {
            problems.push(format!(
                "{unrecorded} images at final paths without a record"
            ));
        }
    }
    for p in problems {
        world.violation(p);
    }
    unrecorded
}

/// Where the loop's daemon stores files: its data directory, or a bucket (`kind = "s3"`).
pub(crate) enum Stored<'a> {
    Local(&'a Path),
    Objects {
        garage: &'a Garage,
        prefix: &'a str,
        data_dir: &'a Path,
    },
}

/// One stored file found by [`Stored::list`].
struct Found {
    /// As a record names it: `images/<task>/<name>`, or `s3://coverd/<prefix><task>/<name>`.
    place: String,
    /// `images` or `files` (empty for an object: its key does not say).
    dir: String,
    task: String,
    name: String,
}

impl Stored<'_> {
    /// Every stored file; a file at a place no final file has is a problem.
    fn list(&self, problems: &mut Vec<String>) -> Vec<Found> {
        match self {
            Stored::Local(data_dir) => ["images", "files"]
                .into_iter()
                .flat_map(|dir| files_under(data_dir, &data_dir.join(dir)))
                .filter_map(|rel| match rel.split('/').collect::<Vec<_>>()[..] {
                    [dir, task, name] => Some(Found {
                        place: rel.clone(),
                        dir: dir.into(),
                        task: task.into(),
                        name: name.into(),
                    }),
                    _ => {
                        problems.push(format!(
                            "{rel}: not at a final path images/<task>/<i>.<ext> or files/<task>/<name>.<ext>"
                        ));
                        None
                    }
                })
                .collect(),
            Stored::Objects {
                garage,
                prefix,
                data_dir,
            } => {
                let mut found = Vec::new();
                for key in garage.keys(prefix) {
                    let rest = key.strip_prefix(*prefix).unwrap_or(&key);
                    match rest.split('/').collect::<Vec<_>>()[..] {
                        [task, name] => found.push(Found {
                            place: format!("s3://{}/{key}", garage.bucket),
                            dir: String::new(),
                            task: task.into(),
                            name: name.into(),
                        }),
                        _ => problems.push(format!(
                            "{key}: not the key of a final file <prefix><task>/<name>"
                        )),
                    }
                }
                // None is ever put in the data directory's stored directories.
                for dir in ["images", "files"] {
                    for rel in files_under(data_dir, &data_dir.join(dir)) {
                        problems.push(format!("{rel}: in the data directory, not the bucket"));
                    }
                }
                found
            }
        }
    }

    fn read(&self, found: &Found) -> std::io::Result<Vec<u8>> {
        match self {
            Stored::Local(data_dir) => std::fs::read(data_dir.join(&found.place)),
            Stored::Objects { garage, prefix, .. } => garage
                .get(&format!("{prefix}{}/{}", found.task, found.name))
                .ok_or_else(|| std::io::Error::other("gone from the bucket")),
        }
    }

    /// Where a file's record says it is (`path`, or `location` with objects).
    fn recorded<'v>(&self, record: &'v Value) -> Option<&'v str> {
        match self {
            Stored::Local(_) => record["path"].as_str(),
            Stored::Objects { .. } => record["location"].as_str(),
        }
    }

    /// The place a final file has, as its record names it.
    fn place(&self, dir: &str, task: &str, name: &str) -> String {
        match self {
            Stored::Local(_) => format!("{dir}/{task}/{name}"),
            Stored::Objects { garage, prefix, .. } => {
                format!("s3://{}/{prefix}{task}/{name}", garage.bucket)
            }
        }
    }
}

/// The checks on notifications: every request `got` (over the whole loop) against the
/// store's `tasks` (after a kill with the daemon stopped, or at the end with `final_run`,
/// when every settled task's notification must be delivered). What a request shows on its
/// own (signature, body, id) is checked once; that the store holds the settle it announced
/// is checked again after every cut. Returns the counts.
fn check_notifications(
    world: &mut World,
    tasks: &[Value],
    got: &[Got],
    final_run: bool,
) -> NotifyStats {
    let by_id: HashMap<&str, &Value> = tasks
        .iter()
        .filter_map(|t| Some((t["task_id"].as_str()?, t)))
        .collect();
    let mut problems = Vec::new();
    let mut stats = NotifyStats {
        requests: got.len(),
        answered_500: got.iter().filter(|g| g.status == 500).count(),
        slow: got.iter().filter(|g| g.slow).count(),
        ..NotifyStats::default()
    };
    // Per task: its webhook-ids, and whether one was answered 2xx; per webhook-id: the
    // daemon runs that sent it.
    let mut ids: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let mut answered: BTreeSet<&str> = BTreeSet::new();
    let mut runs: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    let new_from = world.notify_checked;
    world.notify_checked = got.len();
    for (n, g) in got.iter().enumerate() {
        let new = n >= new_from;
        if new && !g.verified {
            problems.push(format!(
                "notification {}: its signature does not verify",
                g.id
            ));
        }
        let Ok(body) = serde_json::from_slice::<Value>(&g.body) else {
            if !new {
                continue;
            }
            problems.push(format!(
                "notification {}: the body is not JSON: {:?}",
                g.id,
                String::from_utf8_lossy(&g.body)
            ));
            continue;
        };
        let data = &body["data"];
        let (Some(task_id), Some(state)) = (data["task_id"].as_str(), data["state"].as_str())
        else {
            if new {
                problems.push(format!(
                    "notification {}: no task id or state: {body}",
                    g.id
                ));
            }
            continue;
        };
        ids.entry(task_id.to_string()).or_default().insert(&g.id);
        runs.entry(&g.id).or_default().insert(g.epoch);
        if (200..300).contains(&g.status) {
            answered.insert(&g.id);
        }
        if new && !g.id.starts_with(&format!("msg_{task_id}_1_")) {
            problems.push(format!(
                "notification {} for task {task_id}: not the webhook-id of its first settle",
                g.id
            ));
        }
        let kind = data["kind"].as_str().unwrap_or("?");
        if new
            && (body["type"] != format!("{kind}.{state}").as_str()
                || !matches!(state, "downloaded" | "failed")
                || Kind::parse(kind).is_none())
        {
            problems.push(format!(
                "notification {} for task {task_id}: type {} announcing state {state}",
                g.id, body["type"]
            ));
        }
        // Sent only after the settle was durable: the store (after the kill and the power
        // cut) holds the task in the state announced.
        let task = by_id.get(task_id).copied();
        let stored = task.and_then(|t| t["state"].as_str());
        if stored != Some(state) {
            problems.push(format!(
                "notification {} announced task {task_id} {state}, but the store has it {}: a notification for a settle that was not durable",
                g.id,
                stored.unwrap_or("missing")
            ));
        }
        if !new {
            continue;
        }
        let Some(plan) = world.plan_of(task_id, task).map(|i| &world.plans[i]) else {
            problems.push(format!(
                "notification {} for task {task_id}, which belongs to no task of the workload",
                g.id
            ));
            continue;
        };
        if state != plan.expected_state() {
            problems.push(format!(
                "notification {} announced task {task_id} {state}; KIE reported it {}",
                g.id,
                plan.expected_state()
            ));
        }
        if state == "downloaded" {
            let sent: Vec<&str> = data["files"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| i["sha256"].as_str().unwrap_or("?"))
                .collect();
            let want: Vec<String> = plan.images.iter().map(|i| sha256_hex(&i.bytes)).collect();
            if sent != want {
                problems.push(format!(
                    "notification {} for task {task_id}: images {sent:?}, expected {want:?}",
                    g.id
                ));
            }
        }
    }
    for (task_id, set) in &ids {
        if set.len() > 1 && world.many_ids.insert(task_id.clone()) {
            problems.push(format!(
                "task {task_id} was notified under {} webhook-ids: {set:?}",
                set.len()
            ));
        }
    }
    stats.resumed = runs.values().filter(|r| r.len() > 1).count();

    // The store's side: a settled task has its notification, an unsettled one none; one
    // shown delivered was answered 2xx under its id.
    for task in tasks {
        let id = task["task_id"].as_str().unwrap_or("?");
        let state = task["state"].as_str().unwrap_or("?");
        let notify = &task["notify"];
        let settled = matches!(state, "downloaded" | "failed");
        if !settled {
            if !notify.is_null() {
                problems.push(format!(
                    "task {id} is {state} but has a notification: {notify}"
                ));
            }
            continue;
        }
        let seen = ids.get(id);
        match notify["state"].as_str() {
            None => problems.push(format!("task {id} settled {state} without a notification")),
            Some("delivered") => {
                stats.delivered += 1;
                if !seen.is_some_and(|s| s.iter().any(|i| answered.contains(i))) {
                    problems.push(format!(
                        "task {id}: notification shown delivered, but the receiver answered none of its requests 2xx ({seen:?})"
                    ));
                }
            }
            Some(other) if final_run => problems.push(format!(
                "task {id}: notification {other} after the final run: {notify}"
            )),
            Some("pending") => {}
            Some(other) => problems.push(format!("task {id}: notification {other}: {notify}")),
        }
    }
    for p in problems {
        world.violation(p);
    }
    stats
}

fn env_number(var: &str) -> Option<u64> {
    let value = std::env::var(var).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={value:?}: expected a whole number")),
    )
}

/// The kill loop (see the module docs). `COVERD_KILL_CYCLES=N` for more cycles,
/// `COVERD_KILL_SEED=S` to replay a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_keeps_every_promise() {
    let cycles = env_number(CYCLES_VAR).map_or(DEFAULT_CYCLES, |n| n as usize);
    run_loop(
        cycles,
        env_seed(SEED_VAR),
        false,
        (CYCLES_VAR, SEED_VAR),
        None,
    )
    .await;
}

/// The kill loop with files in a real Garage's bucket (`[storage] kind = "s3"`): uploads
/// are under way at the kills, every recorded object must be whole and match its record,
/// and nothing is ever stored in the data directory. `COVERD_KILL_S3_CYCLES=N` for more
/// cycles, `COVERD_KILL_SEED=S` to replay a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_with_files_in_an_object_store_keeps_every_promise() {
    let garage = Garage::start();
    let cycles = env_number(S3_CYCLES_VAR).map_or(DEFAULT_CYCLES, |n| n as usize);
    run_loop(
        cycles,
        env_seed(SEED_VAR),
        false,
        (S3_CYCLES_VAR, SEED_VAR),
        Some(&garage),
    )
    .await;
}

/// The key prefix of the loop's objects.
pub(crate) const S3_PREFIX: &str = "loop/";
const S3_CYCLES_VAR: &str = "COVERD_KILL_S3_CYCLES";

/// A seed from `var`, else from the clock.
pub(crate) fn env_seed(var: &str) -> u64 {
    env_number(var).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    })
}

pub(crate) fn env_cycles(var: &str, default: usize) -> usize {
    env_number(var).map_or(default, |n| n as usize)
}

/// Where a cycle's kill (and power cut) lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CutAt {
    /// After a random delay (the seed's).
    Random,
    /// Right after the first callback answered 200 in the cycle. With `die`, the fault
    /// filesystem is set to lose power at the next `fsync`/`fdatasync` as soon as the daemon
    /// is up: then no write made after that is durable, and a 200 can only come from a
    /// daemon that answers before its flush round.
    FirstAck { die: bool },
    /// Right after an image is recorded as downloaded and a flush round has covered the
    /// record (`admin prune` of nothing flushes).
    FirstImageRecorded,
}

/// A run of the loop.
pub(crate) struct Opts<'a> {
    pub cycles: usize,
    pub seed: u64,
    /// The data directory on the fault filesystem, and a power cut after every SIGKILL.
    pub power_cuts: bool,
    /// The (cycles, seed) variables that replay the run.
    pub vars: (&'a str, &'a str),
    /// Added to every daemon's environment (a broken variant: `COVERD_TEST_BREAK`).
    pub env: Vec<(&'a str, &'a str)>,
    pub cut: CutAt,
    /// Files in this Garage's bucket (`[storage] kind = "s3"`, prefix [`S3_PREFIX`]) instead of
    /// the data directory: uploads are under way at the kills.
    pub garage: Option<&'a Garage>,
    /// After the cycles, a run without kill that must settle every task, a clean stop and
    /// `admin verify`.
    pub final_run: bool,
}

/// What a run of the loop found.
pub(crate) struct Report {
    pub violations: Vec<String>,
    pub acks: u64,
    pub images: usize,
    pub cuts: u64,
    pub notify: NotifyStats,
    /// The scratch directory (kept by the caller when it wants to look).
    pub scratch: Option<Scratch>,
}

/// The loop; panics with every violation found. See [`run`].
pub(crate) async fn run_loop(
    cycles: usize,
    seed: u64,
    power_cuts: bool,
    vars: (&str, &str),
    garage: Option<&Garage>,
) {
    let (cycles_var, seed_var) = vars;
    let report = run(Opts {
        cycles,
        seed,
        power_cuts,
        vars,
        env: Vec::new(),
        cut: CutAt::Random,
        garage,
        final_run: true,
    })
    .await;
    if !report.violations.is_empty() {
        let kept = report.scratch.map(|s| s.dir.keep());
        panic!(
            "kill loop (seed {seed}, replay with {seed_var}={seed} {cycles_var}={cycles}) found {} failures; data directory kept at {kept:?}:\n{}",
            report.violations.len(),
            report.violations.join("\n")
        );
    }
}

/// The loop itself; with `power_cuts`, the data directory is the fault filesystem
/// (`faultfs`) and every SIGKILL is followed by a power cut, once the steps still running
/// at the kill have ended (a command that answered success by then must survive it too).
/// Returns the violations rather than failing.
pub(crate) async fn run(opts: Opts<'_>) -> Report {
    let Opts {
        cycles,
        seed,
        power_cuts,
        vars,
        ref env,
        cut,
        garage,
        final_run,
    } = opts;
    let (cycles_var, seed_var) = vars;
    eprintln!(
        "kill loop: {cycles} cycles, seed {seed} (replay: {seed_var}={seed} {cycles_var}={cycles})"
    );
    let started = Instant::now();
    let fake = Arc::new(FakeKie::start().await);
    let rx = Receiver::start_seeded(Answer::Mixed, seed).await;
    let scratch = Arc::new(Scratch::new());
    let secret_file = scratch.dir.path().join("notify-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write the notify secret");
    let mut text = config(&scratch, &fake, &rx, &secret_file);
    if let Some(garage) = garage {
        text.push_str(&crate::storage::storage_table(&scratch, garage, S3_PREFIX));
    }
    scratch.write_raw_config(&text);
    let data_dir = scratch.data_dir();
    let stored = match garage {
        Some(garage) => Stored::Objects {
            garage,
            prefix: S3_PREFIX,
            data_dir: &data_dir,
        },
        None => Stored::Local(&data_dir),
    };
    let mut power = power_cuts.then(|| {
        FaultFs::mount_at(&scratch.dir.path().join("fault-backing"), &data_dir)
            .expect("mount the fault filesystem on the data directory")
    });
    let world = Arc::new(Mutex::new(World::default()));
    let mut tmp_at_kill: Vec<PathBuf> = Vec::new();

    for cycle in 0..cycles {
        // One generator per cycle, drawn first for the new tasks and the kill delay: the seed
        // replays those exactly, whatever the timing of earlier cycles did to later draws.
        let mut rng =
            StdRng::seed_from_u64(seed ^ (cycle as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let delay = Duration::from_millis(rng.random_range(KILL_DELAY_MS));
        {
            let mut w = world.lock().unwrap();
            w.cycle = Some(cycle);
            // What KIE was still generating is done now.
            for p in &mut w.plans {
                p.kie_done = true;
            }
            add_plans(&mut rng, &fake, &mut w, cycle);
        }
        rx.set_epoch(cycle);
        let d = Arc::new(restart(&scratch, &world, &tmp_at_kill, env).await);
        let (cx, n) = Cx::new(&scratch, &fake, &world, &d);
        if let (CutAt::FirstAck { die: true }, Some(fs)) = (cut, &mut power) {
            cx.expect_failures.store(true, Ordering::SeqCst);
            tokio::task::block_in_place(|| fs.die_at(FaultOp::Fsync, 1)).expect("arm the cut");
        }
        let acks_before = cx.world().stats.acks;
        let acked: Vec<usize> = {
            let w = cx.world();
            (0..n).filter(|&i| w.plans[i].acks > 0).collect()
        };
        let arrivals_seed = rng.random();
        let mut steps = launch(
            &cx,
            || Duration::from_millis(rng.random_range(ARRIVAL_MS)),
            &acked,
            DUPLICATE_STREAMS,
            arrivals_seed,
        );
        // The random moment: whatever the daemon is doing then (taking callbacks, tracking,
        // submitting, confirming, polling, fetching, installing, recording) is cut.
        match cut {
            CutAt::Random => tokio::time::sleep(delay).await,
            CutAt::FirstAck { .. } => {
                let deadline = Instant::now() + TARGET_BOUND;
                while cx.world().stats.acks == acks_before && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            CutAt::FirstImageRecorded => first_image_recorded(&scratch).await,
        }
        cx.killed.store(true, Ordering::SeqCst);
        d.kill();
        let parts = tmp_entries(&data_dir).len();
        while let Some(r) = steps.join_next().await {
            r.expect("load step");
        }
        if let Some(fs) = &mut power {
            tokio::task::block_in_place(|| fs.cut()).expect("power cut");
        }
        let logs = d.logs();
        drop(cx);
        drop(Arc::try_unwrap(d).unwrap_or_else(|_| panic!("daemon still shared")));
        tmp_at_kill = tmp_entries(&data_dir);

        let export = scratch.export().await;
        {
            let mut w = world.lock().unwrap();
            w.stats.cycles += 1;
            w.stats.kills += 1;
            w.stats.parts_at_kill += parts;
            w.stats.adopted += logs.matches(ADOPTED_LOG).count();
            let unrecorded = match export {
                Ok(tasks) => {
                    w.stats.notify = check_notifications(&mut w, &tasks, &rx.got(), false);
                    check_store(&mut w, &tasks, &stored, false)
                }
                Err(e) => {
                    w.violation(e);
                    0
                }
            };
            w.stats.unrecorded_at_kill += unrecorded;
            eprintln!(
                "kill loop cycle {cycle}: SIGKILL after {delay:?} with {parts} partial downloads in tmp/ and {unrecorded} installed images not yet recorded; {} acks so far, {} steps cut, {:?} since start",
                w.stats.acks,
                w.stats.cut,
                started.elapsed()
            );
        }
        // Halfway, the store is left as the release before task kinds wrote it: every cover
        // record in the record format v2; the load goes on on top of it.
        if cycle == cycles / 2 {
            let n = downgrade_covers(&data_dir).await;
            eprintln!(
                "kill loop cycle {cycle}: {n} cover records rewritten as the release before task kinds wrote them (format v2)"
            );
            world.lock().unwrap().stats.downgraded += n;
        }
    }

    if !final_run {
        let w = world.lock().unwrap();
        eprintln!(
            "kill loop (seed {seed}, {cycles} cycles, {cut:?}, no final run): {} acks, {} failures found",
            w.stats.acks,
            w.violations.len()
        );
        let cuts = power.as_ref().map_or(0, |p| p.cuts);
        drop(power);
        return Report {
            violations: w.violations.clone(),
            acks: w.stats.acks,
            images: 0,
            cuts,
            notify: w.stats.notify,
            scratch: Arc::try_unwrap(scratch).ok(),
        };
    }
    // The last run: no kill. KIE finishes everything; every callback is delivered.
    {
        let mut w = world.lock().unwrap();
        w.cycle = None;
        for p in &mut w.plans {
            p.kie_done = true;
        }
    }
    rx.set_epoch(cycles);
    let d = Arc::new(restart(&scratch, &world, &tmp_at_kill, env).await);
    let settle_from = Instant::now();
    let (cx, n) = Cx::new(&scratch, &fake, &world, &d);
    let mut steps = launch(&cx, || Duration::ZERO, &[], 0, 0);
    while let Some(r) = steps.join_next().await {
        r.expect("load step");
    }
    let still = cx.world().plans.iter().filter(|p| p.needs_work()).count();
    if still > 0 {
        cx.world().violation(format!(
            "{still} tasks could not be tracked, submitted or called back"
        ));
    }
    // Every task final, and its notification delivered, within the bound.
    let tasks = loop {
        let tasks = match scratch.export().await {
            Ok(t) => t,
            Err(e) => {
                cx.world().violation(e);
                Vec::new()
            }
        };
        let open = tasks
            .iter()
            .filter(|t| !matches!(t["state"].as_str(), Some("downloaded" | "failed")))
            .count();
        let undelivered = tasks
            .iter()
            .filter(|t| t["notify"]["state"] != "delivered")
            .count();
        if open == 0 && undelivered == 0 && tasks.len() >= n {
            break tasks;
        }
        if settle_from.elapsed() > SETTLE_BOUND {
            cx.world().violation(format!(
                "{open} of {} tasks not final, {undelivered} notifications not delivered {SETTLE_BOUND:?} after the last start",
                tasks.len()
            ));
            break tasks;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let settle = settle_from.elapsed();
    {
        let mut w = world.lock().unwrap();
        w.stats.settle = settle;
        check_store(&mut w, &tasks, &stored, true);
        w.stats.notify = check_notifications(&mut w, &tasks, &rx.got(), true);
    }
    drop(cx);
    let d = Arc::try_unwrap(d).unwrap_or_else(|_| panic!("daemon still shared"));
    let logs = d.stop().await;
    {
        let mut w = world.lock().unwrap();
        w.stats.adopted += logs.matches(ADOPTED_LOG).count();
        let left = tmp_entries(&data_dir);
        if !left.is_empty() {
            w.violation(format!("tmp/ not empty after a clean stop: {left:?}"));
        }
    }
    let verify = scratch.run(&["admin", "verify", "--json"]).await;
    let v: Value = serde_json::from_str(&verify.stdout).unwrap_or(Value::Null);
    let images: usize = world
        .lock()
        .unwrap()
        .plans
        .iter()
        .filter(|p| p.success)
        .map(|p| p.images.len())
        .sum();
    {
        let mut w = world.lock().unwrap();
        w.stats.images = images;
        let clean = verify.code == Some(0)
            && v["checked"] == images
            && v["ok"] == images
            && v["missing"].as_array().is_some_and(Vec::is_empty)
            && v["corrupt"].as_array().is_some_and(Vec::is_empty);
        if !clean {
            w.violation(format!("admin verify after the loop: {verify:?}"));
        }
    }

    let w = world.lock().unwrap();
    let s = &w.stats;
    eprintln!(
        "\nkill loop summary (seed {seed}):\n  cycles: {}, SIGKILLs: {}, power cuts: {}\n  tasks: {} ({} unknown, {} tracked, {} submitted; {} without a callback; by kind: {}; {} cover records rewritten in the format before kinds halfway)\n  callbacks acknowledged: {} ({} duplicate deliveries); requests cut by kills: {}\n  files stored: {}; partial downloads in tmp/ at the kills: {}; installed but unrecorded at the kills: {}; adopted after restart: {}\n  notifications delivered: {} (every settled task); requests to the receiver: {} ({} answered 500, {} answered slowly); sent again by a later run, same webhook-id: {}\n  max recovery (start to healthy): {:?}; every task final and notified {:?} after the last start (bound {SETTLE_BOUND:?})\n  failures found: {}\n  total time: {:?}",
        s.cycles,
        s.kills,
        power.as_ref().map_or(0, |p| p.cuts),
        w.plans.len(),
        w.plans
            .iter()
            .filter(|p| p.intake == Intake::Unknown)
            .count(),
        w.plans.iter().filter(|p| p.intake == Intake::Track).count(),
        w.plans
            .iter()
            .filter(|p| p.intake == Intake::Submit)
            .count(),
        w.plans.iter().filter(|p| !p.callback).count(),
        Kind::ALL
            .iter()
            .map(|k| format!(
                "{} {}",
                w.plans.iter().filter(|p| p.kind == *k).count(),
                k.as_str()
            ))
            .collect::<Vec<_>>()
            .join(", "),
        s.downgraded,
        s.acks,
        s.duplicate_acks,
        s.cut,
        s.images,
        s.parts_at_kill,
        s.unrecorded_at_kill,
        s.adopted,
        s.notify.delivered,
        s.notify.requests,
        s.notify.answered_500,
        s.notify.slow,
        s.notify.resumed,
        s.max_recovery,
        s.settle,
        w.violations.len(),
        started.elapsed(),
    );
    let report = Report {
        violations: w.violations.clone(),
        acks: s.acks,
        images: s.images,
        cuts: power.as_ref().map_or(0, |p| p.cuts),
        notify: s.notify,
        scratch: None,
    };
    drop(w);
    drop(power);
    Report {
        scratch: Arc::try_unwrap(scratch).ok(),
        ..report
    }
}

/// Rewrites every cover record of the (stopped) daemon's store in the record format of the
/// release before task kinds (v2), as an upgrade from it finds them; returns how many.
async fn downgrade_covers(data_dir: &Path) -> usize {
    use coverd::store::{Scanned, Store, codec};
    let store = Store::open(data_dir).expect("open the store to downgrade its records");
    let tasks: Vec<_> = store
        .all_tasks()
        .filter_map(|s| match s {
            Ok(Scanned::Task(t)) if t.kind == Kind::Cover => Some(*t),
            _ => None,
        })
        .collect();
    for task in &tasks {
        let history = store.events(&task.task_id).expect("history");
        let bytes = codec::encode_task_v2(task, &history).expect("encode v2");
        store.put_raw_task(&task.task_id, &bytes).expect("rewrite");
    }
    store.close().await.expect("close the store");
    tasks.len()
}

/// Longest a targeted cut waits for its moment.
const TARGET_BOUND: Duration = Duration::from_secs(20);

/// Returns once an image is recorded as downloaded (`admin export` over the admin socket)
/// and a flush round has covered that record (`admin prune` of nothing flushes), or after
/// [`TARGET_BOUND`].
async fn first_image_recorded(scratch: &Scratch) {
    let deadline = Instant::now() + TARGET_BOUND;
    while Instant::now() < deadline {
        let tasks = scratch.export().await.unwrap_or_default();
        let recorded = tasks.iter().any(|t| {
            t["files"]
                .as_array()
                .is_some_and(|i| i.iter().any(|img| img["state"] == "downloaded"))
        });
        if recorded {
            let out = scratch
                .run(&["admin", "prune", "--older-than", "3650d"])
                .await;
            assert_eq!(out.code, Some(0), "admin prune (a flush): {out:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
