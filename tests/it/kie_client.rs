//! `coverd::kie`: the KIE API client against the fake KIE (real time, real sockets), and the
//! rate limiter on its own (paused time).

use std::time::Duration;

use coverd::config::{ApiKey, KieBaseUrl, KieConfig, Secret, UserAgent};
use coverd::kie::{CoverStatus, KieClient, KieError, RateLimiter};
use serde_json::json;
use tokio::time::Instant;

use crate::fake_kie::FakeKie;
use crate::fake_kie::api::{Delivery, Endpoint, FlagForm, RecordStyle, Status, UrlForm};

const KEY: &str = "sk-test-0123456789abcdef";
const UA: &str = "coverd-test/1.0";
const CALLBACK: &str = "https://coverd.example.org/callbacks/cover";

fn config(base_url: &str, limit: u32) -> KieConfig {
    KieConfig {
        base_url: KieBaseUrl::parse("kie.base_url", base_url).expect("base url"),
        api_key: Some(ApiKey::parse("kie.api_key", &Secret::new(KEY)).expect("key")),
        webhook_hmac_key: None,
        signature_tolerance: Duration::from_secs(300),
        confirm_callbacks: true,
        requests_per_10s: limit,
    }
}

fn ua() -> UserAgent {
    UserAgent::parse(UA.into()).expect("user agent")
}

fn client(fake: &FakeKie) -> KieClient {
    KieClient::new(&config(&fake.base_url(), 18), &ua()).expect("client")
}

fn assert_no_key(e: &KieError) {
    assert!(!e.to_string().contains(KEY), "key leaked in {e}");
    assert!(!format!("{e:?}").contains(KEY), "key leaked in {e:?}");
}

// ---- generate ----

#[tokio::test]
async fn generate_sends_auth_user_agent_and_body() {
    let fake = FakeKie::start().await;
    fake.api.require_api_key(Some(KEY));
    let kie = client(&fake);

    let task_id = kie
        .generate_cover("music-1", CALLBACK)
        .await
        .expect("generate");

    assert_eq!(task_id.len(), 32, "{task_id}");
    assert!(task_id.chars().all(|c| c.is_ascii_hexdigit()), "{task_id}");
    assert_eq!(fake.api.calls(Endpoint::Generate), 1);
    let req = fake.api.last_request(Endpoint::Generate).expect("recorded");
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/api/v1/suno/cover/generate");
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(req.header("user-agent"), Some(UA));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(
        req.json(),
        json!({"taskId": "music-1", "callBackUrl": CALLBACK})
    );
    let task = fake.api.task(&task_id).expect("fake knows the task");
    assert_eq!(task.music_task_id, "music-1");
    assert_eq!(task.callback_url.as_deref(), Some(CALLBACK));
    assert!(!format!("{kie:?}").contains(KEY));
}

