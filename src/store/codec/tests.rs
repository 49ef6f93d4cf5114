//! The codec's tests: every stored type round-trips, the fixtures (`../fixtures/`, bytes
//! of released versions) decode forever, the frozen types write the bytes the domain types
//! wrote before issue 17, a newer envelope is told from damage.

use super::*;
use crate::model::*;

/// A task that exercises every field and every variant that can be stored.
pub fn sample_task() -> Task {
    let mut t = Task::new(
        "21aee3c3c2a01fa5e030b3799fa4dd56".into(),
        Some("73d6128b3523a0079df10da9471017c8".into()),
        1_795_775_581_000,
    );
    t.state = State::Failed;
    t.source = Some(Source::Poll);
    t.callbacks = 2;
    t.polls = 3;
    t.error = Some("image 1: HTTP 404".into());
    t.failure = Some(Failure::Download);
    t.event_count = 7;
    let mut a = Image::pending(0, "https://tempfile.aiquickdraw.com/s/a.png".into(), 5);
    a.state = ImageState::Downloaded;
    a.attempts = 2;
    a.path = Some("images/21aee3c3c2a01fa5e030b3799fa4dd56/0.png".into());
    a.bytes = Some(1234);
    a.sha256 = Some("ab".repeat(32));
    let mut b = Image::pending(1, "https://tempfile.aiquickdraw.com/s/b.png".into(), 6);
    b.state = ImageState::Failed;
    b.refreshed_url = Some("https://tempfile.aiquickdraw.com/s/b2.png".into());
    b.attempts_budget_start = 1;
    b.error = Some("HTTP 404".into());
    t.images = vec![a, b];
    t
}

#[test]
fn every_stored_type_round_trips() {
    let task = sample_task();
    assert_eq!(
        decode_task(&encode_task(&task, &[]).unwrap()).unwrap(),
        task
    );
    let history = sample_history();
    assert_eq!(
        decode_record(&encode_task(&task, &history).unwrap()).unwrap(),
        (task.clone(), Some(history))
    );
    assert_eq!(
        decode_record(&encode_task_v1(&task).unwrap()).unwrap(),
        (task.clone(), None)
    );
    for state in State::ALL {
        let mut t = task.clone();
        t.state = state;
        assert_eq!(decode_task(&encode_task(&t, &[]).unwrap()).unwrap(), t);
    }
    for failure in [None, Some(Failure::Generation), Some(Failure::NoResult)] {
        let mut t = task.clone();
        t.failure = failure;
        t.source = Some(Source::Callback);
        assert_eq!(decode_task(&encode_task(&t, &[]).unwrap()).unwrap(), t);
    }
    for kind in ALL_KINDS {
        let e = EventRecord {
            at: 42,
            kind,
            detail: "d".into(),
        };
        assert_eq!(decode_event(&encode_event(&e).unwrap()).unwrap(), e);
    }
}

/// A notification with every field set.
pub fn sample_notification() -> Notification {
    let mut n = Notification::new(&sample_task(), 3, NotifyType::Failed, 1_795_775_590_000);
    n.state = NotifyState::Undeliverable;
    n.attempts = 14;
    n.attempts_budget_start = 2;
    n.next_attempt_at = 1_795_775_600_000;
    n.updated_at = 1_795_775_601_000;
    n.error = Some("410 Gone".into());
    n
}

#[test]
fn notifications_round_trip() {
    let n = sample_notification();
    assert_eq!(
        decode_notification(&encode_notification(&n).unwrap()).unwrap(),
        n
    );
    for state in NotifyState::ALL {
        for kind in [NotifyType::Downloaded, NotifyType::Failed] {
            let mut m = n.clone();
            m.state = state;
            m.kind = kind;
            m.error = None;
            assert_eq!(
                decode_notification(&encode_notification(&m).unwrap()).unwrap(),
                m
            );
        }
    }
    assert!(decode_notification(&[]).is_err());
    assert!(
        decode_notification(&encode_task(&sample_task(), &sample_history()).unwrap()[..10])
            .is_err()
    );
}

