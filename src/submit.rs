//! `coverd submit`: asks KIE for the cover of a finished song, idempotently and crash-safely.
//! The intent is stored before KIE is called; a repeat for the same song returns the known
//! cover task; KIE's "already exists" answer (400/409 with a task id) is adopted; intents
//! left by a crash are resolved later by asking again (KIE then answers "already exists").
//! The other kinds (`submit music|wav|video|stems`, [`submit_kind`]) are never sent again
//! once sent: KIE would charge and generate again, so an outcome that is not known stays an
//! `unknown` intent (keyed by kind and source) that `admin intents` lists until dropped.
//! Owns this protocol, its answer ([`SubmitJson`]) and its errors ([`SubmitError`]); must
//! not poll, download, or know how the answer is printed or which exit code an error gets
//! (that is `admin`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::Config;
use crate::kie::{KieClient, KieError};
use crate::machine::{Ctx, Event, Origin};
use crate::model::{Failure, Kind, Millis, now_millis};
use crate::store::{IfMissing, IntentState, KindIntent, Store, StoreError};

/// What `coverd submit` answers (SPEC's JSON object).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SubmitJson {
    pub task_id: String,
    /// The song it was made from (`null` for a music task).
    pub music_task_id: Option<String>,
    /// The kind, for the kinds other than cover.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kind: Option<String>,
    /// The track a wav, video or stems task was made from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub audio_id: Option<String>,
    /// The intent's key (`admin intents`), for the kinds other than cover.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub intent: Option<String>,
}

/// A create request of a kind other than cover, as the command builds it: KIE's endpoint
/// (under `/api/v1/`) and body without `callBackUrl` (coverd adds its own), and the source it
/// is made from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct KindRequest {
    pub kind: String,
    pub endpoint: String,
    pub body: serde_json::Value,
    pub music_task_id: Option<String>,
    pub audio_id: Option<String>,
}

/// Largest request body `submit music` takes (KIE's prompts are a few KiB; the admin
/// socket takes 64 KiB in all).
pub const MAX_REQUEST_BYTES: usize = 32 * 1024;

impl KindRequest {
    /// The intent's key: `<kind>/<music task id>/<audio id>`, or for music
    /// `music/<first 16 hex of the sha256 of endpoint and body>` (the same request is the
    /// same intent).
    pub fn key(&self) -> String {
        match (&self.music_task_id, &self.audio_id) {
            (Some(m), Some(a)) if self.kind != "music" => format!("{}/{m}/{a}", self.kind),
            _ => {
                use sha2::Digest;
                let mut h = sha2::Sha256::new();
                h.update(self.endpoint.as_bytes());
                h.update(b"\n");
                h.update(self.body.to_string().as_bytes());
                let hex = hex::encode(h.finalize());
                format!("{}/{}", self.kind, &hex[..16])
            }
        }
    }

    /// Checks what the command or a peer sent: a known kind and one of its endpoints, ids
    /// that are valid, a JSON object body within bounds.
    pub fn check(&self) -> Result<Kind, SubmitError> {
        let bad = |why: String| Err(SubmitError::Usage(why));
        let Some(kind) = Kind::parse(&self.kind).filter(|k| *k != Kind::Cover) else {
            return bad(format!(
                "unknown kind {:?} to submit; use music, wav, video or stems (or a music task id for a cover)",
                self.kind
            ));
        };
        if !kind.describe().create.contains(&self.endpoint.as_str()) {
            return bad(format!(
                "{} is not an endpoint that creates a {} task; use one of: {}",
                self.endpoint,
                self.kind,
                kind.describe().create.join(", ")
            ));
        }
        for (what, id) in [
            ("music task id", &self.music_task_id),
            ("audio id", &self.audio_id),
        ] {
            if let Some(id) = id {
                crate::model::check_task_id(id, what).map_err(SubmitError::Usage)?;
            }
        }
        if kind != Kind::Music && (self.music_task_id.is_none() || self.audio_id.is_none()) {
            return bad(format!(
                "a {} task is made from a track: give its music task id and audio id",
                self.kind
            ));
        }
        if !self.body.is_object() || self.body.to_string().len() > MAX_REQUEST_BYTES {
            return bad(format!(
                "the request must be a JSON object of at most {MAX_REQUEST_BYTES} bytes"
            ));
        }
        Ok(kind)
    }
}

