//! SPEC "Logs", read from the real binary's stderr: every line about a task names the task
//! in its message, one line per event (a failed image is said once), no Rust `Debug` dumps,
//! warnings for failures and rejected callbacks, info for progress, and a configuration
//! error that stops the start at error level.

use crate::bin_util::{Scratch, coverd, run, wait_status};
use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, png};
use crate::harness::success_body;

/// One stderr line of the fmt logger: `<time> <LEVEL> <target>: <message> <fields>`.
struct Line<'a> {
    level: &'a str,
    text: &'a str,
}

fn lines(logs: &str) -> Vec<Line<'_>> {
    logs.lines()
        .filter_map(|text| {
            let level = text.split_whitespace().nth(1)?;
            Some(Line { level, text })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_name_the_task_once_per_event_at_the_right_level() {
    let fake = FakeKie::start().await;
    fake.files.set("/j/a.png", Behaviour::Image(png(20_000)));
    fake.files.set("/j/b.png", Behaviour::Image(png(30_000)));
    fake.files.set("/j/gone.png", Behaviour::Status(404));
    let scratch = Scratch::new();
    scratch.write_config(&fake.base_url(), "", "");
    let d = scratch.serve().await;

    let ok = [fake.files.url("/j/a.png"), fake.files.url("/j/b.png")];
    assert_eq!(d.callback(success_body("jr-ok", &ok)).await.unwrap().0, 200);
    let gone = [fake.files.url("/j/gone.png")];
    assert_eq!(
        d.callback(success_body("jr-bad", &gone)).await.unwrap().0,
        200
    );
    assert_eq!(d.callback("not json".into()).await.unwrap().0, 400);
    wait_status(&scratch, "both tasks finished", |s| {
        s["tasks"]["downloaded"] == 1 && s["tasks"]["failed"] == 1
    })
    .await;
    d.wait_for_log("task jr-bad failed").await;
    let logs = d.stop().await;
    let all = lines(&logs);

    // Progress at info, in messages that name the task and what happened.
    let info = |task: &str, needle: &str| {
        assert!(
            all.iter().any(|l| l.level == "INFO"
                && l.text.contains(&format!("task {task} "))
                && l.text.contains(needle)),
            "no INFO line about {task} with {needle:?}:\n{logs}"
        )
    };
    info("jr-ok", "callback: success callback");
    info("jr-ok", "downloaded: 2 images, 50.0 kB");
    info("jr-ok", "image 0 stored");
    info("jr-ok", "image 1 stored");
    assert!(
        logs.contains("coverd is ready: callbacks on http://"),
        "{logs}"
    );

    // The failed image: one line, a warning, naming task, image and cause.
    let failure: Vec<&Line> = all
        .iter()
        // "HTTP 404", not "404": a line's timestamp may hold those digits (13:43:19.404205Z
        // once made the callback line a second "failure").
        .filter(|l| l.text.contains("jr-bad") && l.text.contains("HTTP 404"))
        .collect();
    assert_eq!(failure.len(), 1, "the failure said more than once:\n{logs}");
    assert_eq!(failure[0].level, "WARN", "{}", failure[0].text);
    assert!(
        failure[0]
            .text
            .contains("task jr-bad failed: image 0: HTTP 404"),
        "{}",
        failure[0].text
    );
    // The rejected callback: a warning.
    assert!(
        all.iter()
            .any(|l| l.level == "WARN" && l.text.contains("callback rejected (400)")),
        "{logs}"
    );

    for l in &all {
        // Every line with a task id field names the task in its message too.
        if let Some(id) = l
            .text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("task_id="))
            .map(|id| id.trim_matches('"'))
        {
            assert!(
                l.text.contains(&format!("task {id}")),
                "message does not name task {id}: {}",
                l.text
            );
        }
        for dump in [" { ", "Some(", "Success {", "\\\""] {
            assert!(!l.text.contains(dump), "Debug dump in: {}", l.text);
        }
        assert!(
            matches!(l.level, "INFO" | "WARN"),
            "unexpected level: {}",
            l.text
        );
    }
}

/// A configuration error stops `serve` with one line at error level (under systemd:
/// `journalctl -p err` shows it); a command says it plainly on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_is_an_error_line() {
    let scratch = Scratch::new();
    scratch.write_raw_config("surprise = 1\n");
    let mut cmd = coverd();
    cmd.arg("serve")
        .arg("--config")
        .arg(scratch.config_path())
        .env("RUST_LOG", "info");
    let out = run(cmd).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    let line = out.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert_eq!(line.split_whitespace().nth(1), Some("ERROR"), "{line}");
    assert!(
        line.contains("coverd cannot start: configuration error") && line.contains("surprise"),
        "{line}"
    );
    let out = scratch.run(&["admin", "status"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.starts_with("coverd: "), "{out:?}");
}
