//! The callback listener through real loopback HTTP (issue "core daemon" part 5): every row
//! of SPEC's callback table, signatures, unknown tasks, duplicates fetched once, KIE's
//! failure codes and a late success after a generation failure.
//! "Store unavailable → 503" uses the store's write-failure injection.

use std::time::Duration;

use coverd::config::Secret;
use coverd::model::{EventKind, State, Task, now_millis};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, png};
use crate::harness::{Daemon, failure_body, success_body};

const RECEIVED: &str = r#"{"status":"received"}"#;
const LIMIT: usize = 64 * 1024;

/// A client of our own, to send any method and read headers.
fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Sends one request; returns status, Content-Type and body.
async fn send(
    d: &Daemon,
    method: reqwest::Method,
    path: &str,
    body: &str,
) -> (u16, Option<String>, String) {
    let resp = client()
        .request(method, format!("{}{path}", d.base))
        .body(body.to_string())
        .send()
        .await
        .expect("request sent");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    (status, ct, resp.text().await.unwrap())
}

/// SPEC: every non-200 answer is a JSON object `{"error": "…"}`.
#[track_caller]
fn assert_error_json(case: &str, body: &str) {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{case}: non-200 body is not JSON ({e}): {body:?}"));
    let obj = v.as_object().unwrap_or_else(|| panic!("{case}: {body}"));
    assert_eq!(obj.len(), 1, "{case}: only `error` expected: {body}");
    let msg = obj["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: error is not a string: {body}"));
    assert!(!msg.is_empty(), "{case}: empty error");
}

/// Writes `bytes` on a fresh connection (without waiting for the server to read them all),
/// then reads the answer until the server closes. Returns status and body.
async fn raw_exchange(d: &Daemon, bytes: &[u8]) -> (u16, String) {
    let addr = d.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it read everything: a write error is fine.
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                // A reset after the answer arrived (unread bytes at close): keep what we have.
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no answer within 5 s (is the server waiting for the rest of the body?); got {:?}",
        String::from_utf8_lossy(&got)
    );
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The task and its history, to prove a rejected request changed nothing.
fn snapshot(d: &Daemon, id: &str) -> (Option<Task>, usize) {
    (d.task(id), d.store.events(id).unwrap().len())
}

/// A success callback for `id` padded with trailing whitespace to exactly `len` bytes.
fn padded_success(id: &str, url: &str, len: usize) -> String {
    let mut body = success_body(id, &[url.to_string()]);
    assert!(body.len() <= len);
    body.extend(std::iter::repeat_n(' ', len - body.len()));
    body
}

