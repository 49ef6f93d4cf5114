//! Listings: by state, newest first across states with ties and limits, the ring of recent
//! tasks after a prune, the oldest unfinished task, the counters.

use super::{callback, ctx, ids, open, quiet, state_entries, track};
use crate::machine::Origin;
use crate::machine::{Event, Report};
use crate::model::Kind;
use crate::model::{State, Task};
use crate::store::IfMissing;

#[test]
fn listing_counts_and_oldest() {
    let (_d, store) = open();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        track(&store, id, 100 + i as i64);
    }
    store
        .apply("b", &callback(1), &ctx(200), IfMissing::Reject)
        .unwrap();
    let ids = |v: Vec<Task>| v.into_iter().map(|t| t.task_id).collect::<Vec<_>>();
    assert_eq!(ids(store.list(None, 10).unwrap()), vec!["c", "b", "a"]);
    assert_eq!(ids(store.list(None, 2).unwrap()), vec!["c", "b"]);
    assert_eq!(
        ids(store.list(Some(State::Submitted), 10).unwrap()),
        vec!["c", "a"]
    );
    assert_eq!(
        ids(store.list(Some(State::Received), 10).unwrap()),
        vec!["b"]
    );
    assert_eq!(store.oldest_unfinished().unwrap().unwrap().task_id, "a");
    let c = store.counts().unwrap();
    assert_eq!((c.submitted, c.received), (2, 1));
}

/// Newest first across states, ties on `created_at` broken by id (descending), cut at
/// the limit: what schema 1's `by_created` index gave.
#[test]
fn listing_all_states_is_newest_first_with_the_limit() {
    let (_d, store) = open();
    let mut want = Vec::new();
    for i in 0..40i64 {
        let id = format!("t{:02}", (i * 7) % 40);
        let created = 1000 + i / 3;
        let event = match i % 4 {
            0 => Event::Track(Origin::cover(None)),
            1 => callback(1),
            _ => Event::Callback(Kind::Cover, Report::Failure { reason: "x".into() }),
        };
        store
            .apply(&id, &event, &quiet(created), IfMissing::Create)
            .unwrap();
        want.push((created, id));
    }
    want.sort();
    want.reverse();
    let want: Vec<String> = want.into_iter().map(|(_, id)| id).collect();
    for limit in [1, 5, 13, 40, 100] {
        let got = ids(store.list(None, limit).unwrap());
        assert_eq!(got, want[..limit.min(40)], "limit {limit}");
    }
    let failed = ids(store.list(Some(State::Failed), 100).unwrap());
    assert_eq!(failed.len(), 20);
    let mut sorted = failed.clone();
    sorted.sort_by_key(|id| {
        let t = store.get(id).unwrap().unwrap();
        std::cmp::Reverse((t.created_at, t.task_id))
    });
    assert_eq!(failed, sorted);
    assert_eq!(state_entries(&store), 20, "only unfinished tasks indexed");
    // A task gone from the ring's newest end (pruned): the next ones fill in.
    let gone = &want[0];
    let t = store.get(gone).unwrap().unwrap();
    assert!(t.state.is_finished(), "{t:?}");
    assert!(store.forget(gone, t.updated_at).unwrap());
    assert_eq!(ids(store.list(None, 5).unwrap()), want[1..6]);
    assert_eq!(ids(store.list(None, 100).unwrap()), want[1..]);
}
