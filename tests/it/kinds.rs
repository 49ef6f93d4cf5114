//! Task kinds other than cover through the real HTTP path (SPEC "Task kinds"): for music,
//! wav, video and stems, success by callback (music in stages), success by polling the
//! kind's details endpoint, failure by callback and by details, confirmation overriding a
//! forged callback, an expired URL refreshed, wrong-type and empty bodies, the callback on
//! another kind's route (409), the notification's type, and the admin views (`list --kind`,
//! `show`, `forget`). The files land at `files/<task>/<name>.<ext>` with their sha256.

use std::time::Duration;

use bytes::Bytes;
use coverd::admin::Request;
use coverd::model::{Kind, State, Task};
use serde_json::{Value, json};

use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, jpeg, mp3, mp4, sha256_hex, wav};
use crate::harness::{Daemon, admin_err, json_of, with_api};

/// Tracks `id` as a task of `kind` (as `coverd admin track --kind` does).
async fn track(d: &Daemon, id: &str, kind: Kind) -> Value {
    json_of(
        &d.config,
        Request::Track {
            task_id: id.into(),
            music_task_id: (kind != Kind::Music).then(|| "music-1".to_string()),
            kind: Some(kind.as_str().into()),
            audio_id: (kind != Kind::Music).then(|| "audio-1".to_string()),
        },
    )
    .await
}

async fn callback(d: &Daemon, kind: Kind, body: &Value) -> (u16, String) {
    d.post(
        &format!("/callbacks/{}", kind.as_str()),
        body.to_string(),
        &[("content-type", "application/json")],
    )
    .await
}

/// One test case's files: (path on the fake's file host, bytes).
pub(crate) struct Files {
    pub(crate) items: Vec<(String, Bytes)>,
}

impl Files {
    pub(crate) fn serve(fake: &FakeKie, items: &[(&str, Bytes)]) -> Files {
        for (path, bytes) in items {
            fake.files.set(path, Behaviour::Image(bytes.clone()));
        }
        Files {
            items: items
                .iter()
                .map(|(p, b)| (p.to_string(), b.clone()))
                .collect(),
        }
    }

    pub(crate) fn url(&self, fake: &FakeKie, i: usize) -> String {
        fake.files.url(&self.items[i].0)
    }
}

/// The files each kind makes in these tests: what the fake serves, and the names
/// (`files/<task>/<name>`) they must be stored under, in order.
pub(crate) fn case(fake: &FakeKie, kind: Kind, tag: &str) -> (Files, Vec<&'static str>) {
    let p = |name: &str| format!("/{tag}/{}/{name}", kind.as_str());
    match kind {
        Kind::Music => (
            Files::serve(
                fake,
                &[
                    (&p("a.mp3"), mp3(40_000)),
                    (&p("a.jpeg"), jpeg(3_000)),
                    (&p("b.mp3"), mp3(50_000)),
                    (&p("b.jpeg"), jpeg(4_000)),
                ],
            ),
            vec!["track-0.mp3", "track-0.jpg", "track-1.mp3", "track-1.jpg"],
        ),
        Kind::Wav => (
            Files::serve(fake, &[(&p("x.wav"), wav(300_000))]),
            vec!["audio.wav"],
        ),
        Kind::Video => (
            Files::serve(fake, &[(&p("x.mp4"), mp4(400_000))]),
            vec!["video.mp4"],
        ),
        Kind::Stems => (
            Files::serve(
                fake,
                &[
                    (&p("v.mp3"), mp3(20_000)),
                    (&p("i.mp3"), mp3(21_000)),
                    (&p("d.mp3"), mp3(22_000)),
                ],
            ),
            vec!["vocal.mp3", "instrumental.mp3", "drums.mp3"],
        ),
        Kind::Cover => unreachable!("covers have their own tests"),
    }
}

/// A success callback of `kind` listing `files` as KIE writes it (snake case, with the
/// fields coverd must ignore: streams, the source, the original).
pub(crate) fn success_callback(fake: &FakeKie, kind: Kind, id: &str, files: &Files) -> Value {
    let u = |i| files.url(fake, i);
    match kind {
        Kind::Music => json!({"code": 200, "msg": "All generated successfully.", "data": {
        "callbackType": "complete", "task_id": id,
        "data": [
            {"id": "trk-a", "audio_url": u(0), "stream_audio_url": "https://musicfile.kie.ai/stream-a",
             "image_url": u(1), "title": "Night Drive", "duration": 198.44,
             "source_audio_url": "https://cdn1.suno.ai/src.mp3", "createTime": "2025-01-01 00:00:00"},
            {"id": "trk-b", "audio_url": u(2), "stream_audio_url": "https://musicfile.kie.ai/stream-b",
             "image_url": u(3), "title": "Night Drive (2)", "duration": "201.5", "createTime": 1735689600000i64}
        ]}}),
        Kind::Wav => json!({"code": 200, "msg": "success",
            "data": {"task_id": id, "audio_wav_url": u(0)}}),
        Kind::Video => json!({"code": "200", "msg": "success",
            "data": {"task_id": id, "video_url": u(0)}}),
        Kind::Stems => json!({"code": 200, "msg": "success", "data": {"task_id": id,
            "vocal_removal_info": {"vocal_url": u(0), "instrumental_url": u(1), "drums_url": u(2),
                "bass_url": "", "origin_url": "https://file.aiquickdraw.com/origin.mp3"}}}),
        Kind::Cover => unreachable!(),
    }
}