#[tokio::test]
async fn callback_table() {
    let fake = FakeKie::start().await;
    fake.files.set("/s/a.png", Behaviour::Image(png(3000)));
    let url = fake.files.url("/s/a.png");
    let d = Daemon::start(&fake, |_| {}).await;
    let id = "table-known";
    crate::admin_track(&d, id).await;

    // Rejections first, while the task is still `submitted`: none of them may change it.
    let before = snapshot(&d, id);
    let no_id = r#"{"code":200,"msg":"success","data":{"images":["https://h/a.png"]}}"#;
    let bad_ids = [
        r#"{"code":200,"data":{"taskId":"../etc","images":["https://h/a.png"]}}"#,
        r#"{"code":200,"taskId":"../../table-known","data":{"images":["https://h/a.png"]}}"#,
        r#"{"code":200,"data":{"task_id":"a/../b","images":["https://h/a.png"]}}"#,
        r#"{"code":200,"data":{"taskId":"..","images":["https://h/a.png"]}}"#,
    ];
    let mut table: Vec<(&str, String, u16)> = vec![
        ("empty body", String::new(), 400),
        ("not JSON", "code=200&taskId=x".into(), 400),
        ("JSON array", "[1,2]".into(), 400),
        (
            "truncated JSON",
            r#"{"code":200,"data":{"taskId":"#.into(),
            400,
        ),
        ("no task id anywhere", no_id.into(), 400),
        (
            "task id not a string",
            r#"{"code":200,"data":{"taskId":7}}"#.into(),
            400,
        ),
        (
            "unknown task",
            success_body("table-unknown", std::slice::from_ref(&url)),
            404,
        ),
    ];
    for b in bad_ids {
        table.push(("task id with ../", b.into(), 400));
    }
    for (case, body, want) in &table {
        let (status, ct, text) = send(&d, reqwest::Method::POST, "/callbacks/cover", body).await;
        assert_eq!(status, *want, "{case}: {text}");
        assert_eq!(ct.as_deref(), Some("application/json"), "{case}");
        assert_error_json(case, &text);
    }
    assert!(d.task("table-unknown").is_none(), "404 must not create");
    assert!(d.task("etc").is_none() && d.task("b").is_none());

    // Over 64 KiB with a Content-Length: 413 right after the headers, body never sent.
    let head = format!(
        "POST /callbacks/cover HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        LIMIT + 1
    );
    let (status, body) = raw_exchange(&d, head.as_bytes()).await;
    assert_eq!(status, 413, "{body}");
    assert_error_json("413 content-length", &body);

    // Over 64 KiB chunked (no Content-Length, no final chunk sent): 413 once 64 KiB passed.
    let big = padded_success(id, &url, LIMIT + 1);
    let mut req = b"POST /callbacks/cover HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for chunk in big.as_bytes().chunks(8192) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    let (status, body) = raw_exchange(&d, &req).await;
    assert_eq!(status, 413, "{body}");
    assert_error_json("413 chunked", &body);

    // Also a complete over-limit body through an ordinary client, when it gets an answer.
    if let Ok(resp) = client()
        .post(format!("{}/callbacks/cover", d.base))
        .body(big.clone())
        .send()
        .await
    {
        assert_eq!(resp.status().as_u16(), 413);
    }
    assert_eq!(
        snapshot(&d, id),
        before,
        "rejected requests changed the task"
    );

    // Paths and methods.
    assert_eq!(d.get("/healthz").await, (200, "ok".to_string()));
    for (method, path, want) in [
        (reqwest::Method::GET, "/", 404),
        (reqwest::Method::POST, "/callbacks", 404),
        (reqwest::Method::POST, "/callbacks/cover/x", 404),
        (reqwest::Method::GET, "/metrics", 404),
        (reqwest::Method::GET, "/callbacks/cover", 405),
        (reqwest::Method::PUT, "/callbacks/cover", 405),
        (reqwest::Method::DELETE, "/callbacks/cover", 405),
        (reqwest::Method::POST, "/healthz", 405),
    ] {
        let case = format!("{method} {path}");
        let resp = client()
            .request(method, format!("{}{path}", d.base))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let allow = resp.headers().get("allow").cloned();
        let text = resp.text().await.unwrap();
        assert_eq!(status, want, "{case}: {text}");
        assert_error_json(&case, &text);
        // A 405 says which methods the path takes.
        assert_eq!(allow.is_some(), want == 405, "{case}: Allow {allow:?}");
    }
    let head = client()
        .head(format!("{}/healthz", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 200);

    // Accepted: exactly 64 KiB is not too large; then a duplicate.
    let exact = padded_success(id, &url, LIMIT);
    assert_eq!(d.callback(&exact).await, (200, RECEIVED.to_string()));
    let t = d.task(id).unwrap();
    assert_eq!((t.state, t.callbacks), (State::Received, 1));
    assert_eq!(d.callback(&exact).await, (200, RECEIVED.to_string()));
    let t = d.wait_for(id, |t| t.state == State::Downloaded).await;
    assert_eq!(t.callbacks, 2);

    // The task id is found in each of its three places.
    for (n, shape) in [
        r#"{"code":200,"msg":"success","data":{"taskId":"ID","images":["URL"]}}"#,
        r#"{"code":200,"msg":"success","taskId":"ID","data":{"images":["URL"]}}"#,
        r#"{"code":200,"msg":"success","data":{"task_id":"ID","images":["URL"]}}"#,
    ]
    .iter()
    .enumerate()
    {
        let tid = format!("table-place-{n}");
        crate::admin_track(&d, &tid).await;
        let body = shape.replace("ID", &tid).replace("URL", &url);
        assert_eq!(
            d.callback(&body).await,
            (200, RECEIVED.to_string()),
            "{body}"
        );
        let t = d.task(&tid).unwrap();
        assert_eq!((t.state, t.images.len()), (State::Received, 1), "{body}");
    }
    d.stop().await;
}

#[tokio::test]
async fn signatures() {
    const KEY: &str = "webhook-secret";
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |c| {
        c.kie.webhook_hmac_key = Some(Secret::new(KEY));
    })
    .await;
    let id = "signed-task";
    crate::admin_track(&d, id).await;
    let body = failure_body(id, 501, "Cover generation failed");
    let now = now_millis() / 1000;
    let ts = now.to_string();
    let good = coverd::signature::sign(KEY.as_bytes(), id, &ts);
    let stale = (now - 3600).to_string();
    let future = (now + 3600).to_string();
    let stale_sig = coverd::signature::sign(KEY.as_bytes(), id, &stale);
    let future_sig = coverd::signature::sign(KEY.as_bytes(), id, &future);
    let other_key = coverd::signature::sign(b"another key", id, &ts);
    let other_task = coverd::signature::sign(KEY.as_bytes(), "another-task", &ts);
    let other_ts = coverd::signature::sign(KEY.as_bytes(), id, &(now - 1).to_string());

    let before = snapshot(&d, id);
    let rejected: [(&str, Vec<(&str, &str)>); 10] = [
        ("no headers", vec![]),
        ("no signature", vec![("x-webhook-timestamp", &ts)]),
        ("no timestamp", vec![("x-webhook-signature", &good)]),
        (
            "empty signature",
            vec![("x-webhook-timestamp", &ts), ("x-webhook-signature", "")],
        ),
        (
            "wrong key",
            vec![
                ("x-webhook-timestamp", &ts),
                ("x-webhook-signature", &other_key),
            ],
        ),
        (
            "signature of another task",
            vec![
                ("x-webhook-timestamp", &ts),
                ("x-webhook-signature", &other_task),
            ],
        ),
        (
            "signature of another timestamp",
            vec![
                ("x-webhook-timestamp", &ts),
                ("x-webhook-signature", &other_ts),
            ],
        ),
        (
            "not base64",
            vec![("x-webhook-timestamp", &ts), ("x-webhook-signature", "%%%")],
        ),
        (
            "stale timestamp",
            vec![
                ("x-webhook-timestamp", &stale),
                ("x-webhook-signature", &stale_sig),
            ],
        ),
        (
            "timestamp in the future",
            vec![
                ("x-webhook-timestamp", &future),
                ("x-webhook-signature", &future_sig),
            ],
        ),
    ];
    for (case, headers) in &rejected {
        let mut h = headers.clone();
        h.push(("content-type", "application/json"));
        let (status, text) = d.post("/callbacks/cover", body.clone(), &h).await;
        assert_eq!(status, 401, "{case}: {text}");
        assert_error_json(case, &text);
        assert!(!text.contains(KEY), "{case}: the key leaks: {text}");
    }
    assert_eq!(snapshot(&d, id), before, "a 401 changed the task");

    let headers = [
        ("content-type", "application/json"),
        ("x-webhook-timestamp", ts.as_str()),
        ("x-webhook-signature", good.as_str()),
    ];
    let (status, text) = d.post("/callbacks/cover", body.clone(), &headers).await;
    assert_eq!((status, text.as_str()), (200, RECEIVED));
    let t = d.task(id).unwrap();
    assert_eq!((t.state, t.callbacks), (State::Failed, 1));
    d.stop().await;
}

