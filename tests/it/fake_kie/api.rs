//! The fake KIE API: cover/generate, record-info and download-url, each able to misbehave.
//!
//! State lives behind one mutex. Every request is recorded (method, path, query, headers,
//! body, time) before anything else happens, so tests can assert on what the client sent
//! and how often. Misbehaviours: forced error codes for the next N calls (as HTTP 200 with an
//! error envelope, as the HTTP status with an envelope, or as a bare HTTP status), slow
//! answers, a "429 burst" limit, alternative answer shapes (successFlag as text, `response`
//! as a JSON string, `message` instead of `msg`, download-url `data` as an object).

// A shared fake: not every test uses every knob.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Body;

/// The API endpoints the fake serves. `Any` matches every `/api/` path in
/// [`Api::fail_next`], [`Api::set_delay`] and [`Api::calls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Generate,
    RecordInfo,
    DownloadUrl,
    /// Any other `/api/` path (answered 404).
    Unknown,
    Any,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Generate => "/api/v1/suno/cover/generate",
            Endpoint::RecordInfo => "/api/v1/suno/cover/record-info",
            Endpoint::DownloadUrl => "/api/v1/common/download-url",
            Endpoint::Unknown | Endpoint::Any => "/api/",
        }
    }

    fn of_path(path: &str) -> Endpoint {
        [
            Endpoint::Generate,
            Endpoint::RecordInfo,
            Endpoint::DownloadUrl,
        ]
        .into_iter()
        .find(|e| e.path() == path)
        .unwrap_or(Endpoint::Unknown)
    }

    fn matches(self, other: Endpoint) -> bool {
        self == Endpoint::Any || self == other
    }
}

/// A cover task's state as record-info reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Pending,
    Generating,
    Success(Vec<String>),
    /// `successFlag` 3 / `GENERATE_COVER_FAILED`, with KIE's `errorCode` and `errorMessage`.
    Failed {
        code: i64,
        message: String,
    },
    /// `successFlag` 3 / `CREATE_TASK_FAILED`.
    CreateFailed {
        code: i64,
        message: String,
    },
}

/// How `successFlag` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlagForm {
    /// 0 pending, 1 success, 2 generating, 3 failed.
    #[default]
    Int,
    /// `PENDING`, `GENERATING`, `SUCCESS`, `GENERATE_COVER_FAILED` / `CREATE_TASK_FAILED`.
    Text,
    /// The integer as a string: `"1"`.
    NumericString,
}

/// The shape of record-info answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordStyle {
    pub flag: FlagForm,
    /// `response` as a JSON string instead of an object.
    pub response_as_string: bool,
    /// Omit `response` entirely (not only its images) unless the task succeeded.
    pub omit_response: bool,
}

/// How a forced error is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// HTTP 200 with `{"code": CODE, "msg": …}` (KIE's usual way).
    Envelope,
    /// HTTP CODE with `{"code": CODE, "msg": …}`.
    HttpStatus,
    /// HTTP CODE with a plain-text body (a proxy or Cloudflare answering).
    HttpPlain,
}

/// How download-url writes its `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UrlForm {
    /// `data` is the URL string.
    #[default]
    String,
    /// `data` is `{"url": …}`.
    ObjectUrl,
    /// `data` is `{"downloadUrl": …}`.
    ObjectDownloadUrl,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub endpoint: Endpoint,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Lower-case header names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// A query parameter, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

#[derive(Debug, Clone)]
pub struct Task {
    pub music_task_id: String,
    pub callback_url: Option<String>,
    pub status: Status,
}

struct Fault {
    endpoint: Endpoint,
    code: u16,
    delivery: Delivery,
    remaining: usize,
}

struct State {
    tasks: HashMap<String, Task>,
    by_music: HashMap<String, String>,
    counter: u64,
    requests: Vec<Recorded>,
    faults: Vec<Fault>,
    delays: Vec<(Endpoint, Duration)>,
    repeat_code: u16,
    not_found_code: u16,
    message_key: bool,
    style: RecordStyle,
    url_form: UrlForm,
    fresh: HashMap<String, String>,
    burst_limit: Option<usize>,
    api_key: Option<String>,
}