/// The details `data` of a finished task of `kind` listing `files` (camel case, `response`
/// as a JSON string for one of them).
fn success_details(fake: &FakeKie, kind: Kind, id: &str, files: &Files, flag: &str) -> Value {
    let u = |i| files.url(fake, i);
    match kind {
        Kind::Music => {
            json!({"taskId": id, "status": flag, "response": {"taskId": id, "sunoData": [
            {"id": "trk-a", "audioUrl": u(0), "streamAudioUrl": "https://musicfile.kie.ai/s", "imageUrl": u(1),
             "title": "Night Drive", "duration": 198.44, "createTime": "2025-01-01T00:00:00Z"},
            {"id": "trk-b", "audioUrl": u(2), "imageUrl": u(3), "title": "Night Drive (2)", "duration": 201.5}]}})
        }
        Kind::Wav => json!({"taskId": id, "successFlag": flag,
            "response": json!({"audioWavUrl": u(0)}).to_string()}),
        Kind::Video => json!({"taskId": id, "successFlag": flag, "response": {"videoUrl": u(0)}}),
        Kind::Stems => json!({"taskId": id, "successFlag": flag, "response": {
            "vocalUrl": u(0), "instrumentalUrl": u(1), "drumsUrl": u(2), "originUrl": "https://x/o.mp3"}}),
        Kind::Cover => unreachable!(),
    }
}

fn failure_callback(kind: Kind, id: &str) -> Value {
    match kind {
        Kind::Music => json!({"code": 501, "msg": "Audio generation failed",
            "data": {"callbackType": "error", "task_id": id, "data": null}}),
        _ => json!({"code": 500, "msg": "Internal error", "data": {"task_id": id}}),
    }
}

pub(crate) const OTHER_KINDS: [Kind; 4] = [Kind::Music, Kind::Wav, Kind::Video, Kind::Stems];

/// The task's files are stored under `files/<id>/` with the expected names and bytes.
fn assert_stored(d: &Daemon, t: &Task, files: &Files, names: &[&str]) {
    assert_eq!(t.state, State::Downloaded, "{t:#?}");
    assert_eq!(t.images.len(), names.len(), "{t:#?}");
    for (i, name) in names.iter().enumerate() {
        let rel = format!("files/{}/{name}", t.task_id);
        assert_eq!(t.images[i].path.as_deref(), Some(rel.as_str()), "{t:#?}");
        let on_disk = std::fs::read(d.dir.path().join(&rel)).expect("stored file");
        assert_eq!(on_disk, files.items[i].1.as_ref(), "{rel}");
        assert_eq!(
            t.images[i].sha256.as_deref(),
            Some(sha256_hex(&on_disk).as_str())
        );
    }
}

#[tokio::test]
async fn every_kind_is_downloaded_from_its_callback() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |_| {}).await;
    for kind in OTHER_KINDS {
        let id = format!("cb-{}", kind.as_str());
        let v = track(&d, &id, kind).await;
        assert_eq!(v["kind"], kind.as_str());
        let (files, names) = case(&fake, kind, "cb");
        if kind == Kind::Music {
            // Stages are recorded and change nothing, whatever they list.
            for stage in ["text", "first"] {
                let body = json!({"code": 200, "msg": "ok", "data": {"callbackType": stage,
                    "task_id": id, "data": [{"id": "trk-a", "audio_url": files.url(&fake, 0)}]}});
                assert_eq!(callback(&d, kind, &body).await.0, 200);
            }
            let t = d.task(&id).unwrap();
            assert_eq!((t.state, t.callbacks), (State::Submitted, 2), "{t:#?}");
            assert!(t.images.is_empty());
        }
        let body = success_callback(&fake, kind, &id, &files);
        assert_eq!(
            callback(&d, kind, &body).await,
            (200, r#"{"status":"received"}"#.into())
        );
        let t = d.wait_for(&id, |t| t.state.is_finished()).await;
        assert_stored(&d, &t, &files, &names);
        // The source's own files are never fetched.
        assert_eq!(fake.files.hits("/origin.mp3"), 0);
        // A duplicate is counted, never processed again.
        assert_eq!(callback(&d, kind, &body).await.0, 200);
        let again = d.task(&id).unwrap();
        assert_eq!(again.state, State::Downloaded);
    }
    // The music task's files describe their tracks; SPEC's JSON carries them.
    let show = json_of(
        &d.config,
        Request::Show {
            task_id: "cb-music".into(),
        },
    )
    .await;
    assert_eq!(show["kind"], "music");
    assert!(show.get("images").is_none(), "{show:#}");
    let files = show["files"].as_array().unwrap();
    assert_eq!(files[0]["name"], "track-0.mp3");
    assert_eq!(files[0]["media_type"], "audio/mpeg");
    assert_eq!(files[0]["audio_id"], "trk-a");
    assert_eq!(files[0]["title"], "Night Drive");
    assert_eq!(files[0]["duration"], 198.44);
    assert_eq!(files[1]["media_type"], "image/jpeg");
    assert_eq!(files[3]["duration"], 201.5);
    let wav = json_of(
        &d.config,
        Request::Show {
            task_id: "cb-wav".into(),
        },
    )
    .await;
    assert_eq!(wav["audio_id"], "audio-1");
    assert_eq!(wav["music_task_id"], "music-1");
    assert_eq!(wav["files"][0]["media_type"], "audio/wav");
    // `list --kind` shows only that kind.
    let listed = json_of(
        &d.config,
        Request::List {
            state: None,
            kind: Some("stems".into()),
            limit: 100,
        },
    )
    .await;
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cb-stems"]);
    d.stop().await;
}

