//! The schema check and migrations: a schema-1 store (written here by a test-only writer of
//! that layout) migrated at open, huge histories trimmed, a migration stopped half way run
//! again; foreign and newer databases refused.

use crate::machine::Origin;
use crate::model::Kind;
use std::path::Path;

use super::{callback, ids, quiet, reference, scripted, state_entries, stored};
use crate::machine::{self, Event, Report};
use crate::model::{EventKind, EventRecord, Millis, State, Task};
use crate::store::history::{MAX_DETAIL_BYTES, append_history};
use crate::store::keys::{event_key, state_key, time_key, u32_from};
use crate::store::migrate::{FORMAT_MARKER, V1_BY_CREATED};
use crate::store::open::LOCK_RELEASE_LIMIT;
use crate::store::{IfMissing, SCHEMA_VERSION, Store, StoreError, codec, writer};

/// What coverd wrote before schema 2 for `tasks`, from its `apply`: records in the `V1`
/// envelope, the history in `events`, `by_state` for every task, `by_created`, due
/// indexes, `by_music`, counters, then `schema_version` = `version`. Ids in `as_v2`
/// are written as the migration writes them (a run stopped half way); `raw` records
/// are written as given, with one history entry each. A test-only writer rather than a
/// directory written by a schema-1 binary: sled's files are large and opaque, while these
/// few lines state the schema-1 layout (keys and envelopes) the migration reads.
fn write_v1_store(dir: &Path, version: u32, as_v2: &[&str], raw: &[(&str, &[u8])]) {
    write_v1_tasks(dir, version, as_v2, raw, scripted());
}