/// Bytes of the first notification format. If this fails, the stored format changed:
/// add a new envelope variant instead.
#[test]
fn notification_v1_fixture_decodes_forever() {
    let n = decode_notification(include_bytes!("../fixtures/notification_v1.bin"))
        .expect("v1 notification");
    // The body is the task's JSON at the time, fixed when the notification was made (it
    // has grown fields since): compared apart.
    assert_eq!(
        Notification {
            body: n.body.clone(),
            ..sample_notification()
        },
        n
    );
    assert!(n.body.starts_with(r#"{"data":{"#), "{}", n.body);
    assert!(n.body.contains(r#""type":"cover.failed""#), "{}", n.body);
    assert_eq!(
        n.webhook_id,
        "msg_21aee3c3c2a01fa5e030b3799fa4dd56_3_1795775590000"
    );
}

#[test]
fn garbage_and_trailing_bytes_are_errors_not_panics() {
    assert!(decode_task(&[]).is_err());
    assert!(decode_task(&[9, 0, 0, 0]).is_err());
    let mut bytes = encode_task(&sample_task(), &sample_history()).unwrap();
    bytes.push(0);
    assert!(
        decode_task(&bytes).is_err(),
        "trailing bytes must be refused"
    );
    assert!(decode_event(&[1, 0, 0, 0, 1]).is_err());
}

#[test]
fn a_newer_envelope_is_told_apart_from_damage() {
    // The current record with the envelope index of the next version: what a newer build
    // writes.
    let mut newer = encode_task(&sample_task(), &sample_history()).unwrap();
    newer[..4].copy_from_slice(&ENVELOPE_VERSION.to_le_bytes());
    let err = decode_task(&newer).unwrap_err();
    assert!(
        matches!(err, CodecError::Newer { found, .. } if found == ENVELOPE_VERSION + 1),
        "{err}"
    );
    assert!(
        err.to_string().contains("written by a newer coverd"),
        "{err}"
    );
    let mut newer_event = encode_event(&EventRecord {
        at: 1,
        kind: EventKind::Callback,
        detail: "d".into(),
    })
    .unwrap();
    newer_event[..4].copy_from_slice(&7u32.to_le_bytes());
    assert!(matches!(
        decode_event(&newer_event),
        Err(CodecError::Newer { found: 8, .. })
    ));
    // Garbage, and a valid envelope cut short, are damage, not a newer coverd.
    for bad in [
        b"\xde\xad\xbe\xef garbage".to_vec(),
        vec![0, 0, 0],
        encode_task(&sample_task(), &sample_history()).unwrap()[..20].to_vec(),
    ] {
        let err = decode_task(&bad).unwrap_err();
        assert!(matches!(err, CodecError::Corrupt { .. }), "{bad:?}: {err}");
        assert!(!err.to_string().contains("newer"), "{err}");
    }
}

/// The history `task_v2.bin` carries.
pub fn sample_history() -> Vec<EventRecord> {
    vec![
        EventRecord {
            at: 1_795_775_581_000,
            kind: EventKind::Tracked,
            detail: "adopted".into(),
        },
        EventRecord {
            at: 1_795_775_590_000,
            kind: EventKind::Failed,
            detail: "image 1: HTTP 404".into(),
        },
    ]
}

/// A failure's reason, noted twice and kept as the task's `error`, is stored once; the
/// history decodes to the same text, whatever the details.
#[test]
fn a_detail_equal_to_the_error_is_not_repeated() {
    let task = sample_task();
    let reason = task.error.clone().unwrap();
    let entry = |detail: &str| EventRecord {
        at: 1,
        kind: EventKind::Callback,
        detail: detail.into(),
    };
    let same = vec![entry(&reason), entry("other"), entry(&reason)];
    let other_text = "x".repeat(reason.len());
    let different = vec![entry(&other_text), entry("other"), entry(&other_text)];
    let short = encode_task(&task, &same).unwrap();
    let long = encode_task(&task, &different).unwrap();
    assert_eq!(long.len() - short.len(), 2 * (8 + reason.len()));
    assert_eq!(
        decode_record(&short).unwrap(),
        (task.clone(), Some(same.clone()))
    );
    let mut no_error = task.clone();
    no_error.error = None;
    assert_eq!(
        decode_record(&encode_task(&no_error, &same).unwrap()).unwrap(),
        (no_error, Some(same))
    );
}

/// Bytes of the schema-2 task record. If this fails, the stored format changed: add a
/// new envelope variant instead.
#[test]
fn task_v2_fixture_decodes_forever() {
    let (task, history) =
        decode_record(include_bytes!("../fixtures/task_v2.bin")).expect("v2 task");
    assert_eq!(task, sample_task());
    assert_eq!(history, Some(sample_history()));
}

/// A task of another kind than cover, with every field version 3 added set.
pub fn sample_stems_task() -> Task {
    let mut t = sample_task();
    t.kind = Kind::Stems;
    t.audio_id = Some("e231c1d2-track".into());
    for (img, name) in t.images.iter_mut().zip(["vocal", "drums"]) {
        img.name = name.into();
        img.expect = FileType::Mp3;
        img.path = img
            .path
            .as_ref()
            .map(|_| format!("files/{}/{name}.mp3", t.task_id));
    }
    t.images[0].audio_id = Some("e231c1d2-track".into());
    t.images[0].title = Some("Night Drive".into());
    t.images[0].duration_ms = Some(198_440);
    t
}

/// Bytes of the version-3 task record (task kinds). If this fails, the stored format
/// changed: add a new envelope variant instead.
#[test]
fn task_v3_fixture_decodes_forever() {
    let (task, history) =
        decode_record(include_bytes!("../fixtures/task_v3.bin")).expect("v3 task");
    assert_eq!(task, sample_stems_task());
    assert_eq!(history, Some(sample_history()));
}

/// Version 3 keeps what kinds added, for every kind and file type.
#[test]
fn version_3_round_trips_every_kind() {
    for kind in Kind::ALL {
        for expect in [FileType::Image, FileType::Mp3, FileType::Wav, FileType::Mp4] {
            let mut t = sample_stems_task();
            t.kind = kind;
            t.images[1].expect = expect;
            t.images[1].title = Some("t".repeat(500));
            let bytes = encode_task(&t, &sample_history()).unwrap();
            assert_eq!(decode_record(&bytes).unwrap(), (t, Some(sample_history())));
        }
    }
}

/// Bytes written by version 0.1.0. If this fails, the stored format changed: add a new
/// envelope variant instead (see the module doc).
#[test]
fn v1_fixtures_decode_forever() {
    let (task, history) =
        decode_record(include_bytes!("../fixtures/task_v1.bin")).expect("v1 task");
    assert_eq!(task, sample_task());
    assert_eq!(history, None);
    let event = decode_event(include_bytes!("../fixtures/event_v1.bin")).expect("v1 event");
    assert_eq!(event.kind, EventKind::ImageStored);
    assert_eq!(event.detail, "image 0 stored");
}

/// Writes the fixtures that do not exist yet: run with
/// `cargo test --lib -- --ignored write_fixtures` by the release that introduces a
/// version (after adding it here). The checked-in files are the bytes of the release that
/// introduced each format: an existing one is never rewritten.
#[test]
#[ignore]
fn write_fixtures() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let e = EventRecord {
        at: 1_795_775_581_000,
        kind: EventKind::ImageStored,
        detail: "image 0 stored".into(),
    };
    let fixtures = [
        ("task_v1.bin", encode_task_v1(&sample_task()).unwrap()),
        (
            "task_v2.bin",
            encode_task_v2(&sample_task(), &sample_history()).unwrap(),
        ),
        (
            "task_v3.bin",
            encode_task(&sample_stems_task(), &sample_history()).unwrap(),
        ),
        ("event_v1.bin", encode_event(&e).unwrap()),
        (
            "notification_v1.bin",
            encode_notification(&sample_notification()).unwrap(),
        ),
        ("parked_v1.bin", encode_parked(&sample_parked()).unwrap()),
    ];
    for (name, bytes) in fixtures {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(name))
        {
            Ok(mut file) => std::io::Write::write_all(&mut file, &bytes).unwrap(),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => panic!("{name}: {e}"),
        }
    }
}

/// A kept delivery with every field set (its key and task id are not in the value).
fn sample_parked() -> Parked {
    Parked {
        key: Vec::new(),
        task_id: String::new(),
        route: "cover".into(),
        received_at: 1_795_775_581_000,
        body: br#"{"code":200,"data":{"task_id":"21aee3c3c2a01fa5e030b3799fa4dd56"}}"#.to_vec(),
    }
}

/// Bytes of the first kept-delivery format. If this fails, the stored format changed:
/// add a new envelope variant instead.
#[test]
fn parked_v1_fixture_decodes_forever() {
    let p = decode_parked(
        b"t\0k".to_vec(),
        "t".into(),
        include_bytes!("../fixtures/parked_v1.bin"),
    )
    .expect("v1 kept delivery");
    let want = Parked {
        key: b"t\0k".to_vec(),
        task_id: "t".into(),
        ..sample_parked()
    };
    assert_eq!(p, want);
    assert!(matches!(
        decode_parked(Vec::new(), String::new(), &[1, 0, 0, 0]),
        Err(CodecError::Newer { found: 2, .. })
    ));
}

/// The encoders of before issue 17, which wrote the domain types themselves (they derive
/// `Serialize` in unit tests for this alone); the frozen types must write the same bytes.
/// When a domain type changes shape (a new version), these no longer describe a stored
/// format and this module goes: the fixtures stay.
mod before_frozen {
    use crate::model::{EventKind, EventRecord, Millis, Notification, Task};
    use serde::Serialize;

    #[derive(Serialize)]
    pub enum StoredTask<'a> {
        V1(&'a Task),
        V2 {
            task: &'a Task,
            history: Vec<Entry<'a>>,
        },
    }
    #[derive(Serialize)]
    pub struct Entry<'a> {
        at: Millis,
        kind: EventKind,
        detail: Detail<'a>,
    }
    #[derive(Serialize)]
    enum Detail<'a> {
        Text(&'a str),
        TaskError,
    }
    #[derive(Serialize)]
    enum StoredEvent<'a> {
        V1(&'a EventRecord),
    }
    #[derive(Serialize)]
    enum StoredNotification<'a> {
        V1(&'a Notification),
    }
    #[derive(Serialize)]
    enum StoredParked {
        V1(ParkedV1),
    }
    #[derive(Serialize)]
    struct ParkedV1 {
        route: String,
        received_at: Millis,
        body: Vec<u8>,
    }

    pub fn task(task: &Task, history: &[EventRecord]) -> Vec<u8> {
        let history = history
            .iter()
            .map(|e| Entry {
                at: e.at,
                kind: e.kind,
                detail: if task.error.as_deref() == Some(e.detail.as_str()) {
                    Detail::TaskError
                } else {
                    Detail::Text(&e.detail)
                },
            })
            .collect();
        super::super::encode(&StoredTask::V2 { task, history }).unwrap()
    }
    pub fn task_v1(task: &Task) -> Vec<u8> {
        super::super::encode(&StoredTask::V1(task)).unwrap()
    }
    pub fn event(e: &EventRecord) -> Vec<u8> {
        super::super::encode(&StoredEvent::V1(e)).unwrap()
    }
    pub fn notification(n: &Notification) -> Vec<u8> {
        super::super::encode(&StoredNotification::V1(n)).unwrap()
    }
    pub fn parked(route: &str, received_at: Millis, body: &[u8]) -> Vec<u8> {
        super::super::encode(&StoredParked::V1(ParkedV1 {
            route: route.into(),
            received_at,
            body: body.into(),
        }))
        .unwrap()
    }
}

const ALL_KINDS: [EventKind; 15] = [
    EventKind::Submitted,
    EventKind::Tracked,
    EventKind::Callback,
    EventKind::DuplicateCallback,
    EventKind::Polled,
    EventKind::Received,
    EventKind::ImageStored,
    EventKind::ImageRetry,
    EventKind::ImageFailed,
    EventKind::Downloaded,
    EventKind::Failed,
    EventKind::Retried,
    EventKind::Ignored,
    EventKind::UrlRefreshed,
    EventKind::Mismatch,
];

/// Tasks over every state, source, failure and image state, with empty, unicode and
/// long strings, `None` and `Some` everywhere, and extreme numbers.
fn varied_tasks() -> Vec<Task> {
    let mut tasks = vec![
        Task::new("a".into(), None, 0),
        Task::new(String::new(), Some(String::new()), -1),
        Task::new("x".repeat(128), Some("é✓".into()), i64::MAX),
    ];
    let base = sample_task();
    for (i, state) in State::ALL.into_iter().enumerate() {
        for source in [None, Some(Source::Callback), Some(Source::Poll)] {
            for failure in [
                None,
                Some(Failure::Generation),
                Some(Failure::NoResult),
                Some(Failure::Download),
            ] {
                let mut t = base.clone();
                t.state = state;
                t.source = source;
                t.failure = failure;
                t.callbacks = u32::MAX - i as u32;
                t.confirmed = i % 2 == 0;
                t.confirm_attempts = i as u32;
                t.updated_at = i64::MIN + i as i64;
                t.next_poll_at = 17;
                t.submitted_at = 99;
                if failure.is_none() {
                    t.error = None;
                }
                tasks.push(t);
            }
        }
    }
    let mut many = base.clone();
    many.images = (0..16)
        .map(|i| {
            let mut image =
                Image::pending(i, format!("https://h/{}", "u".repeat(i as usize * 250)), 3);
            image.state = [
                ImageState::Pending,
                ImageState::Downloaded,
                ImageState::Failed,
            ][i as usize % 3];
            image.bytes = (i % 2 == 0).then_some(u64::MAX);
            image.next_attempt_at = -5;
            image
        })
        .collect();
    tasks.push(many);
    tasks
}

fn varied_histories(task: &Task) -> Vec<Vec<EventRecord>> {
    let error = task.error.clone().unwrap_or_default();
    vec![
        Vec::new(),
        sample_history(),
        ALL_KINDS
            .iter()
            .enumerate()
            .map(|(i, &kind)| EventRecord {
                at: i as i64 * 1000 - 3,
                kind,
                detail: match i % 4 {
                    0 => error.clone(),
                    1 => String::new(),
                    2 => "détail ✓".into(),
                    _ => "d".repeat(1024),
                },
            })
            .collect(),
    ]
}

#[test]
fn frozen_types_write_the_bytes_the_domain_types_wrote() {
    let mut compared = 0;
    for task in varied_tasks() {
        assert_eq!(
            encode_task_v1(&task).unwrap(),
            before_frozen::task_v1(&task)
        );
        for history in varied_histories(&task) {
            let bytes = encode_task_v2(&task, &history).unwrap();
            assert_eq!(bytes, before_frozen::task(&task, &history), "{task:?}");
            assert_eq!(
                decode_record(&bytes).unwrap(),
                (task.clone(), Some(history))
            );
            compared += 1;
        }
        for (i, state) in NotifyState::ALL.into_iter().enumerate() {
            for kind in [NotifyType::Downloaded, NotifyType::Failed] {
                let mut n = Notification::new(&task, i as u32, kind, task.created_at);
                n.state = state;
                n.error = (i % 2 == 0).then(|| "é".into());
                let bytes = encode_notification(&n).unwrap();
                assert_eq!(bytes, before_frozen::notification(&n));
                assert_eq!(decode_notification(&bytes).unwrap(), n);
            }
        }
    }
    for (i, kind) in ALL_KINDS.into_iter().enumerate() {
        let e = EventRecord {
            at: i64::MIN + i as i64,
            kind,
            detail: "é".repeat(i),
        };
        assert_eq!(encode_event(&e).unwrap(), before_frozen::event(&e));
    }
    for body in [Vec::new(), b"{}".to_vec(), vec![0xff; 65536]] {
        let p = Parked {
            body: body.clone(),
            ..sample_parked()
        };
        assert_eq!(
            encode_parked(&p).unwrap(),
            before_frozen::parked(&p.route, p.received_at, &body)
        );
    }
    assert!(compared > 150, "{compared}");
}

#[test]
fn intents_are_eight_bytes_big_endian() {
    assert_eq!(encode_intent(0x0102), [0, 0, 0, 0, 0, 0, 1, 2]);
    assert_eq!(
        decode_intent(&encode_intent(1_795_775_581_000)),
        1_795_775_581_000
    );
    assert_eq!(encode_intent(-1), [0; 8]);
    assert_eq!(decode_intent(&[1, 2]), 0);
    assert_eq!(decode_intent(&[0xff; 8]), 0);
}
