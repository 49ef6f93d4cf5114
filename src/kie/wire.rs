//! The lenient reading of KIE's replies: the `{code, msg, data}` envelope, mapping KIE's codes
//! (by endpoint) to [`KieError`]s, record-info's many shapes of `successFlag`, `response` and
//! `images`, and download-url's answer. Pure functions over bytes and JSON; every answer is
//! bounded (images per task, URL length) before it reaches a caller.
//!
//! It must not do I/O, hold the API key or log secrets: the client sends, this reads.

use crate::model::Kind;
use serde_json::Value;

use super::{CoverStatus, KieError, RecordInfo};
use crate::model::{MAX_IMAGES, MAX_URL_BYTES};

/// Which KIE endpoint a call went to; decides what endpoint-specific codes mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// A create request of a kind (for music, any of its eight endpoints).
    Create(Kind),
    /// A kind's details (record-info).
    Details(Kind),
    DownloadUrl,
}

impl Endpoint {
    /// The `endpoint` label of `coverd_kie_requests_total` (one of `metrics::KIE_ENDPOINTS`).
    pub(super) fn name(self) -> &'static str {
        match self {
            Endpoint::Create(Kind::Cover) => "cover/generate",
            Endpoint::Details(Kind::Cover) => "cover/record-info",
            Endpoint::Create(Kind::Music) => "generate",
            Endpoint::Create(k) => k.describe().create[0],
            Endpoint::Details(k) => k.describe().details,
            Endpoint::DownloadUrl => "common/download-url",
        }
    }
}

/// KIE's `{code, msg, data}` answer.
#[derive(Debug, Clone, PartialEq)]
struct Envelope {
    code: i64,
    msg: String,
    data: Value,
}

/// Parses an envelope: a JSON object with an integer (or numeric string) `code`; `msg` or
/// `message`; `data` of any shape. Anything else is not an envelope.
fn parse_envelope(body: &[u8]) -> Option<Envelope> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let obj = value.as_object()?;
    let code = int_of(obj.get("code")?)?;
    let msg = ["msg", "message"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_str))
        .unwrap_or_default()
        .to_string();
    let data = obj.get("data").cloned().unwrap_or(Value::Null);
    Some(Envelope { code, msg, data })
}

/// Decides the outcome of one answer: success is HTTP 2xx and envelope code 200; anything
/// else becomes a typed error (by envelope code, else by HTTP status).
pub(super) fn interpret(
    endpoint: Endpoint,
    http_status: u16,
    body: &[u8],
) -> Result<Value, KieError> {
    let http_ok = (200..300).contains(&http_status);
    match parse_envelope(body) {
        Some(env) if http_ok && env.code == 200 => Ok(env.data),
        Some(env) => {
            let code = if env.code != 200 {
                env.code
            } else {
                i64::from(http_status)
            };
            let msg = if env.msg.is_empty() {
                format!("no message (HTTP {http_status})")
            } else {
                env.msg
            };
            Err(map_code(endpoint, code, msg, Some(&env.data)))
        }
        None if http_ok => Err(KieError::BadResponse(format!(
            "{} answered HTTP {http_status} without a KIE JSON envelope: {}",
            endpoint.name(),
            snippet(body)
        ))),
        None => Err(map_code(
            endpoint,
            i64::from(http_status),
            format!(
                "HTTP {http_status} without a KIE JSON envelope: {}",
                snippet(body)
            ),
            None,
        )),
    }
}

/// Maps a KIE code to an error. `data` is `Some` when the code came from an envelope; the
/// endpoint-specific meanings (already exists, not found, not a KIE file) need one.
fn map_code(endpoint: Endpoint, code: i64, msg: String, data: Option<&Value>) -> KieError {
    match code {
        401 => return KieError::Unauthorized,
        402 => return KieError::NoCredits,
        429 => return KieError::RateLimited,
        455 => return KieError::Maintenance,
        500..=599 => return KieError::Server { code, msg },
        _ => {}
    }
    if let Some(data) = data {
        match (endpoint, code) {
            (Endpoint::Create(_), 400 | 409) => {
                if let Some(task_id) = task_id_in(data) {
                    return KieError::AlreadyExists { task_id };
                }
            }
            (Endpoint::Details(_), 404 | 422) => return KieError::NotFound,
            (Endpoint::DownloadUrl, 422) => return KieError::NotKieFile,
            _ => {}
        }
    }
    KieError::Invalid { code, msg }
}

