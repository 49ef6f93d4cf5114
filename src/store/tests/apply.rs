//! The batch transaction: a record, its history and its indexes written together; unknown
//! tasks refused or created; a batch going on past what it cannot apply; queued updates
//! sharing one transaction and one flush round.

use super::{callback, ctx, futures_poll_once, open, stored, track};
use crate::machine::{Event, Report};
use crate::model::Kind;
use crate::model::{EventKind, Millis, State};
use crate::store::{Counts, IfMissing, writer};

#[test]
fn apply_keeps_record_history_and_indexes_together() {
    let (_d, store) = open();
    track(&store, "a", 10);
    assert_eq!(store.due_polls(1010, 10).unwrap(), vec!["a"]);
    assert!(store.due_polls(1009, 10).unwrap().is_empty());
    assert_eq!(store.task_for_music("m-a").unwrap().as_deref(), Some("a"));

    let applied = store
        .apply("a", &callback(2), &ctx(20), IfMissing::Reject)
        .unwrap()
        .unwrap();
    assert_eq!(applied.task.state, State::Received);
    assert!(
        store.due_polls(i64::MAX - 1, 10).unwrap().is_empty(),
        "poll entry removed"
    );
    assert_eq!(store.due_downloads(20, 10).unwrap(), vec!["a"]);
    assert_eq!(store.next_download_due().unwrap(), Some(20));

    let kinds: Vec<_> = store.events("a").unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            EventKind::Submitted,
            EventKind::Callback,
            EventKind::Received
        ]
    );
    assert_eq!(
        store.counts().unwrap(),
        Counts {
            received: 1,
            ..Counts::default()
        }
    );
}

#[test]
fn unknown_tasks_are_rejected_or_created() {
    let (_d, store) = open();
    assert!(
        store
            .apply("x", &callback(1), &ctx(1), IfMissing::Reject)
            .unwrap()
            .is_none()
    );
    assert!(store.get("x").unwrap().is_none());
    let a = store
        .apply("x", &callback(1), &ctx(1), IfMissing::Create)
        .unwrap()
        .unwrap();
    assert_eq!(a.before, None);
    assert_eq!(a.task.state, State::Received);
    assert_eq!(store.counts().unwrap().received, 1);
}

fn write(id: &str, event: Event, now: Millis, if_missing: IfMissing) -> writer::Write {
    writer::Write::new(id, event, ctx(now), if_missing)
}

/// One batch, one transaction: an update whose record cannot be decoded and one for an
/// unknown task refused change nothing and stop nothing; two updates of one task see each
/// other; the counters end where one update at a time would have left them.
#[test]
fn a_batch_goes_on_past_a_quarantined_record_and_a_refused_task() {
    let (_d, store) = open();
    track(&store, "bad", 1);
    store.put_raw_task("bad", b"\xff\xff garbage").unwrap();
    let failure = Event::Callback(Kind::Cover, Report::Failure { reason: "x".into() });
    let out = store.inner.apply_batch(&[
        write("a", callback(1), 2, IfMissing::Create),
        write("bad", callback(1), 2, IfMissing::Reject),
        write("unknown", callback(1), 2, IfMissing::Reject),
        write("a", stored(0), 3, IfMissing::Reject),
        write("b", failure, 4, IfMissing::Create),
    ]);
    let applied = |n: usize| match &out[n] {
        Ok(Some(a)) => (a.before, a.task.state, a.ticket),
        other => panic!("update {n}: {other:?}"),
    };
    let (a1, a2, b) = (applied(0), applied(3), applied(4));
    assert_eq!((a1.0, a1.1), (None, State::Received));
    assert_eq!((a2.0, a2.1), (Some(State::Received), State::Downloaded));
    assert_eq!((b.0, b.1), (None, State::Failed));
    assert!(a1.2 < a2.2 && a2.2 < b.2, "tickets in order: {out:?}");
    assert!(matches!(&out[1], Err(e) if e.is_undecodable()), "{out:?}");
    assert!(matches!(&out[2], Ok(None)), "{out:?}");

    assert_eq!(store.get("unknown").unwrap(), None);
    assert_eq!(store.undecodable_reads(), 1);
    assert_eq!(store.quarantined(100).unwrap().0[0].task_id, "bad");
    let kinds: Vec<_> = store.events("a").unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(kinds.first(), Some(&EventKind::Callback));
    assert_eq!(kinds.last(), Some(&EventKind::Downloaded));
    assert_eq!(
        store.counts().unwrap(),
        Counts {
            submitted: 1,
            received: 0,
            downloaded: 1,
            failed: 1
        }
    );
    assert_eq!(store.notify_counts().unwrap().pending, 2);
    assert!(store.due_polls(i64::MAX - 1, 10).unwrap().is_empty());
}

/// Updates queued while the writer is busy are applied as one batch: one transaction and
/// one flush round for all of them, each answered only after that round, so their
/// tickets are durable at once. The writer is held (test hook) while they queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_updates_share_one_transaction_and_one_round() {
    let (_d, store) = open();
    track(&store, "bad", 1);
    store.put_raw_task("bad", b"\xff\xff garbage").unwrap();
    store.flush().await.unwrap();
    let (batches, rounds) = (store.write_batches(), store.group_flushes());
    let paused = store.pause_writes();
    let mut set = tokio::task::JoinSet::new();
    let updates = [
        ("w0", IfMissing::Create),
        ("bad", IfMissing::Reject),
        ("nope", IfMissing::Reject),
        ("w1", IfMissing::Create),
        ("w2", IfMissing::Create),
    ];
    for (id, if_missing) in updates {
        let store = store.clone();
        set.spawn(async move {
            let r = store.apply_async(id, callback(1), ctx(5), if_missing).await;
            (id, r)
        });
    }
    // The held writer took one update; the other four wait in its queue.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store.queued_writes() < updates.len() - 1 {
        assert!(std::time::Instant::now() < deadline, "updates never queued");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert_eq!(store.write_batches(), batches, "nothing applied while held");
    drop(paused);
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            ("bad", r) => assert!(r.unwrap_err().is_undecodable()),
            ("nope", r) => assert!(r.unwrap().is_none()),
            (id, r) => {
                let applied = r.unwrap().unwrap_or_else(|| panic!("{id} applied"));
                let durable = store.durable(applied.ticket);
                tokio::pin!(durable);
                let ready = futures_poll_once(durable.as_mut()).await;
                assert!(matches!(ready, Some(Ok(()))), "{id}: durable at once");
            }
        }
    }
    assert_eq!(store.write_batches() - batches, 1, "one transaction");
    assert_eq!(store.group_flushes() - rounds, 1, "one flush round");
    assert_eq!(store.counts().unwrap().received, 3);
}
