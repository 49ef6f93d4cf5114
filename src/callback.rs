//! Callback intake: turns one `POST /callbacks/<kind>` body into a durable state-machine
//! event and SPEC's answer (200 only after the delivery is flushed). Owns parsing KIE's cover
//! callback JSON (the other kinds' are read by `kind::read`), signature checks and the answer
//! codes; must not read sockets (that is `server`) or download anything (it only wakes
//! `download`).

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use hyper::header::HeaderMap;
use serde_json::Value;
use tokio::sync::Notify;

use crate::config::Config;
use crate::kind::read::Reading;
use crate::machine::{Ctx, Event, Report};
use crate::model::{Kind, MAX_IMAGES, MAX_URL_BYTES, TASK_ID_RULE, now_millis, valid_task_id};
use crate::signature;
use crate::store::{IfMissing, Store, StoreError};

/// Largest accepted callback body (SPEC: 413 above it).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Storing and flushing a delivery must finish well inside KIE's 15 s, or the answer is 503.
const STORE_BUDGET: Duration = Duration::from_secs(10);

/// An HTTP answer: status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
}

impl Answer {
    pub fn received() -> Answer {
        Answer {
            status: StatusCode::OK,
            body: r#"{"status":"received"}"#.into(),
        }
    }

    pub fn error(status: StatusCode, message: impl AsRef<str>) -> Answer {
        Answer {
            status,
            body: serde_json::json!({ "error": message.as_ref() }).to_string(),
        }
    }
}

/// A parsed delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub task_id: String,
    pub report: Report,
}

/// Parses a callback body of `kind` (SPEC "Task kinds"): a cover's by [`parse`], the
/// others' by `kind::read`.
pub fn parse_for(kind: Kind, body: &[u8]) -> Result<Delivery, String> {
    if kind == Kind::Cover {
        return parse(body);
    }
    let read = crate::kind::read::callback(kind, body)?;
    safe_task_id(&read.task_id)?;
    let report = match read.reading {
        Reading::Success { files } => Report::Success { files },
        Reading::Failure { reason } => Report::Failure { reason },
        Reading::Pending { stage, unknown } => Report::Stage {
            stage: stage.or(unknown).unwrap_or_else(|| "pending".into()),
        },
    };
    Ok(Delivery {
        task_id: read.task_id,
        report,
    })
}

/// A callback's task id names a directory: only a safe one (400 otherwise).
fn safe_task_id(task_id: &str) -> Result<(), String> {
    if valid_task_id(task_id) {
        Ok(())
    } else {
        Err(format!("task id must be {TASK_ID_RULE}"))
    }
}

/// Parses a cover callback body: the task id from `data.taskId`, `taskId`, `task_id` or
/// `data.task_id` (in that order), `code` (number or numeric string), `msg` or `message`,
/// `data.images`.
pub fn parse(body: &[u8]) -> Result<Delivery, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("body is not a JSON object".into());
    }
    let data = v.get("data");
    let task_id = [
        data.and_then(|d| d.get("taskId")),
        v.get("taskId"),
        v.get("task_id"),
        data.and_then(|d| d.get("task_id")),
    ]
    .into_iter()
    .flatten()
    .find_map(Value::as_str)
    .ok_or("no task id (looked for data.taskId, taskId, task_id, data.task_id)")?;
    safe_task_id(task_id)?;
    let images = match data.and_then(|d| d.get("images")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_IMAGES {
                return Err(format!("more than {MAX_IMAGES} images"));
            }
            items
                .iter()
                .map(|i| match i.as_str() {
                    Some(s) if !s.is_empty() && s.len() <= MAX_URL_BYTES => Ok(s.to_string()),
                    Some(_) => Err(format!(
                        "an image URL is empty or longer than {MAX_URL_BYTES} bytes"
                    )),
                    None => Err("data.images must hold strings".to_string()),
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => return Err("data.images must be an array or null".into()),
    };
    let code = match v.get("code") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        None if !images.is_empty() => Some(200),
        _ => None,
    }
    .ok_or("no numeric code")?;
    let msg = [v.get("msg"), v.get("message")]
        .into_iter()
        .flatten()
        .find_map(Value::as_str)
        .unwrap_or("");
    let msg: String = msg.chars().take(500).collect();
    Ok(Delivery {
        task_id: task_id.to_string(),
        report: Report::from_callback(code, &msg, images),
    })
}

