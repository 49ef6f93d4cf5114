//! Power cuts in the middle of the long operations (issue 16 part 3): the schema-1 → 2
//! migration in a store's open, `admin backup` and `admin restore`, each run by the real
//! binary on the fault filesystem and cut at an exact operation (`FaultFs::die_at`, the
//! Nth write or sync, drawn from the seed over the count of a clean run), so every cut
//! lands inside the operation. After the cut and a remount:
//! - migration: the store opens and holds every task of the schema-1 fixture, with its
//!   whole history, migrated;
//! - backup: the backup restores complete (every task and image, `admin verify` clean), or
//!   restore refuses it with a reason and leaves nothing; never half; the source store is
//!   untouched;
//! - restore: the target is absent, refused with a reason (a restore cut short), or a
//!   complete restore; a rerun of the same restore then works.
//!
//! Run by `power_loop` (its cycles give the cuts of each kind). Owns these checks and the
//! fixtures; must not change the binary or the filesystem's rules.

use std::path::Path;
use std::process::Output;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sha2::{Digest, Sha256};

use coverd::model::{EventKind, EventRecord, Image, ImageState, State, Task, now_millis};
use coverd::store::{Store, codec};

use crate::bin_util::{coverd, output_blocking};
use crate::faultfs::{FaultFs, FaultOp};

/// Tasks in the schema-1 fixture, and history entries of each.
const V1_TASKS: usize = 400;
const V1_EVENTS: u32 = 3;
/// Tasks (each with one image) in the store that is backed up and restored.
const BACKUP_TASKS: usize = 40;

/// What the cuts found.
#[derive(Debug, Default)]
pub struct OpsReport {
    pub migration: Cuts,
    pub backup: Cuts,
    pub restore: Cuts,
    /// Restores of a backup cut short that were refused (the others restored complete).
    pub backups_refused: usize,
    /// Restores cut short that left a target `Store::open` refuses (the others left none,
    /// or a complete one).
    pub restores_refused: usize,
    pub violations: Vec<String>,
}

/// Cuts of one kind: tried, and how many landed inside the operation (the filesystem died
/// before the command ended).
#[derive(Debug, Default)]
pub struct Cuts {
    pub tried: usize,
    pub inside: usize,
}

impl OpsReport {
    pub fn summary(&self) -> String {
        format!(
            "power cuts inside the schema migration: {} of {}; inside admin backup: {} of {} ({} of those backups refused by restore, the rest restored complete); inside admin restore: {} of {} ({} left a target that is refused until restore runs again; every rerun completed)",
            self.migration.inside,
            self.migration.tried,
            self.backup.inside,
            self.backup.tried,
            self.backups_refused,
            self.restore.inside,
            self.restore.tried,
            self.restores_refused,
        )
    }

    fn violation(&mut self, what: String) {
        eprintln!("power ops VIOLATION: {what}");
        self.violations.push(what);
    }
}

/// `n` cuts of each kind, drawn from `seed`. Blocking.
pub fn run(n: usize, seed: u64) -> OpsReport {
    let mut report = OpsReport::default();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x005E_ED0F_0915);
    let dir = tempfile::tempdir().expect("temp dir");
    let fixtures = dir.path().join("fixtures");
    let v1 = fixtures.join("v1");
    write_v1_store(&v1);
    let src_real = fixtures.join("src");
    write_backup_source(&src_real);
    let mut fs = FaultFs::mount(&dir.path().join("fault")).expect("mount the fault filesystem");
    let root = fs.path().to_path_buf();
    let started = Instant::now();

    migrations(&mut fs, &root, &v1, n, &mut rng, &mut report);
    let src = root.join("src");
    copy_synced(&src_real, &src);
    backups(&mut fs, &root, &src, n, &mut rng, &mut report);
    restores(&mut fs, &root, &src, n, &mut rng, &mut report);
    eprintln!("power ops: {} in {:?}", report.summary(), started.elapsed());
    report
}

/// A cut point inside an operation that made `writes` writes and `syncs` syncs when it ran
/// without a cut: the Nth of one of them.
fn cut_point(rng: &mut StdRng, writes: u64, syncs: u64) -> (FaultOp, u64) {
    let pick_sync = syncs > 0 && (writes == 0 || rng.random_bool(0.5));
    if pick_sync {
        (FaultOp::Fsync, rng.random_range(1..=syncs))
    } else {
        (FaultOp::Write, rng.random_range(1..=writes.max(1)))
    }
}

