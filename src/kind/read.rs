//! The lenient reading of KIE's callbacks and details answers for the kinds other than
//! `cover` (whose readings are `callback::parse` and `kie::wire`): where each kind puts its
//! task id and its files, the music stages, every status name, both spellings where KIE's
//! pages disagree, `successFlag` as text, `response` as a JSON string, KIE's three forms of
//! time. The result is one uniform [`Reading`] whatever the kind, bounded (files per task,
//! URL length, text length) before it reaches a caller.
//!
//! Pure functions over JSON: must not do I/O or decide transitions (`machine` does). File
//! names come from the kind's rules (`track-<i>`, the stem list), never from what KIE sent;
//! `stream_audio_url`, `source_*` and `origin_url` are never read as files.

use serde_json::{Map, Value};

use super::MAX_URL_BYTES;
use super::{FileType, Kind, STEMS_ORDER};

/// Milliseconds since the Unix epoch, UTC (what `model::Millis` is; `kind` is below `model`,
/// so it names the integer).
type Millis = i64;

/// Where a callback's task id is looked for after the kind's own place (SPEC "HTTP
/// surface"): top-level `taskId`, top-level `task_id`, `data.taskId`, `data.task_id`.
pub const TASK_ID_PLACES: [(Option<&str>, &str); 4] = [
    (None, "taskId"),
    (None, "task_id"),
    (Some("data"), "taskId"),
    (Some("data"), "task_id"),
];

/// More files than one task of any kind holds: two tracks of a music task make four, a
/// stem split at most fourteen.
pub const MAX_FILES: usize = 32;
/// Longest text (title, message) kept from KIE.
const MAX_TEXT: usize = 500;

/// A file KIE says a task made.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Its name without extension: `track-0`, `audio`, `video`, `vocal`, …; the extension
    /// comes from its bytes.
    pub stem: String,
    pub url: String,
    /// What its bytes must be.
    pub expect: FileType,
    /// For a music track's files: the track's `id` (what `submit wav|video|stems` takes),
    /// title and duration (seconds) as KIE gave them, and its creation time.
    pub audio_id: Option<String>,
    pub title: Option<String>,
    pub duration: Option<f64>,
    pub created_at: Option<Millis>,
}

impl Found {
    /// A cover's image `index` (named by its index).
    pub fn image(index: u32, url: String) -> Found {
        Found {
            stem: index.to_string(),
            url,
            expect: FileType::Image,
            audio_id: None,
            title: None,
            duration: None,
            created_at: None,
        }
    }
}

/// What a callback or a details answer says about a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// Not finished: a music stage (`text`, `first`) or a details status that is not final.
    /// `unknown` holds a status name coverd does not know (taken as pending, logged once).
    Pending {
        stage: Option<String>,
        unknown: Option<String>,
    },
    /// Finished; these are its files (never empty).
    Success { files: Vec<Found> },
    /// Generation failed; KIE's code or status and message.
    Failure { reason: String },
}

/// A parsed callback of a kind other than `cover`.
#[derive(Debug, Clone, PartialEq)]
pub struct Callback {
    pub task_id: String,
    pub reading: Reading,
}

