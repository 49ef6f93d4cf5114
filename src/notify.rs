//! Outbound notifications: delivers the store's outbox (`due_notify` index) to `notify.url`,
//! signed as Standard Webhooks specifies, with bounded concurrency (`schedule::run_bounded`),
//! timeouts and jittered exponential backoff. Owns the HTTP client of notifications and the signing; must not
//! create notifications (a settle enqueues them in `store::apply`) or decide their state
//! (`machine::notify_attempted`).
//!
//! Delivery is at least once: a notification stays due until an attempt's result is
//! recorded, so a crash mid-attempt sends it again after the restart, with the same
//! `webhook-id` and body (both fixed when it was enqueued).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, notify_key};
use crate::machine::Delivery;
use crate::metrics::Metrics;
use crate::model::{Clock, Millis, NotifyState, millis, now_millis};
use crate::retry::{Backoff, Jitter, NoAnswer};
use crate::schedule::{self, DueWork, Finished, Names, Scheduler};
use crate::store::{Store, StoreError};

/// Deliveries in flight at once.
pub const CONCURRENCY: usize = 4;
/// The wait before the next attempt after `n` failed ones: 5 s × 2^(n-1) with ±20 % jitter,
/// never under 5 s nor over 1 h, so a receiver coming back is not hit by every queued
/// notification at once.
pub const BACKOFF: Backoff = Backoff {
    base: Duration::from_secs(5),
    max: Duration::from_secs(3600),
    jitter: Jitter::Proportional(0.2),
};

/// [`BACKOFF`], or (TEST ONLY: `COVERD_TEST_NOTIFY_BACKOFF`, `broken::notify_backoff`) the
/// same shape from a shorter base, at most 720 times it (as 1 h is to 5 s).
pub fn backoff() -> Backoff {
    match crate::broken::notify_backoff() {
        Some(base) => short_backoff(base),
        None => BACKOFF,
    }
}

fn short_backoff(base: Duration) -> Backoff {
    Backoff {
        base,
        max: base.saturating_mul(720).min(BACKOFF.max).max(base),
        jitter: BACKOFF.jitter,
    }
}
/// Deliveries abandoned at shutdown are sent again at the next start (same webhook-id).
const NAMES: Names = Names {
    what: "notifications",
    index: "the notification outbox",
    abandoned: "they are sent again at the next start",
};
/// After a store error, a delivery slot waits this long before its notification is looked
/// at again.
const STORE_HOLD: Duration = Duration::from_secs(5);
/// The longest error text kept from a failed attempt.
const MAX_REASON: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "the notification secret is not \"whsec_\" followed by base64; fix notify.secret_file, COVERD_NOTIFY_SECRET or the credential notify-secret"
    )]
    BadSecret,
    #[error("cannot build the notification HTTP client: {0}")]
    Client(reqwest::Error),
}

/// The Standard Webhooks signature header value: `v1,` + base64 of
/// HMAC-SHA256(`key`, `"{id}.{timestamp}.{body}"`).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let sig = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(sig)
    )
}

/// What a delivery slot does after one notification.
enum Next {
    Done,
    /// A store error: wait, then let the notification be picked again.
    Hold,
    /// The record cannot be decoded: leave it alone until the next start.
    Skip,
}

/// The notification worker.
pub struct Notifier {
    store: Store,
    client: reqwest::Client,
    url: String,
    key: Vec<u8>,
    max_attempts: u32,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    scheduler: Scheduler<(String, u32)>,
}