#[tokio::test]
async fn store_unavailable_is_503_so_kie_retries() {
    let fake = FakeKie::start().await;
    fake.files.set("/s/u.png", Behaviour::Image(png(2000)));
    let d = Daemon::start(&fake, |_| {}).await;
    let id = "storedown";
    crate::admin_track(&d, id).await;
    let before = d.task(id).unwrap();
    let body = success_body(id, &[fake.files.url("/s/u.png")]);

    d.store.inject_write_failures(true);
    let (status, text) = d.callback(&body).await;
    assert_eq!(status, 503, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["error"].as_str().unwrap().contains("retry"), "{text}");
    assert_eq!(d.task(id).unwrap(), before, "a 503 changes nothing");
    assert_eq!(fake.files.hits("/s/u.png"), 0);

    // KIE's retry after the store recovers is taken as the first delivery.
    d.store.inject_write_failures(false);
    assert_eq!(d.callback(&body).await, (200, RECEIVED.to_string()));
    let t = d.wait_for(id, |t| t.state == State::Downloaded).await;
    assert_eq!(t.callbacks, 1);
    d.stop().await;
}

#[tokio::test]
async fn unknown_tasks() {
    let fake = FakeKie::start().await;
    fake.files.set("/s/u.png", Behaviour::Image(png(2000)));
    let urls = [fake.files.url("/s/u.png")];

    let strict = Daemon::start(&fake, |c| c.accept_unknown_tasks = false).await;
    let (status, text) = strict.callback(&success_body("never-seen", &urls)).await;
    assert_eq!(status, 404, "{text}");
    assert_error_json("unknown task", &text);
    assert!(text.contains("never-seen"), "{text}");
    assert!(strict.task("never-seen").is_none());
    assert_eq!(strict.store.counts().unwrap(), Default::default());
    assert_eq!(fake.files.hits("/s/u.png"), 0);
    strict.stop().await;

    let open = Daemon::start(&fake, |c| c.accept_unknown_tasks = true).await;
    assert_eq!(
        open.callback(&success_body("never-seen", &urls)).await,
        (200, RECEIVED.to_string())
    );
    let t = open.task("never-seen").expect("task created");
    assert_eq!(t.callbacks, 1);
    assert_eq!(t.images[0].url, urls[0]);
    open.wait_for("never-seen", |t| t.state == State::Downloaded)
        .await;
    // A failure for an unknown task is recorded too.
    assert_eq!(
        open.callback(&failure_body("never-seen-2", 501, "nope"))
            .await,
        (200, RECEIVED.to_string())
    );
    assert_eq!(open.task("never-seen-2").unwrap().state, State::Failed);
    open.stop().await;
}