/// Reads a callback body of `kind` (not `cover`). `Err` says why it cannot be read (a 400).
pub fn callback(kind: Kind, body: &[u8]) -> Result<Callback, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("body is not a JSON object")?;
    let task_id = callback_task_id(kind, &v).ok_or_else(|| {
        "no valid task id (looked for data.task_id, taskId, task_id, data.taskId)".to_string()
    })?;
    let data = obj.get("data").and_then(Value::as_object);
    let code = obj.get("code").and_then(int_of).ok_or("no numeric code")?;
    let msg = text(obj, &["msg", "message"]).unwrap_or_default();
    let failure = |detail: Option<String>| {
        let mut reason = format!("KIE code {code}: {msg}");
        if let Some(d) = detail.filter(|d| *d != msg) {
            reason.push_str(&format!(" ({d})"));
        }
        Reading::Failure { reason }
    };
    let error_detail = data.and_then(|d| text(d, &["error", "errorMessage"]));
    let stage = data.and_then(|d| text(d, &["callbackType", "callback_type"]));
    if code != 200
        || stage
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("error"))
    {
        return Ok(Callback {
            task_id,
            reading: failure(error_detail),
        });
    }
    let files = match kind {
        Kind::Cover => return Err("cover callbacks are read by callback::parse".into()),
        Kind::Music => {
            if let Some(s) = stage.filter(|s| !s.eq_ignore_ascii_case("complete")) {
                // `text` and `first` are recorded and change nothing, whatever they list.
                return Ok(Callback {
                    task_id,
                    reading: Reading::Pending {
                        stage: Some(s.to_ascii_lowercase()),
                        unknown: None,
                    },
                });
            }
            let tracks = data.and_then(|d| d.get("data"));
            tracks_files(tracks, Naming::Callback)?
        }
        Kind::Wav => single(
            data,
            &["audioWavUrl", "audio_wav_url"],
            "audio",
            FileType::Wav,
        )?,
        Kind::Video => single(data, &["video_url", "videoUrl"], "video", FileType::Mp4)?,
        Kind::Stems => {
            let info = data.and_then(|d| {
                ["vocal_separation_info", "vocal_removal_info"]
                    .iter()
                    .find_map(|k| d.get(*k).and_then(Value::as_object))
            });
            stems_files(info, Naming::Callback)?
        }
    };
    let reading = if files.is_empty() {
        Reading::Failure {
            reason: "KIE reported success but sent no file URLs".into(),
        }
    } else {
        Reading::Success { files }
    };
    Ok(Callback { task_id, reading })
}

/// The task id of a callback of `kind`: its own place first, then [`TASK_ID_PLACES`]; not
/// empty. The caller checks it is a valid task id (`model::valid_task_id`) before it names
/// anything.
pub fn callback_task_id(kind: Kind, body: &Value) -> Option<String> {
    std::iter::once(kind.describe().task_id_place)
        .chain(TASK_ID_PLACES)
        .find_map(|(parent, key)| {
            let holder = match parent {
                Some(p) => body.get(p)?,
                None => body,
            };
            holder.get(key)?.as_str()
        })
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_string)
}

/// Reads the `data` of a details (record-info) answer of `kind` (not `cover`). `Err` says
/// why it cannot be read (a bad answer from KIE, retried like any).
pub fn details(kind: Kind, data: &Value) -> Result<Reading, String> {
    let parsed;
    let data = match data {
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|e| format!("details data is a string but not JSON ({e})"))?;
            &parsed
        }
        other => other,
    };
    let obj = data.as_object().ok_or_else(|| {
        format!(
            "details data is not an object: {}",
            short(&data.to_string())
        )
    })?;
    let response = response_of(obj)?;
    let response = response.as_ref().and_then(Value::as_object);
    let status_key = if kind == Kind::Music {
        "status"
    } else {
        "successFlag"
    };
    let status = obj
        .get(status_key)
        .or_else(|| {
            obj.get(if kind == Kind::Music {
                "successFlag"
            } else {
                "status"
            })
        })
        .and_then(Value::as_str)
        .map(|s| s.trim().to_ascii_uppercase());
    let files = || -> Result<Vec<Found>, String> {
        match kind {
            Kind::Cover => Err("cover details are read by kie::wire".into()),
            Kind::Music => {
                let tracks =
                    response.and_then(|r| r.get("sunoData").or_else(|| r.get("suno_data")));
                tracks_files(tracks, Naming::Details)
            }
            Kind::Wav => single(
                response,
                &["audioWavUrl", "audio_wav_url"],
                "audio",
                FileType::Wav,
            ),
            Kind::Video => single(response, &["videoUrl", "video_url"], "video", FileType::Mp4),
            Kind::Stems => stems_files(response, Naming::Details),
        }
    };
    let failed = |status: &str| {
        let code = obj.get("errorCode").and_then(int_of);
        let message = text(obj, &["errorMessage", "errorMsg"]);
        let mut reason = format!("KIE status {status}");
        match (code, message) {
            (Some(c), Some(m)) => reason.push_str(&format!(": {m} (code {c})")),
            (None, Some(m)) => reason.push_str(&format!(": {m}")),
            (Some(c), None) => reason.push_str(&format!(" (code {c})")),
            (None, None) => {}
        }
        Reading::Failure { reason }
    };
    let pending = |unknown: Option<String>| Reading::Pending {
        stage: None,
        unknown,
    };
    Ok(match status.as_deref() {
        None | Some("" | "PENDING" | "TEXT_SUCCESS" | "FIRST_SUCCESS" | "GENERATING") => {
            pending(None)
        }
        Some("SUCCESS") => {
            let files = files()?;
            if files.is_empty() {
                Reading::Failure {
                    reason: "KIE status SUCCESS lists no file URLs".into(),
                }
            } else {
                Reading::Success { files }
            }
        }
        // KIE's delivery of the callback failed: done if the files are listed.
        Some("CALLBACK_EXCEPTION") => match files()? {
            files if files.is_empty() => failed("CALLBACK_EXCEPTION"),
            files => Reading::Success { files },
        },
        Some(s) if s.contains("FAILED") || s.ends_with("_ERROR") => failed(s),
        Some(s) => pending(Some(short(s))),
    })
}