/// The first 200 characters of an answer, printable, for error messages.
pub(super) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    if out.trim().is_empty() {
        "(empty body)".into()
    } else {
        out
    }
}

/// An integer from a JSON number or a numeric string.
fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A non-empty string field.
fn str_field(obj: &serde_json::Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// `data.taskId` (or `data.task_id`), non-empty.
/// The task id in `data`, only if it is a safe name: it becomes a directory under `images/`.
pub(super) fn task_id_in(data: &Value) -> Option<String> {
    let obj = data.as_object()?;
    str_field(obj, "taskId")
        .or_else(|| str_field(obj, "task_id"))
        .filter(|id| crate::model::valid_task_id(id))
}

/// Reads `successFlag` in either of KIE's forms: integer 0 pending, 1 success, 2 generating,
/// 3 failed; or text `PENDING`, `GENERATING`, `SUCCESS`, `CREATE_TASK_FAILED`,
/// `GENERATE_COVER_FAILED` (any case), or a numeric string. Missing or null is pending;
/// unrecognised values are `None`.
pub fn parse_success_flag(flag: Option<&Value>) -> Option<CoverStatus> {
    let flag = match flag {
        None | Some(Value::Null) => return Some(CoverStatus::Pending),
        Some(f) => f,
    };
    if let Some(n) = int_of(flag) {
        return match n {
            0 => Some(CoverStatus::Pending),
            1 => Some(CoverStatus::Success),
            2 => Some(CoverStatus::Generating),
            3 => Some(CoverStatus::Failed),
            _ => None,
        };
    }
    let text = flag.as_str()?.trim().to_ascii_uppercase();
    match text.as_str() {
        "" | "PENDING" | "WAITING" | "QUEUED" => Some(CoverStatus::Pending),
        "GENERATING" | "RUNNING" | "PROCESSING" => Some(CoverStatus::Generating),
        "SUCCESS" | "SUCCEEDED" | "COMPLETE" | "COMPLETED" => Some(CoverStatus::Success),
        "CREATE_TASK_FAILED" | "GENERATE_COVER_FAILED" | "FAILED" => Some(CoverStatus::Failed),
        t if t.contains("FAIL") || t.contains("ERROR") => Some(CoverStatus::Failed),
        _ => None,
    }
}

/// Reads `response.images`: `response` may be an object, a JSON string, missing or null;
/// `images` may be missing or null. Non-string entries are skipped (objects with a `url` or
/// `imageUrl` are read). Falls back to `data.images`.
fn parse_images(data: &serde_json::Map<String, Value>) -> Result<Vec<String>, String> {
    let response = match data.get("response") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() || s.trim() == "null" => None,
        Some(Value::String(s)) => Some(
            serde_json::from_str::<Value>(s)
                .map_err(|e| format!("record-info response is a string but not JSON ({e})"))?,
        ),
        Some(v) => Some(v.clone()),
    };
    let images = response
        .as_ref()
        .and_then(|r| r.get("images"))
        .filter(|v| !v.is_null())
        .or_else(|| data.get("images"));
    let list = match images {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(Value::String(one)) if !one.trim().is_empty() => {
            return Ok(vec![one.trim().to_string()]);
        }
        Some(other) => return Err(format!("record-info images is not a list: {other}")),
    };
    let urls: Vec<String> = list
        .iter()
        .filter_map(|item| match item {
            Value::String(s) => Some(s.trim().to_string()),
            Value::Object(o) => str_field(o, "url").or_else(|| str_field(o, "imageUrl")),
            _ => None,
        })
        .filter(|s| !s.is_empty())
        .collect();
    // The same bounds as a callback's: a task record stays small whatever KIE sends.
    if urls.len() > MAX_IMAGES {
        return Err(format!(
            "record-info lists {} images, more than {}",
            urls.len(),
            MAX_IMAGES
        ));
    }
    if urls.iter().any(|u| u.len() > MAX_URL_BYTES) {
        return Err(format!(
            "record-info lists an image URL longer than {} bytes",
            MAX_URL_BYTES
        ));
    }
    Ok(urls)
}