#[tokio::test]
async fn generate_repeat_409_is_already_exists_with_the_id() {
    let fake = FakeKie::start().await;
    let kie = client(&fake);
    let first = kie
        .generate_cover("music-1", CALLBACK)
        .await
        .expect("first");
    match kie.generate_cover("music-1", CALLBACK).await {
        Err(KieError::AlreadyExists { task_id }) => assert_eq!(task_id, first),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    // Another song still gets its own task.
    let second = kie
        .generate_cover("music-2", CALLBACK)
        .await
        .expect("second");
    assert_ne!(first, second);
}

#[tokio::test]
async fn generate_repeat_400_with_id_is_already_exists() {
    let fake = FakeKie::start().await;
    fake.api.set_repeat_code(400);
    fake.api.add_task("existing-cover", "music-9");
    let kie = client(&fake);
    match kie.generate_cover("music-9", CALLBACK).await {
        Err(e @ KieError::AlreadyExists { .. }) => {
            assert!(!e.is_transient());
            assert!(
                matches!(&e, KieError::AlreadyExists { task_id } if task_id == "existing-cover")
            );
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
}

#[tokio::test]
async fn generate_400_without_id_is_invalid() {
    let fake = FakeKie::start().await;
    fake.api.fail_next(Endpoint::Generate, 400, 1);
    let kie = client(&fake);
    let err = kie
        .generate_cover("music-1", CALLBACK)
        .await
        .expect_err("400");
    assert!(
        matches!(err, KieError::Invalid { code: 400, .. }),
        "{err:?}"
    );
    assert!(!err.is_transient());
    // The forced error was for one call only.
    kie.generate_cover("music-1", CALLBACK)
        .await
        .expect("then it works");
}

#[tokio::test]
async fn error_codes_map_to_typed_errors_however_delivered() {
    let fake = FakeKie::start().await;
    type Check = fn(&KieError) -> bool;
    let cases: [(u16, Check, bool); 5] = [
        (401, |e| matches!(e, KieError::Unauthorized), false),
        (402, |e| matches!(e, KieError::NoCredits), false),
        (429, |e| matches!(e, KieError::RateLimited), true),
        (455, |e| matches!(e, KieError::Maintenance), true),
        (
            500,
            |e| matches!(e, KieError::Server { code: 500, .. }),
            true,
        ),
    ];
    for (code, is_expected, transient) in cases {
        for delivery in [
            Delivery::Envelope,
            Delivery::HttpStatus,
            Delivery::HttpPlain,
        ] {
            // A fresh client each time: a 429 pauses the client's limiter for 10 s.
            let kie = client(&fake);
            fake.api
                .fail_next_with(Endpoint::Generate, code, 1, delivery);
            let err = kie
                .generate_cover("music-x", CALLBACK)
                .await
                .expect_err("forced error");
            assert!(is_expected(&err), "{code} via {delivery:?} gave {err:?}");
            assert_eq!(err.is_transient(), transient, "{err:?}");
            assert_no_key(&err);
        }
    }
    assert_eq!(fake.api.calls(Endpoint::Generate), 15);
}

#[tokio::test]
async fn error_messages_tell_the_operator_what_to_do() {
    assert_eq!(
        KieError::Unauthorized.to_string(),
        "KIE rejected the API key (401): check kie.api_key"
    );
    assert_eq!(
        KieError::NoCredits.to_string(),
        "KIE account has no credits left (402): top up at kie.ai"
    );
    let fake = FakeKie::start().await;
    fake.api.fail_next(Endpoint::RecordInfo, 401, 1);
    let err = client(&fake).record_info("any").await.expect_err("401");
    assert!(matches!(err, KieError::Unauthorized), "{err:?}");
}

#[tokio::test]
async fn a_429_pauses_the_client_for_a_whole_window() {
    let fake = FakeKie::start().await;
    fake.api.fail_next(Endpoint::Any, 429, 1);
    let kie = client(&fake);
    assert_eq!(kie.limiter().paused_until(), None);
    let before = Instant::now();
    let err = kie.record_info("any").await.expect_err("429");
    assert!(matches!(err, KieError::RateLimited), "{err:?}");
    let until = kie.limiter().paused_until().expect("paused");
    assert!(until >= before + Duration::from_secs(10), "pause too short");
    // Clones share the limiter.
    assert_eq!(kie.clone().limiter().paused_until(), Some(until));
}

#[tokio::test]
async fn fake_burst_mode_answers_429_past_the_limit() {
    let fake = FakeKie::start().await;
    fake.api.set_burst_limit(Some(3));
    let kie = KieClient::new(&config(&fake.base_url(), 20), &ua()).expect("client");
    for i in 0..3 {
        kie.generate_cover(&format!("music-{i}"), CALLBACK)
            .await
            .expect("under the limit");
    }
    let err = kie
        .generate_cover("music-3", CALLBACK)
        .await
        .expect_err("over the limit");
    assert!(matches!(err, KieError::RateLimited), "{err:?}");
    assert_eq!(fake.api.call_times(Endpoint::Any).len(), 4);
}

// ---- record-info ----

#[tokio::test]
async fn record_info_every_status_in_every_flag_form() {
    let fake = FakeKie::start().await;
    let kie = client(&fake);
    fake.api.add_task("cover-1", "music-1");
    let urls = vec![
        format!("{}/img/a.png", fake.base_url()),
        format!("{}/img/b.png", fake.base_url()),
    ];
    for form in [FlagForm::Int, FlagForm::Text, FlagForm::NumericString] {
        fake.api.set_record_style(RecordStyle {
            flag: form,
            ..RecordStyle::default()
        });
        let cases = [
            (Status::Pending, CoverStatus::Pending),
            (Status::Generating, CoverStatus::Generating),
            (Status::Success(urls.clone()), CoverStatus::Success),
            (
                Status::Failed {
                    code: 501,
                    message: "Cover generation failed".into(),
                },
                CoverStatus::Failed,
            ),
            (
                Status::CreateFailed {
                    code: 400,
                    message: "bad song".into(),
                },
                CoverStatus::Failed,
            ),
        ];
        for (status, expected) in cases {
            fake.api.set_status("cover-1", status.clone());
            let info = kie.record_info("cover-1").await.expect("record-info");
            assert_eq!(info.status, expected, "{status:?} as {form:?}");
            assert_eq!(info.task_id.as_deref(), Some("cover-1"));
            assert_eq!(info.parent_task_id.as_deref(), Some("music-1"));
            match status {
                Status::Success(_) => {
                    assert_eq!(info.images, urls);
                    assert_eq!(
                        (info.error_code, info.error_message.as_deref()),
                        (None, None)
                    );
                }
                Status::Failed { code, message } | Status::CreateFailed { code, message } => {
                    assert!(info.images.is_empty());
                    assert_eq!(info.error_code, Some(code));
                    assert_eq!(info.error_message, Some(message));
                }
                Status::Pending | Status::Generating => {
                    assert!(info.images.is_empty());
                    assert_eq!(info.error_code, None);
                }
            }
        }
    }
    let req = fake
        .api
        .last_request(Endpoint::RecordInfo)
        .expect("recorded");
    assert_eq!(req.method, "GET");
    assert_eq!(req.query_param("taskId").as_deref(), Some("cover-1"));
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(req.header("user-agent"), Some(UA));
    assert_eq!(req.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn record_info_response_as_string_and_message_key() {
    let fake = FakeKie::start().await;
    fake.api.set_record_style(RecordStyle {
        flag: FlagForm::Text,
        response_as_string: true,
        omit_response: false,
    });
    fake.api.use_message_key(true);
    fake.api.add_task("cover-1", "music-1");
    let urls = vec!["https://tempfile.aiquickdraw.com/s/x.png".to_string()];
    fake.api
        .set_status("cover-1", Status::Success(urls.clone()));
    let kie = client(&fake);
    let info = kie.record_info("cover-1").await.expect("record-info");
    assert_eq!(info.status, CoverStatus::Success);
    assert_eq!(info.images, urls);
    // Still pending with `response` as the string form of `{"images": null}`.
    fake.api.set_status("cover-1", Status::Pending);
    let info = kie.record_info("cover-1").await.expect("record-info");
    assert_eq!((info.status, info.images.len()), (CoverStatus::Pending, 0));
    // Errors written with `message` are read too.
    let err = kie.record_info("unknown").await.expect_err("not found");
    assert!(matches!(err, KieError::NotFound), "{err:?}");
}

#[tokio::test]
async fn record_info_without_response_field() {
    let fake = FakeKie::start().await;
    fake.api.set_record_style(RecordStyle {
        omit_response: true,
        ..RecordStyle::default()
    });
    fake.api.add_task("cover-1", "music-1");
    fake.api.set_status("cover-1", Status::Generating);
    let info = client(&fake)
        .record_info("cover-1")
        .await
        .expect("record-info");
    assert_eq!(info.status, CoverStatus::Generating);
    assert!(info.images.is_empty());
}

#[tokio::test]
async fn record_info_unknown_task_is_not_found_for_404_and_422() {
    let fake = FakeKie::start().await;
    let kie = client(&fake);
    for code in [404, 422] {
        fake.api.set_not_found_code(code);
        let err = kie.record_info("nope").await.expect_err("not found");
        assert!(matches!(err, KieError::NotFound), "{code}: {err:?}");
        assert!(!err.is_transient());
    }
}

#[tokio::test]
async fn record_info_query_is_encoded() {
    let fake = FakeKie::start().await;
    let odd = "a b&c=d/é";
    let _ = client(&fake).record_info(odd).await;
    let req = fake
        .api
        .last_request(Endpoint::RecordInfo)
        .expect("recorded");
    assert_eq!(req.query_param("taskId").as_deref(), Some(odd));
}

// ---- download-url ----

#[tokio::test]
async fn download_url_fresh_link_in_every_data_shape() {
    let fake = FakeKie::start().await;
    let kie = client(&fake);
    let old = format!("{}/s/old.png", fake.base_url());
    let expected = format!("{}/fresh/s/old.png", fake.base_url());
    for form in [
        UrlForm::String,
        UrlForm::ObjectUrl,
        UrlForm::ObjectDownloadUrl,
    ] {
        fake.api.set_url_form(form);
        assert_eq!(
            kie.refresh_download_url(&old).await.expect("fresh"),
            expected,
            "{form:?}"
        );
    }
    let req = fake
        .api
        .last_request(Endpoint::DownloadUrl)
        .expect("recorded");
    assert_eq!(req.method, "POST");
    assert_eq!(req.json(), json!({"url": old}));
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );

    let mapped = format!("{}/s/mapped.png", fake.base_url());
    fake.api
        .set_fresh_url(&mapped, "https://cdn.example/new.png");
    assert_eq!(
        kie.refresh_download_url(&mapped).await.expect("fresh"),
        "https://cdn.example/new.png"
    );
}

#[tokio::test]
async fn download_url_of_a_foreign_file_is_not_kie_file() {
    let fake = FakeKie::start().await;
    let err = client(&fake)
        .refresh_download_url("https://example.com/not-kie.png")
        .await
        .expect_err("422");
    assert!(matches!(err, KieError::NotKieFile), "{err:?}");
    assert!(!err.is_transient());
}

// ---- transport ----

#[tokio::test]
async fn slow_answer_within_the_timeout_is_honoured() {
    let fake = FakeKie::start().await;
    fake.api
        .set_delay(Endpoint::Any, Duration::from_millis(1500));
    let kie = client(&fake);
    let started = std::time::Instant::now();
    let task_id = kie
        .generate_cover("music-1", CALLBACK)
        .await
        .expect("slow but fine");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(fake.api.cover_task_for("music-1"), Some(task_id));
}

#[tokio::test]
async fn answer_slower_than_the_timeout_is_a_transient_transport_error() {
    let fake = FakeKie::start().await;
    fake.api
        .set_delay(Endpoint::RecordInfo, Duration::from_secs(3));
    let kie = KieClient::with_timeouts(
        &config(&fake.base_url(), 18),
        &ua(),
        Duration::from_millis(300),
        Duration::from_secs(1),
    )
    .expect("client");
    let err = kie.record_info("cover-1").await.expect_err("timeout");
    assert!(matches!(err, KieError::Transport(_)), "{err:?}");
    assert!(err.is_transient());
    assert_no_key(&err);
}

#[tokio::test]
async fn unreachable_kie_is_a_transient_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let kie = KieClient::new(&config(&format!("http://{addr}/"), 18), &ua()).expect("client");
    let err = kie
        .generate_cover("music-1", CALLBACK)
        .await
        .expect_err("refused");
    assert!(matches!(err, KieError::Transport(_)), "{err:?}");
    assert!(err.is_transient());
    assert_no_key(&err);
}

#[tokio::test]
async fn wrong_key_is_unauthorized() {
    let fake = FakeKie::start().await;
    fake.api.require_api_key(Some("another-key"));
    let err = client(&fake)
        .generate_cover("music-1", CALLBACK)
        .await
        .expect_err("401");
    assert!(matches!(err, KieError::Unauthorized), "{err:?}");
    assert_no_key(&err);
}

// ---- the rate limiter, on paused time ----

#[tokio::test(start_paused = true)]
async fn limiter_never_exceeds_the_limit_in_any_window() {
    let limiter = std::sync::Arc::new(RateLimiter::new(18, Duration::from_secs(10)));
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..100 {
        let limiter = limiter.clone();
        handles.push(tokio::spawn(async move {
            limiter.acquire().await;
            Instant::now()
        }));
    }
    let mut times = Vec::new();
    for h in handles {
        times.push(h.await.expect("task"));
    }
    times.sort();
    let window = Duration::from_secs(10);
    for (i, &start) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|&&t| t < start + window)
            .count();
        assert!(
            in_window <= 18,
            "{in_window} calls in the window starting at {:?}",
            start - t0
        );
    }
    // And no slower than needed: 18 per window, so the 100th starts after 5 windows.
    let last = times.last().copied().expect("100 times");
    assert_eq!(last - t0, Duration::from_secs(50));
    assert_eq!(times.iter().filter(|&&t| t == t0).count(), 18);
}

#[tokio::test(start_paused = true)]
async fn limiter_pause_after_429_blocks_a_full_window() {
    let limiter = RateLimiter::new(18, Duration::from_secs(10));
    limiter.acquire().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let paused_at = Instant::now();
    limiter.pause();
    // Calls from several tasks all wait for the end of the pause.
    let limiter = std::sync::Arc::new(limiter);
    let mut handles = Vec::new();
    for _ in 0..5 {
        let limiter = limiter.clone();
        handles.push(tokio::spawn(async move {
            limiter.acquire().await;
            Instant::now()
        }));
    }
    for h in handles {
        let at = h.await.expect("task");
        assert_eq!(at - paused_at, Duration::from_secs(10));
    }
    // A second 429 during a pause extends it from that moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = Instant::now();
    limiter.pause();
    limiter.acquire().await;
    assert_eq!(Instant::now() - again, Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn limiter_of_zero_still_lets_one_call_through_per_window() {
    let limiter = RateLimiter::new(0, Duration::from_secs(10));
    let t0 = Instant::now();
    limiter.acquire().await;
    limiter.acquire().await;
    assert_eq!(Instant::now() - t0, Duration::from_secs(10));
}