/// Whether a name comes from a callback (snake case) or a details answer (camel case);
/// both spellings are read either way, this only decides which is looked at first.
#[derive(Clone, Copy)]
enum Naming {
    Callback,
    Details,
}

impl Naming {
    fn keys<'a>(self, snake: &'a str, camel: &'a str) -> [&'a str; 2] {
        match self {
            Naming::Callback => [snake, camel],
            Naming::Details => [camel, snake],
        }
    }
}

/// `response` as an object, a JSON string, missing or null.
fn response_of(obj: &Map<String, Value>) -> Result<Option<Value>, String> {
    Ok(match obj.get("response") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() || s.trim() == "null" => None,
        Some(Value::String(s)) => Some(
            serde_json::from_str::<Value>(s)
                .map_err(|e| format!("details response is a string but not JSON ({e})"))?,
        ),
        Some(v) => Some(v.clone()),
    })
}

/// A music task's tracks, in KIE's order: per track its MP3 (`audio_url`) then its image
/// (`image_url`), each only when present (at `FIRST_SUCCESS` some have no `audioUrl`).
fn tracks_files(tracks: Option<&Value>, naming: Naming) -> Result<Vec<Found>, String> {
    let list = match tracks {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(format!(
                "tracks are not a list: {}",
                short(&other.to_string())
            ));
        }
    };
    let mut files = Vec::new();
    for (i, track) in list.iter().enumerate() {
        let Some(t) = track.as_object() else {
            return Err(format!("track {i} is not an object"));
        };
        let audio_id = text(t, &["id", "audioId", "audio_id"]);
        let title = text(t, &["title"]);
        let duration = t
            .get("duration")
            .and_then(|d| d.as_f64().or_else(|| d.as_str()?.trim().parse().ok()))
            .filter(|d| d.is_finite() && *d >= 0.0);
        let created_at = ["createTime", "create_time", "createdAt"]
            .iter()
            .find_map(|k| t.get(*k).and_then(parse_time));
        for (keys, expect) in [
            (naming.keys("audio_url", "audioUrl"), FileType::Mp3),
            (naming.keys("image_url", "imageUrl"), FileType::Image),
        ] {
            if let Some(url) = url_of(t, &keys)? {
                files.push(Found {
                    stem: format!("track-{i}"),
                    url,
                    expect,
                    audio_id: audio_id.clone(),
                    title: title.clone(),
                    duration,
                    created_at,
                });
            }
        }
    }
    bounded(files)
}