/// Parses record-info's `data` leniently (see [`RecordInfo`]). `data` null or missing means
/// the record does not exist (yet): [`KieError::NotFound`].
pub fn parse_record_info(data: &Value) -> Result<RecordInfo, KieError> {
    let parsed;
    let data = match data {
        Value::Null => return Err(KieError::NotFound),
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s).map_err(|e| {
                KieError::BadResponse(format!("record-info data is a string but not JSON ({e})"))
            })?;
            &parsed
        }
        other => other,
    };
    let Some(obj) = data.as_object() else {
        return Err(KieError::BadResponse(format!(
            "record-info data is not an object: {}",
            snippet(data.to_string().as_bytes())
        )));
    };
    let flag = obj.get("successFlag").or_else(|| obj.get("status"));
    let status = match parse_success_flag(flag) {
        Some(s) => s,
        None => {
            let flag =
                flag.map_or_else(|| "none".to_string(), |f| snippet(f.to_string().as_bytes()));
            tracing::warn!(
                "unknown successFlag {flag} in KIE's record-info answer; treating the task as pending"
            );
            CoverStatus::Pending
        }
    };
    let images = parse_images(obj).map_err(KieError::BadResponse)?;
    let (error_code, error_message) = if status == CoverStatus::Failed {
        (
            obj.get("errorCode").and_then(int_of),
            str_field(obj, "errorMessage").or_else(|| str_field(obj, "errorMsg")),
        )
    } else {
        (None, None)
    };
    Ok(RecordInfo {
        task_id: str_field(obj, "taskId"),
        parent_task_id: str_field(obj, "parentTaskId"),
        status,
        images,
        error_code,
        error_message,
    })
}

