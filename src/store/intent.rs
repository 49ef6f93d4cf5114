//! Intents (`intents`: music task id → when, see `codec::encode_intent`), covers requested
//! from KIE whose answer is not stored yet, so that `submit` can resolve a crash in between;
//! `by_music`'s lookup, which makes `submit` idempotent; and the other kinds' intents
//! (`kind_intents`: keyed by kind and source, each a [`KindIntent`]). Must not call KIE or
//! decide what an intent becomes (`submit` does).

use super::error::StoreError;
use super::{IntentState, KindIntent, Store, codec};
use crate::model::Millis;

impl Store {
    /// The cover task recorded for a music task, if any.
    pub fn task_for_music(&self, music_task_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .inner
            .by_music
            .get(music_task_id.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records that a cover for `music_task_id` is about to be requested from KIE, so a crash
    /// before KIE's answer is stored can be resolved later (see `submit`). Returns the cover
    /// task already recorded for that song instead, if there is one.
    pub fn record_intent(
        &self,
        music_task_id: &str,
        now: Millis,
    ) -> Result<Option<String>, StoreError> {
        if let Some(existing) = self.task_for_music(music_task_id)? {
            return Ok(Some(existing));
        }
        self.inner
            .intents
            .insert(music_task_id.as_bytes(), &codec::encode_intent(now))?;
        Ok(None)
    }

    /// Records an intent even though the song has a (failed) cover task: a new request.
    pub fn force_intent(&self, music_task_id: &str, now: Millis) -> Result<(), StoreError> {
        self.inner
            .intents
            .insert(music_task_id.as_bytes(), &codec::encode_intent(now))?;
        Ok(())
    }

    /// Forgets an intent whose request KIE refused for good (nothing was created).
    pub fn drop_intent(&self, music_task_id: &str) -> Result<(), StoreError> {
        self.inner.intents.remove(music_task_id.as_bytes())?;
        Ok(())
    }

    /// Unresolved intents (music task id, recorded at), at most `limit`.
    pub fn intents(&self, limit: usize) -> Result<Vec<(String, Millis)>, StoreError> {
        self.inner
            .intents
            .iter()
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    codec::decode_intent(&v),
                ))
            })
            .collect()
    }

    /// Writes (or replaces) an intent; durable after the next flush.
    pub fn put_kind_intent(&self, intent: &KindIntent) -> Result<(), StoreError> {
        let bytes = codec::encode_kind_intent(intent).map_err(|e| StoreError::Corrupt {
            what: format!("intent {}", intent.key),
            reason: e.to_string(),
        })?;
        self.inner
            .kind_intents
            .insert(intent.key.as_bytes(), bytes)?;
        Ok(())
    }

    /// Records `intent` unless one is already stored under its key, atomically (two submits
    /// of the same request at once: one sends it, the other finds the first's intent).
    /// Returns the intent already there, if any; durable after the next flush.
    pub fn claim_kind_intent(&self, intent: &KindIntent) -> Result<Option<KindIntent>, StoreError> {
        let bytes = codec::encode_kind_intent(intent).map_err(|e| StoreError::Corrupt {
            what: format!("intent {}", intent.key),
            reason: e.to_string(),
        })?;
        match self.inner.kind_intents.compare_and_swap(
            intent.key.as_bytes(),
            None::<&[u8]>,
            Some(bytes),
        )? {
            Ok(()) => Ok(None),
            Err(e) => match e.current {
                Some(current) => decode_kind_intent(&intent.key, &current).map(Some),
                // Removed between the look and the swap: nothing was there to keep.
                None => Ok(None),
            },
        }
    }

    /// Forgets an intent; whether there was one.
    pub fn drop_kind_intent(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.inner.kind_intents.remove(key.as_bytes())?.is_some())
    }

    /// The intents of the other kinds that are not done (their outcome unknown), at most
    /// `limit`, in key order.
    pub fn unknown_kind_intents(&self, limit: usize) -> Result<Vec<KindIntent>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.kind_intents.iter() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let intent = decode_kind_intent(&key, &v)?;
            if intent.state != IntentState::Done {
                out.push(intent);
            }
        }
        Ok(out)
    }
}

fn decode_kind_intent(key: &str, bytes: &[u8]) -> Result<KindIntent, StoreError> {
    codec::decode_kind_intent(key, bytes).map_err(|e| StoreError::Corrupt {
        what: format!("intent {key}"),
        reason: e.to_string(),
    })
}
