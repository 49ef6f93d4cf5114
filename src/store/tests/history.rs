//! A record's history: bounded past `MAX_EVENTS_PER_TASK` (repetitive notes dropped, state
//! changes kept), and kept within the record's size budget.

use super::{callback, ctx, open, track};
use crate::model::{EventKind, EventRecord, Task};
use crate::store::history::{ENTRY_OVERHEAD, MAX_DETAIL_BYTES, MAX_HISTORY_BYTES, fit_history};
use crate::store::{IfMissing, MAX_EVENTS_PER_TASK, codec};

#[test]
fn history_of_repetitive_events_is_bounded() {
    let (_d, store) = open();
    track(&store, "a", 1);
    store
        .apply("a", &callback(1), &ctx(2), IfMissing::Reject)
        .unwrap();
    for i in 0..(MAX_EVENTS_PER_TASK + 50) {
        store
            .apply("a", &callback(1), &ctx(3 + i64::from(i)), IfMissing::Reject)
            .unwrap();
    }
    let t = store.get("a").unwrap().unwrap();
    assert_eq!(t.callbacks, MAX_EVENTS_PER_TASK + 51);
    assert_eq!(
        store.events("a").unwrap().len(),
        MAX_EVENTS_PER_TASK as usize
    );
}

#[test]
fn repeated_track_does_not_grow_history_without_bound() {
    let (_d, store) = open();
    for i in 0..(MAX_EVENTS_PER_TASK + 50) {
        track(&store, "a", 1 + i64::from(i));
    }
    let kinds: Vec<EventKind> = store.events("a").unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(kinds.len(), MAX_EVENTS_PER_TASK as usize);
    assert_eq!(kinds[0], EventKind::Submitted);
    // State changes are still recorded past the bound.
    store
        .apply("a", &callback(1), &ctx(5000), IfMissing::Reject)
        .unwrap();
    let after = store.events("a").unwrap();
    assert_eq!(after.last().unwrap().kind, EventKind::Received);
}

#[test]
fn a_history_past_the_record_budget_loses_its_oldest_repetitive_entries_first() {
    let entry = |kind, detail: &str| EventRecord {
        at: 1,
        kind,
        detail: detail.to_string(),
    };
    let long = "x".repeat(MAX_DETAIL_BYTES);
    let mut history = vec![entry(EventKind::Tracked, "first")];
    for _ in 0..1200 {
        history.push(entry(EventKind::Polled, &long));
    }
    history.push(entry(EventKind::Failed, &long));
    let dropped = fit_history(&mut history);
    assert!(dropped > 0);
    assert_eq!(history[0].detail, "first", "how the task began stays");
    assert_eq!(history.last().unwrap().kind, EventKind::Failed);
    let bytes: usize = history
        .iter()
        .map(|e| e.detail.len() + ENTRY_OVERHEAD)
        .sum();
    assert!(bytes <= MAX_HISTORY_BYTES);
    let task = Task::new("t".into(), None, 1);
    assert!(codec::encode_task(&task, &history).is_ok());
    // Small histories are left alone.
    let mut small = vec![
        entry(EventKind::Tracked, "a"),
        entry(EventKind::Polled, "b"),
    ];
    assert_eq!(fit_history(&mut small), 0);
    assert_eq!(small.len(), 2);
}
