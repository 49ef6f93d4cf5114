//! The statistics `admin status` reads without a scan: stored bytes and the quarantine index
//! kept with every change and across restarts, `admin verify`'s check and repair, copies
//! deriving them anew, a schema-2 store deriving them at open; the benchmark store builder.

use super::{quiet, stored_sized};
use crate::machine::Origin;
use crate::machine::{Event, Report};
use crate::model::Kind;
use crate::model::{ImageState, Millis, State, Task};
use crate::store::keys::count_key;
use crate::store::stats::{BYTES_KEY, FORMAT_KEY, own_meta_key, quarantine_key};
use crate::store::{Counts, IfMissing, SCHEMA_VERSION, StatsVerdict, Store, StoreError, codec};

fn apply(store: &Store, id: &str, event: Event, now: Millis) {
    store
        .apply(id, &event, &quiet(now), IfMissing::Create)
        .unwrap()
        .unwrap();
}

/// Tasks in every state; `a` and `b` store 100 + 20 and 7 bytes.
fn fill(store: &Store) {
    let success = |n: usize| {
        Event::Callback(
            Kind::Cover,
            Report::images((0..n).map(|i| format!("https://h/{i}.png")).collect()),
        )
    };
    apply(store, "a", success(2), 1);
    apply(store, "a", stored_sized(0, 100), 2);
    apply(store, "a", stored_sized(1, 20), 3);
    apply(store, "b", success(2), 4);
    apply(store, "b", stored_sized(1, 7), 5);
    apply(store, "c", Event::Track(Origin::cover(None)), 6);
    let failure = Event::Callback(
        Kind::Cover,
        Report::Failure {
            reason: "KIE code 501: no".into(),
        },
    );
    apply(store, "d", failure, 7);
}

/// A record damaged on disk, found by a read.
fn damage(store: &Store, id: &str) {
    store.put_raw_task(id, b"\xde\xad not a record").unwrap();
    assert!(store.get(id).unwrap_err().is_undecodable());
}

fn quarantined_ids(store: &Store) -> (Vec<String>, u64) {
    let (named, total) = store.quarantined(100).unwrap();
    (named.into_iter().map(|q| q.task_id).collect(), total)
}

/// `admin verify`'s check: one scan, then the comparison.
fn check(store: &Store) -> StatsVerdict {
    let mut check = store.stats_check();
    for scanned in store.all_tasks() {
        check.add(&scanned.unwrap());
    }
    store.finish_stats_check(check).unwrap()
}

fn counts(submitted: u64, received: u64, downloaded: u64, failed: u64) -> Counts {
    Counts {
        submitted,
        received,
        downloaded,
        failed,
    }
}

#[test]
fn bytes_and_quarantine_follow_every_change_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    fill(&store);
    assert_eq!(store.stored_bytes().unwrap(), 127);
    assert_eq!(store.counts().unwrap(), counts(1, 1, 1, 1));
    // A retry of a downloaded task whose file is damaged: its bytes are not stored now.
    apply(&store, "a", Event::Retry { damaged: vec![0] }, 8);
    assert_eq!(store.stored_bytes().unwrap(), 27);
    assert_eq!(check(&store), StatsVerdict::Agreed);

    // A quarantine event: the read that finds it puts it in the index.
    assert_eq!(quarantined_ids(&store), (vec![], 0));
    damage(&store, "c");
    assert_eq!(quarantined_ids(&store), (vec!["c".to_string()], 1));
    // The counters still count it as it was: verify's check sees the difference and
    // derives them again from the records.
    let StatsVerdict::Repaired(what) = check(&store) else {
        panic!("not repaired")
    };
    assert!(what.contains("counts per state"), "{what}");
    assert_eq!(store.counts().unwrap(), counts(0, 2, 0, 1));
    assert_eq!(check(&store), StatsVerdict::Agreed);

    // Kept across a restart, without a scan.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(quarantined_ids(&store), (vec!["c".to_string()], 1));
    assert_eq!(store.stored_bytes().unwrap(), 27);
    // Repaired (made readable again): out of the index in the same write.
    let readable = codec::encode_task(&Task::new("c".into(), None, 6), &[]).unwrap();
    store.put_raw_task("c", &readable).unwrap();
    assert_eq!(quarantined_ids(&store), (vec![], 0));
}

