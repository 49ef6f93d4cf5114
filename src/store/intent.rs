//! Intents (`intents`: music task id → when, see `codec::encode_intent`), covers requested
//! from KIE whose answer is not stored yet, so that `submit` can resolve a crash in between;
//! and `by_music`'s lookup, which makes `submit` idempotent. Must not call KIE or decide
//! what an intent becomes (`submit` does).

use super::error::StoreError;
use super::{Store, codec};
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
}
