//! The power-cut loop (issue 16 part 3): the kill loop (`kill_loop::run_loop`, its workload
//! and every check) with the daemon's data directory on the fault filesystem (`faultfs`)
//! and a power cut after every SIGKILL, so what was acknowledged must have been on "stable
//! storage", not in the page cache. Owns only its test and its settings; must not change the
//! kill loop's workload or checks.
//!
//! `COVERD_POWER_CYCLES` (default 2) and `COVERD_POWER_SEED` drive it.

use crate::kill_loop::{env_cycles, env_seed, run_loop};

const CYCLES_VAR: &str = "COVERD_POWER_CYCLES";
const SEED_VAR: &str = "COVERD_POWER_SEED";
/// Cycles when `COVERD_POWER_CYCLES` is not set (what `cargo test` runs).
const DEFAULT_CYCLES: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_and_power_cut_at_random_moments_keeps_every_promise() {
    run_loop(
        env_cycles(CYCLES_VAR, DEFAULT_CYCLES),
        env_seed(SEED_VAR),
        true,
        (CYCLES_VAR, SEED_VAR),
    )
    .await;
}