#[tokio::test]
async fn every_kind_is_found_by_polling_its_details_endpoint() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, with_api).await;
    for (n, kind) in OTHER_KINDS.into_iter().enumerate() {
        let id = format!("poll-{}", kind.as_str());
        fake.kinds.add(kind, &id);
        track(&d, &id, kind).await;
        let (files, names) = case(&fake, kind, "poll");
        // Pending, then a status coverd does not know (taken as pending), then success (or
        // CALLBACK_EXCEPTION with the files listed, which is a success too).
        d.advance(Duration::from_secs(3600));
        d.wait_for(&id, |t| t.polls >= 1).await;
        let odd = match kind {
            Kind::Music => json!({"taskId": id, "status": "SOMETHING_NEW"}),
            _ => json!({"taskId": id, "successFlag": "SOMETHING_NEW"}),
        };
        fake.kinds.set_details(&id, odd);
        d.advance(Duration::from_secs(3600));
        let t = d.wait_for(&id, |t| t.polls >= 2).await;
        assert_eq!(t.state, State::Submitted, "{t:#?}");
        let flag = if n % 2 == 0 {
            "SUCCESS"
        } else {
            "CALLBACK_EXCEPTION"
        };
        fake.kinds
            .set_details(&id, success_details(&fake, kind, &id, &files, flag));
        d.advance(Duration::from_secs(3600));
        let t = d.wait_for(&id, |t| t.state.is_finished()).await;
        assert_eq!(t.source, Some(coverd::model::Source::Poll));
        assert_stored(&d, &t, &files, &names);
        assert!(fake.kinds.details_calls(&id) >= 3);
    }
    d.stop().await;
}

#[tokio::test]
async fn failures_come_by_callback_and_by_details() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, with_api).await;
    for kind in OTHER_KINDS {
        // By callback.
        let id = format!("fcb-{}", kind.as_str());
        fake.kinds.add(kind, &id);
        track(&d, &id, kind).await;
        assert_eq!(
            callback(&d, kind, &failure_callback(kind, &id)).await.0,
            200
        );
        let t = d.wait_for(&id, |t| t.state == State::Failed).await;
        assert!(
            t.error.as_deref().unwrap().starts_with("KIE code 5"),
            "{t:#?}"
        );
        // By details: a failure status, and CALLBACK_EXCEPTION without files.
        for (i, status) in ["GENERATE_AUDIO_FAILED", "CALLBACK_EXCEPTION"]
            .iter()
            .enumerate()
        {
            let id = format!("fd{i}-{}", kind.as_str());
            fake.kinds.add(kind, &id);
            track(&d, &id, kind).await;
            let key = if kind == Kind::Music {
                "status"
            } else {
                "successFlag"
            };
            fake.kinds.set_details(
                &id,
                json!({"taskId": id, key: status, "errorCode": 400, "errorMessage": "sensitive words"}),
            );
            d.advance(Duration::from_secs(3600));
            let t = d.wait_for(&id, |t| t.state == State::Failed).await;
            assert!(t.error.as_deref().unwrap().contains(status), "{t:#?}");
        }
    }
    d.stop().await;
}

/// With confirmation on, the details endpoint is the truth: a forged callback's URLs are
/// never fetched; and a link that expired is refreshed through download-url.
#[tokio::test]
async fn details_override_a_forged_callback_and_expired_links_are_refreshed() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, with_api).await;
    for kind in OTHER_KINDS {
        let id = format!("forged-{}", kind.as_str());
        fake.kinds.add(kind, &id);
        track(&d, &id, kind).await;
        let (real, names) = case(&fake, kind, "real");
        let (forged, _) = case(&fake, kind, "forged");
        fake.kinds
            .set_details(&id, success_details(&fake, kind, &id, &real, "SUCCESS"));
        // Every real link has expired: 404 until refreshed (download-url answers
        // `/fresh<path>`).
        for (path, bytes) in &real.items {
            fake.files.set(path, Behaviour::Status(404));
            fake.files
                .set(&format!("/fresh{path}"), Behaviour::Image(bytes.clone()));
        }
        let body = success_callback(&fake, kind, &id, &forged);
        assert_eq!(callback(&d, kind, &body).await.0, 200);
        let t = d.wait_for(&id, |t| t.state.is_finished()).await;
        for (path, _) in &forged.items {
            assert_eq!(fake.files.hits(path), 0, "a forged URL was fetched: {path}");
        }
        for (i, img) in t.images.iter().enumerate() {
            assert_eq!(img.url, real.url(&fake, i));
            assert!(img.refreshed_url.is_some(), "{t:#?}");
        }
        assert_stored(&d, &t, &real, &names);
    }
    d.stop().await;
}