#[test]
fn verify_repairs_counters_and_index_that_disagree_with_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    fill(&store);
    damage(&store, "d");
    // The counters still count the damaged record as it was: the first check repairs.
    assert!(matches!(check(&store), StatsVerdict::Repaired(_)));
    assert_eq!(check(&store), StatsVerdict::Agreed);
    let meta = &store.inner.meta;
    meta.insert(BYTES_KEY, &5u64.to_be_bytes()).unwrap();
    meta.insert(count_key(State::Failed), &9u64.to_be_bytes())
        .unwrap();
    meta.remove(quarantine_key(b"d")).unwrap();
    meta.insert(quarantine_key(b"a"), &[]).unwrap();
    meta.insert(quarantine_key(b"gone"), &[]).unwrap();
    // `status` shows only what is really quarantined, even from a stale index (and
    // what this process found, even when the index lost it).
    assert_eq!(quarantined_ids(&store), (vec!["d".to_string()], 1));
    let StatsVerdict::Repaired(what) = check(&store) else {
        panic!("not repaired")
    };
    assert!(what.contains("bytes stored were 5"), "{what}");
    assert!(what.contains("2 of them readable or gone"), "{what}");
    assert_eq!(store.stored_bytes().unwrap(), 127);
    assert_eq!(store.counts().unwrap(), counts(1, 1, 1, 0));
    assert_eq!(quarantined_ids(&store), (vec!["d".to_string()], 1));
    assert_eq!(check(&store), StatsVerdict::Agreed);

    // A record changed during the scan: not compared, nothing written.
    let mut during = store.stats_check();
    for scanned in store.all_tasks() {
        during.add(&scanned.unwrap());
    }
    apply(&store, "e", Event::Track(Origin::cover(None)), 9);
    meta.insert(BYTES_KEY, &5u64.to_be_bytes()).unwrap();
    assert!(matches!(
        store.finish_stats_check(during).unwrap(),
        StatsVerdict::NotCompared(_)
    ));
    assert_eq!(store.stored_bytes().unwrap(), 5);
}

/// Restore and backup write copies with statistics derived from them, never the
/// source's (a backup is untrusted input).
#[test]
fn copies_derive_the_statistics_instead_of_copying_them() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, dst) = (
        Store::open(d1.path()).unwrap(),
        Store::open(d2.path()).unwrap(),
    );
    fill(&src);
    src.put_raw_task("q", b"\xde\xad not a record").unwrap();
    // Lies in the source's meta: not believed.
    let meta = &src.inner.meta;
    meta.insert(BYTES_KEY, &999u64.to_be_bytes()).unwrap();
    meta.insert(quarantine_key(b"a"), &[]).unwrap();
    meta.insert(FORMAT_KEY, &0u32.to_be_bytes()).unwrap();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = src.read_tasks(after.as_deref(), 2).unwrap();
        let Some(last) = chunk.last() else { break };
        after = Some(last.key().to_vec());
        dst.put_copies(&chunk).unwrap();
    }
    src.copy_other_trees(&dst).unwrap();
    assert_eq!(dst.stored_bytes().unwrap(), 127);
    assert_eq!(dst.counts().unwrap(), counts(1, 1, 1, 1));
    assert_eq!(quarantined_ids(&dst), (vec!["q".to_string()], 1));
    assert_eq!(check(&dst), StatsVerdict::Agreed);
    // Forgetting a task takes its bytes away.
    let a = dst.get("a").unwrap().unwrap();
    assert!(dst.forget("a", a.updated_at).unwrap());
    assert_eq!(dst.stored_bytes().unwrap(), 7);
    assert_eq!(check(&dst), StatsVerdict::Agreed);
}

/// Turns `dir`'s store into what the previous release (schema 2) wrote: no statistics.
fn as_schema_2(dir: &std::path::Path) {
    let store = Store::open(dir).unwrap();
    let meta = &store.inner.meta;
    for k in meta.iter().keys() {
        let k = k.unwrap();
        if own_meta_key(&k) {
            meta.remove(k).unwrap();
        }
    }
    meta.insert("schema_version", &2u32.to_be_bytes()).unwrap();
    store.flush_now().unwrap();
}

#[test]
fn a_schema_2_store_gets_its_statistics_derived_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        fill(&store);
        // Damage no one has read yet: the derivation finds it.
        store.put_raw_task("q", b"\xde\xad not a record").unwrap();
    }
    as_schema_2(dir.path());
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.inner.meta.get("schema_version").unwrap().as_deref(),
        Some(&SCHEMA_VERSION.to_be_bytes()[..])
    );
    assert_eq!(store.stored_bytes().unwrap(), 127);
    assert_eq!(store.counts().unwrap(), counts(1, 1, 1, 1));
    assert_eq!(quarantined_ids(&store), (vec!["q".to_string()], 1));
    assert_eq!(check(&store), StatsVerdict::Agreed);

    // A store another build's record format last indexed is derived again at open.
    store
        .inner
        .meta
        .insert(FORMAT_KEY, &(codec::ENVELOPE_VERSION + 1).to_be_bytes())
        .unwrap();
    store.inner.meta.insert(quarantine_key(b"a"), &[]).unwrap();
    store
        .inner
        .meta
        .insert(BYTES_KEY, &1u64.to_be_bytes())
        .unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.stored_bytes().unwrap(), 127);
    assert_eq!(quarantined_ids(&store), (vec!["q".to_string()], 1));
    assert_eq!(check(&store), StatsVerdict::Agreed);
}