pub(crate) fn write_v1_tasks(
    dir: &Path,
    version: u32,
    as_v2: &[&str],
    raw: &[(&str, &[u8])],
    script: Vec<(&str, Millis, Vec<Event>)>,
) {
    let path = dir.join("db");
    {
        let db = sled::open(&path).unwrap();
        let t = |name: &str| db.open_tree(name).unwrap();
        let (meta, tasks, events) = (t("meta"), t("tasks"), t("events"));
        let (due_dl, due_poll, by_state, by_created, by_music) = (
            t("due_download"),
            t("due_poll"),
            t("by_state"),
            t("by_created"),
            t("by_music"),
        );
        let mut counts = std::collections::BTreeMap::<u8, u64>::new();
        for (id, created, script) in script {
            let mut task = Task::new(id.to_string(), None, created);
            let mut history = Vec::new();
            for (i, event) in script.into_iter().enumerate() {
                let now = created + i as Millis;
                let outcome = machine::apply(&mut task, event, &quiet(now));
                append_history(&mut task, &mut history, &outcome.notes, now);
            }
            if as_v2.contains(&id) {
                tasks
                    .insert(id, codec::encode_task(&task, &history).unwrap())
                    .unwrap();
            } else {
                tasks
                    .insert(id, codec::encode_task_v1(&task).unwrap())
                    .unwrap();
                for (seq, e) in history.iter().enumerate() {
                    events
                        .insert(event_key(id, seq as u32), codec::encode_event(e).unwrap())
                        .unwrap();
                }
            }
            if !(as_v2.contains(&id) && task.state.is_finished()) {
                by_state
                    .insert(state_key(task.state, task.created_at, id), &[])
                    .unwrap();
            }
            by_created
                .insert(time_key(task.created_at, id), &[])
                .unwrap();
            if let Some(at) = task.download_due() {
                due_dl.insert(time_key(at, id), &[]).unwrap();
            }
            if let Some(at) = task.poll_due() {
                due_poll.insert(time_key(at, id), &[]).unwrap();
            }
            if let Some(m) = &task.music_task_id {
                by_music.insert(m.as_bytes(), id.as_bytes()).unwrap();
            }
            *counts.entry(task.state.code()).or_default() += 1;
        }
        for (id, bytes) in raw {
            tasks.insert(id.as_bytes(), *bytes).unwrap();
            let e = EventRecord {
                at: 1,
                kind: EventKind::Tracked,
                detail: format!("{id} tracked"),
            };
            events
                .insert(event_key(id, 0), codec::encode_event(&e).unwrap())
                .unwrap();
        }
        for (code, n) in counts {
            meta.insert([b"count/".as_slice(), &[code]].concat(), &n.to_be_bytes())
                .unwrap();
        }
        meta.insert("format", FORMAT_MARKER).unwrap();
        meta.insert("schema_version", &version.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    writer::wait_for_lock_release(&path.join("db"), LOCK_RELEASE_LIMIT);
}

/// `store` reads exactly like `want` (tasks, histories, listings, counts, queues).
fn assert_same(store: &Store, want: &Store) {
    for (id, _, _) in scripted() {
        assert_eq!(store.get(id).unwrap(), want.get(id).unwrap(), "task {id}");
        assert_eq!(store.events(id).unwrap(), want.events(id).unwrap(), "{id}");
        assert!(!store.events(id).unwrap().is_empty(), "{id}");
    }
    for limit in [1, 2, 3, 10] {
        assert_eq!(
            ids(store.list(None, limit).unwrap()),
            ids(want.list(None, limit).unwrap())
        );
        for s in State::ALL {
            assert_eq!(
                ids(store.list(Some(s), limit).unwrap()),
                ids(want.list(Some(s), limit).unwrap()),
                "{s:?}"
            );
        }
    }
    assert_eq!(store.counts().unwrap(), want.counts().unwrap());
    assert_eq!(store.stored_bytes().unwrap(), want.stored_bytes().unwrap());
    assert_eq!(
        store.download_queue(10).unwrap(),
        want.download_queue(10).unwrap()
    );
    assert_eq!(store.poll_queue(10).unwrap(), want.poll_queue(10).unwrap());
    assert_eq!(
        store.oldest_unfinished().unwrap().map(|t| t.task_id),
        want.oldest_unfinished().unwrap().map(|t| t.task_id)
    );
    assert_eq!(store.task_for_music("m-d").unwrap().as_deref(), Some("d"));
}

pub(crate) fn schema_of(store: &Store) -> u32 {
    u32_from(&store.inner.meta.get("schema_version").unwrap().unwrap())
}

/// Schema 1's `events` tree is empty and its `by_created` index gone.
pub(crate) fn schema_1_trees_gone(store: &Store) -> bool {
    store.inner.events.is_empty() && !has_tree(store, V1_BY_CREATED)
}

fn has_tree(store: &Store, name: &str) -> bool {
    store
        .inner
        .db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == name.as_bytes())
}

#[test]
fn a_schema_1_store_is_migrated_at_open() {
    let (_r, want) = reference();
    let dir = tempfile::tempdir().unwrap();
    let garbage: &[u8] = b"\xff\xff not a record";
    write_v1_store(dir.path(), 1, &[], &[("zz", garbage)]);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(schema_of(&store), SCHEMA_VERSION);
    assert!(!has_tree(&store, V1_BY_CREATED));
    assert_same(&store, &want);
    // Every record now holds its history; finished tasks lost their `by_state` entry.
    for kv in store.inner.tasks.iter() {
        let (k, v) = kv.unwrap();
        if k.as_ref() != b"zz" {
            assert!(matches!(codec::decode_record(&v), Ok((_, Some(_)))));
        }
    }
    assert_eq!(state_entries(&store), 3, "a, b and e");
    // The undecodable record stays as it was, quarantined, its history still read.
    assert!(store.get("zz").unwrap_err().is_undecodable());
    assert_eq!(store.inner.events.len(), 1);
    let (history, damaged) = store.history("zz").unwrap();
    assert_eq!(
        (history[0].detail.as_str(), damaged.len()),
        ("zz tracked", 0)
    );
    assert_eq!(store.quarantined(100).unwrap().0.len(), 1);

    // Reopened: nothing to do; then the tasks go on as usual.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_same(&store, &want);
    store
        .apply("b", &stored(0), &quiet(500), IfMissing::Reject)
        .unwrap();
    let kinds: Vec<_> = store.events("b").unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(kinds.last(), Some(&EventKind::ImageStored));
    assert_eq!(kinds.len(), want.events("b").unwrap().len() + 1);
}

/// Issue 14 item 3: schema 1 kept history details whole, so one task's history inlined
/// could pass the codec's 1 MiB limit and make the migration (and so every start) fail.
#[test]
fn a_schema_1_record_with_a_huge_history_is_migrated_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let script = vec![(
        "big1",
        100,
        vec![Event::Track(Origin::cover(Some("m-big".into())))],
    )];
    write_v1_tasks(dir.path(), 1, &[], &[], script);
    // 20 history entries of 60 KB each beside the record, as schema 1 wrote them.
    {
        let db = sled::open(dir.path().join("db")).unwrap();
        let (tasks, events) = (
            db.open_tree("tasks").unwrap(),
            db.open_tree("events").unwrap(),
        );
        let mut task = codec::decode_task(&tasks.get("big1").unwrap().unwrap()).unwrap();
        for seq in 0..20u32 {
            let e = EventRecord {
                at: 100 + Millis::from(seq),
                kind: if seq == 0 {
                    EventKind::Tracked
                } else {
                    EventKind::Polled
                },
                detail: format!("{seq:02}{}", "é".repeat(30_000)),
            };
            events
                .insert(event_key("big1", seq), codec::encode_event(&e).unwrap())
                .unwrap();
        }
        task.event_count = 20;
        tasks
            .insert("big1", codec::encode_task_v1(&task).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    // sled's lock is its file `db/db`, not the directory `db`.
    writer::wait_for_lock_release(&dir.path().join("db").join("db"), LOCK_RELEASE_LIMIT);

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(schema_of(&store), SCHEMA_VERSION);
    let history = store.events("big1").unwrap();
    assert_eq!(history.len(), 20, "every entry kept, its detail cut");
    for (seq, e) in history.iter().enumerate() {
        assert!(e.detail.len() <= MAX_DETAIL_BYTES, "entry {seq}");
        assert!(e.detail.starts_with(&format!("{seq:02}é")), "entry {seq}");
    }
    // The task goes on as usual.
    store
        .apply("big1", &callback(1), &quiet(500), IfMissing::Reject)
        .unwrap();
    assert!(store.events("big1").unwrap().len() > 20);
}

#[test]
fn a_migration_stopped_half_way_runs_again() {
    let (_r, want) = reference();
    // Stopped before the version flip: some records already in schema 2.
    let dir = tempfile::tempdir().unwrap();
    write_v1_store(dir.path(), 1, &["a", "c"], &[]);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(schema_of(&store), SCHEMA_VERSION);
    assert_same(&store, &want);
    assert!(store.inner.events.is_empty());
    assert!(!has_tree(&store, V1_BY_CREATED));

    // Stopped after the flip, before `by_created` was dropped.
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<&str> = scripted().iter().map(|t| t.0).collect();
    write_v1_store(dir.path(), 2, &all, &[]);
    let store = Store::open(dir.path()).unwrap();
    assert!(!has_tree(&store, V1_BY_CREATED));
    assert_same(&store, &want);
}

/// The migration's speed: a schema-1 store of `COVERD_MIGRATE_TASKS` (default 100,000)
/// failed tasks, opened. A measurement, not a test:
/// `COVERD_MIGRATE_TASKS=100000 cargo test --release --lib migration_throughput -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a test"]
fn migration_throughput() {
    let n: usize = std::env::var("COVERD_MIGRATE_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let ids: Vec<String> = (0..n).map(|i| format!("f-{i}")).collect();
    let failure = Event::Callback(
        Kind::Cover,
        Report::Failure {
            reason: "KIE code 501: Cover generation failed".into(),
        },
    );
    let script = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), 1_000 + i as Millis, vec![failure.clone()]))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_v1_tasks(dir.path(), 1, &[], &[], script);
    let started = std::time::Instant::now();
    let store = Store::open(dir.path()).unwrap();
    let took = started.elapsed();
    assert_eq!(store.counts().unwrap().failed, n as u64);
    println!(
        "migrated {n} tasks in {:.2} s ({:.0} tasks/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    // What listing finished tasks costs now that it scans.
    let started = std::time::Instant::now();
    assert_eq!(store.list(None, 20).unwrap().len(), 20.min(n));
    println!(
        "list of the newest 20 of {n}: {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn foreign_and_newer_databases_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path().join("db")).unwrap();
        db.open_tree("tasks").unwrap().insert("x", "y").unwrap();
        db.flush().unwrap();
    }
    // sled's I/O threads let go of the lock a moment after the handle: wait, or the
    // open below may find the directory locked rather than foreign.
    // sled's lock is its file `db/db`, not the directory `db`.
    writer::wait_for_lock_release(&dir.path().join("db").join("db"), LOCK_RELEASE_LIMIT);
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Foreign { .. })
    ));

    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .inner
            .meta
            .insert("schema_version", &99u32.to_be_bytes())
            .unwrap();
        store.inner.db.flush().unwrap();
    }
    let err = Store::open(dir.path()).err().unwrap();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
}
