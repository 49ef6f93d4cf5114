//! The power-cut loop (issue 16 part 3): the kill loop (`kill_loop::run`, its workload with
//! notifications to a receiver, and every check) with the daemon's data directory on the fault filesystem (`faultfs`) and a
//! power cut after every SIGKILL, so what was acknowledged must have been on "stable
//! storage", not in the page cache; then power cuts in the middle of the schema migration,
//! `admin backup` and `admin restore` (`power_ops`). And the proof that the loop catches
//! the deliberately broken builds of `COVERD_TEST_BREAK` (`coverd::broken`): each runs one
//! cycle with the cut placed where that bug must lose an acknowledged write. Owns only its
//! tests and their settings; must not change the kill loop's workload or checks.
//!
//! `COVERD_POWER_CYCLES` (default 2) and `COVERD_POWER_SEED` drive the loop; the cuts in
//! the migration, backup and restore are as many each as the cycles.

use coverd::broken::{Break, VAR as BREAK_VAR};

use crate::kill_loop::{CutAt, Opts, Report, env_cycles, env_seed, run};

const CYCLES_VAR: &str = "COVERD_POWER_CYCLES";
const SEED_VAR: &str = "COVERD_POWER_SEED";
/// Cycles when `COVERD_POWER_CYCLES` is not set (what `cargo test` runs).
const DEFAULT_CYCLES: usize = 2;
/// The seed of the broken-variant runs: its first cycle has callbacks for unknown tasks
/// and images served at once (any seed would do for the cuts, which wait for their moment).
const BROKEN_SEED: u64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_and_power_cut_at_random_moments_keeps_every_promise() {
    power_loop(None, CYCLES_VAR).await;
}

/// The power-cut loop with files in a real Garage's bucket (`[storage] kind = "s3"`): the
/// data directory (the task store, `tmp/`) on the fault filesystem loses power after every
/// SIGKILL while uploads are under way; Garage (fsync on) keeps what it acknowledged.
/// `COVERD_POWER_S3_CYCLES=N` for more cycles.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cuts_with_files_in_an_object_store_keep_every_promise() {
    let garage = crate::garage::Garage::start();
    power_loop(Some(&garage), S3_CYCLES_VAR).await;
}

const S3_CYCLES_VAR: &str = "COVERD_POWER_S3_CYCLES";

/// The loop with power cuts (and, with local files, `power_ops`' admin commands cut too).
async fn power_loop(garage: Option<&crate::garage::Garage>, cycles_var: &'static str) {
    let cycles = env_cycles(cycles_var, DEFAULT_CYCLES);
    let seed = env_seed(SEED_VAR);
    let report = run(Opts {
        cycles,
        seed,
        power_cuts: true,
        vars: (cycles_var, SEED_VAR),
        env: Vec::new(),
        cut: CutAt::Random,
        garage,
        final_run: true,
    })
    .await;
    let ops = match garage {
        None => tokio::task::block_in_place(|| crate::power_ops::run(cycles, seed)),
        Some(_) => crate::power_ops::OpsReport::default(),
    };
    eprintln!(
        "\npower loop summary (seed {seed}, replay: {SEED_VAR}={seed} {cycles_var}={cycles}, files in {}):\n  power cuts under load: {}; callbacks acknowledged: {}; files stored: {}\n  notifications delivered: {} ({} requests, {} answered 500, {} sent again after a cut with the same webhook-id)\n  {}\n  failures found: {}",
        if garage.is_some() {
            "a bucket"
        } else {
            "the data directory"
        },
        report.cuts,
        report.acks,
        report.images,
        report.notify.delivered,
        report.notify.requests,
        report.notify.answered_500,
        report.notify.resumed,
        match garage {
            None => ops.summary(),
            Some(_) => "admin commands under power cuts: in the loop with local files".into(),
        },
        report.violations.len() + ops.violations.len()
    );
    let all: Vec<String> = report
        .violations
        .iter()
        .chain(&ops.violations)
        .cloned()
        .collect();
    if !all.is_empty() {
        let kept = report.scratch.map(|s| s.dir.keep());
        panic!(
            "power loop (seed {seed}, replay with {SEED_VAR}={seed} {cycles_var}={cycles}) found {} failures; data directory kept at {kept:?}:\n{}",
            all.len(),
            all.join("\n")
        );
    }
}

/// One cycle of the loop with `broken` switched on and the cut at `cut`.
async fn with_broken(broken: Option<Break>, cut: CutAt) -> Report {
    run(Opts {
        cycles: 1,
        seed: BROKEN_SEED,
        power_cuts: true,
        vars: (CYCLES_VAR, SEED_VAR),
        env: broken.map(|b| (BREAK_VAR, b.name())).into_iter().collect(),
        cut,
        garage: None,
        final_run: false,
    })
    .await
}

/// The loop's report names a lost acknowledged write (`what`) under `broken`.
fn assert_caught(broken: Break, report: &Report, what: &[&str]) {
    assert!(
        report
            .violations
            .iter()
            .any(|v| what.iter().any(|w| v.contains(w))),
        "the power loop did not catch {}={}: {:?}",
        BREAK_VAR,
        broken.name(),
        report.violations
    );
}

/// The callback (or track) checks of the loop: a task acknowledged but gone, or fewer
/// callbacks stored than acknowledged.
const LOST_ACK: [&str; 2] = ["is not in the store", "callbacks acknowledged but"];

/// A 200 sent before the flush round: the disk loses power at the first sync after the
/// daemon is up, so every write made after that is lost; only a daemon that answers before
/// its round answers 200 at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_loop_catches_a_200_sent_before_the_flush_round() {
    let b = Break::AckBeforeFlush;
    let report = with_broken(Some(b), CutAt::FirstAck { die: true }).await;
    assert_caught(b, &report, &LOST_ACK);
}

/// sled's flush without our `fdatasync` of its log: cut right after the first 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_loop_catches_a_round_without_the_log_fdatasync() {
    let b = Break::SkipLogFdatasync;
    let report = with_broken(Some(b), CutAt::FirstAck { die: false }).await;
    assert_caught(b, &report, &LOST_ACK);
}

/// An image renamed into place without the directory fsyncs: cut right after its record is
/// flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_loop_catches_an_image_rename_without_the_directory_fsync() {
    let b = Break::SkipImageDirsync;
    let report = with_broken(Some(b), CutAt::FirstImageRecorded).await;
    assert_caught(b, &report, &["recorded as downloaded for"]);
}

/// The same three cuts against the correct build find nothing: what the tests above catch
/// is the broken variant, not the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_cuts_find_nothing_in_the_correct_build() {
    for cut in [
        CutAt::FirstAck { die: true },
        CutAt::FirstAck { die: false },
        CutAt::FirstImageRecorded,
    ] {
        let report = with_broken(None, cut).await;
        assert!(
            report.violations.is_empty(),
            "{cut:?}: {:?}",
            report.violations
        );
    }
}