/// Builds the store of docs/benchmarks.md's `admin status` benchmark: `COVERD_BENCH_TASKS`
/// (default 1,000,000) tasks written straight into `COVERD_BENCH_DIR` (which must not
/// hold a store yet) in transactions of 10,000 with their derived indexes: 94 % downloaded
/// with 2 images, 4 % failed, 1 % received, 1 % submitted, and 10 undecodable records;
/// with `COVERD_BENCH_SCHEMA=2`, left as the previous release wrote it (no statistics,
/// schema 2), for its binary. No image files. A tool, not a test:
/// `scripts/bench-status`.
#[test]
#[ignore = "builds a benchmark's store"]
fn build_status_bench_store() {
    use crate::model::{EventKind, EventRecord, Image};
    use sled::Transactional;
    let env = |k: &str| std::env::var(k).ok();
    let dir = std::path::PathBuf::from(env("COVERD_BENCH_DIR").expect("COVERD_BENCH_DIR"));
    let n: u64 = env("COVERD_BENCH_TASKS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let schema: u32 = env("COVERD_BENCH_SCHEMA")
        .and_then(|v| v.parse().ok())
        .unwrap_or(SCHEMA_VERSION);
    let started = std::time::Instant::now();
    let store = Store::open(&dir).unwrap();
    assert!(
        store.inner.tasks.is_empty(),
        "{} holds tasks",
        dir.display()
    );
    let t0: Millis = 1_780_000_000_000;
    let task_of = |i: u64| -> (Task, Vec<EventRecord>) {
        let id = format!("bench{i:07}-{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let at = t0 + i as Millis * 10;
        let mut t = Task::new(id, None, at);
        let note = |at, kind, detail: &str| EventRecord {
            at,
            kind,
            detail: detail.to_string(),
        };
        let mut history = vec![note(
            at,
            EventKind::Callback,
            "success callback, 2 image(s)",
        )];
        t.callbacks = 1;
        t.confirmed = true;
        t.images = (0..2)
            .map(|k| {
                Image::pending(
                    k,
                    format!("https://tempfile.aiquickdraw.com/s/{i}_{k}.png"),
                    at,
                )
            })
            .collect();
        match i % 100 {
            0 => {
                t.images.clear();
                history = vec![note(at, EventKind::Tracked, "tracked")];
            }
            1 => t.state = State::Received,
            2..=5 => {
                t.state = State::Failed;
                t.images.clear();
                t.error = Some("KIE code 501: Cover generation failed".into());
                history.push(note(
                    at + 1,
                    EventKind::Failed,
                    "KIE code 501: Cover generation failed",
                ));
            }
            _ => {
                t.state = State::Received;
                for img in &mut t.images {
                    img.state = ImageState::Downloaded;
                    img.path = Some(format!("images/{}/{}.png", t.task_id, img.index));
                    img.bytes = Some(1_500_000 + (i % 1000) * 1000 + u64::from(img.index));
                    img.sha256 = Some("ab".repeat(32));
                    history.push(note(at + 5, EventKind::ImageStored, "image stored"));
                }
                t.state = State::Downloaded;
                history.push(note(at + 6, EventKind::Downloaded, "2 image(s)"));
            }
        }
        t.updated_at = at + 6;
        t.event_count = history.len() as u32;
        (t, history)
    };
    let i = &*store.inner;
    const CHUNK: u64 = 10_000;
    for first in (0..n).step_by(CHUNK as usize) {
        let chunk: Vec<(Task, Vec<u8>)> = (first..(first + CHUNK).min(n))
            .map(|k| {
                let (t, h) = task_of(k);
                let bytes = codec::encode_task(&t, &h).unwrap();
                (t, bytes)
            })
            .collect();
        (&i.meta, &i.tasks, &i.due_download, &i.due_poll, &i.by_state)
            .transaction(|(meta, tasks, due_download, due_poll, by_state)| {
                let indexes = crate::store::index::Indexes {
                    meta,
                    due_download,
                    due_poll,
                    by_state,
                };
                let mut deltas = crate::store::index::Deltas::default();
                for (t, bytes) in &chunk {
                    indexes.derive_into(&t.task_id, None, Some(t), &mut deltas)?;
                    tasks.insert(t.task_id.as_bytes(), bytes.as_slice())?;
                }
                deltas.write(meta)?;
                Ok::<_, sled::transaction::ConflictableTransactionError<StoreError>>(())
            })
            .unwrap();
    }
    for q in 0..10 {
        let id = format!("bench-damaged-{q}");
        store.put_raw_task(&id, b"\xde\xad not a record").unwrap();
        // Found by a read, as the workers would (schema 2 has no index for them).
        assert!(store.get(&id).is_err());
    }
    store.flush_now().unwrap();
    drop(store);
    if schema == 2 {
        as_schema_2(&dir);
    }
    println!(
        "built a schema-{schema} store of {n} tasks in {} in {:.1} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
}
