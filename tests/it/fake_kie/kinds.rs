//! The fake KIE's other task kinds (SPEC "Task kinds", kie-api.md "Other Suno result
//! kinds"): every kind's create endpoints and details endpoint. A task's details are the
//! `data` object a test sets (so a test writes KIE's shapes itself: either spelling,
//! `successFlag` as text, `response` as a JSON string, a status coverd does not know);
//! creates are recorded, and a repeat for the same kind and source answers 409 (with or
//! without the existing task id) or, for a music create, always makes a new task.

// A shared fake: not every test uses every knob.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use coverd::model::Kind;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use super::Body;

/// One task of a kind other than cover.
#[derive(Debug, Clone)]
pub struct KindTask {
    pub kind: Kind,
    /// The create request's body, as sent.
    pub request: Value,
    /// What the details endpoint answers in `data`.
    pub details: Value,
}

#[derive(Default)]
struct State {
    tasks: HashMap<String, KindTask>,
    /// (kind, music task id, audio id) → task id, for 409 on a repeat.
    by_source: HashMap<(Kind, String, String), String>,
    counter: u64,
    /// (path, body) of every create request.
    creates: Vec<(String, Value)>,
    /// Details requests per task id.
    details_calls: HashMap<String, usize>,
    /// A 409 on a repeat leaves out the existing task id (KIE's WAV page does not promise it).
    repeat_without_id: bool,
    /// The next create requests answer this code (one per call), e.g. 500.
    fail_creates: Vec<u16>,
}

pub struct Kinds {
    state: Mutex<State>,
}

impl Default for Kinds {
    fn default() -> Kinds {
        Kinds::new()
    }
}

impl Kinds {
    pub fn new() -> Kinds {
        Kinds {
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kind and whether it is a create, for a path this fake serves.
    pub fn route(path: &str) -> Option<(Kind, bool)> {
        let rest = path.strip_prefix("/api/v1/")?;
        Kind::ALL
            .into_iter()
            .filter(|k| *k != Kind::Cover)
            .find_map(|k| {
                let d = k.describe();
                if d.create.contains(&rest) {
                    Some((k, true))
                } else if d.details == rest {
                    Some((k, false))
                } else {
                    None
                }
            })
    }

    /// Registers a pending task of `kind` (as if it had been created elsewhere).
    pub fn add(&self, kind: Kind, task_id: &str) {
        self.state().tasks.insert(
            task_id.to_string(),
            KindTask {
                kind,
                request: Value::Null,
                details: pending_details(kind, task_id),
            },
        );
    }

    /// What the details endpoint answers for `task_id` from now on.
    pub fn set_details(&self, task_id: &str, details: Value) {
        let mut st = self.state();
        let task = st
            .tasks
            .get_mut(task_id)
            .unwrap_or_else(|| panic!("fake KIE: no task {task_id}"));
        task.details = details;
    }

    pub fn task(&self, task_id: &str) -> Option<KindTask> {
        self.state().tasks.get(task_id).cloned()
    }

    pub fn details_calls(&self, task_id: &str) -> usize {
        self.state()
            .details_calls
            .get(task_id)
            .copied()
            .unwrap_or(0)
    }

    /// Every create request: (path, body).
    pub fn creates(&self) -> Vec<(String, Value)> {
        self.state().creates.clone()
    }

    pub fn set_repeat_without_id(&self, on: bool) {
        self.state().repeat_without_id = on;
    }

    /// The next create requests answer these codes, one each (then creates work again).
    pub fn fail_creates(&self, codes: &[u16]) {
        self.state().fail_creates = codes.to_vec();
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path().to_string();
        let Some((kind, create)) = Kinds::route(&path) else {
            return envelope(StatusCode::NOT_FOUND, 404, "no such endpoint", Value::Null);
        };
        let mut st = self.state();
        if create {
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            st.creates.push((path.clone(), body.clone()));
            if !st.fail_creates.is_empty() {
                let code = st.fail_creates.remove(0);
                return envelope(StatusCode::OK, code, "forced error", Value::Null);
            }
            let text = |k: &str| {
                body.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            // A repeat of a track's WAV, video or stems answers 409; a music create always
            // makes a new task.
            let source = (kind != Kind::Music).then(|| (kind, text("taskId"), text("audioId")));
            if let Some(existing) = source.as_ref().and_then(|s| st.by_source.get(s)).cloned() {
                let data = if st.repeat_without_id {
                    Value::Null
                } else {
                    json!({"taskId": existing})
                };
                return envelope(StatusCode::OK, 409, "record already exists", data);
            }
            st.counter += 1;
            let id = format!("{}{:024x}", &kind.as_str()[..3], st.counter);
            if let Some(source) = source {
                st.by_source.insert(source, id.clone());
            }
            st.tasks.insert(
                id.clone(),
                KindTask {
                    kind,
                    request: body,
                    details: pending_details(kind, &id),
                },
            );
            return envelope(StatusCode::OK, 200, "success", json!({"taskId": id}));
        }
        let task_id = parts
            .uri
            .query()
            .and_then(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "taskId")
                    .map(|(_, v)| v.into_owned())
            })
            .unwrap_or_default();
        *st.details_calls.entry(task_id.clone()).or_default() += 1;
        match st.tasks.get(&task_id) {
            Some(t) if t.kind == kind => {
                envelope(StatusCode::OK, 200, "success", t.details.clone())
            }
            _ => envelope(StatusCode::OK, 422, "record not found", Value::Null),
        }
    }
}

/// A pending task's details, in the kind's own status field.
pub fn pending_details(kind: Kind, task_id: &str) -> Value {
    match kind {
        Kind::Music => json!({"taskId": task_id, "status": "PENDING", "response": null}),
        _ => json!({"taskId": task_id, "successFlag": "PENDING", "response": null}),
    }
}

fn envelope(status: StatusCode, code: u16, msg: &str, data: Value) -> Response<Body> {
    let body = json!({"code": code, "msg": msg, "data": data}).to_string();
    let body: Body = http_body_util::Full::new(Bytes::from(body))
        .map_err(|e: std::convert::Infallible| match e {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
