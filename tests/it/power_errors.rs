//! Write errors, generated (issue 16 part 5): the fault filesystem's error injection under
//! the real binary, over many seeds.
//! - EIO on the Nth sync (`fsync`/`fdatasync` of a file or a directory; N drawn from the
//!   seed): SPEC's "a failed flush is final": no callback answered 200 after the failed sync
//!   in that process, and after a SIGKILL, a power cut and a restart every callback answered
//!   200 before it is stored.
//! - ENOSPC past a byte budget drawn from the seed: callbacks get 503 once the store met
//!   it, no 200 is lost; once space returns the daemon exits 75 (its store reopens at the
//!   restart, as systemd would restart it) and takes callbacks again.
//!
//! Callbacks are failure reports (no downloads), so every sync is the store's. Each seed is
//! a fresh data directory on a fresh mount. `COVERD_POWER_ERROR_SEEDS` (default 3 each)
//! and `COVERD_POWER_SEED` drive it. Owns these checks; must not change the filesystem's
//! rules or the daemon.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bin_util::{Daemon, Scratch};
use crate::faultfs::{Errno, FaultFs, FaultOp};
use crate::harness::failure_body;
use crate::kill_loop::{env_cycles, env_seed};

const SEEDS_VAR: &str = "COVERD_POWER_ERROR_SEEDS";
const SEED_VAR: &str = "COVERD_POWER_SEED";
/// Seeds of each kind when `COVERD_POWER_ERROR_SEEDS` is not set (what `cargo test` runs).
const DEFAULT_SEEDS: usize = 3;
/// Callbacks sent per seed.
const CALLBACKS: usize = 24;
/// SPEC: callbacks are taken again within this long after the cause is gone.
const RECOVERY: Duration = Duration::from_secs(30);
const RECEIVED: &str = r#"{"status":"received"}"#;

/// A scratch directory whose data directory is a fresh fault filesystem.
fn setup() -> (Scratch, FaultFs) {
    let scratch = Scratch::new();
    scratch.write_config("http://127.0.0.1:9", "", "");
    let fs = FaultFs::mount_at(
        &scratch.dir.path().join("fault-backing"),
        &scratch.data_dir(),
    )
    .expect("mount the fault filesystem on the data directory");
    (scratch, fs)
}

/// Every task of `acked` is in the store (the daemon stopped).
async fn assert_stored(scratch: &Scratch, acked: &BTreeSet<String>, what: &str) {
    let tasks = scratch
        .export()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let stored: BTreeSet<String> = tasks
        .iter()
        .filter_map(|t| t["task_id"].as_str().map(str::to_string))
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{what}: callbacks answered 200 but lost: {lost:?}"
    );
}

async fn send(d: &Daemon, id: &str) -> bool {
    matches!(
        d.callback(failure_body(id, 501, "failed")).await,
        Ok((200, body)) if body == RECEIVED
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eio_on_any_sync_is_final_and_loses_no_earlier_200() {
    let base = env_seed(SEED_VAR);
    let seeds = env_cycles(SEEDS_VAR, DEFAULT_SEEDS);
    eprintln!("EIO on a sync: {seeds} seeds from {base} (replay: {SEED_VAR}={base})");
    for s in 0..seeds as u64 {
        let mut rng = StdRng::seed_from_u64(base ^ s.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (scratch, mut fs) = setup();
        let d = scratch.serve().await;
        // Each callback costs one round (an fdatasync, sometimes a directory fsync): the
        // failure lands somewhere among them.
        let nth = rng.random_range(1..=CALLBACKS as u64);
        tokio::task::block_in_place(|| fs.fail_nth(FaultOp::Fsync, nth, Errno::Eio))
            .expect("inject");
        let mut acked = BTreeSet::new();
        let mut failed_before = None;
        for n in 0..CALLBACKS {
            let failed = tokio::task::block_in_place(|| fs.counts())
                .expect("counts")
                .failed;
            if failed > 0 && failed_before.is_none() {
                failed_before = Some(n);
            }
            let id = format!("eio{s}x{n:02}");
            if send(&d, &id).await {
                assert!(
                    failed_before.is_none(),
                    "seed {s} (sync {nth} failed): callback {n} answered 200 after the failed sync (before callback {failed_before:?})"
                );
                acked.insert(id);
            }
        }
        let failed_at = failed_before.or_else(|| {
            let c = fs.counts().ok()?;
            (c.failed > 0).then_some(CALLBACKS)
        });
        assert!(
            failed_at.is_some(),
            "seed {s}: the injected EIO on sync {nth} never happened"
        );
        let (status, body) = d.get("/healthz").await;
        assert_eq!(
            status, 503,
            "seed {s}: /healthz after a failed sync: {body}"
        );
        d.kill();
        drop(d);
        tokio::task::block_in_place(|| fs.cut()).expect("power cut");
        assert_stored(&scratch, &acked, &format!("seed {s}, sync {nth} failed")).await;
        eprintln!(
            "  seed {s}: sync {nth} failed before callback {failed_at:?}; {} callbacks answered 200 before it, all stored",
            acked.len()
        );
        drop(fs);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enospc_at_any_byte_budget_is_503_then_recovery() {
    let base = env_seed(SEED_VAR);
    let seeds = env_cycles(SEEDS_VAR, DEFAULT_SEEDS);
    eprintln!("ENOSPC past a byte budget: {seeds} seeds from {base} (replay: {SEED_VAR}={base})");
    for s in 0..seeds as u64 {
        let mut rng = StdRng::seed_from_u64(base ^ s.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let (scratch, mut fs) = setup();
        let d = scratch.serve().await;
        let budget = rng.random_range(0..64 * 1024);
        tokio::task::block_in_place(|| fs.budget(budget, Errno::Enospc)).expect("inject");
        let mut acked = BTreeSet::new();
        let mut refused = None;
        // Until the store meets the full disk (sled writes its log in buffers, so a few
        // callbacks may fit in the budget first).
        for n in 0..2_000 {
            let id = format!("nospc{s}x{n:04}");
            if send(&d, &id).await {
                assert!(
                    refused.is_none(),
                    "seed {s} (budget {budget}): callback {n} answered 200 after callback {refused:?} got 503"
                );
                acked.insert(id);
            } else if refused.is_none() {
                refused = Some(n);
                break;
            }
        }
        assert!(
            refused.is_some(),
            "seed {s}: the disk never filled (budget {budget} bytes)"
        );
        let (status, _) = d.get("/healthz").await;
        assert_eq!(status, 503, "seed {s}: /healthz with a full disk");
        // Space returns: the daemon notices and exits 75 to reopen its store.
        tokio::task::block_in_place(|| fs.clear_faults()).expect("clear");
        let freed = Instant::now();
        let (status, logs) = d.wait_exit().await;
        assert_eq!(
            status.code(),
            Some(75),
            "seed {s}: exit once space returned:\n{logs}"
        );
        let d = scratch.serve().await;
        let again = format!("nospc{s}again");
        assert!(send(&d, &again).await, "seed {s}: no 200 after the restart");
        assert!(
            freed.elapsed() < RECOVERY,
            "seed {s}: callbacks taken again {:?} after space returned",
            freed.elapsed()
        );
        acked.insert(again);
        d.stop().await;
        assert_stored(&scratch, &acked, &format!("seed {s}, budget {budget}")).await;
        eprintln!(
            "  seed {s}: budget {budget} bytes: {} callbacks answered 200, then 503; exit 75 and 200 again {:?} after space returned",
            acked.len() - 1,
            freed.elapsed()
        );
        drop(fs);
    }
}
