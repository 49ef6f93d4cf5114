//! Group commit and the handle's lifecycle: tickets durable through shared flush rounds,
//! waiters dropped mid-flush, the lock held while open and released at close or drop.

use super::{ctx, futures_poll_once, open, track};
use crate::machine::Event;
use crate::machine::Origin;
use crate::store::{IfMissing, Store, StoreError};

#[tokio::test]
async fn group_commit_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let tickets: Vec<u64> = (0..20)
            .map(|i| track(&store, &format!("t{i}"), 1).ticket)
            .collect();
        let mut waits = tokio::task::JoinSet::new();
        for t in tickets {
            let store = store.clone();
            waits.spawn(async move { store.durable(t).await });
        }
        while let Some(r) = waits.join_next().await {
            r.unwrap().unwrap();
        }
        // The store is locked while open, in this process too.
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked { .. })
        ));
    }
    // sled releases its lock when its background threads let go of the db, which can
    // be a moment after the last handle is dropped on a loaded machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let store = loop {
        match Store::open(dir.path()) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            other => break other.unwrap(),
        }
    };
    assert_eq!(store.counts().unwrap().submitted, 20);
    store.check_health().await.unwrap();
}

/// Ingest throughput with group commit: 64 concurrent writers, each writing one task and
/// waiting until it is durable, for 3 s. Run by hand to measure the cost of durability:
/// `cargo test --release --lib ingest_throughput -- --ignored --nocapture`
/// (in a directory on the disk to measure: `TMPDIR=/var/tmp`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn ingest_throughput() {
    let (_d, store) = open();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..64 {
        let store = store.clone();
        writers.spawn(async move {
            let mut n = 0u64;
            while std::time::Instant::now() < deadline {
                let id = format!("w{w}-{n}");
                let applied = store
                    .apply_async(
                        &id,
                        Event::Track(Origin::cover(None)),
                        ctx(1),
                        IfMissing::Create,
                    )
                    .await
                    .unwrap()
                    .unwrap();
                store.durable(applied.ticket).await.unwrap();
                n += 1;
            }
            n
        });
    }
    let mut total = 0;
    while let Some(n) = writers.join_next().await {
        total += n.unwrap();
    }
    println!(
        "ingest: {} durable writes/s, {} flushes",
        total / 3,
        store.group_flushes()
    );
}

/// Waiters dropped mid-wait (a client reset, a timeout) never start a second flush: the
/// flusher thread owns every flush, one at a time, and the store stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_waiters_never_start_a_second_flush() {
    let (_d, store) = open();
    let mut waiters = tokio::task::JoinSet::new();
    for i in 0..200 {
        let store = store.clone();
        waiters.spawn(async move {
            let ticket = track(&store, &format!("c{i}"), 1).ticket;
            // Polled once or a few times, then dropped while its flush runs.
            let wait = store.durable(ticket);
            tokio::pin!(wait);
            for _ in 0..(i % 4) {
                if futures_poll_once(wait.as_mut()).await.is_some() {
                    return;
                }
            }
        });
    }
    while let Some(r) = waiters.join_next().await {
        r.unwrap();
    }
    // Still working (no deadlock), everything durable, and never two flushes at once.
    tokio::time::timeout(std::time::Duration::from_secs(60), store.flush())
        .await
        .expect("a flush after cancelled waiters finishes")
        .unwrap();
    assert_eq!(store.max_concurrent_flushes(), 1);
    assert_eq!(store.counts().unwrap().submitted, 200);
}

/// Dropping the last handle (or `close`) releases sled's lock before it returns, even
/// with waiters dropped mid-flush just before: the directory opens again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_reopens_at_once_after_close_or_drop() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..100 {
        let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let tickets: Vec<u64> = (0..8)
            .map(|i| track(&store, &format!("r{round}-{i}"), 1).ticket)
            .collect();
        // Some waiters finish, some are dropped while their flush runs.
        let last = *tickets.last().unwrap();
        {
            let abandoned = store.durable(last);
            tokio::pin!(abandoned);
            let _ = futures_poll_once(abandoned.as_mut()).await;
        }
        if round % 2 == 0 {
            store.durable(tickets[0]).await.unwrap();
            drop(store);
        } else {
            store.close().await.unwrap();
        }
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.counts().unwrap().submitted, 100 * 8);
}