/// Why a submit did not record a task. Each message says what failed and what to do.
#[derive(thiserror::Error, Debug)]
pub enum SubmitError {
    /// The configuration does not allow it (no `public_url`, no API key, a key KIE refuses):
    /// fix it first.
    #[error("{0}")]
    Config(String),
    /// KIE did not create the cover, or it was not recorded; the message says who retries.
    #[error("{0}")]
    Failed(String),
    /// The request itself is wrong (unknown kind or endpoint, a bad id or body).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a submit needs: the store, the KIE client (`None` without an API key), the config
/// (`public_url`, the machine's context), the daemon's loops to wake after a change
/// (empty when no daemon runs in this process), and whether a daemon runs (which says who
/// retries a failed request).
pub struct Submitter<'a> {
    pub store: &'a Store,
    pub kie: Option<&'a KieClient>,
    pub config: &'a Config,
    pub wake: &'a [Arc<Notify>],
    pub daemon_running: bool,
}

impl Submitter<'_> {
    /// `public_url` and the KIE client, which every submit needs; else why not.
    fn ready(&self) -> Result<(&str, &KieClient), SubmitError> {
        let public_url = self.config.public_url.as_str();
        if public_url.is_empty() {
            return Err(SubmitError::Config(
                "cannot submit: `public_url` is not set, so KIE would have nowhere to send the callback; set public_url in the config file".into(),
            ));
        }
        let Some(kie) = self.kie else {
            return Err(SubmitError::Config(
                "cannot submit: no KIE API key; set kie.api_key, KIE_API_KEY, kie.api_key_file or the systemd credential kie-api-key".into(),
            ));
        };
        Ok((public_url, kie))
    }
}

/// Asks KIE for a cover of `music_task_id` unless one is already recorded.
pub async fn submit(
    exec: &Submitter<'_>,
    music_task_id: &str,
) -> Result<(SubmitJson, String), SubmitError> {
    let (public_url, kie) = exec.ready()?;
    let answer = |task_id: String, message: String| {
        Ok((
            SubmitJson {
                task_id,
                music_task_id: Some(music_task_id.to_string()),
                kind: None,
                audio_id: None,
                intent: None,
            },
            message,
        ))
    };
    if let Some(existing) = exec.store.record_intent(music_task_id, now_millis())? {
        if !failed_generation(exec.store, &existing) {
            return answer(
                existing,
                format!("a cover was already requested for {music_task_id}; not asking KIE again"),
            );
        }
        exec.store.force_intent(music_task_id, now_millis())?;
    }
    exec.store.flush().await?;
    let callback_url = format!("{public_url}/callbacks/cover");
    let (task_id, message) = resolve(exec.store, kie, music_task_id, &callback_url)
        .await
        .map_err(|e| {
            // Say who retries what: a refusal is dropped (nothing exists at KIE), anything
            // else is kept as an intent that the daemon asks KIE about again.
            let refused = matches!(
                e,
                KieError::Unauthorized
                    | KieError::NoCredits
                    | KieError::Invalid { .. }
                    | KieError::NoApiKey
            );
            let next = if refused {
                format!(
                    "nothing was created and nothing retries it; fix the cause, then run `coverd submit {music_task_id}` again"
                )
            } else if exec.daemon_running {
                format!(
                    "the request is remembered: the daemon asks KIE about it again within a few minutes, or run `coverd submit {music_task_id}` again"
                )
            } else {
                format!(
                    "the request is remembered: `coverd serve` asks KIE about it again once it runs, or run `coverd submit {music_task_id}` again"
                )
            };
            let message = format!("KIE did not create a cover for {music_task_id}: {e}; {next}");
            match e {
                // A key KIE refuses is a configuration error.
                KieError::Unauthorized | KieError::NoApiKey => SubmitError::Config(message),
                _ => SubmitError::Failed(message),
            }
        })?;
    record(exec, &task_id, music_task_id, now_millis()).await?;
    // The task is durable now, so the intent is resolved; a crash before this line leaves
    // an intent whose song has a task, which `resolve_intents` drops without calling KIE.
    if let Err(e) = exec.store.drop_intent(music_task_id) {
        tracing::warn!(
            task_id,
            music_task_id,
            "task {task_id} submitted for music task {music_task_id}, but its submit intent was not dropped: {e}; the daemon drops it later"
        );
    }
    answer(task_id, message)
}

