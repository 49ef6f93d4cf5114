//! The whole path once: track, callback, download, files on disk, admin view.

use coverd::model::{ImageState, State};

use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, png, sha256_hex};
use crate::harness::{Daemon, success_body};

#[tokio::test]
async fn callback_to_files_on_disk() {
    let fake = FakeKie::start().await;
    let (a, b) = (png(5000), png(7000));
    fake.files.set("/s/a.png", Behaviour::Image(a.clone()));
    fake.files.set("/s/b.png", Behaviour::Image(b.clone()));
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