/// Checks a task that got `n` deliveries of one success: each image fetched once.
async fn assert_fetched_once(fake: &FakeKie, d: &Daemon, id: &str, paths: &[&str], n: u32) {
    // Downloads only run while `received`, so once downloaded no fetch can follow.
    let t = d.wait_for(id, |t| t.state == State::Downloaded).await;
    assert_eq!(d.task(id).unwrap().callbacks, n);
    for p in paths {
        assert_eq!(fake.files.hits(p), 1, "{id}: {p} fetched more than once");
    }
    assert!(t.images.iter().all(|i| i.attempts == 1), "{t:#?}");
    let events = d.store.events(id).unwrap();
    let count = |k: EventKind| events.iter().filter(|e| e.kind == k).count();
    assert_eq!(
        count(EventKind::DuplicateCallback),
        n as usize - 1,
        "{events:#?}"
    );
    assert_eq!(count(EventKind::Callback), 1, "{events:#?}");
    assert_eq!(count(EventKind::Received), 1, "{events:#?}");
    assert_eq!(count(EventKind::ImageStored), paths.len(), "{events:#?}");
    assert_eq!(count(EventKind::Ignored), 0, "{events:#?}");
}

#[tokio::test]
async fn duplicates_are_fetched_once() {
    let fake = FakeKie::start().await;
    for p in ["/s/seq0.png", "/s/seq1.png", "/s/par0.png", "/s/par1.png"] {
        fake.files.set(p, Behaviour::Image(png(4000)));
    }
    let d = Daemon::start(&fake, |_| {}).await;

    // One after the other.
    let seq = "dup-sequential";
    crate::admin_track(&d, seq).await;
    let body = success_body(
        seq,
        &[fake.files.url("/s/seq0.png"), fake.files.url("/s/seq1.png")],
    );
    for _ in 0..3 {
        assert_eq!(d.callback(&body).await, (200, RECEIVED.to_string()));
    }
    assert_fetched_once(&fake, &d, seq, &["/s/seq0.png", "/s/seq1.png"], 3).await;
    // A fourth delivery after the download is counted and changes nothing else.
    assert_eq!(d.callback(&body).await, (200, RECEIVED.to_string()));
    let t = d.task(seq).unwrap();
    assert_eq!((t.state, t.callbacks), (State::Downloaded, 4));
    assert_eq!(fake.files.hits("/s/seq0.png"), 1);

    // At the same time.
    let par = "dup-concurrent";
    crate::admin_track(&d, par).await;
    let body = success_body(
        par,
        &[fake.files.url("/s/par0.png"), fake.files.url("/s/par1.png")],
    );
    let (a, b, c) = tokio::join!(d.callback(&body), d.callback(&body), d.callback(&body));
    for r in [a, b, c] {
        assert_eq!(r, (200, RECEIVED.to_string()));
    }
    assert_fetched_once(&fake, &d, par, &["/s/par0.png", "/s/par1.png"], 3).await;
    d.stop().await;
}