/// Asks KIE for a task of a kind other than cover, at most once per intent (SPEC "Task
/// kinds"): the intent is stored durably first; a repeat answers the task already made, or
/// refuses while the earlier request's outcome is unknown; KIE's answer "already exists"
/// with a task id is adopted; a refusal drops the intent; anything that leaves the outcome
/// unknown (no answer, a 5xx, an answer we could not read) keeps it `unknown` and fails.
pub async fn submit_kind(
    exec: &Submitter<'_>,
    request: &KindRequest,
) -> Result<(SubmitJson, String), SubmitError> {
    let kind = request.check()?;
    let (public_url, kie) = exec.ready()?;
    let key = request.key();
    let answer = |task_id: String, message: String| {
        Ok((
            SubmitJson {
                task_id,
                music_task_id: request.music_task_id.clone(),
                kind: Some(kind.as_str().into()),
                audio_id: request.audio_id.clone(),
                intent: Some(key.clone()),
            },
            message,
        ))
    };
    let unknown_help = |detail: &str| {
        format!(
            "the outcome of the {} request {key} is unknown ({detail}), and sending it again would make KIE charge and generate again; check KIE's details for it, then `coverd admin track TASK_ID --kind {}` if KIE made it, and `coverd admin intents --drop {key}`",
            kind.as_str(),
            kind.as_str()
        )
    };
    let mut intent = KindIntent {
        key: key.clone(),
        kind,
        music_task_id: request.music_task_id.clone(),
        audio_id: request.audio_id.clone(),
        recorded_at: now_millis(),
        state: IntentState::Sending,
        task_id: None,
        detail: "sent; no answer recorded (the process stopped?)".into(),
    };
    // Recorded only if no submit of the same request did so before (or does so now).
    match exec.store.claim_kind_intent(&intent)? {
        Some(i) if i.state == IntentState::Done => {
            let task_id = i.task_id.unwrap_or_default();
            return answer(
                task_id.clone(),
                format!("{key} was already submitted: task {task_id}; not asking KIE again"),
            );
        }
        Some(i) => return Err(SubmitError::Failed(unknown_help(&i.detail))),
        None => {}
    }
    exec.store.flush().await?;
    let mut body = request.body.clone();
    if let Some(obj) = body.as_object_mut() {
        obj.insert(
            "callBackUrl".into(),
            format!("{public_url}/callbacks/{}", kind.as_str()).into(),
        );
    }
    let made = match kie.create(kind, &request.endpoint, &body, &key).await {
        Ok(id) => Ok((
            id,
            format!("KIE accepted the {} request {key}", kind.as_str()),
        )),
        Err(KieError::AlreadyExists { task_id }) => Ok((
            task_id,
            format!("KIE already had a task for {key}; adopted it"),
        )),
        Err(e) => Err(e),
    };
    let (task_id, message) = match made {
        Ok(made) => made,
        Err(e) if create_refused(&e) => {
            exec.store.drop_kind_intent(&key)?;
            exec.store.flush().await?;
            let message = format!(
                "KIE did not create the {} task {key}: {e}; nothing was created, fix the cause and submit again",
                kind.as_str()
            );
            return Err(match e {
                KieError::Unauthorized | KieError::NoApiKey => SubmitError::Config(message),
                _ => SubmitError::Failed(message),
            });
        }
        Err(e) => {
            intent.state = IntentState::Unknown;
            intent.detail = e.to_string();
            exec.store.put_kind_intent(&intent)?;
            exec.store.flush().await?;
            return Err(SubmitError::Failed(unknown_help(&intent.detail)));
        }
    };
    let ctx = Ctx::from_config(exec.config, now_millis());
    let event = Event::Submit(Origin {
        kind,
        music_task_id: request.music_task_id.clone(),
        audio_id: request.audio_id.clone(),
    });
    let applied = exec
        .store
        .apply_async(&task_id, event, ctx, IfMissing::Create)
        .await?
        .ok_or_else(|| SubmitError::Failed(format!("task {task_id} was not recorded")))?;
    exec.store.durable(applied.ticket).await?;
    crate::logline::record(&applied, tracing::Level::INFO);
    intent.state = IntentState::Done;
    intent.task_id = Some(task_id.clone());
    intent.detail = message.clone();
    exec.store.put_kind_intent(&intent)?;
    exec.store.flush().await?;
    for wake in exec.wake {
        wake.notify_one();
    }
    answer(task_id, message)
}

/// A create request KIE refused for sure: nothing was made, so the request may be sent again
/// later (a 409 without a task id included: KIE has the task, but did not say which).
fn create_refused(e: &KieError) -> bool {
    matches!(
        e,
        KieError::Unauthorized
            | KieError::NoCredits
            | KieError::Invalid { .. }
            | KieError::NoApiKey
            | KieError::RateLimited
            | KieError::Maintenance
            | KieError::Setup(_)
    )
}