/// Runs `args` (a coverd command) and returns how many writes and syncs it made.
fn measure(fs: &mut FaultFs, args: &[&str]) -> (Output, u64, u64) {
    let before = fs.counts().expect("counts");
    let out = run_coverd(args);
    let after = fs.counts().expect("counts");
    (
        out,
        after.writes - before.writes,
        (after.fsyncs + after.dir_fsyncs) - (before.fsyncs + before.dir_fsyncs),
    )
}

/// Runs `args` with the power set to go off at `cut`; then the cut itself. Whether the
/// power went off inside the command.
fn cut_inside(fs: &mut FaultFs, cut: (FaultOp, u64), args: &[&str]) -> (Output, bool) {
    fs.die_at(cut.0, cut.1).expect("arm the cut");
    let out = run_coverd(args);
    let died = fs.counts().expect("counts").died;
    fs.cut().expect("power cut");
    (out, died)
}

fn migrations(
    fs: &mut FaultFs,
    root: &Path,
    v1: &Path,
    n: usize,
    rng: &mut StdRng,
    report: &mut OpsReport,
) {
    // A clean run: how much a migrating open writes and syncs.
    let clean = root.join("m-clean");
    copy_synced(v1, &clean);
    let (out, writes, syncs) = measure(fs, &admin(&clean, &["status", "--json"]));
    assert_eq!(out.status.code(), Some(0), "migrating open: {}", text(&out));
    check_migrated(&clean, "the clean run", report);
    for i in 0..n {
        let dir = root.join(format!("m{i}"));
        copy_synced(v1, &dir);
        let cut = cut_point(rng, writes, syncs);
        let (out, died) = cut_inside(fs, cut, &admin(&dir, &["status", "--json"]));
        report.migration.tried += 1;
        report.migration.inside += usize::from(died);
        if !died && out.status.code() != Some(0) {
            report.violation(format!(
                "migration {i}: failed without a cut: {}",
                text(&out)
            ));
        }
        check_migrated(&dir, &format!("migration cut at {cut:?}"), report);
    }
}

/// The store in `dir` opens and holds every task of the fixture with its whole history.
fn check_migrated(dir: &Path, what: &str, report: &mut OpsReport) {
    let out = run_coverd(&admin(dir, &["export"]));
    if out.status.code() != Some(0) {
        return report.violation(format!(
            "{what}: the store does not open after the cut: {}",
            text(&out)
        ));
    }
    let tasks = lines(&out);
    let mut problems = Vec::new();
    if tasks.len() != V1_TASKS {
        problems.push(format!("{} tasks, not {V1_TASKS}", tasks.len()));
    }
    for t in &tasks {
        let events = t["events"].as_array().map_or(0, Vec::len);
        if events != V1_EVENTS as usize {
            problems.push(format!(
                "task {} has {events} history entries, not {V1_EVENTS}",
                t["task_id"]
            ));
        }
    }
    let schema = run_coverd(&admin(dir, &["status", "--json"]));
    if schema.status.code() != Some(0) {
        problems.push(format!("status: {}", text(&schema)));
    }
    if !problems.is_empty() {
        problems.truncate(5);
        report.violation(format!("{what}: {}", problems.join("; ")));
    }
}

fn backups(
    fs: &mut FaultFs,
    root: &Path,
    src: &Path,
    n: usize,
    rng: &mut StdRng,
    report: &mut OpsReport,
) {
    let clean = root.join("b-clean");
    let (out, writes, syncs) = measure(fs, &admin(src, &["backup", path(&clean)]));
    assert_eq!(out.status.code(), Some(0), "backup: {}", text(&out));
    for i in 0..n {
        let dest = root.join(format!("b{i}"));
        let cut = cut_point(rng, writes, syncs);
        let (out, died) = cut_inside(fs, cut, &admin(src, &["backup", path(&dest)]));
        report.backup.tried += 1;
        report.backup.inside += usize::from(died);
        if !died && out.status.code() != Some(0) {
            report.violation(format!("backup {i}: failed without a cut: {}", text(&out)));
        }
        // The source is untouched by a backup cut short.
        check_complete(src, &format!("the source after backup cut {i}"), report);
        // The backup restores complete, or is refused and nothing is restored.
        let target = root.join(format!("b{i}-restored"));
        let restored = run_coverd(&admin(&target, &["restore", path(&dest)]));
        let what = format!("restore of backup {i} cut at {cut:?}");
        if restored.status.code() == Some(0) {
            check_complete(&target, &what, report);
        } else {
            report.backups_refused += 1;
            if !died {
                report.violation(format!(
                    "{what}: a complete backup refused: {}",
                    text(&restored)
                ));
            }
            let stderr = String::from_utf8_lossy(&restored.stderr);
            if !stderr.contains(path(&dest)) {
                report.violation(format!(
                    "{what}: refused without naming the backup: {stderr}"
                ));
            }
            if !empty_or_absent(&target) {
                report.violation(format!(
                    "{what}: refused but left {:?} in the target",
                    entries(&target)
                ));
            }
        }
    }
}