/// Reads download-url's `data`: the URL itself, or an object with `url` / `downloadUrl`.
pub fn parse_download_url(data: &Value) -> Option<String> {
    match data {
        Value::String(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
        Value::Object(o) => str_field(o, "url")
            .or_else(|| str_field(o, "downloadUrl"))
            .or_else(|| str_field(o, "download_url")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn success_flag_integer_forms() {
        let f = |v: Value| parse_success_flag(Some(&v));
        assert_eq!(f(json!(0)), Some(CoverStatus::Pending));
        assert_eq!(f(json!(1)), Some(CoverStatus::Success));
        assert_eq!(f(json!(2)), Some(CoverStatus::Generating));
        assert_eq!(f(json!(3)), Some(CoverStatus::Failed));
        assert_eq!(f(json!(7)), None);
    }

    #[test]
    fn success_flag_string_forms() {
        let f = |v: &str| parse_success_flag(Some(&json!(v)));
        assert_eq!(f("PENDING"), Some(CoverStatus::Pending));
        assert_eq!(f("GENERATING"), Some(CoverStatus::Generating));
        assert_eq!(f("SUCCESS"), Some(CoverStatus::Success));
        assert_eq!(f("success"), Some(CoverStatus::Success));
        assert_eq!(f("CREATE_TASK_FAILED"), Some(CoverStatus::Failed));
        assert_eq!(f("GENERATE_COVER_FAILED"), Some(CoverStatus::Failed));
        assert_eq!(f("SENSITIVE_WORD_ERROR"), Some(CoverStatus::Failed));
        assert_eq!(f("1"), Some(CoverStatus::Success));
        assert_eq!(f(" 3 "), Some(CoverStatus::Failed));
        assert_eq!(f("0"), Some(CoverStatus::Pending));
        assert_eq!(f("WHATEVER"), None);
    }

    #[test]
    fn success_flag_missing_or_null_is_pending() {
        assert_eq!(parse_success_flag(None), Some(CoverStatus::Pending));
        assert_eq!(
            parse_success_flag(Some(&Value::Null)),
            Some(CoverStatus::Pending)
        );
    }

    #[test]
    fn hostile_answers_are_bounded() {
        let many: Vec<String> = (0..17).map(|i| format!("https://h/{i}.png")).collect();
        let data = json!({"taskId": "c1", "successFlag": 1, "response": {"images": many}});
        assert!(matches!(
            parse_record_info(&data),
            Err(KieError::BadResponse(_))
        ));
        let long = format!("https://h/{}", "a".repeat(MAX_URL_BYTES));
        let data = json!({"taskId": "c1", "successFlag": 1, "response": {"images": [long]}});
        assert!(matches!(
            parse_record_info(&data),
            Err(KieError::BadResponse(_))
        ));
        // Task ids become directory names: unsafe ones are not taken from KIE's answers.
        for bad in ["../../etc", "a/b", ""] {
            assert_eq!(task_id_in(&json!({"taskId": bad})), None, "{bad}");
        }
        assert_eq!(
            task_id_in(&json!({"taskId": "c0ffee"})).as_deref(),
            Some("c0ffee")
        );
    }

    #[test]
    fn record_info_full_success() {
        let data = json!({
            "taskId": "c1", "parentTaskId": "m1", "callbackUrl": "https://x/cb",
            "createTime": "2026-11-27T10:33:01Z", "completeTime": "2026-11-27T10:35:01Z",
            "response": {"images": ["https://h/a.png", "https://h/b.png"]},
            "successFlag": 1, "errorCode": 200, "errorMessage": "", "extra": {"ignored": true}
        });
        let info = parse_record_info(&data).expect("parses");
        assert_eq!(
            info,
            RecordInfo {
                task_id: Some("c1".into()),
                parent_task_id: Some("m1".into()),
                status: CoverStatus::Success,
                images: vec!["https://h/a.png".into(), "https://h/b.png".into()],
                error_code: None,
                error_message: None,
            }
        );
    }

    #[test]
    fn record_info_response_as_json_string() {
        let data =
            json!({"successFlag": "SUCCESS", "response": "{\"images\":[\"https://h/a.png\"]}"});
        let info = parse_record_info(&data).expect("parses");
        assert_eq!(info.status, CoverStatus::Success);
        assert_eq!(info.images, vec!["https://h/a.png".to_string()]);
    }

    #[test]
    fn record_info_missing_and_null_pieces() {
        for data in [
            json!({}),
            json!({"response": null}),
            json!({"response": {}}),
            json!({"response": {"images": null}, "successFlag": null}),
            json!({"response": "", "taskId": null}),
        ] {
            let info = parse_record_info(&data).expect("parses");
            assert_eq!(info.status, CoverStatus::Pending, "{data}");
            assert!(info.images.is_empty(), "{data}");
            assert_eq!(info.task_id, None);
        }
    }

    #[test]
    fn record_info_bad_response_string_is_an_error() {
        let err = parse_record_info(&json!({"response": "{not json"})).expect_err("refused");
        assert!(matches!(err, KieError::BadResponse(_)), "{err:?}");
    }

    #[test]
    fn record_info_error_fields_only_when_failed() {
        let ok =
            parse_record_info(&json!({"successFlag": 2, "errorCode": 500, "errorMessage": "x"}))
                .expect("parses");
        assert_eq!((ok.error_code, ok.error_message), (None, None));
        let failed = parse_record_info(&json!({
            "successFlag": "GENERATE_COVER_FAILED", "errorCode": "501", "errorMessage": "Cover generation failed"
        }))
        .expect("parses");
        assert_eq!(failed.status, CoverStatus::Failed);
        assert_eq!(failed.error_code, Some(501));
        assert_eq!(
            failed.error_message.as_deref(),
            Some("Cover generation failed")
        );
    }

    #[test]
    fn record_info_null_data_is_not_found() {
        assert!(matches!(
            parse_record_info(&Value::Null),
            Err(KieError::NotFound)
        ));
        assert!(matches!(
            parse_record_info(&json!([1])),
            Err(KieError::BadResponse(_))
        ));
    }

    #[test]
    fn download_url_both_shapes() {
        assert_eq!(
            parse_download_url(&json!("https://h/x.png")).as_deref(),
            Some("https://h/x.png")
        );
        assert_eq!(
            parse_download_url(&json!({"url": "https://h/y"})).as_deref(),
            Some("https://h/y")
        );
        assert_eq!(
            parse_download_url(&json!({"downloadUrl": "https://h/z"})).as_deref(),
            Some("https://h/z")
        );
        assert_eq!(parse_download_url(&json!({})), None);
        assert_eq!(parse_download_url(&json!("")), None);
        assert_eq!(parse_download_url(&Value::Null), None);
    }

    #[test]
    fn envelope_msg_or_message_and_string_code() {
        let e =
            parse_envelope(br#"{"code":"200","message":"ok","data":{"a":1}}"#).expect("envelope");
        assert_eq!((e.code, e.msg.as_str()), (200, "ok"));
        assert_eq!(e.data, json!({"a": 1}));
        assert!(parse_envelope(b"<html>").is_none());
        assert!(parse_envelope(br#"{"status":"x"}"#).is_none());
    }

    #[test]
    fn interpret_success_needs_http_2xx_and_code_200() {
        let ok = interpret(
            Endpoint::Create(Kind::Cover),
            200,
            br#"{"code":200,"msg":"success","data":{"taskId":"t"}}"#,
        );
        assert_eq!(ok.expect("success"), json!({"taskId": "t"}));
        let err = interpret(
            Endpoint::Create(Kind::Cover),
            200,
            br#"{"code":401,"msg":"bad key"}"#,
        )
        .expect_err("401");
        assert!(matches!(err, KieError::Unauthorized));
        // HTTP 500 with an envelope that claims 200: the HTTP status wins.
        let err = interpret(
            Endpoint::Create(Kind::Cover),
            500,
            br#"{"code":200,"msg":"?"}"#,
        )
        .expect_err("500");
        assert!(matches!(err, KieError::Server { code: 500, .. }));
        let err =
            interpret(Endpoint::Create(Kind::Cover), 200, b"hello").expect_err("not envelope");
        assert!(matches!(err, KieError::BadResponse(_)));
        let err = interpret(
            Endpoint::Create(Kind::Cover),
            502,
            b"<html>bad gateway</html>",
        )
        .expect_err("502");
        assert!(matches!(err, KieError::Server { code: 502, .. }) && err.is_transient());
        let err =
            interpret(Endpoint::Create(Kind::Cover), 403, b"error code: 1010").expect_err("403");
        assert!(matches!(err, KieError::Invalid { code: 403, .. }));
    }

    #[test]
    fn interpret_endpoint_specific_codes() {
        let exists = br#"{"code":409,"msg":"record already exists","data":{"taskId":"old"}}"#;
        match interpret(Endpoint::Create(Kind::Cover), 200, exists) {
            Err(KieError::AlreadyExists { task_id }) => assert_eq!(task_id, "old"),
            other => panic!("{other:?}"),
        }
        // The same as the HTTP status itself.
        assert!(matches!(
            interpret(Endpoint::Create(Kind::Cover), 409, exists),
            Err(KieError::AlreadyExists { .. })
        ));
        let no_id = br#"{"code":400,"msg":"bad","data":null}"#;
        assert!(matches!(
            interpret(Endpoint::Create(Kind::Cover), 200, no_id),
            Err(KieError::Invalid { code: 400, .. })
        ));
        let nf = br#"{"code":422,"msg":"record not found","data":null}"#;
        assert!(matches!(
            interpret(Endpoint::Details(Kind::Cover), 200, nf),
            Err(KieError::NotFound)
        ));
        assert!(matches!(
            interpret(Endpoint::Create(Kind::Cover), 200, nf),
            Err(KieError::Invalid { code: 422, .. })
        ));
        assert!(matches!(
            interpret(Endpoint::DownloadUrl, 200, nf),
            Err(KieError::NotKieFile)
        ));
        // A bare HTTP 404 page is not KIE saying "no record": probably a wrong base URL.
        assert!(matches!(
            interpret(Endpoint::Details(Kind::Cover), 404, b"Not Found"),
            Err(KieError::Invalid { code: 404, .. })
        ));
    }
}