/// A file of the wrong type fails for good (never stored); an empty 200 is tried again.
#[tokio::test]
async fn wrong_types_and_empty_bodies_are_never_stored() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |c| c.download.max_attempts = 3).await;
    // A WAV task whose URL serves an MP3.
    track(&d, "wrongtype", Kind::Wav).await;
    fake.files.set("/wt/x.wav", Behaviour::Image(mp3(5_000)));
    let body = json!({"code": 200, "data": {"task_id": "wrongtype", "audioWavUrl": fake.files.url("/wt/x.wav")}});
    assert_eq!(callback(&d, Kind::Wav, &body).await.0, 200);
    let t = d.wait_for("wrongtype", |t| t.state == State::Failed).await;
    assert_eq!(
        t.images[0].attempts, 1,
        "a wrong type is not retried: {t:#?}"
    );
    assert!(t.error.as_deref().unwrap().contains("not a WAV"), "{t:#?}");
    assert!(!d.dir.path().join("files/wrongtype/audio.wav").exists());
    // A video whose host answers 200 with an empty body: retried, never stored.
    track(&d, "empty", Kind::Video).await;
    fake.files.set("/em/x.mp4", Behaviour::Image(Bytes::new()));
    let body = json!({"code": 200, "data": {"task_id": "empty", "video_url": fake.files.url("/em/x.mp4")}});
    assert_eq!(callback(&d, Kind::Video, &body).await.0, 200);
    let t = d.wait_for("empty", |t| t.state == State::Failed).await;
    assert_eq!(
        t.images[0].attempts, 3,
        "an empty body is transient: {t:#?}"
    );
    assert!(t.error.as_deref().unwrap().contains("empty body"), "{t:#?}");
    assert!(!d.dir.path().join("files/empty").join("video.mp4").exists());
    d.stop().await;
}

/// A callback on another kind's route is refused (409) and changes nothing; an unknown
/// task created through a route gets that route's kind.
#[tokio::test]
async fn a_callback_on_another_kinds_route_is_refused() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |c| c.accept_unknown_tasks = true).await;
    track(&d, "is-wav", Kind::Wav).await;
    let before = d.task("is-wav").unwrap();
    let body = json!({"code": 200, "data": {"task_id": "is-wav", "video_url": "https://x/v.mp4"}});
    let (status, text) = callback(&d, Kind::Video, &body).await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("is a wav task"), "{text}");
    assert_eq!(d.task("is-wav").unwrap(), before);
    // A task id that is not a safe name is refused on every route (it would name a
    // directory).
    for bad in ["../x", "a/b", ""] {
        let body = json!({"code": 200, "data": {"task_id": bad, "audioWavUrl": "https://x/a.wav"}});
        assert_eq!(callback(&d, Kind::Wav, &body).await.0, 400, "{bad:?}");
    }
    // A cover callback for it on /callbacks/cover: the same.
    let (status, _) = d
        .callback(&crate::harness::success_body(
            "is-wav",
            &["https://x/a.png".into()],
        ))
        .await;
    assert_eq!(status, 409);
    // Unknown, accepted: created with the route's kind.
    let (files, names) = case(&fake, Kind::Stems, "unknown");
    let body = success_callback(&fake, Kind::Stems, "new-stems", &files);
    assert_eq!(callback(&d, Kind::Stems, &body).await.0, 200);
    let t = d.wait_for("new-stems", |t| t.state.is_finished()).await;
    assert_eq!(t.kind, Kind::Stems);
    assert_stored(&d, &t, &files, &names);
    // Tracking it again as another kind is refused too.
    let err = admin_err(
        &d.config,
        Request::Track {
            task_id: "new-stems".into(),
            music_task_id: None,
            kind: Some("video".into()),
            audio_id: None,
        },
    )
    .await;
    assert!(err.message.contains("is a stems task"), "{}", err.message);
    d.stop().await;
}

#[tokio::test]
async fn notifications_name_the_kind() {
    let fake = FakeKie::start().await;
    let receiver =
        crate::notify::Receiver::start_seeded(crate::notify::Answer::Status(200), 0).await;
    let url = receiver.url();
    let d = Daemon::start(&fake, |c| {
        c.notify.url = Some(url);
        c.notify.secret = Some(coverd::config::Secret::new(crate::notify::SECRET));
    })
    .await;
    let mut want = Vec::new();
    for kind in OTHER_KINDS {
        // Each kind once downloaded, once failed.
        let ok = format!("n-ok-{}", kind.as_str());
        track(&d, &ok, kind).await;
        let (files, _) = case(&fake, kind, "notify");
        let body = success_callback(&fake, kind, &ok, &files);
        assert_eq!(callback(&d, kind, &body).await.0, 200);
        want.push((format!("{}.downloaded", kind.as_str()), true));
        let failed = format!("n-failed-{}", kind.as_str());
        track(&d, &failed, kind).await;
        let body = failure_callback(kind, &failed);
        assert_eq!(callback(&d, kind, &body).await.0, 200);
        want.push((format!("{}.failed", kind.as_str()), true));
    }
    want.sort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let types = loop {
        let got = receiver.got();
        let mut types: Vec<(String, bool)> = got
            .iter()
            .map(|g| {
                let v: Value = serde_json::from_slice(&g.body).unwrap();
                (v["type"].as_str().unwrap().to_string(), g.verified)
            })
            .collect();
        types.sort();
        if types.len() >= want.len() || tokio::time::Instant::now() > deadline {
            break types;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(types, want);
    d.stop().await;
}

/// `admin forget` removes a task with its files; an unfinished one only with force.
#[tokio::test]
async fn forget_removes_a_task_and_its_files() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |_| {}).await;
    track(&d, "fg", Kind::Wav).await;
    let forget = |force| Request::Forget {
        task_id: "fg".into(),
        force,
    };
    let err = admin_err(&d.config, forget(false)).await;
    assert!(err.message.contains("not finished"), "{}", err.message);
    let (files, names) = case(&fake, Kind::Wav, "fg");
    let body = success_callback(&fake, Kind::Wav, "fg", &files);
    assert_eq!(callback(&d, Kind::Wav, &body).await.0, 200);
    let t = d.wait_for("fg", |t| t.state.is_finished()).await;
    assert_stored(&d, &t, &files, &names);
    json_of(&d.config, forget(false)).await;
    assert!(d.task("fg").is_none());
    assert!(!d.dir.path().join("files/fg").exists());
    // Forced: an unfinished one.
    track(&d, "fg2", Kind::Music).await;
    json_of(
        &d.config,
        Request::Forget {
            task_id: "fg2".into(),
            force: true,
        },
    )
    .await;
    assert!(d.task("fg2").is_none());
    let status = json_of(&d.config, Request::Status).await;
    assert_eq!(status["tasks"]["submitted"], 0, "{status:#}");
    d.stop().await;
}