/// Everything the intake needs, shared by all connections.
pub struct Intake {
    pub store: Store,
    pub config: Arc<Config>,
    /// Woken when a task becomes ready to download.
    pub downloads: Arc<Notify>,
}

impl Intake {
    /// Handles one complete callback body that came on the route of `kind`.
    pub async fn handle(&self, kind: Kind, headers: &HeaderMap, body: &[u8]) -> Answer {
        let delivery = match parse_for(kind, body) {
            Ok(d) => d,
            Err(reason) => {
                tracing::warn!("{} callback rejected (400): {reason}", kind.as_str());
                return Answer::error(StatusCode::BAD_REQUEST, reason);
            }
        };
        let task_id = delivery.task_id.as_str();
        if let Some(key) = &self.config.kie.webhook_hmac_key {
            let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            if let Err(e) = signature::verify(
                key.expose().as_bytes(),
                task_id,
                header("x-webhook-timestamp"),
                header("x-webhook-signature"),
                now_millis() / 1000,
                self.config.kie.signature_tolerance,
            ) {
                tracing::warn!(task_id, "task {task_id} callback rejected (401): {e}");
                return Answer::error(
                    StatusCode::UNAUTHORIZED,
                    format!("signature check failed: {e}"),
                );
            }
        }
        let if_missing = if_missing(&self.config);
        let ctx = Ctx::from_config(&self.config, now_millis());
        // Storing and flushing share one budget, so the answer is always well inside KIE's 15 s.
        let deadline = tokio::time::Instant::now() + STORE_BUDGET;
        let too_slow = || {
            tracing::warn!(
                task_id,
                "task {task_id} callback answered 503: the store did not take it within {STORE_BUDGET:?}; KIE retries"
            );
            Answer::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store too slow; retry later",
            )
        };
        // A full writer queue is refused at once (503, KIE retries), never waited on.
        let stored = self.store.try_apply_async(
            task_id,
            Event::Callback(kind, delivery.report.clone()),
            ctx,
            if_missing,
        );
        let Ok(stored) = tokio::time::timeout_at(deadline, stored).await else {
            return too_slow();
        };
        let applied = match stored {
            Ok(Some(applied)) => applied,
            Ok(None) => {
                let report = match &delivery.report {
                    Report::Success { files } => format!("success with {} file(s)", files.len()),
                    Report::Failure { reason } => format!("failure: {reason}"),
                    Report::Stage { stage } => format!("`{stage}` stage"),
                };
                let track = match kind {
                    Kind::Cover => String::new(),
                    k => format!(" --kind {}", k.as_str()),
                };
                tracing::warn!(
                    task_id,
                    "task {task_id} {} callback rejected (404): unknown task ({report}); not submitted or tracked here, and accept_unknown_tasks = false; `coverd admin track {task_id}{track}` accepts its next delivery",
                    kind.as_str()
                );
                return Answer::error(
                    StatusCode::NOT_FOUND,
                    format!("unknown task {task_id}: not submitted or tracked here"),
                );
            }
            Err(e) if e.is_undecodable() => {
                return self.keep_aside(kind, task_id, body, &e, deadline).await;
            }
            Err(e @ StoreError::WrongKind { .. }) => {
                tracing::warn!(task_id, "task {task_id} callback rejected (409): {e}");
                return Answer::error(StatusCode::CONFLICT, e.to_string());
            }
            Err(e @ StoreError::Busy { .. }) => {
                tracing::warn!(
                    task_id,
                    "task {task_id} callback answered 503: not stored: {e}; KIE retries"
                );
                return Answer::error(StatusCode::SERVICE_UNAVAILABLE, "store busy; retry later");
            }
            Err(e) => {
                tracing::warn!(
                    task_id,
                    "task {task_id} callback answered 503: not stored: {e}"
                );
                return Answer::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store unavailable; retry later",
                );
            }
        };
        // The writer answers after the flush covering the update: this returns at once.
        match tokio::time::timeout_at(deadline, self.store.durable(applied.ticket)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(
                    task_id,
                    "task {task_id} callback answered 503: not flushed to disk: {e}"
                );
                return Answer::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store unavailable; retry later",
                );
            }
            Err(_) => return too_slow(),
        }
        crate::logline::record(&applied, tracing::Level::INFO);
        let task = &applied.task;
        if task.download_due().is_some() {
            self.downloads.notify_one();
        }
        Answer::received()
    }

    /// A delivery for a task whose record cannot be decoded (quarantined): kept aside
    /// durably as it arrived (200), to be applied once the record can be read
    /// ([`replay_parked`]). A 503 would have KIE retry three times and then drop it.
    async fn keep_aside(
        &self,
        kind: Kind,
        task_id: &str,
        body: &[u8],
        why: &StoreError,
        deadline: tokio::time::Instant,
    ) -> Answer {
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::warn!(
                task_id,
                "task {task_id} callback answered 503: its record cannot be read ({why}) and the delivery could not be kept aside: {e}"
            );
            Answer::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable; retry later",
            )
        };
        if let Err(e) = self.store.park(task_id, kind.as_str(), body, now_millis()) {
            return unavailable(&e);
        }
        match tokio::time::timeout_at(deadline, self.store.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return unavailable(&e),
            Err(_) => return unavailable(&"the store did not flush it in time"),
        }
        tracing::warn!(
            task_id,
            "task {task_id} callback kept aside: its record cannot be read ({why}); applied once it can (after an upgrade or a repair)"
        );
        Answer::received()
    }
}

