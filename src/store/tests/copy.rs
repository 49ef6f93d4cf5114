//! Copies for backup and restore (indexes, counters, notifications and other trees rebuilt
//! or carried), a crafted outbox named, and forgetting only unchanged finished tasks.

use super::quiet;
use crate::machine::Origin;
use crate::machine::{Ctx, Event, Report};
use crate::model::Kind;
use crate::model::State;
use crate::store::outbox::head_key;
use crate::store::{IfMissing, Store};

fn fill(store: &Store) {
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        let event = Event::Track(Origin::cover(Some(format!("m-{id}"))));
        store
            .apply(id, &event, &quiet(10 + i as i64), IfMissing::Create)
            .unwrap();
    }
    let failure = Event::Callback(
        Kind::Cover,
        Report::Failure {
            reason: "KIE code 501: no".into(),
        },
    );
    store
        .apply("b", &failure, &quiet(20), IfMissing::Reject)
        .unwrap();
    store.inner.intents.insert("song", &[0u8; 8]).unwrap();
}

#[test]
fn copies_rebuild_indexes_counts_and_other_trees() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, dst) = (
        Store::open(d1.path()).unwrap(),
        Store::open(d2.path()).unwrap(),
    );
    fill(&src);
    let first = src.read_tasks(None, 2).unwrap();
    assert_eq!(first.len(), 2);
    let rest = src.read_tasks(Some(first[1].key()), 10).unwrap();
    assert_eq!(rest.len(), 1);
    dst.put_copies(&first).unwrap();
    dst.put_copies(&rest).unwrap();
    // Putting the same copy again changes nothing (indexes and counts replaced).
    dst.put_copies(&rest).unwrap();
    src.copy_other_trees(&dst).unwrap();
    assert_eq!(dst.counts().unwrap(), src.counts().unwrap());
    assert_eq!(dst.poll_queue(10).unwrap(), src.poll_queue(10).unwrap());
    let ids = |s: &Store, st| {
        s.list(st, 10)
            .unwrap()
            .into_iter()
            .map(|t| t.task_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&dst, None), ids(&src, None));
    assert_eq!(ids(&dst, Some(State::Failed)), vec!["b"]);
    assert_eq!(dst.events("b").unwrap(), src.events("b").unwrap());
    assert_eq!(dst.task_for_music("m-c").unwrap().as_deref(), Some("c"));
    assert_eq!(dst.intents(10).unwrap(), src.intents(10).unwrap());
    assert!(dst.read_task("zzz").unwrap().is_none());
}

/// A task's notifications travel with it: the copy has the same records, due entries
/// and counters, and putting the same copy twice counts nothing twice.
#[test]
fn copies_carry_their_notifications_with_due_entries_and_counters() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, dst) = (
        Store::open(d1.path()).unwrap(),
        Store::open(d2.path()).unwrap(),
    );
    let notify = |now| Ctx {
        notify: true,
        ..quiet(now)
    };
    let track = Event::Track(Origin::cover(None));
    let failure = Event::Callback(
        Kind::Cover,
        Report::Failure {
            reason: "KIE code 501: no".into(),
        },
    );
    for id in ["p", "q"] {
        src.apply(id, &track, &notify(10), IfMissing::Create)
            .unwrap();
    }
    src.apply("p", &failure, &notify(20), IfMissing::Reject)
        .unwrap();
    let copies = src.read_tasks(None, 10).unwrap();
    assert_eq!(copies.len(), 2);
    assert!(copies.iter().all(|c| c.notification_problem().is_none()));
    dst.put_copies(&copies).unwrap();
    dst.put_copies(&copies).unwrap();
    src.copy_other_trees(&dst).unwrap();
    assert_eq!(dst.notify_counts().unwrap(), src.notify_counts().unwrap());
    assert_eq!(dst.notify_counts().unwrap().pending, 1);
    assert_eq!(
        dst.latest_notification("p").unwrap(),
        src.latest_notification("p").unwrap()
    );
    assert_eq!(
        dst.due_notifications(i64::MAX, 10).unwrap(),
        src.due_notifications(i64::MAX, 10).unwrap()
    );
    assert!(dst.latest_notification("q").unwrap().is_none());
}

/// A crafted outbox (a head claiming 4 billion notifications, a record of another
/// task) is named, and reading it stays bounded.
#[test]
fn a_crafted_outbox_is_named() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    fill(&store);
    store
        .inner
        .outbox
        .insert(head_key("a"), &u32::MAX.to_be_bytes())
        .unwrap();
    let copies = store.read_tasks(None, 10).unwrap();
    let why = copies[0].notification_problem().unwrap();
    assert!(why.contains("4294967295 notifications"), "{why}");
    assert!(copies[1].notification_problem().is_none());
}

#[test]
fn forget_takes_only_unchanged_finished_tasks() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    fill(&store);
    let (found, last) = store.finished_before(i64::MAX, None, 10).unwrap();
    assert_eq!(last.as_deref(), Some(&b"c"[..]));
    let ids: Vec<_> = found.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["b"]);
    let b = &found[0];
    assert!(
        store
            .finished_before(b.updated_at, None, 10)
            .unwrap()
            .0
            .is_empty()
    );
    // Unfinished, or changed since it was read: kept.
    let a = store.get("a").unwrap().unwrap();
    assert!(!store.forget("a", a.updated_at).unwrap());
    assert!(!store.forget("b", b.updated_at - 1).unwrap());
    assert!(store.forget("b", b.updated_at).unwrap());
    assert!(store.get("b").unwrap().is_none());
    assert!(store.events("b").unwrap().is_empty());
    assert_eq!(store.task_for_music("m-b").unwrap(), None);
    assert_eq!(store.counts().unwrap().failed, 0);
    assert_eq!(store.counts().unwrap().submitted, 2);
    assert!(!store.forget("b", b.updated_at).unwrap());
}
