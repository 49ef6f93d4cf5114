//! Issue 14, items 1, 4 and 5: a backup is untrusted input (SPEC "Data directory"). Restore
//! (the real binary, in a child process; as root with SRC owned by `nobody`, so the drop to
//! SRC's owner is exercised) never writes outside the target, never follows a symbolic link
//! in SRC, never modifies SRC (read-only media, a schema-1 backup migrated in a copy only),
//! and refuses a record whose task id is invalid, differs from its key, or names a file other
//! than its own; `prune` and `retry` build every path from a valid id and never remove
//! anything outside `images/`. An online backup reads each task's record and its
//! notifications at one moment. Escapes point at decoy directories inside the test's temp
//! dir, whose tree is compared before and after.

use coverd::machine::Origin;
use coverd::model::Kind;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use coverd::admin::backup;
use coverd::machine::{Ctx, Event, Report};
use coverd::model::{Image, ImageState, State, Task, now_millis};
use coverd::store::{IfMissing, Store, codec};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use crate::bin_util::{NOBODY, coverd, is_root, output_blocking as output};

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A PNG's magic bytes and some payload (restore checks the hash, not the content).
fn png(tag: &str) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend_from_slice(tag.as_bytes());
    v
}

/// A finished task record named `id` whose images are `(index, path, data)`, downloaded.
fn record(id: &str, images: &[(u32, String, Vec<u8>)]) -> Vec<u8> {
    let now = now_millis() - 10_000;
    let mut task = Task::new(id.to_string(), None, now);
    task.state = State::Downloaded;
    task.images = images
        .iter()
        .map(|(index, path, data)| {
            let mut img = Image::pending(*index, format!("https://x.test/{index}.png"), now);
            img.state = ImageState::Downloaded;
            img.path = Some(path.clone());
            img.bytes = Some(data.len() as u64);
            img.sha256 = Some(sha(data));
            img
        })
        .collect();
    codec::encode_task(&task, &[]).expect("encode")
}

/// A store in `dir` holding exactly `records` (raw keys and bytes, no indexes).
fn plant_store(dir: &Path, records: &[(Vec<u8>, Vec<u8>)]) {
    let store = Store::open(dir).expect("open store");
    for (k, v) in records {
        store.put_raw_record(k, v).expect("plant record");
    }
    drop(store);
}

/// `backup.json` with these counts.
fn write_manifest(dir: &Path, tasks: u64, images: u64, bytes: u64) {
    let m = backup::Manifest {
        format: backup::FORMAT.into(),
        version: "0.1.0".into(),
        created_at: "2026-01-01T00:00:00Z".into(),
        tasks,
        images,
        bytes,
        objects: 0,
        storage: None,
    };
    std::fs::write(
        dir.join(backup::MANIFEST),
        serde_json::to_vec(&m).expect("manifest"),
    )
    .expect("write manifest");
}

/// Every entry under `root` (not following links) but those under `skip`: type, mode,
/// owner and content (a file's sha256, a link's target).
fn snapshot(root: &Path, skip: &[&Path]) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if skip.iter().any(|s| p.starts_with(s)) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let what = if meta.file_type().is_symlink() {
            format!("link -> {:?}", std::fs::read_link(&p).ok())
        } else if meta.is_dir() {
            for e in std::fs::read_dir(&p).expect("read dir").flatten() {
                stack.push(e.path());
            }
            "dir".to_string()
        } else {
            format!("file {}", sha(&std::fs::read(&p).unwrap_or_default()))
        };
        out.insert(
            p,
            format!("{what} mode {:o} uid {}", meta.mode(), meta.uid()),
        );
    }
    out
}

/// The differences between two snapshots, for a failure message.
fn diff(a: &BTreeMap<PathBuf, String>, b: &BTreeMap<PathBuf, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (p, v) in a {
        match b.get(p) {
            None => out.push(format!("removed {}", p.display())),
            Some(w) if w != v => out.push(format!("changed {}: {v} -> {w}", p.display())),
            _ => {}
        }
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        out.push(format!("created {}", p.display()));
    }
    out
}

/// Gives `path` and everything under it (not following links) to `nobody`.
fn chown_nobody(path: &Path) {
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).expect("stat");
        std::os::unix::fs::lchown(&p, Some(NOBODY), Some(NOBODY)).expect("chown");
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).expect("read dir").flatten() {
                stack.push(e.path());
            }
        }
    }
}

