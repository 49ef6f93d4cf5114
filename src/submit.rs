//! `coverd submit`: asks KIE for the cover of a finished song, idempotently and crash-safely.
//! The intent is stored before KIE is called; a repeat for the same song returns the known
//! cover task; KIE's "already exists" answer (400/409 with a task id) is adopted; intents
//! left by a crash are resolved later by asking again (KIE then answers "already exists").
//! Owns this protocol, its answer ([`SubmitJson`]) and its errors ([`SubmitError`]); must
//! not poll, download, or know how the answer is printed or which exit code an error gets
//! (that is `admin`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::Config;
use crate::kie::{KieClient, KieError};
use crate::machine::{Ctx, Event, Origin};
use crate::model::{Failure, Millis, now_millis};
use crate::store::{IfMissing, Store, StoreError};

/// What `coverd submit` answers (SPEC's JSON object).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SubmitJson {
    pub task_id: String,
    pub music_task_id: String,
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

/// Asks KIE for a cover of `music_task_id` unless one is already recorded.
pub async fn submit(
    exec: &Submitter<'_>,
    music_task_id: &str,
) -> Result<(SubmitJson, String), SubmitError> {
    let public_url = exec.config.public_url.as_str();
    if public_url.is_empty() {
        return Err(SubmitError::Config(
            "cannot submit: `public_url` is not set, so KIE would have nowhere to send the callback; set public_url in the config file".into(),
        ));
    }
    let Some(kie) = exec.kie else {
        return Err(SubmitError::Config(
            "cannot submit: no KIE API key; set kie.api_key, KIE_API_KEY, kie.api_key_file or the systemd credential kie-api-key".into(),
        ));
    };
    let answer = |task_id: String, message: String| {
        Ok((
            SubmitJson {
                task_id,
                music_task_id: music_task_id.to_string(),
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