fn restores(
    fs: &mut FaultFs,
    root: &Path,
    src: &Path,
    n: usize,
    rng: &mut StdRng,
    report: &mut OpsReport,
) {
    let backup = root.join("r-backup");
    let out = run_coverd(&admin(src, &["backup", path(&backup)]));
    assert_eq!(out.status.code(), Some(0), "backup: {}", text(&out));
    let clean = root.join("r-clean");
    let (out, writes, syncs) = measure(fs, &admin(&clean, &["restore", path(&backup)]));
    assert_eq!(out.status.code(), Some(0), "restore: {}", text(&out));
    check_complete(&clean, "the clean restore", report);
    for i in 0..n {
        let target = root.join(format!("r{i}"));
        let cut = cut_point(rng, writes, syncs);
        let (out, died) = cut_inside(fs, cut, &admin(&target, &["restore", path(&backup)]));
        report.restore.tried += 1;
        report.restore.inside += usize::from(died);
        let what = format!("restore cut at {cut:?}");
        if !died && out.status.code() != Some(0) {
            report.violation(format!("{what}: failed without a cut: {}", text(&out)));
        }
        // Absent (or empty), refused with the reason, or complete.
        if !empty_or_absent(&target) {
            let status = run_coverd(&admin(&target, &["status", "--json"]));
            if status.status.code() == Some(0) {
                check_complete(&target, &what, report);
            } else {
                report.restores_refused += 1;
                let stderr = String::from_utf8_lossy(&status.stderr);
                if !stderr.contains("restore that did not finish") {
                    report.violation(format!(
                        "{what}: the target neither opens nor says why: {stderr}"
                    ));
                }
            }
        }
        // A rerun works, whatever the cut left.
        let rerun = run_coverd(&admin(&target, &["restore", path(&backup)]));
        if rerun.status.code() != Some(0) {
            report.violation(format!("{what}: the rerun failed: {}", text(&rerun)));
        } else {
            check_complete(&target, &format!("{what}, rerun"), report);
        }
    }
}

/// The data directory `dir` holds every task of the backup source with its image
/// (`admin export` and `admin verify`).
fn check_complete(dir: &Path, what: &str, report: &mut OpsReport) {
    let out = run_coverd(&admin(dir, &["export"]));
    if out.status.code() != Some(0) {
        return report.violation(format!("{what}: does not open: {}", text(&out)));
    }
    let tasks = lines(&out);
    if tasks.len() != BACKUP_TASKS {
        return report.violation(format!(
            "{what}: {} tasks, not {BACKUP_TASKS}: half a restore",
            tasks.len()
        ));
    }
    let verify = run_coverd(&admin(dir, &["verify", "--json"]));
    let v: Value = serde_json::from_slice(&verify.stdout).unwrap_or(Value::Null);
    if verify.status.code() != Some(0) || v["ok"] != BACKUP_TASKS {
        report.violation(format!("{what}: admin verify: {}", text(&verify)));
    }
}

fn admin<'a>(data_dir: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["admin", "--data-dir", path(data_dir)];
    all.extend_from_slice(args);
    all
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

/// Runs coverd with `args`, SIGKILLed past `bin_util::PATIENCE` (60 s; on the fault
/// filesystem a dead mount answers EIO at once, so nothing waits that long).
fn run_coverd(args: &[&str]) -> Output {
    output_blocking(coverd().args(args).env("RUST_LOG", "warn,sled=off"))
}

/// A command's exit and output, each cut to its first 2,000 characters.
fn text(out: &Output) -> String {
    let cut = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .chars()
            .take(2_000)
            .collect::<String>()
    };
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        cut(&out.stdout),
        cut(&out.stderr)
    )
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn empty_or_absent(dir: &Path) -> bool {
    entries(dir).is_empty()
}

/// Copies the tree `from` (a real directory) to `to` on the fault filesystem, every file
/// and directory synced, so that it survives the cuts.
fn copy_synced(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for e in std::fs::read_dir(from).expect("read fixture") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_synced(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
            std::fs::File::open(&target)
                .and_then(|f| f.sync_all())
                .expect("sync file");
        }
    }
    sync_dir(to);
    if let Some(parent) = to.parent() {
        sync_dir(parent);
    }
}

fn sync_dir(dir: &Path) {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .expect("sync dir");
}

