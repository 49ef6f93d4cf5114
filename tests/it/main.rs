//! The one integration-test crate: real server on loopback, real sled in a temp dir, and a
//! fake KIE written in Rust (`fake_kie`). One binary keeps build times down.

mod admin;
mod bin_util;
mod binary;
mod crash;
mod crowd;
mod diskfull;
mod downloads;
mod fake_kie;
mod faultfs;
mod fetch;
mod fsyncgate;
mod garage;
mod harness;
mod health;
mod hostile_backup;
mod intake;
mod kie_client;
mod kie_flows;
mod kill_loop;
mod kinds;
mod logline;
mod metrics;
mod notify;
mod ops;
mod ops_binary;
mod power_errors;
mod power_loop;
mod power_ops;
mod process;
mod quarantine;
mod sharing;
mod sled_power;
mod smoke;
mod storage;
mod unit_view;

/// `admin track` through the library, as the admin socket would run it.
pub async fn admin_track(d: &harness::Daemon, task_id: &str) {
    let reply = coverd::admin::run(
        d.config.clone(),
        coverd::admin::Request::Track {
            task_id: task_id.into(),
            music_task_id: None,
            kind: None,
            audio_id: None,
        },
    )
    .await
    .expect("track");
    assert!(matches!(reply, coverd::admin::Reply::Task { .. }));
}
