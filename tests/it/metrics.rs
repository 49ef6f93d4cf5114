//! SPEC "Metrics" under real traffic: callbacks (accepted, unknown, malformed), a confirmed
//! download through the fake KIE (a record-info call, two image fetches), a task left
//! waiting; `/metrics` is scraped before and after, parsed, and every family SPEC lists is
//! checked, counters and histogram counts included.

use std::collections::HashMap;
use std::time::Duration;

use coverd::model::State;

use crate::bin_util::free_port;
use crate::fake_kie::FakeKie;
use crate::fake_kie::api::Status;
use crate::fake_kie::files::png;
use crate::harness::{Daemon, success_body, with_api};

/// Sample lines (`name{labels}` → value) of a text exposition; every other line must be a
/// `# HELP` or `# TYPE` comment.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            out.insert(name.to_string(), value).is_none(),
            "twice: {line}"
        );
    }
    out
}

async fn scrape(http: &reqwest::Client, addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let resp = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    parse(&resp.text().await.unwrap())
}

fn get(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_real_traffic() {
    let (fake, [a, b]) = FakeKie::serving([("/m/a.png", png(3000)), ("/m/b.png", png(4000))]).await;
    let urls = vec![fake.files.url("/m/a.png"), fake.files.url("/m/b.png")];
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = Daemon::start(&fake, |c| {
        with_api(c);
        c.metrics_listen = Some(metrics_addr);
    })
    .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let before = scrape(&http, metrics_addr).await;
    assert_eq!(get(&before, "coverd_build_info{version=\"0.1.0\"}"), 1.0);
    assert_eq!(get(&before, "coverd_callback_ack_seconds_count"), 0.0);

    // A confirmed callback: record-info (a KIE call), then two fetches.
    fake.api.add_task("mt-ok", "music-ok");
    fake.api.set_status("mt-ok", Status::Success(urls.clone()));
    crate::admin_track(&d, "mt-ok").await;
    assert_eq!(d.callback(&success_body("mt-ok", &urls)).await.0, 200);
    // Rejected: unknown task (404), not JSON (400).
    assert_eq!(d.callback(&success_body("mt-nobody", &urls)).await.0, 404);
    assert_eq!(d.callback("not json").await.0, 400);
    // A task KIE has not finished stays unfinished.
    fake.api.add_task("mt-wait", "music-wait");
    crate::admin_track(&d, "mt-wait").await;
    d.wait_for("mt-ok", |t| t.state == State::Downloaded).await;
    // The schedulers' clock moves 10 minutes: the waiting task is that old now.
    d.advance(Duration::from_secs(600));

    // Counters are bumped just after the store writes the waits saw: scrape until they show.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let m = scrape(&http, metrics_addr).await;
        let done = get(&m, "coverd_image_fetches_total{result=\"stored\"}") == 2.0
            && get(&m, "coverd_oldest_unfinished_seconds") >= 600.0;
        if done || tokio::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let dump = || {
        let mut lines: Vec<String> = after.iter().map(|(k, v)| format!("{k} {v}")).collect();
        lines.sort();
        lines.join("\n")
    };
    let expect = [
        ("coverd_build_info{version=\"0.1.0\"}", 1.0),
        ("coverd_tasks{state=\"downloaded\"}", 1.0),
        ("coverd_tasks{state=\"submitted\"}", 1.0),
        ("coverd_callbacks_total{kind=\"cover\",answer=\"200\"}", 1.0),
        ("coverd_callbacks_total{kind=\"cover\",answer=\"404\"}", 1.0),
        ("coverd_callbacks_total{kind=\"cover\",answer=\"400\"}", 1.0),
        (
            "coverd_file_fetches_total{kind=\"cover\",result=\"stored\"}",
            2.0,
        ),
        (
            "coverd_file_bytes_total{kind=\"cover\"}",
            (a.len() + b.len()) as f64,
        ),
        ("coverd_file_fetch_seconds_count{kind=\"cover\"}", 2.0),
        ("coverd_callback_ack_seconds_count", 3.0),
        ("coverd_callback_ack_seconds_bucket{le=\"+Inf\"}", 3.0),
        ("coverd_image_fetches_total{result=\"stored\"}", 2.0),
        ("coverd_image_bytes_total", (a.len() + b.len()) as f64),
        ("coverd_image_fetch_seconds_count", 2.0),
        ("coverd_image_fetch_seconds_bucket{le=\"+Inf\"}", 2.0),
    ];
    for (name, value) in expect {
        assert_eq!(get(&after, name), value, "{name}:\n{}", dump());
    }
    assert!(
        get(&after, "coverd_callback_ack_seconds_sum") > 0.0,
        "{}",
        dump()
    );
    assert!(
        get(&after, "coverd_image_fetch_seconds_sum") > 0.0,
        "{}",
        dump()
    );
    assert!(
        get(
            &after,
            "coverd_kie_requests_total{endpoint=\"cover/record-info\",result=\"ok\"}"
        ) >= 1.0,
        "{}",
        dump()
    );
    assert!(
        get(&after, "coverd_oldest_unfinished_seconds") >= 600.0,
        "{}",
        dump()
    );
    for name in [
        "coverd_queue_tasks{queue=\"downloads\"}",
        "coverd_queue_tasks{queue=\"polls\"}",
    ] {
        assert!(after.contains_key(name), "{name} missing:\n{}", dump());
    }
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(get(&after, name) > 0.0, "{name}:\n{}", dump());
    }
    assert!(
        after.contains_key("process_cpu_seconds_total"),
        "{}",
        dump()
    );
    // No counter went down.
    for (name, value) in &after {
        if name.contains("_total") {
            assert!(*value >= get(&before, name), "{name} went down");
        }
    }
    d.stop().await;
}