fn kind_request(kind: Kind, music: &str, audio: &str, body: Value) -> Request {
    let endpoint = kind.describe().create[0].to_string();
    Request::SubmitKind {
        request: coverd::submit::KindRequest {
            kind: kind.as_str().into(),
            endpoint,
            body,
            music_task_id: (kind != Kind::Music).then(|| music.to_string()),
            audio_id: (kind != Kind::Music).then(|| audio.to_string()),
        },
    }
}

/// `submit wav|video|stems|music`: the intent first, the callback route of the kind, a
/// repeat answered from the store, 409 with a task id adopted, and an unknown outcome never
/// sent again until the operator drops it.
#[tokio::test]
async fn submitting_each_kind_is_never_a_blind_resend() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, with_api).await;
    let wav = || {
        kind_request(
            Kind::Wav,
            "m1",
            "a1",
            json!({"taskId": "m1", "audioId": "a1"}),
        )
    };
    let v = json_of(&d.config, wav()).await;
    let id = v["task_id"].as_str().unwrap().to_string();
    assert_eq!(v["kind"], "wav");
    assert_eq!(v["intent"], "wav/m1/a1");
    let (path, sent) = fake.kinds.creates()[0].clone();
    assert_eq!(path, "/api/v1/wav/generate");
    assert_eq!(sent["callBackUrl"], "https://coverd.example/callbacks/wav");
    assert_eq!(
        (sent["taskId"].clone(), sent["audioId"].clone()),
        (json!("m1"), json!("a1"))
    );
    let t = d.task(&id).unwrap();
    assert_eq!((t.kind, t.state), (Kind::Wav, State::Submitted));
    assert_eq!(t.music_task_id.as_deref(), Some("m1"));
    assert_eq!(t.audio_id.as_deref(), Some("a1"));
    // A repeat: the known task, KIE not asked.
    let again = json_of(&d.config, wav()).await;
    assert_eq!(again["task_id"], id.as_str());
    assert_eq!(fake.kinds.creates().len(), 1);
    // A video of the same track is another intent.
    let video = kind_request(
        Kind::Video,
        "m1",
        "a1",
        json!({"taskId": "m1", "audioId": "a1"}),
    );
    let v = json_of(&d.config, video).await;
    assert_ne!(v["task_id"], id.as_str());
    assert_eq!(fake.kinds.creates().len(), 2);

    // Forgotten here, asked again: KIE's 409 carries the task id, which is adopted.
    json_of(
        &d.config,
        Request::Forget {
            task_id: id.clone(),
            force: true,
        },
    )
    .await;
    let store = d.store.clone();
    assert!(store.drop_kind_intent("wav/m1/a1").unwrap());
    let adopted = json_of(&d.config, wav()).await;
    assert_eq!(adopted["task_id"], id.as_str());
    assert_eq!(d.task(&id).unwrap().kind, Kind::Wav);

    // An unknown outcome (a 500): exit 1, listed, never sent again until dropped.
    fake.kinds.fail_creates(&[500]);
    let stems = || {
        kind_request(
            Kind::Stems,
            "m2",
            "a2",
            json!({"taskId": "m2", "audioId": "a2", "type": "split_stem"}),
        )
    };
    let err = admin_err(&d.config, stems()).await;
    assert_eq!(
        err.kind,
        coverd::admin::AdminErrorKind::Failed,
        "{}",
        err.message
    );
    assert!(err.message.contains("unknown"), "{}", err.message);
    assert!(
        err.message.contains("admin intents --drop stems/m2/a2"),
        "{}",
        err.message
    );
    let creates = fake.kinds.creates().len();
    let err = admin_err(&d.config, stems()).await;
    assert!(err.message.contains("unknown"), "{}", err.message);
    assert_eq!(
        fake.kinds.creates().len(),
        creates,
        "an unknown outcome was sent again"
    );
    let listed = json_of(&d.config, Request::Intents { drop: None }).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(listed[0]["key"], "stems/m2/a2");
    assert_eq!(listed[0]["state"], "unknown");
    json_of(
        &d.config,
        Request::Intents {
            drop: Some("stems/m2/a2".into()),
        },
    )
    .await;
    let v = json_of(&d.config, stems()).await;
    assert_eq!(v["kind"], "stems");
    assert_eq!(fake.kinds.creates().len(), creates + 1);

    // A refusal (no credits) creates nothing and keeps no intent.
    fake.kinds.fail_creates(&[402]);
    let music = kind_request(
        Kind::Music,
        "",
        "",
        json!({"prompt": "a song", "customMode": false, "instrumental": false, "model": "V5"}),
    );
    let err = admin_err(&d.config, music.clone()).await;
    assert!(
        err.message.contains("nothing was created"),
        "{}",
        err.message
    );
    assert!(
        json_of(&d.config, Request::Intents { drop: None })
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    let v = json_of(&d.config, music).await;
    assert_eq!(v["kind"], "music");
    assert!(v["music_task_id"].is_null());
    assert!(v["intent"].as_str().unwrap().starts_with("music/"));
    let (path, sent) = fake.kinds.creates().last().unwrap().clone();
    assert_eq!(path, "/api/v1/generate");
    assert_eq!(
        sent["callBackUrl"],
        "https://coverd.example/callbacks/music"
    );
    assert_eq!(sent["prompt"], "a song");
    d.stop().await;
}