impl Notifier {
    /// `None` when notifications are off (`notify.url` empty).
    pub fn new(
        store: Store,
        config: &Config,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<Notifier>>, NotifyError> {
        let Some(url) = config.notify.url.clone() else {
            return Ok(None);
        };
        let key = config
            .notify
            .secret
            .as_ref()
            .and_then(notify_key)
            .ok_or(NotifyError::BadSecret)?;
        let client = reqwest::Client::builder()
            .user_agent(config.download.user_agent.as_str())
            .timeout(config.notify.timeout)
            .connect_timeout(config.notify.timeout)
            // A redirect is not a delivery (as Standard Webhooks senders do): retried.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(NotifyError::Client)?;
        Ok(Some(Arc::new(Notifier {
            scheduler: Scheduler::new(
                &NAMES,
                store.clone(),
                clock.clone(),
                store.outbox_waker(),
                CONCURRENCY,
            ),
            store,
            client,
            url,
            key,
            max_attempts: config.notify.max_attempts,
            clock,
            metrics,
        })))
    }

    /// Runs until `shutdown`: sends due notifications, then sleeps until the next due time
    /// or a wake-up (new settle, redeliver). Store errors do not stop it.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        match self.store.notify_counts() {
            Ok(c) => tracing::info!(
                pending = c.pending,
                undeliverable = c.undeliverable,
                "outbound notifications on: {} pending, {} undeliverable",
                c.pending,
                c.undeliverable
            ),
            Err(e) => tracing::error!(error = %e, "cannot count pending notifications"),
        }
        schedule::run_bounded(self, shutdown).await;
    }

    /// One attempt of one notification, and its recording.
    async fn deliver(&self, task_id: &str, seq: u32) -> Next {
        let n = match self.store.notification(task_id, seq) {
            Ok(Some(n)) if n.state == NotifyState::Pending => n,
            Ok(_) => return Next::Done,
            Err(StoreError::Corrupt { .. } | StoreError::Newer { .. }) => {
                tracing::error!(
                    task_id,
                    "task {task_id}: its notification record cannot be decoded; skipping it until the next start (`coverd admin verify`)"
                );
                return Next::Skip;
            }
            Err(e) => {
                tracing::error!(task_id, error = %e, "task {task_id}: cannot read its notification; trying again later");
                return Next::Hold;
            }
        };
        // The settle this announces must be on disk before anyone hears of it.
        if let Err(e) = self.store.flush().await {
            tracing::error!(task_id, error = %e, "task {task_id}: notification held back: the store cannot flush");
            return Next::Hold;
        }
        let timestamp = now_millis().div_euclid(1000);
        let signature = sign(&self.key, &n.webhook_id, timestamp, n.body.as_bytes());
        let sent = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", &n.webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(n.body.clone())
            .send()
            .await;
        let attempt = n.attempts + 1;
        let now = self.clock.now();
        let retry_at = now.saturating_add(millis(backoff().delay(n.budget_used() + 1, None)));
        let result = match sent {
            Ok(resp) if resp.status().is_success() => Delivery::Delivered {
                detail: format!("HTTP {}", resp.status().as_u16()),
            },
            Ok(resp) if resp.status() == reqwest::StatusCode::GONE => Delivery::Gone,
            Ok(resp) => Delivery::Failed {
                reason: format!("the receiver answered HTTP {}", resp.status().as_u16()),
                retry_at,
            },
            Err(e) => Delivery::Failed {
                reason: no_answer(&e),
                retry_at,
            },
        };
        // A sled transaction: off the runtime's worker threads.
        let recorded = {
            let (store, id, result) = (self.store.clone(), task_id.to_string(), result.clone());
            let max = self.max_attempts;
            tokio::task::spawn_blocking(move || store.record_delivery(&id, seq, &result, max, now))
                .await
                .unwrap_or_else(|e| {
                    Err(StoreError::Corrupt {
                        what: format!("notification of task {task_id}"),
                        reason: format!("recording panicked: {e}"),
                    })
                })
        };
        let recorded = match recorded {
            Ok(Some(n)) => n,
            Ok(None) => return Next::Done,
            Err(e) => {
                // Left due: it is sent again (same webhook-id) once the store is back.
                tracing::error!(task_id, error = %e, "task {task_id}: cannot record a notification attempt; it will be sent again");
                return Next::Hold;
            }
        };
        let id = &n.webhook_id;
        let kind = n.type_name();
        match (&result, recorded.state) {
            (Delivery::Delivered { detail }, _) => {
                self.metrics.notification("delivered");
                tracing::info!(task_id, webhook_id = %id, attempt, "task {task_id}: {kind} notification delivered ({detail}, attempt {attempt})");
            }
            (Delivery::Gone, _) => {
                self.metrics.notification("gone");
                tracing::warn!(task_id, webhook_id = %id, attempt, "task {task_id}: {kind} notification undeliverable: the receiver answered 410 Gone");
            }
            (Delivery::Failed { .. }, NotifyState::Undeliverable) => {
                self.metrics.notification("undeliverable");
                tracing::warn!(task_id, webhook_id = %id, attempt, "task {task_id}: {kind} notification undeliverable: {}; `coverd admin redeliver {task_id}` sends it again", recorded.error.as_deref().unwrap_or("gave up"));
            }
            (Delivery::Failed { reason, retry_at }, _) => {
                self.metrics.notification("retry");
                let wait = humantime::format_duration(Duration::from_secs(
                    u64::try_from((retry_at - now).max(0) / 1000).unwrap_or(0),
                ));
                tracing::warn!(task_id, webhook_id = %id, attempt, "task {task_id}: {kind} notification attempt {attempt} failed: {reason}; retrying in {wait}");
            }
        }
        Next::Done
    }
}

