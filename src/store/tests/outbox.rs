//! The outbox: a settle and its notification are one write; delivery attempts,
//! redelivery, counters; nothing enqueued with notifications off.

use super::{callback, ctx, open, stored, track};
use crate::machine::{Ctx, Delivery, Event, Report};
use crate::model::Kind;
use crate::model::{NotifyState, State};
use crate::store::{IfMissing, NotifyCounts};

#[test]
fn a_settle_enqueues_its_notification_in_the_same_write() {
    let (_d, store) = open();
    track(&store, "a", 1);
    store
        .apply("a", &callback(1), &ctx(2), IfMissing::Reject)
        .unwrap();
    assert_eq!(store.latest_notification("a").unwrap(), None);
    assert_eq!(store.next_notification_due().unwrap(), None);
    store
        .apply("a", &stored(0), &ctx(3), IfMissing::Reject)
        .unwrap();

    let n = store.latest_notification("a").unwrap().unwrap();
    assert_eq!((n.seq, n.webhook_id.as_str()), (1, "msg_a_1_3"));
    assert_eq!(n.kind, crate::model::NotifyType::Downloaded);
    assert_eq!(n.state, NotifyState::Pending);
    let body: serde_json::Value = serde_json::from_str(&n.body).unwrap();
    assert_eq!(body["type"], "cover.downloaded");
    assert_eq!(body["data"]["state"], "downloaded");
    assert!(body["data"].get("events").is_none() && body["data"].get("notify").is_none());
    assert_eq!(
        store.due_notifications(3, 10).unwrap(),
        vec![("a".to_string(), 1)]
    );
    assert!(store.due_notifications(2, 10).unwrap().is_empty());
    assert_eq!(store.notify_counts().unwrap().pending, 1);

    // A duplicate callback on the settled task enqueues nothing.
    store
        .apply("a", &callback(1), &ctx(4), IfMissing::Reject)
        .unwrap();
    assert_eq!(store.latest_notification("a").unwrap().unwrap().seq, 1);

    // A failed attempt: still pending, due later; then delivered: out of the index.
    let failed = Delivery::Failed {
        reason: "HTTP 500".into(),
        retry_at: 100,
    };
    let n = store
        .record_delivery("a", 1, &failed, 3, 5)
        .unwrap()
        .unwrap();
    assert_eq!((n.state, n.attempts), (NotifyState::Pending, 1));
    assert!(store.due_notifications(99, 10).unwrap().is_empty());
    assert_eq!(store.next_notification_due().unwrap(), Some(100));
    let ok = Delivery::Delivered {
        detail: "HTTP 200".into(),
    };
    let n = store.record_delivery("a", 1, &ok, 3, 100).unwrap().unwrap();
    assert_eq!((n.state, n.attempts), (NotifyState::Delivered, 2));
    assert_eq!(store.next_notification_due().unwrap(), None);
    let c = store.notify_counts().unwrap();
    assert_eq!((c.pending, c.delivered, c.undeliverable), (0, 1, 0));

    // Redeliver: the same message is due again.
    let n = store.redeliver("a", 200).unwrap().unwrap();
    assert_eq!(
        (n.webhook_id.as_str(), n.state),
        ("msg_a_1_3", NotifyState::Pending)
    );
    assert_eq!(
        store.due_notifications(200, 10).unwrap(),
        vec![("a".to_string(), 1)]
    );
    assert_eq!(store.redeliver("nope", 200).unwrap(), None);

    // A second settle (retry of a damaged image, stored again) is a new message.
    store
        .apply(
            "a",
            &Event::Retry { damaged: vec![0] },
            &ctx(300),
            IfMissing::Reject,
        )
        .unwrap();
    store
        .apply("a", &stored(0), &ctx(301), IfMissing::Reject)
        .unwrap();
    let n = store.latest_notification("a").unwrap().unwrap();
    assert_eq!((n.seq, n.webhook_id.as_str()), (2, "msg_a_2_301"));
    assert_eq!(store.notify_counts().unwrap().pending, 2);
    assert_eq!(
        store.notification("a", 1).unwrap().unwrap().webhook_id,
        "msg_a_1_3"
    );
}

#[test]
fn notifications_off_enqueue_nothing() {
    let (_d, store) = open();
    let off = Ctx {
        notify: false,
        ..ctx(1)
    };
    store
        .apply(
            "a",
            &Event::Callback(Kind::Cover, Report::Failure { reason: "x".into() }),
            &off,
            IfMissing::Create,
        )
        .unwrap();
    assert_eq!(store.get("a").unwrap().unwrap().state, State::Failed);
    assert_eq!(store.latest_notification("a").unwrap(), None);
    assert_eq!(store.next_notification_due().unwrap(), None);
    assert_eq!(store.notify_counts().unwrap(), NotifyCounts::default());
}
