//! The whole path once: track, callback, download, files on disk, admin view.

use coverd::model::{ImageState, State};

use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, png, sha256_hex};
use crate::harness::{Daemon, get_text, success_body};

#[tokio::test]
async fn callback_to_files_on_disk() {
    let (fake, [a, b]) = FakeKie::serving([("/s/a.png", png(5000)), ("/s/b.png", png(7000))]).await;
    let d = Daemon::start(&fake, |_| {}).await;
    let id = "21aee3c3c2a01fa5e030b3799fa4dd56";
    assert_eq!(
        d.callback(&success_body(id, &[fake.files.url("/s/a.png")]))
            .await
            .0,
        404
    );
    crate::admin_track(&d, id).await;
    let urls = vec![fake.files.url("/s/a.png"), fake.files.url("/s/b.png")];
    let (status, body) = d.callback(&success_body(id, &urls)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"received"}"#));
    let t = d.wait_for(id, |t| t.state == State::Downloaded).await;
    for (img, bytes) in t.images.iter().zip([&a, &b]) {
        assert_eq!(img.state, ImageState::Downloaded);
        assert_eq!(img.sha256.as_deref(), Some(sha256_hex(bytes).as_str()));
        let on_disk = std::fs::read(d.dir.path().join(img.path.as_ref().unwrap())).unwrap();
        assert_eq!(&on_disk[..], &bytes[..]);
    }
    assert_eq!(d.get("/healthz").await, (200, "ok".into()));
    d.stop().await;
}

#[tokio::test]
async fn metrics_listener_serves_prometheus_text() {
    let fake = FakeKie::start().await;
    fake.files.set("/s/m.png", Behaviour::Image(png(1000)));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let d = Daemon::start(&fake, |c| {
        c.metrics_listen = Some(metrics_addr);
        c.accept_unknown_tasks = true;
    })
    .await;
    assert_eq!(
        d.callback(&success_body("m1", &[fake.files.url("/s/m.png")]))
            .await
            .0,
        200
    );
    assert_eq!(d.callback("not json").await.0, 400);
    d.wait_for("m1", |t| t.state == State::Downloaded).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // Counters are bumped just after the store write the wait saw: read until they show.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let (status, text) = get_text(&http, &format!("http://{metrics_addr}/metrics")).await;
        assert_eq!(status, 200);
        if text.contains("coverd_image_fetches_total{result=\"stored\"} 1")
            || tokio::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    for line in [
        "coverd_tasks{state=\"downloaded\"} 1",
        "coverd_callbacks_total{kind=\"cover\",answer=\"200\"} 1",
        "coverd_callbacks_total{kind=\"cover\",answer=\"400\"} 1",
        "coverd_image_fetches_total{result=\"stored\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing in:\n{text}"
        );
    }
    let other = get_text(&http, &format!("http://{metrics_addr}/nope")).await;
    assert_eq!(other.0, 404);
    d.stop().await;
}