/// The one file of a WAV or video task.
fn single(
    holder: Option<&Map<String, Value>>,
    keys: &[&str],
    stem: &str,
    expect: FileType,
) -> Result<Vec<Found>, String> {
    let Some(holder) = holder else {
        return Ok(Vec::new());
    };
    Ok(url_of(holder, keys)?
        .map(|url| Found {
            stem: stem.to_string(),
            url,
            expect,
            audio_id: None,
            title: None,
            duration: None,
            created_at: None,
        })
        .into_iter()
        .collect())
}

/// The stems made, in [`STEMS_ORDER`]; empty or missing fields are stems not made, and
/// `origin_url` (the source) is never one.
fn stems_files(info: Option<&Map<String, Value>>, naming: Naming) -> Result<Vec<Found>, String> {
    let Some(info) = info else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    for stem in STEMS_ORDER {
        let snake = format!("{stem}_url");
        let camel = camel_case(&snake);
        if let Some(url) = url_of(info, &naming.keys(&snake, &camel))? {
            files.push(Found {
                stem: stem.to_string(),
                url,
                expect: FileType::Mp3,
                audio_id: None,
                title: None,
                duration: None,
                created_at: None,
            });
        }
    }
    Ok(files)
}

/// `backing_vocals_url` → `backingVocalsUrl`.
fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The first of `keys` holding a non-empty string: a URL within bounds, or an error.
fn url_of(obj: &Map<String, Value>, keys: &[&str]) -> Result<Option<String>, String> {
    let Some(url) = keys
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_str).map(str::trim))
        .filter(|u| !u.is_empty())
    else {
        return Ok(None);
    };
    if url.len() > MAX_URL_BYTES {
        return Err(format!("a file URL is longer than {MAX_URL_BYTES} bytes"));
    }
    Ok(Some(url.to_string()))
}

fn bounded(files: Vec<Found>) -> Result<Vec<Found>, String> {
    if files.len() > MAX_FILES {
        return Err(format!("{} files, more than {MAX_FILES}", files.len()));
    }
    Ok(files)
}

/// The first of `keys` holding a non-empty string, at most [`MAX_TEXT`] characters, with
/// control characters made spaces.
fn text(obj: &Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(short)
}