/// What a delivery for a task never submitted or tracked here does: creates it only with
/// `accept_unknown_tasks`, else is refused (404). The same for a kept-aside one.
fn if_missing(config: &Config) -> IfMissing {
    if config.accept_unknown_tasks {
        IfMissing::Create
    } else {
        IfMissing::Reject
    }
}

/// Applies the callbacks kept aside for quarantined records whose record can be read now
/// (after an upgrade or a repair), in arrival order, each durably before it is forgotten;
/// those whose record still cannot be read stay. A crash in between applies one again,
/// which is a duplicate callback: harmless. Runs at the daemon's start, before the
/// workers. Returns how many were applied.
pub async fn replay_parked(store: &Store, config: &Config) -> Result<usize, StoreError> {
    let mut applied = 0;
    let mut next = store.parked_after(None)?;
    // The intake keeps at most MAX_PARKED; a tree holding more came from elsewhere (a
    // backup): the rest waits for the next start.
    for _ in 0..crate::store::MAX_PARKED {
        let Some(parked) = next.take() else {
            break;
        };
        next = store.parked_after(Some(&parked))?;
        let task_id = parked.task_id.as_str();
        match store.get(task_id) {
            Err(e) if e.is_undecodable() => continue,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let Some(kind) = Kind::parse(&parked.route) else {
            // A route of a newer coverd: left for it.
            continue;
        };
        // Never more than the intake takes: a larger body did not come through it.
        let delivery = if parked.body.len() <= MAX_BODY_BYTES {
            parse_for(kind, &parked.body)
        } else {
            Err(format!("{} bytes", parked.body.len()))
        };
        match delivery {
            Ok(delivery) if delivery.task_id == task_id => {
                let ctx = Ctx::from_config(config, now_millis());
                let event = Event::Callback(kind, delivery.report);
                match store
                    .apply_async(task_id, event, ctx, if_missing(config))
                    .await
                {
                    Ok(Some(done)) => {
                        store.durable(done.ticket).await?;
                        crate::logline::record(&done, tracing::Level::INFO);
                        applied += 1;
                    }
                    Err(e @ StoreError::WrongKind { .. }) => tracing::warn!(
                        task_id,
                        "task {task_id}: a callback kept aside was dropped: {e}"
                    ),
                    Err(e) => return Err(e),
                    Ok(None) => tracing::warn!(
                        task_id,
                        "task {task_id}: a callback kept aside was dropped: the task is no longer known here"
                    ),
                }
            }
            _ => tracing::warn!(
                task_id,
                "task {task_id}: a callback kept aside was dropped: it no longer parses as this task's callback"
            ),
        }
        store.unpark(&parked)?;
    }
    store.flush().await?;
    if applied > 0 {
        tracing::info!(
            applied,
            "applied {applied} callback(s) kept aside while their records could not be read"
        );
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Delivery {
        parse(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    #[test]
    fn task_id_locations_in_order() {
        assert_eq!(
            ok(r#"{"code":200,"data":{"taskId":"a","task_id":"c"},"taskId":"b"}"#).task_id,
            "a"
        );
        assert_eq!(
            ok(r#"{"code":200,"data":{"task_id":"c"},"taskId":"b"}"#).task_id,
            "b"
        );
        assert_eq!(ok(r#"{"code":200,"data":{"task_id":"c"}}"#).task_id, "c");
    }

    #[test]
    fn reports() {
        let d = ok(
            r#"{"code":200,"msg":"success","data":{"taskId":"t","images":["https://h/a.png","https://h/b.png"]}}"#,
        );
        assert_eq!(
            d.report,
            Report::images(vec!["https://h/a.png".into(), "https://h/b.png".into()])
        );
        let d = ok(
            r#"{"code":501,"msg":"Cover generation failed","data":{"taskId":"t","images":null}}"#,
        );
        assert_eq!(
            d.report,
            Report::Failure {
                reason: "KIE code 501: Cover generation failed".into()
            }
        );
        let d = ok(r#"{"code":"531","message":"refunded","data":{"taskId":"t"}}"#);
        assert_eq!(
            d.report,
            Report::Failure {
                reason: "KIE code 531: refunded".into()
            }
        );
    }

    #[test]
    fn rejections() {
        let many = format!(
            r#"{{"code":200,"data":{{"taskId":"t","images":[{}]}}}}"#,
            vec!["\"https://h/x.png\""; MAX_IMAGES + 1].join(",")
        );
        for bad in [
            "",
            "not json",
            "[1,2]",
            r#"{"code":200}"#,
            r#"{"code":200,"data":{"taskId":7}}"#,
            r#"{"code":200,"data":{"taskId":"../../etc"}}"#,
            r#"{"code":200,"data":{"taskId":"t","images":"x"}}"#,
            r#"{"code":200,"data":{"taskId":"t","images":[1]}}"#,
            r#"{"data":{"taskId":"t"}}"#,
            many.as_str(),
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    /// Hostile bodies get an answer, never a panic: random bytes and random mutations of a
    /// valid delivery (seeded, repeatable).
    #[test]
    fn parse_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let valid = br#"{"code":200,"msg":"success","data":{"taskId":"t1","images":["https://h/a.png","https://h/b.png"]}}"#;
        for _ in 0..20_000 {
            let mut body = valid.to_vec();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..body.len());
                match rng.random_range(0..3) {
                    0 => body[at] = rng.random(),
                    1 => {
                        body.remove(at);
                    }
                    _ => body.insert(at, rng.random()),
                }
                if body.is_empty() {
                    break;
                }
            }
            if let Ok(d) = parse(&body) {
                assert!(valid_task_id(&d.task_id), "{d:?}");
            }
            let noise: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            let _ = parse(&noise);
        }
    }
}