/// Due notifications, from the store's outbox.
impl DueWork for Notifier {
    type Key = (String, u32);

    fn scheduler(&self) -> &Scheduler<Self::Key> {
        &self.scheduler
    }

    fn queue(&self, now: Millis, limit: usize) -> Result<Vec<(Millis, Self::Key)>, StoreError> {
        let due = self.store.due_notifications(now, limit)?;
        Ok(due.into_iter().map(|key| (now, key)).collect())
    }

    /// Something due but in flight is looked at again when its delivery ends.
    fn next_due(&self, now: Millis) -> Result<Option<Millis>, StoreError> {
        Ok(self.store.next_notification_due()?.filter(|at| *at > now))
    }

    async fn work(self: Arc<Self>, key: Self::Key, shutdown: CancellationToken) -> Finished {
        match self.deliver(&key.0, key.1).await {
            Next::Done => {}
            Next::Hold => {
                // The store failed: hold this slot a while instead of resending in a loop.
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(STORE_HOLD) => {}
                }
            }
            // Undecodable: stays "in flight" (skipped) until the next start.
            Next::Skip => return Finished::KeepOut,
        }
        Finished::Done
    }
}

/// Why a request got no answer, in words (no URL: it may carry a token in its query).
fn no_answer(e: &reqwest::Error) -> String {
    let what = match NoAnswer::of(e) {
        NoAnswer::ConnectTimedOut | NoAnswer::TimedOut => "timed out",
        NoAnswer::CannotConnect => "cannot connect",
        NoAnswer::Failed => "no answer",
    };
    let mut reason = format!("the receiver did not answer: {what}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.source().is_none() {
            reason = format!("{reason} ({s})");
        }
        source = s.source();
    }
    reason.chars().take(MAX_REASON).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference vector of the Standard Webhooks specification.
    #[test]
    fn standard_webhooks_reference_vector() {
        let key = notify_key(&crate::config::Secret::new(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ))
        .unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    /// The test-only short base (`COVERD_TEST_NOTIFY_BACKOFF`) keeps the shape: doubling,
    /// ±20 %, at most 720 times the base; unset, the backoff is SPEC's.
    #[test]
    fn a_short_base_doubles_the_same_way_up_to_720_times_it() {
        let base = Duration::from_millis(100);
        let policy = short_backoff(base);
        for _ in 0..200 {
            let first = policy.delay(1, None);
            assert!(first >= base && first <= base.mul_f64(1.2), "{first:?}");
            let third = policy.delay(3, None);
            assert!(third >= base * 4 * 8 / 10 && third <= base * 4 * 12 / 10);
            let late = policy.delay(u32::MAX, None);
            assert!(late <= base * 720 && late >= (base * 720).mul_f64(0.8));
        }
        assert_eq!(short_backoff(BACKOFF.base), BACKOFF);
        assert_eq!(backoff(), BACKOFF);
    }
}