#[tokio::test]
async fn failure_codes_are_recorded_and_a_late_success_revives() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |_| {}).await;
    let cases = [
        (400, "Invalid parameters"),
        (408, "Timeout"),
        (500, "Internal server error"),
        (501, "Cover generation failed"),
        (531, "Generation failed, credits refunded"),
    ];
    for (code, msg) in cases {
        let id = format!("fail-{code}");
        crate::admin_track(&d, &id).await;
        assert_eq!(
            d.callback(&failure_body(&id, code, msg)).await,
            (200, RECEIVED.to_string()),
            "{code}"
        );
        let t = d.task(&id).unwrap();
        assert_eq!(t.state, State::Failed, "{code}");
        assert_eq!(t.callbacks, 1);
        let err = t.error.as_deref().unwrap_or_default();
        assert!(
            err.contains(&code.to_string()) && err.contains(msg),
            "{code}: error {err:?}"
        );
        assert!(t.images.is_empty());
    }

    // SPEC: failed (generation) ──a later success callback──▶ received ──▶ downloaded.
    for (code, _) in cases {
        let id = format!("fail-{code}");
        let path = format!("/s/late-{code}.png");
        fake.files.set(&path, Behaviour::Image(png(2500)));
        assert_eq!(
            d.callback(&success_body(&id, &[fake.files.url(&path)]))
                .await,
            (200, RECEIVED.to_string()),
            "{code}"
        );
        let t = d.task(&id).unwrap();
        assert!(
            matches!(t.state, State::Received | State::Downloaded),
            "{code}: {t:#?}"
        );
        let t = d.wait_for(&id, |t| t.state == State::Downloaded).await;
        assert_eq!((t.callbacks, t.error.as_deref()), (2, None), "{code}");
        assert_eq!(fake.files.hits(&path), 1);
        // downloaded is final: a later failure delivery is only counted.
        assert_eq!(
            d.callback(&failure_body(&id, code, "late failure")).await,
            (200, RECEIVED.to_string())
        );
        let t = d.task(&id).unwrap();
        assert_eq!((t.state, t.callbacks), (State::Downloaded, 3), "{code}");
    }
    d.stop().await;
}