pub struct Api {
    addr: SocketAddr,
    state: Mutex<State>,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Api {
        Api {
            addr,
            state: Mutex::new(State {
                tasks: HashMap::new(),
                by_music: HashMap::new(),
                counter: 0,
                requests: Vec::new(),
                faults: Vec::new(),
                delays: Vec::new(),
                repeat_code: 409,
                not_found_code: 422,
                message_key: false,
                style: RecordStyle::default(),
                url_form: UrlForm::default(),
                fresh: HashMap::new(),
                burst_limit: None,
                api_key: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    // ---- tasks ----

    /// Registers a cover task (status pending), as if generate had created it.
    pub fn add_task(&self, task_id: &str, music_task_id: &str) {
        let mut st = self.state();
        st.by_music
            .insert(music_task_id.to_string(), task_id.to_string());
        st.tasks.insert(
            task_id.to_string(),
            Task {
                music_task_id: music_task_id.to_string(),
                callback_url: None,
                status: Status::Pending,
            },
        );
    }

    /// Sets a known task's status. Panics for an unknown task (a test bug).
    pub fn set_status(&self, task_id: &str, status: Status) {
        let mut st = self.state();
        let task = st
            .tasks
            .get_mut(task_id)
            .unwrap_or_else(|| panic!("fake KIE: no task {task_id}"));
        task.status = status;
    }

    pub fn task(&self, task_id: &str) -> Option<Task> {
        self.state().tasks.get(task_id).cloned()
    }

    /// The cover task made for a music task, if any.
    pub fn cover_task_for(&self, music_task_id: &str) -> Option<String> {
        self.state().by_music.get(music_task_id).cloned()
    }

    /// Every known cover task id.
    pub fn task_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.state().tasks.keys().cloned().collect();
        ids.sort();
        ids
    }

    // ---- behaviours ----

    /// The next `n` calls to `endpoint` answer `code` as HTTP 200 + error envelope.
    pub fn fail_next(&self, endpoint: Endpoint, code: u16, n: usize) {
        self.fail_next_with(endpoint, code, n, Delivery::Envelope);
    }

    /// The next `n` calls to `endpoint` answer `code`, delivered as `delivery`.
    pub fn fail_next_with(&self, endpoint: Endpoint, code: u16, n: usize, delivery: Delivery) {
        self.state().faults.push(Fault {
            endpoint,
            code,
            delivery,
            remaining: n,
        });
    }

    /// Answers to `endpoint` wait `delay` first (`Duration::ZERO` to stop).
    pub fn set_delay(&self, endpoint: Endpoint, delay: Duration) {
        let mut st = self.state();
        st.delays.retain(|(e, _)| *e != endpoint);
        if !delay.is_zero() {
            st.delays.push((endpoint, delay));
        }
    }

    /// The code a repeated generate for the same music task answers (409 or 400), with the
    /// existing cover task id in `data.taskId`.
    pub fn set_repeat_code(&self, code: u16) {
        self.state().repeat_code = code;
    }

    /// The envelope code record-info answers for unknown tasks (404 or 422).
    pub fn set_not_found_code(&self, code: u16) {
        self.state().not_found_code = code;
    }

    /// Write `message` instead of `msg` in every envelope.
    pub fn use_message_key(&self, on: bool) {
        self.state().message_key = on;
    }

    pub fn set_record_style(&self, style: RecordStyle) {
        self.state().style = style;
    }

    pub fn set_url_form(&self, form: UrlForm) {
        self.state().url_form = form;
    }

    /// download-url for `url` answers `fresh` (default: `base_url + "/fresh" + path`).
    pub fn set_fresh_url(&self, url: &str, fresh: &str) {
        self.state()
            .fresh
            .insert(url.to_string(), fresh.to_string());
    }

    /// When more than `limit` API calls arrive within 10 s, the extra ones answer 429.
    pub fn set_burst_limit(&self, limit: Option<usize>) {
        self.state().burst_limit = limit;
    }

    /// Demand `Authorization: Bearer KEY` (401 envelope otherwise). Default: accept any.
    pub fn require_api_key(&self, key: Option<&str>) {
        self.state().api_key = key.map(str::to_string);
    }

    // ---- observations ----

    /// Calls received for `endpoint` (`Endpoint::Any`: all API calls).
    pub fn calls(&self, endpoint: Endpoint) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| endpoint.matches(r.endpoint))
            .count()
    }

    /// Arrival times of the calls to `endpoint`.
    pub fn call_times(&self, endpoint: Endpoint) -> Vec<Instant> {
        self.state()
            .requests
            .iter()
            .filter(|r| endpoint.matches(r.endpoint))
            .map(|r| r.at)
            .collect()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    pub fn last_request(&self, endpoint: Endpoint) -> Option<Recorded> {
        self.state()
            .requests
            .iter()
            .rev()
            .find(|r| endpoint.matches(r.endpoint))
            .cloned()
    }

    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    // ---- serving ----

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let endpoint = Endpoint::of_path(parts.uri.path());
        let recorded = Recorded {
            endpoint,
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body,
            at: Instant::now(),
        };

        let delay = {
            let mut st = self.state();
            st.requests.push(recorded.clone());
            st.delays
                .iter()
                .find(|(e, _)| e.matches(endpoint))
                .map(|(_, d)| *d)
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }

        let mut st = self.state();
        if let Some(fault) = st
            .faults
            .iter_mut()
            .find(|f| f.remaining > 0 && f.endpoint.matches(endpoint))
        {
            fault.remaining -= 1;
            let (code, delivery) = (fault.code, fault.delivery);
            st.faults.retain(|f| f.remaining > 0);
            return forced(&st, code, delivery);
        }
        if let Some(key) = &st.api_key {
            if recorded.header("authorization") != Some(format!("Bearer {key}").as_str()) {
                return envelope(
                    &st,
                    StatusCode::OK,
                    401,
                    "You do not have access permissions",
                    Value::Null,
                );
            }
        }
        if let Some(limit) = st.burst_limit {
            let since = recorded.at.checked_sub(Duration::from_secs(10));
            let recent = st
                .requests
                .iter()
                .filter(|r| since.is_none_or(|s| r.at > s) && r.at <= recorded.at)
                .count();
            if recent > limit {
                return envelope(
                    &st,
                    StatusCode::OK,
                    429,
                    "Rate limited: too many requests",
                    Value::Null,
                );
            }
        }
        match (endpoint, parts.method.as_str()) {
            (Endpoint::Generate, "POST") => self.generate(&mut st, &recorded),
            (Endpoint::RecordInfo, "GET") => record_info(&st, &recorded),
            (Endpoint::DownloadUrl, "POST") => self.download_url(&st, &recorded),
            (Endpoint::Unknown, _) => envelope(
                &st,
                StatusCode::NOT_FOUND,
                404,
                "no such endpoint",
                Value::Null,
            ),
            _ => envelope(
                &st,
                StatusCode::METHOD_NOT_ALLOWED,
                405,
                "method not allowed",
                Value::Null,
            ),
        }
    }

    fn generate(&self, st: &mut State, req: &Recorded) -> Response<Body> {
        let body = req.json();
        let music = body
            .get("taskId")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let callback = body
            .get("callBackUrl")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if music.is_empty() || callback.is_empty() {
            return envelope(
                st,
                StatusCode::OK,
                422,
                "taskId and callBackUrl are required",
                Value::Null,
            );
        }
        // A failed generation may be requested again (KIE's 531: credits refunded).
        let failed = |st: &State, id: &str| {
            st.tasks.get(id).is_some_and(|t| {
                matches!(
                    t.status,
                    Status::Failed { .. } | Status::CreateFailed { .. }
                )
            })
        };
        if let Some(existing) = st.by_music.get(&music).cloned()
            && !failed(st, &existing)
        {
            let code = st.repeat_code;
            let msg = if code == 400 {
                "cover already generated for this task"
            } else {
                "record already exists"
            };
            return envelope(st, StatusCode::OK, code, msg, json!({"taskId": existing}));
        }
        st.counter += 1;
        let task_id = format!("c0ffee{:026x}", st.counter);
        st.by_music.insert(music.clone(), task_id.clone());
        st.tasks.insert(
            task_id.clone(),
            Task {
                music_task_id: music,
                callback_url: Some(callback),
                status: Status::Pending,
            },
        );
        envelope(
            st,
            StatusCode::OK,
            200,
            "success",
            json!({"taskId": task_id}),
        )
    }

    fn download_url(&self, st: &State, req: &Recorded) -> Response<Body> {
        let body = req.json();
        let Some(file_url) = body.get("url").and_then(Value::as_str) else {
            return envelope(st, StatusCode::OK, 400, "url is required", Value::Null);
        };
        let ours = url::Url::parse(file_url).ok().filter(|u| {
            u.host_str() == Some(self.addr.ip().to_string().as_str())
                && u.port() == Some(self.addr.port())
        });
        let Some(parsed) = ours else {
            return envelope(
                st,
                StatusCode::OK,
                422,
                "The URL is not a file generated by KIE",
                Value::Null,
            );
        };
        let fresh = st
            .fresh
            .get(file_url)
            .cloned()
            .unwrap_or_else(|| format!("{}/fresh{}", self.base_url(), parsed.path()));
        let data = match st.url_form {
            UrlForm::String => json!(fresh),
            UrlForm::ObjectUrl => json!({"url": fresh}),
            UrlForm::ObjectDownloadUrl => json!({"downloadUrl": fresh}),
        };
        envelope(st, StatusCode::OK, 200, "success", data)
    }
}

fn record_info(st: &State, req: &Recorded) -> Response<Body> {
    let task_id = req.query_param("taskId").unwrap_or_default();
    let Some(task) = st.tasks.get(&task_id) else {
        return envelope(
            st,
            StatusCode::OK,
            st.not_found_code,
            "record not found",
            Value::Null,
        );
    };
    let style = st.style;
    let (flag_int, flag_text, images, error_code, error_message) = match &task.status {
        Status::Pending => (0, "PENDING", None, Value::Null, Value::Null),
        Status::Generating => (2, "GENERATING", None, Value::Null, Value::Null),
        Status::Success(urls) => (1, "SUCCESS", Some(urls.clone()), json!(200), Value::Null),
        Status::Failed { code, message } => (
            3,
            "GENERATE_COVER_FAILED",
            None,
            json!(code),
            json!(message),
        ),
        Status::CreateFailed { code, message } => {
            (3, "CREATE_TASK_FAILED", None, json!(code), json!(message))
        }
    };
    let flag = match style.flag {
        FlagForm::Int => json!(flag_int),
        FlagForm::Text => json!(flag_text),
        FlagForm::NumericString => json!(flag_int.to_string()),
    };
    let response_obj = json!({"images": images});
    let response = if style.omit_response && images.is_none() {
        None
    } else if style.response_as_string {
        Some(json!(response_obj.to_string()))
    } else {
        Some(response_obj)
    };
    let mut data = json!({
        "taskId": task_id,
        "parentTaskId": task.music_task_id,
        "callbackUrl": task.callback_url,
        "createTime": "2026-11-27T10:33:01Z",
        "completeTime": if images.is_some() { json!("2026-11-27T10:35:01Z") } else { Value::Null },
        "successFlag": flag,
        "errorCode": error_code,
        "errorMessage": error_message,
        "someFutureField": {"ignored": true},
    });
    if let (Some(response), Some(obj)) = (response, data.as_object_mut()) {
        obj.insert("response".into(), response);
    }
    envelope(st, StatusCode::OK, 200, "success", data)
}

fn forced(st: &State, code: u16, delivery: Delivery) -> Response<Body> {
    let msg = match code {
        401 => "You do not have access permissions",
        402 => "Credits insufficient",
        404 => "Not found",
        409 => "Conflict",
        422 => "Validation error",
        429 => "Rate limited",
        455 => "Service unavailable: maintenance",
        500 => "Internal server error",
        _ => "forced error",
    };
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match delivery {
        Delivery::Envelope => envelope(st, StatusCode::OK, code, msg, Value::Null),
        Delivery::HttpStatus => envelope(st, status, code, msg, Value::Null),
        Delivery::HttpPlain => respond(
            status,
            "text/plain",
            Bytes::from(format!("error code: {code}")),
        ),
    }
}

fn envelope(st: &State, status: StatusCode, code: u16, msg: &str, data: Value) -> Response<Body> {
    let msg_key = if st.message_key { "message" } else { "msg" };
    let body = json!({"code": code, msg_key: msg, "data": data});
    respond(status, "application/json", Bytes::from(body.to_string()))
}

fn respond(status: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    let body: Body = Full::new(body).map_err(|e: Infallible| match e {}).boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}