/// SPEC "Metrics" (issue 15 item 8): every label value docs/operations.md names is exported
/// from the start, at 0, before any traffic, so that `increase(…[5m]) > 0` alerts see the
/// first occurrence. The values are read from the docs' metric table itself.
#[tokio::test]
async fn every_documented_label_value_is_exported_at_zero_before_any_traffic() {
    let fake = FakeKie::start().await;
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = Daemon::start(&fake, |c| c.metrics_listen = Some(metrics_addr)).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let m = scrape(&http, metrics_addr).await;
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let mut checked = 0;
    for row in docs.lines().filter(|l| l.starts_with("| `coverd_")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let name_cell = cells[0].trim_start_matches("| ").trim_matches('`');
        let Some((name, label)) = name_cell.split_once('{') else {
            continue;
        };
        let label = label.trim_end_matches('}');
        if name == "coverd_build_info" || name == "coverd_kie_requests_total" {
            continue; // the version is not a fixed set; KIE requests: below
        }
        let what = cells.last().unwrap();
        let values: Vec<&str> = what.split('`').skip(1).step_by(2).collect();
        assert!(!values.is_empty(), "no values documented for {name}: {row}");
        // `{kind,X}`: every kind with every value of X; the kinds are listed in the cell too.
        let (kinds, values): (Vec<&str>, Vec<&str>) = match label.split_once(',') {
            Some(("kind", _)) => values
                .into_iter()
                .partition(|v| coverd::model::Kind::parse(v).is_some()),
            Some(_) => panic!("two labels not known to this test: {row}"),
            None => (Vec::new(), values),
        };
        let label = label.rsplit(',').next().unwrap();
        let histogram = row.contains("| histogram |");
        for value in values {
            let sample = match kinds.as_slice() {
                [] if histogram => format!("{name}_count{{{label}=\"{value}\"}}"),
                [] => format!("{name}{{{label}=\"{value}\"}}"),
                kinds => {
                    for kind in kinds {
                        let sample = format!("{name}{{kind=\"{kind}\",{label}=\"{value}\"}}");
                        assert_eq!(m.get(&sample), Some(&0.0), "{sample} not exported at 0");
                        checked += 1;
                    }
                    continue;
                }
            };
            assert_eq!(m.get(&sample), Some(&0.0), "{sample} not exported at 0");
            checked += 1;
        }
    }
    assert!(
        checked >= 7 + 3 + 4 + 4 + 2,
        "only {checked} label values found in the docs"
    );
    for endpoint in coverd::metrics::KIE_ENDPOINTS {
        assert!(
            docs.contains(&format!("`{endpoint}`")),
            "{endpoint} not in the docs"
        );
        for result in coverd::metrics::KIE_RESULTS {
            let sample =
                format!("coverd_kie_requests_total{{endpoint=\"{endpoint}\",result=\"{result}\"}}");
            assert_eq!(m.get(&sample), Some(&0.0), "{sample} not exported at 0");
        }
    }
    d.stop().await;
}