/// A schema-1 store as coverd 0.0 wrote it (records without history, their history in
/// `events`, `by_created`, schema version 1), in `dir/db`.
fn write_v1_store(dir: &Path) {
    let db = sled::open(dir.join("db")).expect("sled");
    let t = |name: &str| db.open_tree(name).expect("tree");
    let (meta, tasks, events, by_created) = (t("meta"), t("tasks"), t("events"), t("by_created"));
    meta.insert("format", b"coverd store").expect("insert");
    meta.insert("schema_version", &1u32.to_be_bytes())
        .expect("insert");
    let now = now_millis() - 3_600_000;
    for n in 0..V1_TASKS {
        let id = format!("v1task{n:05}");
        let mut task = Task::new(id.clone(), Some(format!("music{n}")), now + n as i64);
        task.event_count = V1_EVENTS;
        tasks
            .insert(&id, codec::encode_task_v1(&task).expect("encode"))
            .expect("insert");
        for seq in 0..V1_EVENTS {
            let e = EventRecord {
                at: now + n as i64 + i64::from(seq),
                kind: EventKind::Tracked,
                detail: format!("{id} entry {seq} {}", "x".repeat(200)),
            };
            let mut key = id.as_bytes().to_vec();
            key.push(0);
            key.extend_from_slice(&seq.to_be_bytes());
            events
                .insert(key, codec::encode_event(&e).expect("encode"))
                .expect("insert");
        }
        by_created
            .insert((now + n as i64).to_be_bytes(), id.as_bytes())
            .expect("insert");
    }
    db.flush().expect("flush");
}

/// A store of [`BACKUP_TASKS`] downloaded tasks, one image each, in `dir` (a real
/// directory; copied onto the fault filesystem).
fn write_backup_source(dir: &Path) {
    let store = Store::open(dir).expect("open store");
    let now = now_millis() - 10_000;
    for n in 0..BACKUP_TASKS {
        let id = format!("bk{n:04}");
        let mut data = b"\x89PNG\r\n\x1a\n".to_vec();
        data.extend(std::iter::repeat_n(n as u8, 20_000 + n * 100));
        let rel = format!("images/{id}/0.png");
        let file = dir.join(&rel);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&file, &data).expect("write image");
        let mut task = Task::new(id.clone(), None, now + n as i64);
        task.state = State::Downloaded;
        let mut img = Image::pending(0, format!("https://x.test/{n}.png"), now);
        img.state = ImageState::Downloaded;
        img.path = Some(rel);
        img.bytes = Some(data.len() as u64);
        img.sha256 = Some(hex::encode(Sha256::digest(&data)));
        task.images = vec![img];
        store
            .put_raw_task(&id, &codec::encode_task(&task, &[]).expect("encode"))
            .expect("plant");
    }
    drop(store);
    // Planted records bypass the store's counters (schema 3's statistics): `verify`
    // derives them, as it would after any repair, so that the source is a store coverd
    // itself could have written and its own `verify` passes.
    let out = run_coverd(&admin(dir, &["verify"]));
    assert!(
        text(&out).contains("derived again") || out.status.code() == Some(0),
        "verify of the backup source: {}",
        text(&out)
    );
    let out = run_coverd(&admin(dir, &["verify"]));
    assert_eq!(out.status.code(), Some(0), "verify again: {}", text(&out));
}

/// The fix the restore cuts called for: a restore cut short left a store that opened as if
/// complete. Now its marker makes every open refuse it, with the reason, and a rerun of the
/// restore starts over in it.
#[test]
fn a_restore_cut_short_is_refused_until_a_rerun_starts_over() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("src");
    write_backup_source(&src);
    let backup = dir.path().join("backup");
    let out = run_coverd(&admin(&src, &["backup", path(&backup)]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // What a cut in the middle leaves: the marker, a store with some of the tasks.
    let target = dir.path().join("target");
    std::fs::create_dir(&target).expect("mkdir");
    std::fs::write(target.join(coverd::store::UNFINISHED_RESTORE), b"").expect("marker");
    {
        let half = Store::open_for_restore(&target).expect("open");
        let task = Task::new("bk0000".into(), None, now_millis());
        half.put_raw_task("bk0000", &codec::encode_task(&task, &[]).expect("encode"))
            .expect("plant");
    }
    assert!(matches!(
        Store::open(&target),
        Err(coverd::store::StoreError::UnfinishedRestore { .. })
    ));
    for args in [&["status"][..], &["export"]] {
        let out = run_coverd(&admin(&target, args));
        assert_ne!(out.status.code(), Some(0), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("restore that did not finish"),
            "{}",
            text(&out)
        );
    }
    let out = run_coverd(&admin(&target, &["restore", path(&backup)]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut report = OpsReport::default();
    check_complete(&target, "the rerun", &mut report);
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert!(!target.join(coverd::store::UNFINISHED_RESTORE).exists());
}
