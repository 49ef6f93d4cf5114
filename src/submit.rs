//! `coverd submit`: asks KIE for the cover of a finished song, idempotently and crash-safely.
//! The intent is stored before KIE is called; a repeat for the same song returns the known
//! cover task; KIE's "already exists" answer (400/409 with a task id) is adopted; intents
//! left by a crash are resolved later by asking again (KIE then answers "already exists").
//! Owns this protocol only; must not poll or download.

use crate::admin::{AdminError, Exec, SubmitJson};
use crate::kie::{KieClient, KieError};
use crate::machine::Event;
use crate::model::{Failure, now_millis};
use crate::store::{IfMissing, Store};

/// Asks KIE for a cover of `music_task_id` unless one is already recorded.
pub async fn submit(exec: &Exec, music_task_id: &str) -> Result<(SubmitJson, String), AdminError> {
    let public_url = exec.config.public_url.as_str();
    if public_url.is_empty() {
        return Err(AdminError::usage(
            "cannot submit: `public_url` is not set, so KIE would have nowhere to send the callback; set public_url in the config file",
        ));
    }
    let Some(kie) = &exec.kie else {
        return Err(AdminError::usage(
            "cannot submit: no KIE API key; set kie.api_key, KIE_API_KEY, kie.api_key_file or the systemd credential kie-api-key",
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
        if !failed_generation(&exec.store, &existing) {
            return answer(
                existing,
                format!("a cover was already requested for {music_task_id}; not asking KIE again"),
            );
        }
        exec.store.force_intent(music_task_id, now_millis())?;
    }
    exec.store.flush().await?;
    let callback_url = format!("{public_url}/callbacks/cover");
    let (task_id, message) = resolve(&exec.store, kie, music_task_id, &callback_url)
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
                KieError::Unauthorized | KieError::NoApiKey => AdminError::usage(message),
                _ => AdminError::missing(message),
            }
        })?;
    let event = Event::Submit {
        music_task_id: Some(music_task_id.to_string()),
    };
    exec.apply(&task_id, event, IfMissing::Create).await?;
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
/// unresolved; called by the daemon's poller. Returns how many were resolved.
pub async fn resolve_intents(
    store: &Store,
    kie: &KieClient,
    exec_config: &crate::config::Config,
    now: crate::model::Millis,
    min_age_ms: i64,
) -> usize {
    let public_url = exec_config.public_url.as_str();
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
            Ok((task_id, message)) => {
                let ctx = crate::machine::Ctx::from_config(exec_config, now);
                let event = Event::Submit {
                    music_task_id: Some(music.clone()),
                };
                match store
                    .apply_async(&task_id, event, ctx, IfMissing::Create)
                    .await
                {
                    Ok(_) => {
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
                }
            }
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