/// A temp dir others may traverse (as root, `nobody` must reach the paths, and escapes must
/// not be stopped merely by permissions), with decoy directories `nobody` may write.
struct Playground {
    dir: tempfile::TempDir,
}

impl Playground {
    fn new() -> Playground {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let p = Playground { dir };
        for decoy in ["decoy", "deep/decoy"] {
            let d = p.path().join(decoy);
            std::fs::create_dir_all(&d).expect("decoy");
            std::fs::write(d.join("keep.txt"), b"keep").expect("decoy file");
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        }
        std::fs::set_permissions(
            p.path().join("deep"),
            std::fs::Permissions::from_mode(0o777),
        )
        .expect("chmod");
        if is_root() {
            for decoy in ["decoy", "deep"] {
                chown_nobody(&p.path().join(decoy));
            }
        }
        p
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// `coverd admin --data-dir TARGET restore SRC`, to completion.
fn restore(target: &Path, src: &Path) -> Output {
    output(
        coverd()
            .arg("admin")
            .arg("--data-dir")
            .arg(target)
            .arg("restore")
            .arg(src),
    )
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Item 1: a record whose image path climbs out of `images/` (with the hash of a file
/// planted where it points) made restore write outside the target and exit 0.
#[test]
fn restore_refuses_an_image_path_that_leaves_images_and_writes_nothing_outside() {
    let play = Playground::new();
    let src = play.path().join("src");
    // The target is one level deeper than SRC: the same relative escape reads beside SRC
    // and writes beside the target (into deep/).
    let target = play.path().join("deep/target");
    let evil = png("evil");
    std::fs::write(play.path().join("decoy/evil.png"), &evil).unwrap();
    let path = "images/t1/../../../decoy/evil.png".to_string();
    plant_store(
        &src,
        &[(b"t1".to_vec(), record("t1", &[(0, path, evil.clone())]))],
    );
    // The directory the path climbs out of exists, as in any backup with images.
    std::fs::create_dir_all(src.join("images/t1")).unwrap();
    write_manifest(&src, 1, 1, evil.len() as u64);
    if is_root() {
        chown_nobody(&src);
    }
    let before = snapshot(play.path(), &[&target]);
    let out = restore(&target, &src);
    let after = snapshot(play.path(), &[&target]);
    assert_eq!(
        diff(&before, &after),
        Vec::<String>::new(),
        "{}",
        text(&out)
    );
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("t1"), "the task is named: {err}");
}

/// Item 1: a symbolic link in SRC (here `images/<id>`, pointing at a directory outside
/// holding a file with the recorded hash) is never followed.
#[test]
fn restore_never_follows_a_symlink_in_src() {
    let play = Playground::new();
    let src = play.path().join("src");
    let target = play.path().join("target");
    let secret = png("secret");
    std::fs::write(play.path().join("decoy/0.png"), &secret).unwrap();
    plant_store(
        &src,
        &[(
            b"t1".to_vec(),
            record("t1", &[(0, "images/t1/0.png".into(), secret.clone())]),
        )],
    );
    std::fs::create_dir(src.join("images")).unwrap();
    std::os::unix::fs::symlink(play.path().join("decoy"), src.join("images/t1")).unwrap();
    write_manifest(&src, 1, 1, secret.len() as u64);
    if is_root() {
        chown_nobody(&src);
    }
    let before = snapshot(play.path(), &[&target]);
    let out = restore(&target, &src);
    let after = snapshot(play.path(), &[&target]);
    assert_eq!(
        diff(&before, &after),
        Vec::<String>::new(),
        "{}",
        text(&out)
    );
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !target.join("images/t1/0.png").exists(),
        "the file behind the link was copied: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("t1") && err.contains("link"), "{err}");
}

/// Item 1: `admin prune` and `admin retry` on records keyed and named `../../victim`
/// (finished long ago, with an image recorded outside `images/`) remove nothing outside.
#[test]
fn prune_and_retry_never_remove_outside_images() {
    let play = Playground::new();
    let data = play.path().join("deep/data");
    let victim = play.path().join("deep/victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("0.png"), png("v")).unwrap();
    if is_root() {
        chown_nobody(&victim);
    }
    let id = "../../victim";
    let img = png("v");
    plant_store(
        &data,
        &[
            (
                id.as_bytes().to_vec(),
                record(id, &[(0, "images/../../victim/0.png".into(), png("x"))]),
            ),
            (
                b"ok-1".to_vec(),
                record("ok-1", &[(0, "images/../../victim/0.png".into(), img)]),
            ),
        ],
    );
    // A data directory always has its images/ (the paths climb out of it).
    std::fs::create_dir_all(data.join("images")).unwrap();
    if is_root() {
        chown_nobody(&data);
    }
    let before = snapshot(play.path(), &[&data]);
    for args in [
        &["retry", id][..],
        &["retry", "ok-1"],
        &["prune", "--older-than", "0s"],
    ] {
        let out = output(
            coverd()
                .arg("admin")
                .arg("--data-dir")
                .arg(&data)
                .args(args),
        );
        let after = snapshot(play.path(), &[&data]);
        assert_eq!(
            diff(&before, &after),
            Vec::<String>::new(),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert!(victim.join("0.png").exists());
}

/// Item 5: restore reads SRC without writing to it: a schema-1 backup on media the
/// restoring user cannot write is restored (migrated in a copy) and SRC is unchanged byte
/// for byte.
#[test]
fn restore_reads_src_without_writing_and_migrates_schema_1_in_a_copy() {
    let play = Playground::new();
    let src = play.path().join("src");
    let target = play.path().join("target");
    // A schema-1 store as coverd 0.0 wrote it: records without history, the version 1.
    {
        let db = sled::open(src.join("db")).unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format", b"coverd store").unwrap();
        meta.insert("schema_version", &1u32.to_be_bytes()).unwrap();
        let tasks = db.open_tree("tasks").unwrap();
        let task = Task::new("old-1".into(), None, now_millis());
        tasks
            .insert("old-1", codec::encode_task_v1(&task).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    write_manifest(&src, 1, 0, 0);
    // Read-only for whoever restores: root's restore acts as SRC's owner (nobody), so SRC
    // stays root's; as another user, its write bits are cleared.
    let mut stack = vec![src.clone()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = if meta.is_dir() { 0o555 } else { 0o444 };
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let mut cmd = coverd();
    if is_root() {
        use std::os::unix::process::CommandExt;
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::chown(&target, Some(NOBODY), Some(NOBODY)).unwrap();
        cmd.uid(NOBODY).gid(NOBODY);
    }
    let before = snapshot(&src, &[]);
    let out = output(
        cmd.arg("admin")
            .arg("--data-dir")
            .arg(&target)
            .arg("restore")
            .arg(&src),
    );
    let after = snapshot(&src, &[]);
    // Writable again, so the temp dir can be removed.
    let mut stack = vec![src.clone()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        }
    }
    assert_eq!(
        diff(&before, &after),
        Vec::<String>::new(),
        "{}",
        text(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let store = Store::open(&target).unwrap();
    assert_eq!(store.get("old-1").unwrap().unwrap().task_id, "old-1");
    assert_eq!(store.counts().unwrap().submitted, 1);
    drop(store);
    // Nothing of the scratch copy is left in the target.
    let mut names: Vec<_> = std::fs::read_dir(&target)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["db"], "{}", text(&out));
}

fn notify_ctx(now: i64) -> Ctx {
    Ctx {
        now,
        max_attempts: 3,
        poll_after_ms: 1000,
        notify: true,
    }
}

/// Item 4: a task that settles while an online backup runs, after its record was read, is
/// restored as it was read: without the notification of that later settle. (Before, the
/// outbox was copied after all records: restored, the task was unsettled with a pending
/// notification, and settling it again sent a second webhook-id for the same event.)
#[test]
fn an_online_backup_reads_each_task_with_its_notifications() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Store::open(&data).unwrap();
    let now = now_millis();
    // More than one chunk of tasks, so the backup reports progress in between.
    for i in 0..200 {
        let id = format!("n-{i:03}");
        store
            .apply(
                &id,
                &Event::Track(Origin::cover(None)),
                &notify_ctx(now),
                IfMissing::Create,
            )
            .unwrap();
    }
    let fail = Event::Callback(
        Kind::Cover,
        Report::Failure {
            reason: "KIE code 501: no".into(),
        },
    );
    let settled = Arc::new(AtomicBool::new(false));
    let progress: backup::Progress = {
        let (store, settled, fail) = (store.clone(), settled.clone(), fail.clone());
        Arc::new(move |_, _| {
            // After the first chunk was read: n-000 settles, with its notification.
            if !settled.swap(true, Ordering::SeqCst) {
                store
                    .apply("n-000", &fail, &notify_ctx(now + 1), IfMissing::Reject)
                    .unwrap();
            }
        })
    };
    let dest = dir.path().join("backup");
    backup::backup(&store, &data, &dest, None, Some(progress)).unwrap();
    assert!(settled.load(Ordering::SeqCst));
    assert!(store.latest_notification("n-000").unwrap().is_some());
    drop(store);

    let target = dir.path().join("restored");
    backup::restore(&dest, &target, None, None).unwrap();
    let restored = Store::open(&target).unwrap();
    let task = restored.get("n-000").unwrap().unwrap();
    let n = restored.latest_notification("n-000").unwrap();
    assert_eq!(
        (task.state, n.as_ref().map(|n| n.webhook_id.clone())),
        (State::Submitted, None),
        "a record must be restored with the notifications it had at that moment"
    );
    assert_eq!(restored.notify_counts().unwrap().pending, 0);
    // Settling it once now makes exactly one notification.
    restored
        .apply("n-000", &fail, &notify_ctx(now + 2), IfMissing::Reject)
        .unwrap();
    assert_eq!(restored.notify_counts().unwrap().pending, 1);
    assert_eq!(
        restored.latest_notification("n-000").unwrap().unwrap().seq,
        1
    );
}

// ---- Generated hostile backups and stores (proptest) ----

/// Cases each property runs: modest, so both finish within a minute on a loaded 2-core
/// machine (each case runs the binary). The number is quoted in docs/reliability.md.
const CASES: u32 = 64;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // No regression files written into the source tree; shrinking kept short.
        failure_persistence: None,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    }
}

/// A task id as a crafted record may hold it. `DECOY` is replaced by the absolute path of
/// the case's decoy directory.
fn any_id() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => "[A-Za-z0-9_-]{1,12}",
        1 => Just("..".to_string()),
        1 => Just("../decoy".to_string()),
        1 => Just("../../decoy".to_string()),
        1 => Just("DECOY".to_string()),
        1 => "[a-z]{1,3}/[a-z]{1,3}",
        1 => Just("a".repeat(129)),
        1 => Just("b".repeat(4000)),
        1 => Just(String::new()),
        1 => "\\PC{1,6}",
    ]
}

/// What a record's key is, beside its id.
#[derive(Debug, Clone)]
enum Key {
    SameAsId,
    Other(String),
    /// Not UTF-8.
    Bytes(Vec<u8>),
}

fn any_key() -> impl Strategy<Value = Key> {
    prop_oneof![
        12 => Just(Key::SameAsId),
        1 => any_id().prop_map(Key::Other),
        1 => prop::collection::vec(128u8..=255, 1..6).prop_map(Key::Bytes),
    ]
}

/// What an image's recorded path is.
#[derive(Debug, Clone, Copy)]
enum PathKind {
    Canonical,
    /// `images/<id>/../../../decoy/<n>.png`: beside SRC when read, beside the target
    /// (one level deeper) when written.
    Climb,
    ClimbFurther,
    Absolute,
    OtherTask,
    BadExt,
    DoubleSlash,
    VeryLong,
    NoPath,
}

fn any_path_kind() -> impl Strategy<Value = PathKind> {
    prop_oneof![
        12 => Just(PathKind::Canonical),
        1 => Just(PathKind::Climb),
        1 => Just(PathKind::ClimbFurther),
        1 => Just(PathKind::Absolute),
        1 => Just(PathKind::OtherTask),
        1 => Just(PathKind::BadExt),
        1 => Just(PathKind::DoubleSlash),
        1 => Just(PathKind::VeryLong),
        1 => Just(PathKind::NoPath),
    ]
}

/// A symbolic link planted in SRC (pointing into a decoy directory).
#[derive(Debug, Clone, Copy)]
enum Link {
    None,
    ImagesDir,
    TaskDir,
    ImageFile,
    DbFile,
    DbBlobs,
    Manifest,
}

fn any_link() -> impl Strategy<Value = Link> {
    prop_oneof![
        8 => Just(Link::None),
        1 => Just(Link::ImagesDir),
        1 => Just(Link::TaskDir),
        1 => Just(Link::ImageFile),
        1 => Just(Link::DbFile),
        1 => Just(Link::DbBlobs),
        1 => Just(Link::Manifest),
    ]
}

#[derive(Debug, Clone)]
enum ManifestKind {
    /// The counts a faithful restore of the records would find.
    Matching,
    Counts(u64, u64, u64),
    Missing,
    Garbage(Vec<u8>),
}

fn any_manifest() -> impl Strategy<Value = ManifestKind> {
    prop_oneof![
        8 => Just(ManifestKind::Matching),
        1 => (0u64..5, 0u64..5, 0u64..100).prop_map(|(a, b, c)| ManifestKind::Counts(a, b, c)),
        1 => Just(ManifestKind::Missing),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(ManifestKind::Garbage),
    ]
}

#[derive(Debug, Clone)]
struct CraftedRecord {
    id: String,
    key: Key,
    images: Vec<PathKind>,
    failed: bool,
}

fn any_record() -> impl Strategy<Value = CraftedRecord> {
    (
        any_id(),
        any_key(),
        prop::collection::vec(any_path_kind(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(id, key, images, failed)| CraftedRecord {
            id,
            key,
            images,
            failed,
        })
}

/// Lexically resolves `.` and `..` (no file system access).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// What `craft` makes of a case: its records (key, bytes), whether a faithful restore must
/// refuse them, and the counts it would find (tasks, images, bytes).
type Crafted = (Vec<(Vec<u8>, Vec<u8>)>, bool, (u64, u64, u64));

/// The records of a case, as keys and bytes, with every image's data planted where its
/// recorded path points from `base` (inside the playground only), and whether a faithful
/// restore must refuse them; also the counts it would find (tasks, images, bytes).
fn craft(play: &Path, base: &Path, records: &[CraftedRecord]) -> Crafted {
    let decoy = play.join("decoy");
    let mut out = Vec::new();
    let mut hostile = false;
    let mut counts = (0, 0, 0);
    let mut keys = std::collections::BTreeSet::new();
    for (n, r) in records.iter().enumerate() {
        let id = r.id.replace("DECOY", &decoy.display().to_string());
        let key = match &r.key {
            Key::SameAsId => id.as_bytes().to_vec(),
            Key::Other(k) => k.as_bytes().to_vec(),
            Key::Bytes(b) => b.clone(),
        };
        if !keys.insert(key.clone()) {
            continue;
        }
        let valid = coverd::model::valid_task_id(&id) && key == id.as_bytes();
        hostile |= !valid;
        let mut images = Vec::new();
        for (index, kind) in r.images.iter().enumerate() {
            let data = png(&format!("case image {n} {index}"));
            let path = match kind {
                PathKind::Canonical => format!("images/{id}/{index}.png"),
                PathKind::Climb => format!("images/{id}/../../../decoy/{n}-{index}.png"),
                PathKind::ClimbFurther => format!("images/{id}/../../../../decoy/{n}-{index}.png"),
                PathKind::Absolute => format!("{}/abs-{n}-{index}.png", decoy.display()),
                PathKind::OtherTask => format!("images/other-{n}/{index}.png"),
                PathKind::BadExt => format!("images/{id}/{index}.sh"),
                PathKind::DoubleSlash => format!("images/{id}//{index}.png"),
                PathKind::VeryLong => format!("images/{id}/{}{index}.png", "x/".repeat(3000)),
                PathKind::NoPath => String::new(),
            };
            if matches!(kind, PathKind::NoPath) {
                // Downloaded without a file: refused too.
                hostile = true;
                images.push((index as u32, String::new(), data));
                continue;
            }
            if !matches!(kind, PathKind::Canonical) || !valid {
                hostile = true;
            }
            // The data where the path points, so that only the path makes it hostile.
            let at = normalize(&if Path::new(&path).is_absolute() {
                PathBuf::from(&path)
            } else {
                base.join(&path)
            });
            if at.starts_with(play) && path.len() < 1000 {
                if let Some(parent) = at.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let _ = std::fs::write(&at, &data);
            }
            // The directories a climbing path passes through exist, as in a real backup.
            if coverd::model::valid_task_id(&id) {
                let _ = std::fs::create_dir_all(base.join("images").join(&id));
            }
            counts.1 += 1;
            counts.2 += data.len() as u64;
            images.push((index as u32, path, data));
        }
        let mut bytes = record(&id, &images);
        if images.iter().any(|(_, p, _)| p.is_empty()) {
            // A downloaded image without a path.
            let mut task = codec::decode_task(&bytes).unwrap();
            for img in &mut task.images {
                if img.path.as_deref() == Some("") {
                    img.path = None;
                }
            }
            bytes = codec::encode_task(&task, &[]).unwrap();
        }
        if r.failed {
            let mut task = codec::decode_task(&bytes).unwrap();
            task.state = State::Failed;
            bytes = codec::encode_task(&task, &[]).unwrap();
        }
        counts.0 += 1;
        out.push((key, bytes));
    }
    (out, hostile, counts)
}

/// Plants `link` in SRC, pointing into the decoy directory; whether restore reads through
/// it (and so must refuse).
fn plant_link(play: &Path, src: &Path, link: Link, first_valid_id: Option<&str>) -> bool {
    let decoy = play.join("decoy");
    let sym = |to: &Path, at: &Path| {
        if let Some(parent) = at.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::remove_dir_all(at);
        let _ = std::fs::remove_file(at);
        std::os::unix::fs::symlink(to, at).expect("symlink");
    };
    match (link, first_valid_id) {
        (Link::None, _) => false,
        (Link::ImagesDir, _) => {
            sym(&decoy, &src.join("images"));
            false
        }
        (Link::TaskDir, Some(id)) => {
            sym(&decoy, &src.join("images").join(id));
            false
        }
        (Link::ImageFile, Some(id)) => {
            std::fs::write(decoy.join("linked.png"), png("linked")).unwrap();
            sym(
                &decoy.join("linked.png"),
                &src.join("images").join(id).join("0.png"),
            );
            false
        }
        (Link::TaskDir | Link::ImageFile, None) => false,
        (Link::DbFile, _) => {
            let conf = src.join("db/conf");
            std::fs::copy(&conf, decoy.join("conf")).unwrap();
            sym(&decoy.join("conf"), &conf);
            true
        }
        (Link::DbBlobs, _) => {
            std::fs::create_dir_all(decoy.join("blobs")).unwrap();
            sym(&decoy.join("blobs"), &src.join("db/blobs"));
            true
        }
        (Link::Manifest, _) => {
            let m = src.join(backup::MANIFEST);
            let _ = std::fs::rename(&m, decoy.join("backup.json"));
            sym(&decoy.join("backup.json"), &m);
            true
        }
    }
}

/// Every path under the target is one restore may write: its store, or an image file at
/// `images/<valid id>/<index>.<ext>`; no link.
fn target_paths_are_canonical(target: &Path) -> Result<(), String> {
    for p in crate::bin_util::tree(target) {
        let meta = std::fs::symlink_metadata(&p).map_err(|e| e.to_string())?;
        if meta.file_type().is_symlink() {
            return Err(format!("a link in the target: {}", p.display()));
        }
        let rel = p.strip_prefix(target).unwrap();
        let parts: Vec<_> = rel
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let ok = match parts.as_slice() {
            [] => true,
            [db, ..] if db == "db" => true,
            [images] if images == "images" => true,
            [images, id] if images == "images" => coverd::model::valid_task_id(id),
            [images, id, file] if images == "images" => {
                coverd::model::valid_task_id(id)
                    && file.split_once('.').is_some_and(|(n, ext)| {
                        n.parse::<u32>().is_ok() && ["png", "jpg", "webp", "gif"].contains(&ext)
                    })
            }
            _ => false,
        };
        if !ok {
            return Err(format!("restore wrote {}", p.display()));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Restore of a generated backup (records with arbitrary ids, keys, image paths;
    /// symbolic links in SRC; any manifest), through the binary: nothing outside the target
    /// is created, modified or removed, SRC is unchanged byte for byte, a hostile record or
    /// a link restore would read makes it refuse, and what it restores is only its store and
    /// image files at their own paths.
    #[test]
    fn restore_of_a_generated_backup_stays_in_its_target(
        records in prop::collection::vec(any_record(), 1..4),
        link in any_link(),
        manifest in any_manifest(),
    ) {
        let play = Playground::new();
        let src = play.path().join("src");
        let target = play.path().join("deep/target");
        std::fs::create_dir_all(&src).unwrap();
        let (planted, hostile, counts) = craft(play.path(), &src, &records);
        plant_store(&src, &planted);
        match &manifest {
            ManifestKind::Matching => write_manifest(&src, counts.0, counts.1, counts.2),
            ManifestKind::Counts(a, b, c) => write_manifest(&src, *a, *b, *c),
            ManifestKind::Missing => {}
            ManifestKind::Garbage(g) => std::fs::write(src.join(backup::MANIFEST), g).unwrap(),
        }
        let first_valid = records
            .iter()
            .map(|r| r.id.as_str())
            .find(|id| coverd::model::valid_task_id(id));
        let through_link = plant_link(play.path(), &src, link, first_valid);
        if is_root() {
            chown_nobody(&src);
            chown_nobody(&play.path().join("decoy"));
        }
        let before = snapshot(play.path(), &[&target]);
        let out = restore(&target, &src);
        let after = snapshot(play.path(), &[&target]);
        prop_assert_eq!(diff(&before, &after), Vec::<String>::new(), "{}", text(&out));
        if hostile || through_link {
            prop_assert_ne!(out.status.code(), Some(0), "{}", text(&out));
        }
        if out.status.code() == Some(0) {
            let checked = target_paths_are_canonical(&target);
            prop_assert!(checked.is_ok(), "{:?}: {}", checked, text(&out));
            if is_root() {
                // Root only created the target: everything in it is SRC's owner's.
                let roots: Vec<_> = crate::bin_util::tree(&target)
                    .into_iter()
                    .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.uid() != NOBODY))
                    .collect();
                prop_assert!(roots.is_empty(), "not nobody's: {:?}", roots);
            }
        } else {
            // Refused: the target is gone, or (created by root for SRC's owner) empty.
            let left = std::fs::read_dir(&target).map(|d| d.count()).unwrap_or(0);
            prop_assert_eq!(left, 0, "{}", text(&out));
        }
    }

    /// `admin retry` (which forgets nothing but discards and re-queues) on one of the keys,
    /// `admin verify` and `admin prune` on a stopped store holding generated records (keys and ids such as
    /// `../../decoy`, image paths outside `images/`, non-UTF-8 keys), with the files they
    /// name planted: nothing outside the data directory is created, modified or removed.
    #[test]
    fn prune_retry_and_verify_of_generated_records_stay_in_images(
        records in prop::collection::vec(any_record(), 1..4),
        retried in any::<prop::sample::Index>(),
    ) {
        let play = Playground::new();
        let data = play.path().join("deep/data");
        std::fs::create_dir_all(data.join("images")).unwrap();
        let (planted, _, _) = craft(play.path(), &data, &records);
        plant_store(&data, &planted);
        if is_root() {
            chown_nobody(&data);
            chown_nobody(&play.path().join("deep"));
            chown_nobody(&play.path().join("decoy"));
        }
        let before = snapshot(play.path(), &[&data]);
        let mut runs: Vec<Vec<std::ffi::OsString>> = vec![
            vec!["verify".into()],
            vec!["prune".into(), "--older-than".into(), "0s".into()],
        ];
        // `retry` on one of the keys (a process per command: one key per case keeps the
        // property within a minute on a loaded machine; the cases vary the key).
        if !planted.is_empty() {
            use std::os::unix::ffi::OsStringExt;
            let key = planted[retried.index(planted.len())].0.clone();
            runs.insert(0, vec!["retry".into(), std::ffi::OsString::from_vec(key)]);
        }
        for args in runs {
            let out = output(
                coverd()
                    .arg("admin")
                    .arg("--data-dir")
                    .arg(&data)
                    .args(&args),
            );
            let after = snapshot(play.path(), &[&data]);
            prop_assert_eq!(diff(&before, &after), Vec::<String>::new(), "{:?}: {}", args, text(&out));
        }
    }
}