fn short(s: &str) -> String {
    s.chars()
        .take(MAX_TEXT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// An integer from a JSON number or a numeric string.
fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// KIE's times in any of their three forms: epoch milliseconds (a number or numeric text),
/// RFC 3339 / ISO 8601, or `YYYY-MM-DD hh:mm:ss` (UTC).
pub fn parse_time(v: &Value) -> Option<Millis> {
    use time::format_description::well_known::Rfc3339;
    use time::macros::format_description;
    if let Some(ms) = int_of(v) {
        return (ms >= 0).then_some(ms);
    }
    let s = v.as_str()?.trim();
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Some(millis_of(t));
    }
    let plain = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let iso_no_zone = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    [plain, iso_no_zone]
        .iter()
        .find_map(|f| time::PrimitiveDateTime::parse(s, f).ok())
        .map(|t| millis_of(t.assume_utc()))
}

fn millis_of(t: time::OffsetDateTime) -> Millis {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cb(kind: Kind, v: Value) -> Callback {
        callback(kind, v.to_string().as_bytes()).unwrap()
    }

    fn urls(r: &Reading) -> Vec<(String, String, FileType)> {
        match r {
            Reading::Success { files } => files
                .iter()
                .map(|f| (f.stem.clone(), f.url.clone(), f.expect))
                .collect(),
            other => panic!("not a success: {other:?}"),
        }
    }

    fn music_body(stage: &str, tracks: Value) -> Value {
        json!({"code": 200, "msg": "All generated successfully.",
               "data": {"callbackType": stage, "task_id": "m1", "data": tracks}})
    }

    fn track(id: &str, audio: Option<&str>) -> Value {
        json!({"id": id, "audio_url": audio, "stream_audio_url": "https://s/stream",
               "source_audio_url": "https://s/src.mp3", "image_url": format!("https://i/{id}.jpeg"),
               "title": "Song", "duration": 198.44, "createTime": "2025-01-01 00:00:00"})
    }

    #[test]
    fn music_stages_change_nothing_until_complete() {
        for stage in ["text", "first", "FIRST"] {
            let c = cb(Kind::Music, music_body(stage, json!([track("a", None)])));
            assert_eq!(c.task_id, "m1");
            assert!(
                matches!(&c.reading, Reading::Pending { stage: Some(s), .. } if *s == stage.to_ascii_lowercase()),
                "{c:?}"
            );
        }
        let c = cb(
            Kind::Music,
            music_body(
                "complete",
                json!([
                    track("a", Some("https://t/a.mp3")),
                    track("b", Some("https://t/b.mp3"))
                ]),
            ),
        );
        assert_eq!(
            urls(&c.reading),
            [
                ("track-0".into(), "https://t/a.mp3".into(), FileType::Mp3),
                ("track-0".into(), "https://i/a.jpeg".into(), FileType::Image),
                ("track-1".into(), "https://t/b.mp3".into(), FileType::Mp3),
                ("track-1".into(), "https://i/b.jpeg".into(), FileType::Image),
            ]
        );
        let Reading::Success { files } = &c.reading else {
            unreachable!()
        };
        assert_eq!(files[0].audio_id.as_deref(), Some("a"));
        assert_eq!(files[0].title.as_deref(), Some("Song"));
        assert_eq!(files[0].duration, Some(198.44));
        assert_eq!(files[0].created_at, Some(1_735_689_600_000));
        // Straight to complete without a stage name is complete too.
        let body = json!({"code": 200, "msg": "ok", "data": {"task_id": "m1",
                          "data": [track("a", Some("https://t/a.mp3"))]}});
        assert_eq!(urls(&cb(Kind::Music, body).reading).len(), 2);
    }

    #[test]
    fn music_failures_in_every_form() {
        let c = cb(
            Kind::Music,
            json!({"code": 501, "msg": "Audio generation failed",
                   "data": {"callbackType": "error", "task_id": "m1", "data": null}}),
        );
        assert_eq!(
            c.reading,
            Reading::Failure {
                reason: "KIE code 501: Audio generation failed".into()
            }
        );
        let c = cb(
            Kind::Music,
            json!({"code": 200, "msg": "x", "data": {"callbackType": "error", "task_id": "m1",
                   "error": "copyrighted lyrics"}}),
        );
        assert_eq!(
            c.reading,
            Reading::Failure {
                reason: "KIE code 200: x (copyrighted lyrics)".into()
            }
        );
        let c = cb(
            Kind::Music,
            json!({"code": "531", "msg": "refunded", "data": {"task_id": "m1"}}),
        );
        assert!(matches!(c.reading, Reading::Failure { .. }), "{c:?}");
        // A complete callback that lists nothing is a failure, not a success.
        let c = cb(Kind::Music, music_body("complete", json!([])));
        assert!(matches!(c.reading, Reading::Failure { .. }), "{c:?}");
    }

    #[test]
    fn task_id_places_in_order() {
        let id = |v: Value| callback_task_id(Kind::Music, &v);
        assert_eq!(
            id(json!({"taskId": "b", "data": {"task_id": "a"}})),
            Some("a".into())
        );
        assert_eq!(id(json!({"taskId": "b", "task_id": "c"})), Some("b".into()));
        assert_eq!(
            id(json!({"task_id": "c", "data": {"taskId": "d"}})),
            Some("c".into())
        );
        assert_eq!(id(json!({"data": {"taskId": "d"}})), Some("d".into()));
        assert_eq!(id(json!({"data": {"task_id": "  "}})), None);
        // Read as sent: `callback::parse_for` refuses an id that is not a safe name.
        assert_eq!(
            id(json!({"data": {"task_id": "../x"}})),
            Some("../x".into())
        );
        // A cover's own place is data.taskId.
        assert_eq!(
            callback_task_id(
                Kind::Cover,
                &json!({"taskId": "b", "data": {"taskId": "a"}})
            ),
            Some("a".into())
        );
    }

    #[test]
    fn wav_video_and_stems_callbacks_with_both_spellings() {
        for key in ["audioWavUrl", "audio_wav_url"] {
            let c = cb(
                Kind::Wav,
                json!({"code": 200, "msg": "success", "data": {"task_id": "w1", key: "https://f/a.wav"}}),
            );
            assert_eq!(
                urls(&c.reading),
                [("audio".into(), "https://f/a.wav".into(), FileType::Wav)]
            );
        }
        let c = cb(
            Kind::Video,
            json!({"code": 200, "msg": "ok", "data": {"task_id": "v1", "video_url": "https://f/v.mp4"}}),
        );
        assert_eq!(
            urls(&c.reading),
            [("video".into(), "https://f/v.mp4".into(), FileType::Mp4)]
        );
        let c = cb(
            Kind::Video,
            json!({"code": 500, "msg": "failed", "data": {"task_id": "v1", "video_url": null}}),
        );
        assert!(matches!(c.reading, Reading::Failure { .. }));
        for key in ["vocal_separation_info", "vocal_removal_info"] {
            let c = cb(
                Kind::Stems,
                json!({"code": 200, "msg": "ok", "data": {"task_id": "s1", key: {
                    "instrumental_url": "https://f/i.mp3", "vocal_url": "https://f/v.mp3",
                    "origin_url": "https://f/o.mp3", "drums_url": "", "bass_url": null}}}),
            );
            assert_eq!(
                urls(&c.reading),
                [
                    ("vocal".into(), "https://f/v.mp3".into(), FileType::Mp3),
                    (
                        "instrumental".into(),
                        "https://f/i.mp3".into(),
                        FileType::Mp3
                    ),
                ]
            );
        }
    }

    #[test]
    fn music_details_statuses() {
        let data = |status: &str, response: Value| {
            json!({"taskId": "m1", "status": status, "response": response,
                   "errorCode": 400, "errorMessage": "bad words"})
        };
        let tracks = json!({"sunoData": [
            {"id": "a", "audioUrl": "https://t/a.mp3", "streamAudioUrl": "https://s", "imageUrl": "https://i/a.png"},
            {"id": "b", "audioUrl": "", "imageUrl": "https://i/b.png"}]});
        for s in ["PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS"] {
            assert_eq!(
                details(Kind::Music, &data(s, tracks.clone())).unwrap(),
                Reading::Pending {
                    stage: None,
                    unknown: None
                }
            );
        }
        let r = details(Kind::Music, &data("SUCCESS", tracks.clone())).unwrap();
        // A track without audioUrl yields only its image.
        assert_eq!(urls(&r).len(), 3);
        // `response` as a JSON string.
        let r = details(
            Kind::Music,
            &data("SUCCESS", Value::String(tracks.to_string())),
        )
        .unwrap();
        assert_eq!(urls(&r).len(), 3);
        for s in [
            "CREATE_TASK_FAILED",
            "GENERATE_AUDIO_FAILED",
            "SENSITIVE_WORD_ERROR",
        ] {
            assert_eq!(
                details(Kind::Music, &data(s, Value::Null)).unwrap(),
                Reading::Failure {
                    reason: format!("KIE status {s}: bad words (code 400)")
                }
            );
        }
        assert_eq!(
            urls(&details(Kind::Music, &data("CALLBACK_EXCEPTION", tracks)).unwrap()).len(),
            3
        );
        assert!(matches!(
            details(Kind::Music, &data("CALLBACK_EXCEPTION", Value::Null)).unwrap(),
            Reading::Failure { .. }
        ));
        assert_eq!(
            details(Kind::Music, &data("MAGIC", Value::Null)).unwrap(),
            Reading::Pending {
                stage: None,
                unknown: Some("MAGIC".into())
            }
        );
    }

    #[test]
    fn wav_video_stems_details() {
        let r = details(
            Kind::Wav,
            &json!({"successFlag": "SUCCESS", "response": {"audio_wav_url": "https://f/a.wav"}}),
        )
        .unwrap();
        assert_eq!(urls(&r).len(), 1);
        let r = details(
            Kind::Video,
            &json!({"successFlag": "success", "response": "{\"videoUrl\":\"https://f/v.mp4\"}"}),
        )
        .unwrap();
        assert_eq!(urls(&r)[0].2, FileType::Mp4);
        assert!(matches!(
            details(
                Kind::Video,
                &json!({"successFlag": "GENERATE_MP4_FAILED", "errorMessage": "no"})
            )
            .unwrap(),
            Reading::Failure { .. }
        ));
        let r = details(
            Kind::Stems,
            &json!({"successFlag": "SUCCESS", "response": {
                "vocalUrl": "https://f/v.mp3", "pianoUrl": "https://f/p.mp3",
                "backingVocalsUrl": "https://f/b.mp3", "originUrl": "https://f/o.mp3"}}),
        )
        .unwrap();
        let stems: Vec<String> = urls(&r).into_iter().map(|u| u.0).collect();
        assert_eq!(stems, ["vocal", "backing_vocals", "piano"]);
        assert_eq!(
            details(Kind::Stems, &json!({"successFlag": "PENDING"})).unwrap(),
            Reading::Pending {
                stage: None,
                unknown: None
            }
        );
    }

    #[test]
    fn times_in_three_forms() {
        let t = 1_735_689_600_000;
        assert_eq!(parse_time(&json!("2025-01-01 00:00:00")), Some(t));
        assert_eq!(parse_time(&json!("2025-01-01T00:00:00Z")), Some(t));
        assert_eq!(parse_time(&json!("2025-01-01T01:00:00+01:00")), Some(t));
        assert_eq!(parse_time(&json!("2025-01-01T00:00:00")), Some(t));
        assert_eq!(parse_time(&json!(t)), Some(t));
        assert_eq!(parse_time(&json!(t.to_string())), Some(t));
        assert_eq!(parse_time(&json!("yesterday")), None);
        assert_eq!(parse_time(&json!(-5)), None);
    }

    #[test]
    fn bounds_and_garbage_never_panic() {
        let long = format!("https://f/{}", "a".repeat(MAX_URL_BYTES));
        assert!(
            callback(
                Kind::Wav,
                json!({"code": 200, "data": {"task_id": "w", "audioWavUrl": long}})
                    .to_string()
                    .as_bytes()
            )
            .is_err()
        );
        let many: Vec<Value> = (0..20)
            .map(|i| track(&i.to_string(), Some("https://t/x.mp3")))
            .collect();
        assert!(
            callback(
                Kind::Music,
                music_body("complete", Value::Array(many))
                    .to_string()
                    .as_bytes()
            )
            .is_err()
        );
        for body in [
            &b""[..],
            b"[]",
            b"{}",
            b"{\"code\":200}",
            b"\xff",
            b"{\"data\":{\"task_id\":\"a\"}}",
        ] {
            for kind in [Kind::Music, Kind::Wav, Kind::Video, Kind::Stems] {
                assert!(callback(kind, body).is_err(), "{kind:?} {body:?}");
            }
        }
        for data in [
            json!(null),
            json!([]),
            json!("not json"),
            json!({"response": "{"}),
            json!({"status": 5}),
        ] {
            for kind in [Kind::Music, Kind::Wav, Kind::Video, Kind::Stems] {
                let _ = details(kind, &data);
            }
        }
    }
}
