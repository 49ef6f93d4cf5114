//! `fetch::Fetcher` and `guard::UrlGuard` against the fake file host: every way a download
//! can go wrong, and that none of them leaves a temp file behind.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use coverd::config::{Config, DownloadConfig, UserAgent};
use coverd::fetch::{Ext, FetchError, Fetched, Fetcher};
use coverd::guard::UrlGuard;
use tempfile::TempDir;

use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, gif, jpeg, png, sha256_hex, webp};

const MAX_BYTES: u64 = 64 * 1024;
const UA: &str = "coverd-test/1.0";

/// Plain http, any host, private networks allowed: the fake serves from 127.0.0.1.
fn open_cfg() -> DownloadConfig {
    DownloadConfig {
        allowed_hosts: vec![],
        allow_http: true,
        allow_private_networks: true,
        max_image_bytes: MAX_BYTES,
        timeout: Duration::from_secs(10),
        user_agent: UserAgent::parse(UA.into()).expect("user agent"),
        ..Config::default().download
    }
}

/// Private networks refused, but the fake's own 127.0.0.1 trusted.
fn guarded_cfg() -> DownloadConfig {
    DownloadConfig {
        allow_private_networks: false,
        ..open_cfg()
    }
}

struct Case {
    fake: FakeKie,
    tmp: TempDir,
    fetcher: Fetcher,
}

impl Case {
    async fn new() -> Case {
        Case::with(open_cfg(), |g| g).await
    }

    async fn with(cfg: DownloadConfig, guard: impl FnOnce(UrlGuard) -> UrlGuard) -> Case {
        let fake = FakeKie::start().await;
        let fetcher = Fetcher::new(&cfg, guard(UrlGuard::new(&cfg))).expect("fetcher");
        let tmp = TempDir::new().expect("temp dir");
        Case { fake, tmp, fetcher }
    }

    /// With the fake's 127.0.0.1 trusted while private networks are refused.
    async fn trusting_fake() -> Case {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        Case::with(guarded_cfg(), |g| g.with_trusted_addrs(vec![lo])).await
    }

    fn set(&self, path: &str, behaviour: Behaviour) -> String {
        self.fake.files.set(path, behaviour);
        self.fake.files.url(path)
    }

    async fn ok(&self, url: &str) -> Fetched {
        match self.fetcher.fetch(url, self.tmp.path()).await {
            Ok(fetched) => fetched,
            Err(e) => panic!("fetch {url}: {e}"),
        }
    }