/// SIGKILL of the real binary while a file of every kind is mid-download (each trickles in),
/// then a restart: every file completes, at its final path with its sha256, and nothing
/// partial is left in `tmp/` or at a final path.
#[tokio::test]
async fn sigkill_mid_download_of_every_kind_resumes() {
    use crate::bin_util::{Scratch, files_under, tmp_entries, wait_status};
    let (fake, scratch) = Scratch::with_fake().await;
    scratch.write_config(&fake.base_url(), "", "");
    let d = scratch.serve().await;
    let mut expected: Vec<(String, Vec<(String, Bytes)>)> = Vec::new();
    for kind in OTHER_KINDS {
        let id = format!("kill-{}", kind.as_str());
        let (files, names) = case(&fake, kind, "kill");
        // Every file trickles in (~1 s), so the kill lands mid-download.
        for (path, bytes) in &files.items {
            fake.files.set(
                path,
                Behaviour::Trickle {
                    bytes: bytes.clone(),
                    chunk: bytes.len() / 20 + 1,
                    every: Duration::from_millis(50),
                },
            );
        }
        let body = success_callback(&fake, kind, &id, &files);
        let (status, text) = d
            .callback_on(kind.as_str(), body.to_string())
            .await
            .unwrap();
        assert_eq!(status, 200, "{text}");
        let want = names
            .iter()
            .zip(&files.items)
            .map(|(n, (_, b))| (format!("files/{id}/{n}"), b.clone()))
            .collect();
        expected.push((id, want));
    }
    // Mid-flight: some bytes served, no task finished.
    let first = &case(&fake, Kind::Wav, "kill").0.items[0].0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.files.hits(first) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no download started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.kill();
    let data = scratch.data_dir();
    let parts_at_kill = tmp_entries(&data);
    // Whatever is at a final path is whole (it matches its bytes).
    for (_, want) in &expected {
        for (rel, bytes) in want {
            if let Ok(on_disk) = std::fs::read(data.join(rel)) {
                assert_eq!(on_disk, bytes.as_ref(), "{rel} is partial after the kill");
            }
        }
    }
    // Restart: the trickling files now come at once.
    for kind in OTHER_KINDS {
        let (files, _) = case(&fake, kind, "kill");
        for (path, bytes) in &files.items {
            fake.files.set(path, Behaviour::Image(bytes.clone()));
        }
    }
    let d = scratch.serve().await;
    // The partial downloads of the killed run are gone (the new run's own may be there).
    for part in &parts_at_kill {
        assert!(
            !part.exists(),
            "{} left in tmp/ after the restart",
            part.display()
        );
    }
    wait_status(&scratch, "every task downloaded", |v| {
        v["tasks"]["downloaded"] == expected.len()
    })
    .await;
    for (id, want) in &expected {
        let show = scratch.admin_json(&["show", id]).await;
        for (i, (rel, bytes)) in want.iter().enumerate() {
            assert_eq!(show["files"][i]["path"], rel.as_str(), "{show:#}");
            assert_eq!(show["files"][i]["sha256"], sha256_hex(bytes).as_str());
            assert_eq!(
                std::fs::read(data.join(rel)).unwrap(),
                bytes.as_ref(),
                "{rel}"
            );
        }
    }
    let stored = files_under(&data, &data.join("files"));
    assert_eq!(
        stored.len(),
        expected.iter().map(|(_, w)| w.len()).sum::<usize>(),
        "{stored:?}"
    );
    d.stop().await;
    let out = scratch.run(&["admin", "verify", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

/// A store written by the release before task kinds (records of format v2) opens, keeps
/// every cover task, and `admin show --json` prints it byte for byte as that release did,
/// apart from the new `kind` and `files` fields; the next change writes it as v3.
#[tokio::test]
async fn a_store_of_the_release_before_kinds_keeps_its_covers() {
    use coverd::machine::{Ctx, Event, Origin, Report};
    use coverd::store::{IfMissing, Store, codec};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let ctx = |now| Ctx {
        now,
        max_attempts: 3,
        poll_after_ms: 120_000,
        notify: false,
    };
    let png = crate::fake_kie::files::png(3000);
    let sha = sha256_hex(&png);
    let t0 = 1_795_775_581_000;
    {
        let store = Store::open(&data).unwrap();
        let id = "oldcover1";
        let origin = Origin::cover(Some("music-old".into()));
        store
            .apply(id, &Event::Track(origin), &ctx(t0), IfMissing::Create)
            .unwrap();
        let report = Report::images(vec!["https://tempfile.aiquickdraw.com/s/a.png".into()]);
        store
            .apply(
                id,
                &Event::Callback(Kind::Cover, report),
                &ctx(t0 + 1000),
                IfMissing::Reject,
            )
            .unwrap();
        let stored = Event::ImageStored {
            index: 0,
            path: format!("images/{id}/0.png"),
            bytes: png.len() as u64,
            sha256: sha.clone(),
        };
        store
            .apply(id, &stored, &ctx(t0 + 2000), IfMissing::Reject)
            .unwrap();
        std::fs::create_dir_all(data.join("images").join(id)).unwrap();
        std::fs::write(data.join(format!("images/{id}/0.png")), &png).unwrap();
        // The same record as the release before kinds wrote it.
        let task = store.get(id).unwrap().unwrap();
        let history = store.events(id).unwrap();
        store
            .put_raw_task(id, &codec::encode_task_v2(&task, &history).unwrap())
            .unwrap();
        store.close().await.unwrap();
    }
    let fake = FakeKie::start().await;
    let config = crate::harness::test_config(&data, &fake);
    let reply = coverd::admin::run(
        config.clone(),
        Request::Show {
            task_id: "oldcover1".into(),
        },
    )
    .await
    .unwrap();
    let text = coverd::admin::render(&reply, true);
    // That release's output: the same lines without `kind` and `files`.
    let without_new: String = {
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["kind"], "cover");
        assert_eq!(v["files"][0]["name"], "0.png");
        assert_eq!(v["files"][0]["media_type"], "image/png");
        let mut lines = Vec::new();
        let mut skipping = 0usize;
        for line in text.lines() {
            if skipping > 0 {
                skipping += line.matches(['[', '{']).count();
                skipping -= line.matches([']', '}']).count();
                continue;
            }
            if line.starts_with("  \"kind\":") {
                continue;
            }
            if line.starts_with("  \"files\":") {
                skipping = line.matches(['[', '{']).count() - line.matches([']', '}']).count();
                continue;
            }
            lines.push(line);
        }
        lines.join("\n")
    };
    let expected = format!(
        r#"{{
  "task_id": "oldcover1",
  "music_task_id": "music-old",
  "state": "downloaded",
  "source": "callback",
  "created_at": "2026-11-27T10:33:01Z",
  "updated_at": "2026-11-27T10:33:03Z",
  "callbacks": 1,
  "polls": 0,
  "error": null,
  "images": [
    {{
      "index": 0,
      "url": "https://tempfile.aiquickdraw.com/s/a.png",
      "state": "downloaded",
      "attempts": 1,
      "path": "images/oldcover1/0.png",
      "bytes": 3000,
      "sha256": "{sha}",
      "error": null
    }}
  ],
  "notify": null,
  "events": ["#
    );
    assert!(
        without_new.starts_with(&expected),
        "{without_new}\n--- expected to start with ---\n{expected}"
    );
    // It verifies, and a change writes it in the current format (still a cover).
    let verify = json_of(&config, Request::Verify).await;
    assert_eq!(verify["ok"], 1, "{verify:#}");
    // Through the running daemon: the same answer.
    let offline: Value = serde_json::from_str(&text).unwrap();
    let d = Daemon::start_in(dir, config).await;
    let show = Request::Show {
        task_id: "oldcover1".into(),
    };
    assert_eq!(json_of(&d.config, show).await, offline);
    d.stop().await;
}

/// `verify`, `retry`, `backup`, `restore` and `prune` over files of every kind.
#[tokio::test]
async fn verify_retry_backup_restore_and_prune_cover_every_kind() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, |_| {}).await;
    let mut stored = 0;
    for kind in OTHER_KINDS {
        let id = format!("ops-{}", kind.as_str());
        track(&d, &id, kind).await;
        let (files, names) = case(&fake, kind, "ops");
        let body = success_callback(&fake, kind, &id, &files);
        assert_eq!(callback(&d, kind, &body).await.0, 200);
        let t = d.wait_for(&id, |t| t.state.is_finished()).await;
        assert_stored(&d, &t, &files, &names);
        stored += names.len();
    }
    let verify = json_of(&d.config, Request::Verify).await;
    assert_eq!(
        (verify["checked"].as_u64(), verify["ok"].as_u64()),
        (Some(stored as u64), Some(stored as u64))
    );
    // Damage the WAV and delete a stem: verify names both, retry repairs them.
    let root = d.dir.path().to_path_buf();
    std::fs::write(root.join("files/ops-wav/audio.wav"), b"RIFF damaged").unwrap();
    std::fs::remove_file(root.join("files/ops-stems/drums.mp3")).unwrap();
    let verify = json_of(&d.config, Request::Verify).await;
    assert_eq!(
        verify["corrupt"],
        json!(["files/ops-wav/audio.wav"]),
        "{verify:#}"
    );
    assert_eq!(
        verify["missing"],
        json!(["files/ops-stems/drums.mp3"]),
        "{verify:#}"
    );
    for id in ["ops-wav", "ops-stems"] {
        json_of(&d.config, Request::Retry { task_id: id.into() }).await;
        d.wait_for(id, |t| t.state == State::Downloaded).await;
    }
    let verify = json_of(&d.config, Request::Verify).await;
    assert_eq!(verify["ok"].as_u64(), Some(stored as u64), "{verify:#}");
    // Backup (running), restore into a new directory: every file there, verified.
    let scratch = tempfile::tempdir().unwrap();
    let dest = scratch.path().join("bk");
    let m = json_of(
        &d.config,
        Request::Backup {
            dest: dest.clone(),
            seen: None,
        },
    )
    .await;
    assert_eq!(m["tasks"], OTHER_KINDS.len(), "{m:#}");
    assert_eq!(m["images"], stored, "{m:#}");
    let (_dir, cfg) = d.stop().await;
    let mut rcfg = cfg.clone();
    rcfg.data_dir = scratch.path().join("restored");
    json_of(&rcfg, Request::Restore { src: dest.clone() }).await;
    let verify = json_of(&rcfg, Request::Verify).await;
    assert_eq!(verify["ok"].as_u64(), Some(stored as u64), "{verify:#}");
    assert!(rcfg.data_dir.join("files/ops-video/video.mp4").is_file());
    // The song the WAV, video and stems were made from has no cover: restore's derived
    // index maps a song to its cover only.
    {
        let store = coverd::store::Store::open(&rcfg.data_dir).unwrap();
        assert_eq!(store.task_for_music("music-1").unwrap(), None);
        store.close().await.unwrap();
    }
    // Prune forgets them all, with their directories under files/.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let pruned = json_of(
        &rcfg,
        Request::Prune {
            older_than_secs: 0,
            dry_run: false,
        },
    )
    .await;
    assert_eq!(pruned["tasks"], OTHER_KINDS.len(), "{pruned:#}");
    let left: Vec<_> = std::fs::read_dir(rcfg.data_dir.join("files"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Music stages out of order, skipped, or a `first` without a `complete`: stages never change
/// the state; a `complete` (or the details endpoint, when it never comes) decides; a stage
/// after the result is only counted.
#[tokio::test]
async fn music_stages_in_any_order_change_nothing() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, with_api).await;
    let stage = |id: &str, s: &str| json!({"code": 200, "msg": "ok", "data": {"callbackType": s, "task_id": id, "data": []}});
    // `first` before `text`, then no `complete`: the details endpoint finds the result.
    let id = "stages-a";
    fake.kinds.add(Kind::Music, id);
    track(&d, id, Kind::Music).await;
    for s in ["first", "text", "first"] {
        assert_eq!(callback(&d, Kind::Music, &stage(id, s)).await.0, 200);
    }
    let t = d.task(id).unwrap();
    assert_eq!((t.state, t.callbacks), (State::Submitted, 3), "{t:#?}");
    let (files, names) = case(&fake, Kind::Music, "stages-a");
    fake.kinds.set_details(
        id,
        json!({"taskId": id, "status": "FIRST_SUCCESS", "response": {"sunoData": [
            {"id": "trk-a", "audioUrl": "", "imageUrl": files.url(&fake, 1)}]}}),
    );
    d.advance(Duration::from_secs(3600));
    let t = d.wait_for(id, |t| t.polls >= 1).await;
    assert_eq!(
        t.state,
        State::Submitted,
        "FIRST_SUCCESS is not the result: {t:#?}"
    );
    fake.kinds.set_details(
        id,
        success_details(&fake, Kind::Music, id, &files, "SUCCESS"),
    );
    d.advance(Duration::from_secs(3600));
    let t = d.wait_for(id, |t| t.state.is_finished()).await;
    assert_stored(&d, &t, &files, &names);
    // A stage after the result is counted and changes nothing.
    assert_eq!(callback(&d, Kind::Music, &stage(id, "text")).await.0, 200);
    let after = d.task(id).unwrap();
    assert_eq!((after.state, after.callbacks), (State::Downloaded, 4));
    // `complete` straight away, stages skipped.
    let id = "stages-b";
    track(&d, id, Kind::Music).await;
    let (files, names) = case(&fake, Kind::Music, "stages-b");
    fake.kinds.add(Kind::Music, id);
    fake.kinds.set_details(
        id,
        success_details(&fake, Kind::Music, id, &files, "SUCCESS"),
    );
    let body = success_callback(&fake, Kind::Music, id, &files);
    assert_eq!(callback(&d, Kind::Music, &body).await.0, 200);
    let t = d.wait_for(id, |t| t.state.is_finished()).await;
    assert_stored(&d, &t, &files, &names);
    d.stop().await;
}

/// Two submits of the same request at once send it once: the intent is claimed atomically,
/// so the second finds the first's (done: the same task; still sending: an unknown outcome).
#[tokio::test]
async fn concurrent_submits_of_one_request_send_it_once() {
    let fake = FakeKie::start().await;
    let d = Daemon::start(&fake, with_api).await;
    for round in 0..5 {
        let music = format!("mc{round}");
        let req = || {
            kind_request(
                Kind::Wav,
                &music,
                "a1",
                json!({"taskId": music, "audioId": "a1"}),
            )
        };
        let (a, b) = tokio::join!(
            coverd::admin::run(d.config.clone(), req()),
            coverd::admin::run(d.config.clone(), req())
        );
        let ok = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert!(ok >= 1, "{a:?} {b:?}");
        for r in [&a, &b] {
            if let Err(e) = r {
                assert!(e.message.contains("unknown"), "{}", e.message);
            }
        }
        let creates = fake
            .kinds
            .creates()
            .iter()
            .filter(|(_, body)| body["taskId"] == music.as_str())
            .count();
        assert_eq!(creates, 1, "round {round}: {a:?} {b:?}");
    }
    d.stop().await;
}
