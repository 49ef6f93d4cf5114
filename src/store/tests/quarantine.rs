//! Quarantine: records that cannot be decoded (damage, a newer coverd) are errors to their
//! readers, skipped by the due queues and listings, named by the scan, and a damaged history
//! entry does not hide the rest.

use super::{callback, ctx, open, track};
use crate::model::Millis;
use crate::store::keys::event_key;
use crate::store::{IfMissing, StoreError, codec};

#[test]
fn undecodable_records_are_quarantined_and_skipped() {
    let (_d, store) = open();
    for (i, id) in ["bad", "newer", "good"].iter().enumerate() {
        track(&store, id, 10 + i as i64);
        store
            .apply(id, &callback(1), &ctx(20 + i as i64), IfMissing::Reject)
            .unwrap();
    }
    store.put_raw_task("bad", b"\xff\xff garbage").unwrap();
    let mut newer = codec::encode_task(&store.get("newer").unwrap().unwrap(), &[]).unwrap();
    // The envelope index of the next version: what a newer coverd writes.
    newer[..4].copy_from_slice(&codec::ENVELOPE_VERSION.to_le_bytes());
    store.put_raw_task("newer", &newer).unwrap();
    let ids = |q: Vec<(Millis, String)>| q.into_iter().map(|e| e.1).collect::<Vec<_>>();
    // Not known yet: the queue still offers them; a read quarantines them.
    assert_eq!(
        ids(store.download_queue(10).unwrap()),
        ["bad", "newer", "good"]
    );
    let err = store.get("bad").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }) && err.is_undecodable());
    let err = store.get("newer").unwrap_err();
    assert!(
        matches!(err, StoreError::Newer { found, .. } if found == codec::ENVELOPE_VERSION + 1),
        "{err}"
    );
    assert!(
        err.to_string().contains("written by a newer coverd"),
        "{err}"
    );
    assert_eq!(ids(store.download_queue(10).unwrap()), ["good"]);
    assert_eq!(ids(store.download_queue(1).unwrap()), ["good"]);
    assert_eq!(store.next_download_due().unwrap(), Some(22));
    assert_eq!(store.due_downloads(100, 10).unwrap(), ["good"]);
    // An update of a quarantined task fails the same way, and changes nothing.
    let err = store
        .apply("newer", &callback(1), &ctx(30), IfMissing::Reject)
        .unwrap_err();
    assert!(matches!(err, StoreError::Newer { .. }), "{err}");

    // Scans go on past them.
    let names: Vec<String> = store
        .quarantined(100)
        .unwrap()
        .0
        .into_iter()
        .map(|q| format!("{}: {}", q.task_id, q.reason))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].starts_with("bad: corrupt ("), "{names:?}");
    assert!(
        names[1].starts_with("newer: written by a newer coverd"),
        "{names:?}"
    );
    let listed: Vec<String> = store
        .list(None, 10)
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(listed, ["good"]);
    assert_eq!(store.oldest_unfinished().unwrap().unwrap().task_id, "good");

    // A damaged history entry (one schema 1 left beside the record, which the migration
    // could not decode): the rest of the history is still read.
    store
        .inner
        .events
        .insert(event_key("good", 1), b"\x05\x00\x00".to_vec())
        .unwrap();
    assert!(store.events("good").unwrap_err().is_undecodable());
    let (events, damaged) = store.history("good").unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(damaged.len(), 1);
    assert!(
        damaged[0].starts_with("history entry 1: corrupt"),
        "{damaged:?}"
    );
}