    /// The fetch must fail and leave nothing in the temp dir.
    async fn err(&self, url: &str) -> FetchError {
        let result = self.fetcher.fetch(url, self.tmp.path()).await;
        let err = match result {
            Ok(fetched) => panic!("fetch {url} succeeded: {fetched:?}"),
            Err(e) => e,
        };
        assert_eq!(
            leftovers(self.tmp.path()),
            Vec::<String>::new(),
            "after {err}"
        );
        err
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read temp dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[tokio::test]
async fn good_png_is_stored_with_its_hash() {
    let case = Case::new().await;
    let image = png(5000);
    let url = case.set("/s/a.png", Behaviour::Image(image.clone()));

    let fetched = case.ok(&url).await;

    assert_eq!(fetched.ext, Ext::Png);
    assert_eq!(fetched.bytes, 5000);
    assert_eq!(fetched.sha256, sha256_hex(&image));
    assert_eq!(fetched.sha256.len(), 64);
    assert_eq!(fetched.final_url, url);
    assert_eq!(fetched.temp_path.parent(), Some(case.tmp.path()));
    let name = fetched.temp_path.file_name().unwrap().to_string_lossy();
    assert!(name.ends_with(".part"), "{name}");
    assert_eq!(std::fs::read(&fetched.temp_path).unwrap(), image);
    assert_eq!(leftovers(case.tmp.path()).len(), 1);
    assert_eq!(case.fake.files.last_user_agent().as_deref(), Some(UA));
}

#[tokio::test]
async fn many_small_chunks_are_written_in_order_with_their_hash() {
    // 60 chunks of 1000 bytes: each goes through the file's writer thread.
    let case = Case::new().await;
    let image = png(60_000);
    let url = case.set(
        "/s/chunks.png",
        Behaviour::Trickle {
            bytes: image.clone(),
            chunk: 1000,
            every: Duration::ZERO,
        },
    );

    let fetched = case.ok(&url).await;

    assert_eq!(fetched.bytes, 60_000);
    assert_eq!(fetched.sha256, sha256_hex(&image));
    assert_eq!(std::fs::read(&fetched.temp_path).unwrap(), image);
}

#[tokio::test]
async fn a_fetch_dropped_mid_body_leaves_no_temp_file() {
    let case = Case::new().await;
    let url = case.set(
        "/s/stalls.png",
        Behaviour::SlowBody {
            bytes: png(20_000),
            first: 1000,
            stall: Duration::from_secs(600),
        },
    );
    let fetcher = case.fetcher.clone();
    let dir = case.tmp.path().to_path_buf();
    let fetch = tokio::spawn(async move { fetcher.fetch(&url, &dir).await });
    // Wait (bounded) until the body has started and the temp file exists.
    let deadline = Instant::now() + Duration::from_secs(30);
    while leftovers(case.tmp.path()).is_empty() {
        assert!(Instant::now() < deadline, "no temp file appeared");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fetch.abort();
    assert!(fetch.await.unwrap_err().is_cancelled());
    assert_eq!(leftovers(case.tmp.path()), Vec::<String>::new());
}

#[tokio::test]
async fn each_image_type_gets_its_ext() {
    let case = Case::new().await;
    for (path, bytes, ext) in [
        ("/s/a.png", png(300), Ext::Png),
        ("/s/a.jpg", jpeg(300), Ext::Jpg),
        ("/s/a.gif", gif(300), Ext::Gif),
        ("/s/a.webp", webp(300), Ext::Webp),
        ("/s/tiny.jpg", jpeg(3), Ext::Jpg),
    ] {
        let url = case.set(path, Behaviour::Image(bytes.clone()));
        let fetched = case.ok(&url).await;
        assert_eq!(fetched.ext, ext, "{path}");
        assert_eq!(fetched.sha256, sha256_hex(&bytes), "{path}");
        std::fs::remove_file(&fetched.temp_path).unwrap();
    }
    assert_eq!(
        ["png", "jpg", "webp", "gif"],
        [Ext::Png, Ext::Jpg, Ext::Webp, Ext::Gif].map(Ext::as_str)
    );
}

#[tokio::test]
async fn png_bytes_under_a_wrong_content_type_are_accepted() {
    let case = Case::new().await;
    let url = case.set("/s/a", Behaviour::ImageAs(png(400), "text/plain"));
    assert_eq!(case.ok(&url).await.ext, Ext::Png);
}

#[tokio::test]
async fn server_error_is_transient() {
    let case = Case::new().await;
    let url = case.set("/s/a.png", Behaviour::Status(500));
    let err = case.err(&url).await;
    assert!(
        matches!(err, FetchError::Status { status: 500, .. }),
        "{err:?}"
    );
    assert!(err.is_transient() && !err.is_gone());
    assert_eq!(err.retry_after(), None);
    assert_eq!(err.to_string(), "HTTP 500 Internal Server Error");
}

#[tokio::test]
async fn failures_then_success() {
    let case = Case::new().await;
    let image = png(1000);
    let url = case.set(
        "/s/a.png",
        Behaviour::FailFirst {
            failures: 2,
            bytes: image.clone(),
        },
    );
    for _ in 0..2 {
        assert!(case.err(&url).await.is_transient());
    }
    assert_eq!(case.ok(&url).await.sha256, sha256_hex(&image));
    assert_eq!(case.fake.files.hits("/s/a.png"), 3);
}

#[tokio::test]
async fn gone_statuses_are_distinct_and_permanent() {
    let case = Case::new().await;
    for (code, text) in [
        (404, "HTTP 404 Not Found"),
        (403, "HTTP 403 Forbidden"),
        (410, "HTTP 410 Gone"),
    ] {
        let url = case.set(&format!("/s/{code}.png"), Behaviour::Status(code));
        let err = case.err(&format!("{url}?token=SECRET")).await;
        assert!(err.is_gone() && !err.is_transient(), "{code}: {err:?}");
        assert_eq!(err.to_string(), text);
    }
    // Other 4xx: permanent, not gone.
    let url = case.set("/s/400.png", Behaviour::Status(400));
    let err = case.err(&url).await;
    assert!(!err.is_gone() && !err.is_transient(), "{err:?}");
}

#[tokio::test]
async fn expired_link_answers_gone() {
    let case = Case::new().await;
    let url = case.set("/s/a.png", Behaviour::Image(png(100)));
    std::fs::remove_file(case.ok(&url).await.temp_path).unwrap();
    case.fake.files.expire("/s/a.png");
    assert!(case.err(&url).await.is_gone());
}

#[tokio::test]
async fn rate_limited_with_retry_after() {
    let case = Case::new().await;
    let url = case.set("/s/a.png", Behaviour::StatusRetryAfter(429, "7".into()));
    let err = case.err(&url).await;
    assert!(err.is_transient());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    assert_eq!(err.to_string(), "HTTP 429 Too Many Requests");

    // An HTTP-date a minute ahead.
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(60);
    let date = at
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap()
        .replace("+0000", "GMT");
    let url = case.set("/s/b.png", Behaviour::StatusRetryAfter(503, date));
    let wait = case.err(&url).await.retry_after().expect("retry_after");
    assert!(
        wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
        "{wait:?}"
    );
}

#[tokio::test]
async fn body_shorter_than_its_content_length_is_a_transient_cut() {
    let case = Case::new().await;
    let url = case.set(
        "/s/a.png",
        Behaviour::CutBody {
            bytes: png(5000),
            sent: 1234,
        },
    );
    let err = case.err(&url).await;
    assert!(matches!(err, FetchError::CutBody { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(err.to_string().starts_with("body cut off after "), "{err}");
    assert!(err.to_string().ends_with(" of 5000 bytes"), "{err}");
}

/// coverd never asks for a range, so a 206 carries only part of the file, however
/// image-like its first bytes look: retried like a cut body, never stored.
#[tokio::test]
async fn partial_content_is_a_transient_failure_not_an_image() {
    let case = Case::new().await;
    let url = case.set(
        "/s/a.png",
        Behaviour::Partial {
            bytes: png(5000),
            sent: 1000,
        },
    );
    let err = case.err(&url).await;
    assert!(
        matches!(err, FetchError::Status { status: 206, .. }),
        "{err:?}"
    );
    assert!(err.is_transient() && !err.is_gone(), "{err:?}");
    assert_eq!(err.to_string(), "HTTP 206 Partial Content");
}

#[tokio::test]
async fn body_breaking_mid_way_is_a_transient_cut() {
    let case = Case::new().await;
    let url = case.set(
        "/s/a.png",
        Behaviour::BrokenBody {
            bytes: png(5000),
            sent: 1000,
        },
    );
    let err = case.err(&url).await;
    assert!(matches!(err, FetchError::CutBody { .. }), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn stalled_body_times_out_at_the_read_timeout() {
    let case = Case::new().await;
    let read_timeout = Duration::from_millis(300);
    let fetcher = case
        .fetcher
        .clone()
        .with_read_timeout(read_timeout)
        .unwrap();
    let url = case.set(
        "/s/a.png",
        Behaviour::SlowBody {
            bytes: png(5000),
            first: 100,
            stall: Duration::from_secs(30),
        },
    );
    let started = Instant::now();
    let err = fetcher.fetch(&url, case.tmp.path()).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, FetchError::Timeout { stalled: true, .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert_eq!(err.to_string(), "timed out after 300ms without data");
    assert!(
        took >= read_timeout && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(leftovers(case.tmp.path()), Vec::<String>::new());
}

/// A case serving a PNG of `len` bytes in `chunk`s every `every_ms`, and its fetcher
/// averaging the speed floor over 300 ms instead of 30 s.
async fn trickled(
    cfg: DownloadConfig,
    len: usize,
    chunk: usize,
    every_ms: u64,
) -> (Case, Fetcher, String) {
    let case = Case::with(cfg, |g| g).await;
    let fetcher = case
        .fetcher
        .clone()
        .with_speed_window(Duration::from_millis(300));
    let url = case.set(
        "/s/a.png",
        Behaviour::Trickle {
            bytes: png(len),
            chunk,
            every: Duration::from_millis(every_ms),
        },
    );
    (case, fetcher, url)
}

/// A body that flows, but below `download.min_bytes_per_second` over a whole window, is a
/// transient failure (curl's `--speed-limit`), however short its stalls.
#[tokio::test]
async fn a_body_below_the_speed_floor_is_too_slow() {
    let cfg = DownloadConfig {
        min_bytes_per_second: 10_000,
        ..open_cfg()
    };
    // 100 bytes every 50 ms: 2,000 bytes/s.
    let (case, fetcher, url) = trickled(cfg, 5000, 100, 50).await;
    let err = fetcher.fetch(&url, case.tmp.path()).await.unwrap_err();
    assert!(
        matches!(err, FetchError::TooSlow { floor: 10_000, .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(
        err.to_string()
            .contains("below download.min_bytes_per_second = 10000"),
        "{err}"
    );
    assert_eq!(leftovers(case.tmp.path()), Vec::<String>::new());
}

/// `download.timeout` no longer bounds the whole request: a body that keeps flowing above
/// the floor takes as long as it takes (a WAV of hundreds of MB), here three times the
/// timeout.
#[tokio::test]
async fn a_steady_body_may_outlast_the_timeout() {
    let cfg = DownloadConfig {
        timeout: Duration::from_secs(1),
        min_bytes_per_second: 100,
        ..open_cfg()
    };
    let (case, fetcher, url) = trickled(cfg, 6000, 200, 100).await;
    let started = Instant::now();
    let fetched = fetcher.fetch(&url, case.tmp.path()).await.unwrap();
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fetched.bytes, 6000);
}

/// A server that takes the request and never answers: `download.timeout` bounds the wait
/// for the response headers.
#[tokio::test]
async fn no_response_headers_within_the_timeout() {
    let cfg = DownloadConfig {
        timeout: Duration::from_millis(300),
        ..open_cfg()
    };
    let case = Case::with(cfg, |g| g).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            kept.push(conn);
        }
    });
    let started = Instant::now();
    let err = case.err(&format!("http://{addr}/s/a.png")).await;
    assert!(
        matches!(err, FetchError::Timeout { stalled: false, .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert_eq!(
        err.to_string(),
        "timed out after 300ms waiting for the response headers"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    held.abort();
}

#[tokio::test]
async fn html_page_is_not_an_image() {
    let case = Case::new().await;
    let page = "<!DOCTYPE html><html><body>Access denied</body></html>".to_owned();
    let url = case.set("/s/a.png", Behaviour::Html(page));
    let err = case.err(&url).await;
    assert!(matches!(err, FetchError::WrongType { .. }), "{err:?}");
    assert!(!err.is_transient() && !err.is_gone());
    assert_eq!(
        err.to_string(),
        "not an image: content-type text/html; charset=utf-8, starts with '<!DOCTYPE html><'"
    );
}

#[tokio::test]
async fn oversized_with_content_length_is_refused_early() {
    let case = Case::new().await;
    let url = case.set(
        "/s/big.png",
        Behaviour::Oversized {
            len: Some(MAX_BYTES + 1),
        },
    );
    let err = case.err(&url).await;
    assert!(
        matches!(
            err,
            FetchError::TooLarge {
                limit: MAX_BYTES,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert_eq!(
        err.to_string(),
        format!("image larger than {MAX_BYTES} bytes")
    );
}

/// A file whose declared size would leave less than 1 GiB free is not fetched: it waits
/// like a full disk (no attempt used), whatever its type's cap allows.
#[tokio::test]
async fn a_file_larger_than_the_free_space_less_1_gib_waits_like_a_full_disk() {
    let cfg = DownloadConfig {
        max_video_bytes: 1 << 50,
        ..open_cfg()
    };
    let case = Case::with(cfg, |g| g).await;
    let url = case.set("/s/huge.mp4", Behaviour::Oversized { len: Some(1 << 45) });
    let err = case
        .fetcher
        .fetch_as(&url, case.tmp.path(), coverd::fetch::FileType::Mp4)
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::NoRoom { need, .. } if need == 1 << 45),
        "{err:?}"
    );
    assert!(err.is_disk_full() && err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("less than 1 GiB free"), "{err}");
    assert_eq!(std::fs::read_dir(case.tmp.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn oversized_without_content_length_is_cut_while_streaming() {
    let case = Case::new().await;
    let url = case.set("/s/big.png", Behaviour::Oversized { len: None });
    let err = case.err(&url).await;
    assert!(
        matches!(
            err,
            FetchError::TooLarge {
                limit: MAX_BYTES,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn exactly_max_bytes_is_allowed() {
    let case = Case::new().await;
    let url = case.set("/s/a.png", Behaviour::Image(png(MAX_BYTES as usize)));
    assert_eq!(case.ok(&url).await.bytes, MAX_BYTES);
}

#[tokio::test]
async fn redirect_on_an_allowed_host_is_followed() {
    let case = Case::new().await;
    let image = png(700);
    let target = case.set("/s/b.png", Behaviour::Image(image.clone()));
    let url = case.set("/s/a.png", Behaviour::Redirect(target.clone()));
    let fetched = case.ok(&url).await;
    assert_eq!(fetched.final_url, target);
    assert_eq!(fetched.sha256, sha256_hex(&image));
}

#[tokio::test]
async fn redirect_loop_stops_after_five_hops() {
    let case = Case::new().await;
    let url = format!("{}/s/loop.png", case.fake.base_url());
    case.set("/s/loop.png", Behaviour::Redirect(url.clone()));
    let err = case.err(&url).await;
    assert!(matches!(err, FetchError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("more than 5 redirects"), "{err}");
    assert_eq!(case.fake.files.hits("/s/loop.png"), 6);
}

#[tokio::test]
async fn connect_error_is_transient_and_hides_the_query() {
    let case = Case::new().await;
    // A port nobody listens on: bind one, then free it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/s/a.png?token=SECRET");
    let err = case.err(&url).await;
    assert!(matches!(err, FetchError::Connect { .. }), "{err:?}");
    assert!(err.is_transient());
    let text = err.to_string();
    assert!(
        !text.contains("SECRET") && !text.contains("token"),
        "{text}"
    );
    assert!(
        text.contains(&format!("http://127.0.0.1:{port}/s/a.png")),
        "{text}"
    );
}

// ---- the guard ----

#[tokio::test]
async fn loopback_literal_is_refused_without_a_request() {
    let case = Case::with(guarded_cfg(), |g| g).await;
    let url = case.set("/s/a.png", Behaviour::Image(png(100)));
    let err = case.err(&url).await;
    assert!(matches!(err, FetchError::Refused(_)), "{err:?}");
    assert!(!err.is_transient() && !err.is_gone());
    assert_eq!(
        err.to_string(),
        "refused URL: host 127.0.0.1 is a loopback address"
    );
    assert_eq!(case.fake.files.hits("/s/a.png"), 0);
}

#[tokio::test]
async fn private_metadata_and_non_http_urls_are_refused() {
    let case = Case::with(guarded_cfg(), |g| g).await;
    for (url, words) in [
        (
            "https://10.0.0.1/x.png",
            "host 10.0.0.1 is a private address",
        ),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("file:///etc/passwd", "scheme file"),
        ("ftp://example.com/x.png", "scheme ftp"),
        ("data:image/png;base64,iVBORw0KGgo=", "scheme data"),
        ("https://user:pw@example.com/x.png", "credentials"),
        ("not a url", "not a valid URL"),
    ] {
        let err = case.err(url).await;
        assert!(matches!(err, FetchError::Refused(_)), "{url}: {err:?}");
        assert!(!err.is_transient(), "{url}");
        assert!(err.to_string().contains(words), "{url}: {err}");
    }
}

#[tokio::test]
async fn plain_http_needs_allow_http() {
    let cfg = DownloadConfig {
        allow_http: false,
        ..open_cfg()
    };
    let case = Case::with(cfg, |g| g).await;
    let url = case.set("/s/a.png", Behaviour::Image(png(100)));
    let err = case.err(&url).await;
    assert!(err.to_string().contains("plain http"), "{err}");
    assert_eq!(case.fake.files.hits("/s/a.png"), 0);
}

#[tokio::test]
async fn host_outside_allowed_hosts_is_refused() {
    let cfg = DownloadConfig {
        allowed_hosts: vec!["tempfile.aiquickdraw.com".into()],
        ..open_cfg()
    };
    let case = Case::with(cfg, |g| g).await;
    let url = case.set("/s/a.png", Behaviour::Image(png(100)));
    let err = case.err(&url).await;
    assert_eq!(
        err.to_string(),
        "refused URL: host 127.0.0.1 is not in download.allowed_hosts"
    );
    assert_eq!(case.fake.files.hits("/s/a.png"), 0);
}

#[tokio::test]
async fn trusted_fake_still_serves() {
    let case = Case::trusting_fake().await;
    let url = case.set("/s/a.png", Behaviour::Image(png(100)));
    assert_eq!(case.ok(&url).await.ext, Ext::Png);
}

#[tokio::test]
async fn redirect_to_a_private_address_is_refused() {
    let case = Case::trusting_fake().await;
    let port = case.fake.addr.port();
    case.set("/s/a.png", Behaviour::Image(png(100)));
    for (from, to, words) in [
        (
            "/r/other-loopback",
            format!("http://127.0.0.2:{port}/s/a.png"),
            "host 127.0.0.2 is a loopback address (redirect target)",
        ),
        (
            "/r/private",
            "http://10.0.0.1/x.png".to_owned(),
            "host 10.0.0.1 is a private address (redirect target)",
        ),
        (
            "/r/metadata",
            "http://169.254.169.254/latest/meta-data".to_owned(),
            "link-local",
        ),
    ] {
        let url = case.set(from, Behaviour::Redirect(to));
        let err = case.err(&url).await;
        assert!(matches!(err, FetchError::Refused(_)), "{from}: {err:?}");
        assert!(err.to_string().contains(words), "{from}: {err}");
        assert_eq!(case.fake.files.hits(from), 1);
    }
    assert_eq!(case.fake.files.hits("/s/a.png"), 0);

    // reqwest itself never follows a redirect to a non-http(s) scheme: the 3xx comes back,
    // and is refused.
    let url = case.set("/r/file", Behaviour::Redirect("file:///etc/passwd".into()));
    let err = case.err(&url).await;
    assert!(matches!(err, FetchError::Refused(_)), "{err:?}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn name_resolving_to_loopback_is_refused_by_the_resolver() {
    let case = Case::with(guarded_cfg(), |g| g).await;
    case.set("/s/a.png", Behaviour::Image(png(100)));
    let url = format!("http://localhost:{}/s/a.png", case.fake.addr.port());
    let err = case.err(&url).await;
    assert!(matches!(err, FetchError::Refused(_)), "{err:?}");
    assert!(!err.is_transient());
    let text = err.to_string();
    assert!(
        text.starts_with("refused URL: all addresses of localhost are refused: "),
        "{text}"
    );
    assert_eq!(case.fake.files.hits("/s/a.png"), 0);
}