/// Records `task_id` as submitted for `music_task_id`, waits until that is durable, logs it
/// and wakes the daemon's loops: the one path for `submit` and for the daemon resolving an
/// unfinished one. The caller drops the intent only after this returned.
async fn record(
    exec: &Submitter<'_>,
    task_id: &str,
    music_task_id: &str,
    now: Millis,
) -> Result<(), SubmitError> {
    let ctx = Ctx::from_config(exec.config, now);
    let event = Event::Submit(Origin::cover(Some(music_task_id.to_string())));
    let applied = exec
        .store
        .apply_async(task_id, event, ctx, IfMissing::Create)
        .await?
        .ok_or_else(|| {
            SubmitError::Failed(format!(
                "task {task_id} for music task {music_task_id} was not recorded; run `coverd submit {music_task_id}` again"
            ))
        })?;
    exec.store.durable(applied.ticket).await?;
    crate::logline::record(&applied, tracing::Level::INFO);
    for wake in exec.wake {
        wake.notify_one();
    }
    Ok(())
}

/// KIE allows a new request after a failed generation (531: credits refunded), so a song
/// whose cover task failed that way may be submitted again; any other task is the answer.
fn failed_generation(store: &Store, task_id: &str) -> bool {
    store
        .get(task_id)
        .ok()
        .flatten()
        .is_some_and(|t| matches!(t.failure, Some(Failure::Generation | Failure::NoResult)))
}

/// Calls KIE for one intent. On a definite refusal the intent is dropped (nothing exists at
/// KIE); on a transient failure it is kept, to be resolved by a later `submit` or the daemon.
async fn resolve(
    store: &Store,
    kie: &KieClient,
    music_task_id: &str,
    callback_url: &str,
) -> Result<(String, String), KieError> {
    match kie.generate_cover(music_task_id, callback_url).await {
        Ok(id) => Ok((
            id,
            format!("KIE accepted the cover request for {music_task_id}"),
        )),
        Err(KieError::AlreadyExists { task_id }) => Ok((
            task_id,
            format!("KIE already had a cover task for {music_task_id}; adopted it"),
        )),
        Err(e) => {
            // Only a clear refusal proves nothing was created. Anything else (transient, or
            // an answer we could not read) may hide a created cover: keep the intent, so a
            // later attempt gets KIE's "already exists" with its id.
            let refused = matches!(
                e,
                KieError::Unauthorized
                    | KieError::NoCredits
                    | KieError::Invalid { .. }
                    | KieError::NoApiKey
            );
            if refused {
                let _ = store.drop_intent(music_task_id);
            }
            Err(e)
        }
    }
}

/// Resolves intents older than `min_age_ms` that a crash (or a transient KIE failure) left
/// unresolved; called by the daemon's poller (which needs no wake-up: it is the one asking).
/// Returns how many were resolved.
pub async fn resolve_intents(
    store: &Store,
    kie: &KieClient,
    config: &Config,
    now: Millis,
    min_age_ms: i64,
) -> usize {
    let exec = Submitter {
        store,
        kie: Some(kie),
        config,
        wake: &[],
        daemon_running: true,
    };
    let public_url = config.public_url.as_str();
    if public_url.is_empty() {
        return 0;
    }
    let callback_url = format!("{public_url}/callbacks/cover");
    let Ok(intents) = store.intents(16) else {
        return 0;
    };
    let mut resolved = 0;
    for (music, at) in intents {
        if now - at < min_age_ms {
            continue;
        }
        // The task was recorded but the process stopped before the intent was dropped.
        if let Ok(Some(task_id)) = store.task_for_music(&music)
            && !failed_generation(store, &task_id)
        {
            tracing::info!(
                task_id,
                music_task_id = music,
                "task {task_id}: the unfinished submit for music task {music} was already recorded; dropping its intent"
            );
            if let Err(e) = store.drop_intent(&music) {
                tracing::error!(
                    music_task_id = music,
                    "music task {music}: resolved submit intent not dropped: {e}; tried again later"
                );
            }
            resolved += 1;
            continue;
        }
        match resolve(store, kie, &music, &callback_url).await {
            Ok((task_id, message)) => match record(&exec, &task_id, &music, now).await {
                Ok(()) => {
                    if let Err(e) = store.drop_intent(&music) {
                        tracing::error!(
                            music_task_id = music,
                            "music task {music}: resolved submit intent not dropped: {e}; tried again later"
                        );
                    }
                    resolved += 1;
                    tracing::info!(
                        task_id,
                        music_task_id = music,
                        "task {task_id} submitted: an unfinished submit resolved ({message})"
                    );
                }
                Err(e) => tracing::error!(
                    task_id,
                    music_task_id = music,
                    "task {task_id}: KIE made it for music task {music}, but it was not recorded: {e}; tried again later"
                ),
            },
            Err(e) => {
                tracing::warn!(
                    music_task_id = music,
                    "music task {music}: unfinished submit still unresolved: {e}; tried again in a minute"
                )
            }
        }
    }
    resolved
}
