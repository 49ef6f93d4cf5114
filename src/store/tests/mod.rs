//! The store's unit tests, by topic (one file each), and the helpers they share: contexts,
//! a fresh store, the usual events, and the scripted tasks the migration and restore tests
//! compare with (`admin::backup`'s tests use these too). Must not test another module's
//! rules through the store (`machine`'s transitions are tested there).

mod apply;
mod copy;
mod durability;
mod health;
mod history;
mod list;
mod migrate;
mod outbox;
mod quarantine;
mod stats;
mod summary;

pub(crate) use migrate::{schema_1_trees_gone, schema_of, write_v1_tasks};

use super::list::RECENT;
use super::{Applied, IfMissing, Store};
use crate::machine::Origin;
use crate::machine::{Ctx, Event, Report};
use crate::model::Kind;
use crate::model::{Millis, Task};

/// An update's context at `now`, with notifications on (`notify.url` set).
fn ctx(now: Millis) -> Ctx {
    Ctx {
        now,
        max_attempts: 3,
        poll_after_ms: 1000,
        notify: true,
    }
}

/// [`ctx`] with notifications off.
fn quiet(now: Millis) -> Ctx {
    Ctx {
        notify: false,
        ..ctx(now)
    }
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

fn track(store: &Store, id: &str, now: Millis) -> Applied {
    store
        .apply(
            id,
            &Event::Track(Origin::cover(Some(format!("m-{id}")))),
            &ctx(now),
            IfMissing::Create,
        )
        .unwrap()
        .unwrap()
}

fn callback(n: usize) -> Event {
    Event::Callback(
        Kind::Cover,
        Report::images((0..n).map(|i| format!("https://h/{i}.png")).collect()),
    )
}

fn stored(index: u32) -> Event {
    Event::ImageStored {
        index,
        path: format!("images/a/{index}.png"),
        bytes: 1,
        sha256: "ab".repeat(32),
    }
}

/// Image `index` stored, `bytes` long.
fn stored_sized(index: u32, bytes: u64) -> Event {
    Event::ImageStored {
        index,
        path: format!("images/a/{index}.png"),
        bytes,
        sha256: "ab".repeat(32),
    }
}

/// Polls `fut` once; `Some` if it finished.
async fn futures_poll_once<F: std::future::Future + Unpin>(fut: F) -> Option<F::Output> {
    let mut fut = fut;
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// Tasks in every state (with a tie on `created_at` between states), each a list of
/// events applied one ms apart from its creation.
pub(crate) fn scripted() -> Vec<(&'static str, Millis, Vec<Event>)> {
    let track = |m: &str| Event::Track(Origin::cover(Some(m.to_string())));
    let failure = Event::Callback(
        Kind::Cover,
        Report::Failure {
            reason: "KIE code 501: no".into(),
        },
    );
    vec![
        ("a", 100, vec![track("m-a")]),
        ("b", 101, vec![track("m-b"), callback(2)]),
        ("c", 102, vec![failure.clone(), failure]),
        ("d", 102, vec![track("m-d"), callback(1), stored(0)]),
        ("e", 103, vec![track("m-e"), callback(1)]),
    ]
}

/// The same tasks written by this build's `apply`.
pub(crate) fn reference() -> (tempfile::TempDir, Store) {
    let (dir, store) = open();
    for (id, created, script) in scripted() {
        for (i, event) in script.into_iter().enumerate() {
            store
                .apply(id, &event, &quiet(created + i as Millis), IfMissing::Create)
                .unwrap();
        }
    }
    (dir, store)
}

pub(crate) fn ids(tasks: Vec<Task>) -> Vec<String> {
    tasks.into_iter().map(|t| t.task_id).collect()
}

/// `by_state` entries that index a state (not the ring of recent tasks).
fn state_entries(store: &Store) -> usize {
    store
        .inner
        .by_state
        .iter()
        .keys()
        .filter(|k| k.as_ref().unwrap()[0] != RECENT)
        .count()
}