/// Group commit: concurrent deliveries share flushes instead of each paying its own, and
/// every one of them is still acknowledged only once durable.
#[tokio::test]
async fn concurrent_deliveries_share_flushes() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |c| c.accept_unknown_tasks = true).await;
    const N: usize = 128;
    let before = d.store.group_flushes();
    let (batches_before, written_before) = (d.store.write_batches(), d.store.batched_writes());
    let d = std::sync::Arc::new(d);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..N {
        let d = d.clone();
        set.spawn(async move {
            d.callback(&failure_body(&format!("gc{i}"), 501, "failed"))
                .await
                .0
        });
    }
    while let Some(status) = set.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let flushes = d.store.group_flushes() - before;
    let batches = d.store.write_batches() - batches_before;
    let written = d.store.batched_writes() - written_before;
    println!("{N} deliveries, {batches} write batches (transactions), {flushes} flushes");
    assert!(
        flushes <= (N / 4) as u64,
        "{flushes} flushes for {N} concurrent deliveries"
    );
    // One writer: the deliveries share transactions too, not only flushes.
    assert_eq!(written, N as u64, "every delivery went through the writer");
    assert!(
        batches <= (N / 4) as u64,
        "{batches} transactions for {N} concurrent deliveries"
    );
    assert_eq!(d.store.counts().unwrap().failed, N as u64);
}

/// Backpressure: when the store's writer queue is full, a delivery is answered 503 at once
/// (KIE retries) instead of waiting in an unbounded queue; every delivery answered 200 is
/// stored and survives a restart. The writer is held (test hook) and its queue is tiny
/// (test knob), so the queue fills without timing.
#[tokio::test]
async fn a_full_write_queue_answers_503_and_loses_nothing_acknowledged() {
    let fake = FakeKie::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::harness::test_config(dir.path(), &fake);
    config.accept_unknown_tasks = true;
    let d = Daemon::start_with(dir, config, |h| h.write_queue = Some(2)).await;
    const N: usize = 16;
    let paused = d.store.pause_writes();
    let d = std::sync::Arc::new(d);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..N {
        let d = d.clone();
        set.spawn(async move {
            let id = format!("bp{i}");
            let (status, body) = d.callback(&failure_body(&id, 501, "failed")).await;
            (id, status, body)
        });
    }
    // Nothing can be acknowledged while the writer is held: the first answer is a refusal.
    let (_, status, body) = set.join_next().await.unwrap().unwrap();
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("busy"), "{body}");
    let mut answers = vec![];
    // Once the writer goes on, the queued deliveries are stored and answered.
    drop(paused);
    while let Some(r) = set.join_next().await {
        answers.push(r.unwrap());
    }
    // And the writer takes deliveries again.
    let late = failure_body("bp-late", 501, "failed");
    assert_eq!(d.callback(&late).await, (200, RECEIVED.to_string()));
    answers.push(("bp-late".to_string(), 200, RECEIVED.to_string()));
    let acked: Vec<String> = answers
        .iter()
        .filter(|(_, s, _)| *s == 200)
        .map(|(id, _, _)| id.clone())
        .collect();
    let refused = answers.iter().filter(|(_, s, _)| *s == 503).count() + 1;
    assert_eq!(acked.len() + refused, N + 1, "{answers:?}");
    // At most the queue (2) and the one update the held writer took, and the late one.
    assert!(acked.len() <= 4, "{answers:?}");
    for (id, status, body) in &answers {
        match status {
            200 => assert_eq!(body, RECEIVED),
            _ => assert_eq!(d.task(id), None, "a 503 stores nothing: {id}"),
        }
    }
    let d = std::sync::Arc::into_inner(d).unwrap();
    let (dir, config) = d.stop().await;
    let d = Daemon::start_in(dir, config).await;
    for id in &acked {
        assert_eq!(d.task(id).unwrap().state, State::Failed, "{id}");
    }
    assert_eq!(d.store.counts().unwrap().failed, acked.len() as u64);
    d.stop().await;
}
