//! The poll fallback: tasks still `submitted` are looked up on KIE's record-info when their
//! poll is due (the store's poll index), until a result arrives or `poll.give_up_after`
//! passes; its loop is `schedule`'s (store pause, sleep until due). Owns the schedule of
//! polls and the reading of a record-info answer ([`interpret`], shared with the
//! confirmation of callbacks in `download`); must not fetch images (`download`) or decide
//! transitions (`machine`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kie::{CoverStatus, KieClient, KieError, RecordInfo};
use crate::machine::{Ctx, Event, Report};
use crate::metrics::Metrics;
use crate::model::{Clock, Millis, millis};
use crate::schedule::{self, Flow};
use crate::store::{IfMissing, Store};

/// How a poll whose record-info call failed starts its detail.
pub const RECORD_INFO_FAILED: &str = "record-info failed";
/// Due tasks handled per pass; the rate limiter paces the calls themselves.
const BATCH: usize = 64;

pub struct Poller {
    store: Store,
    config: Arc<Config>,
    kie: Option<Arc<KieClient>>,
    downloads: Arc<Notify>,
    wake: Arc<Notify>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Unresolved submit intents are looked at once per [`INTENT_MIN_AGE_MS`] at most.
    intents_checked_at: AtomicI64,
}

/// Without an API key, a submitted task is looked at this often (for its give-up time).
const NO_KEY_RECHECK_MS: Millis = 15 * 60_000;
/// How long "record not found" counts as "not created yet" rather than "no such task".
const NOT_FOUND_GRACE_MS: Millis = 15 * 60_000;
/// An unresolved submit intent is retried once it is this old (a live `submit` may still
/// be waiting for KIE's answer before that).
const INTENT_MIN_AGE_MS: Millis = 60_000;

impl Poller {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        kie: Option<Arc<KieClient>>,
        downloads: Arc<Notify>,
        wake: Arc<Notify>,
        clock: Arc<dyn Clock>,
    ) -> Poller {
        Poller {
            store,
            config,
            kie,
            downloads,
            wake,
            clock,
            metrics: Arc::default(),
            intents_checked_at: AtomicI64::new(i64::MIN),
        }
    }

    /// Counts polls into the daemon's metrics.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Poller {
        self.metrics = metrics;
        self
    }

    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            // No KIE call whose answer cannot be recorded: wait until the store takes writes.
            match schedule::wait_while_unwritable(&self.store, "polls", &shutdown).await {
                Flow::Go => {}
                Flow::Again => continue,
                Flow::Stop => return,
            }
            let next = match self.pass(&shutdown).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(
                        "polling paused: cannot read the poll index: {e}; retrying in 5 s"
                    );
                    Some(self.clock.now() + 5_000)
                }
            };
            let min = Duration::from_millis(50);
            let (clock, wake) = (self.clock.as_ref(), self.wake.as_ref());
            if !schedule::sleep_until_due(clock, next, min, wake, &shutdown).await {
                return;
            }
        }
    }

    /// Polls every due task once; returns when the next one is due.
    async fn pass(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Millis>, crate::store::StoreError> {
        let now = self.clock.now();
        let intents_due = now.saturating_sub(self.intents_checked_at.load(Ordering::Relaxed))
            >= INTENT_MIN_AGE_MS;
        if self.store.write_failure().is_some() {
            return Ok(Some(now));
        }
        if let Some(kie) = self.kie.as_ref().filter(|_| intents_due) {
            self.intents_checked_at.store(now, Ordering::Relaxed);
            crate::submit::resolve_intents(
                &self.store,
                kie,
                &self.config,
                self.clock.now(),
                INTENT_MIN_AGE_MS,
            )
            .await;
        }
        for (at, task_id) in self.store.poll_queue(BATCH)? {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            if at > self.clock.now() {
                return Ok(Some(at));
            }
            if self.store.write_failure().is_some() {
                // `run` pauses; nothing more is asked of KIE until the store recovers.
                return Ok(Some(self.clock.now()));
            }
            self.poll_one(&task_id).await;
        }
        self.store.next_poll_due()
    }

    async fn poll_one(&self, task_id: &str) {
        let Some(task) = schedule::task_to_work_on(&self.store, task_id, "polled") else {
            return;
        };
        let now = self.clock.now();
        let give_up_at = task
            .submitted_at
            .saturating_add(millis(self.config.poll.give_up_after));
        let next = now
            .saturating_add(millis(self.config.poll.interval))
            .min(give_up_at);
        let event = if now >= give_up_at {
            Event::GiveUp
        } else if let Some(kie) = &self.kie {
            self.metrics.poll_made();
            self.ask(kie, task_id, task.submitted_at, next).await
        } else {
            // Look again now and then: a restart with an API key then resumes polling.
            Event::Wait {
                until: now.saturating_add(NO_KEY_RECHECK_MS).min(give_up_at),
            }
        };
        // A failed KIE call is recorded as a pending poll, and said as a warning.
        let level = match &event {
            Event::PollPending { detail, .. } if detail.starts_with(RECORD_INFO_FAILED) => {
                tracing::Level::WARN
            }
            _ => tracing::Level::INFO,
        };
        let ctx = Ctx::from_config(&self.config, self.clock.now());
        match self
            .store
            .apply_async(task_id, event, ctx, IfMissing::Reject)
            .await
        {
            Ok(Some(applied)) => {
                if applied.task.download_due().is_some() {
                    self.downloads.notify_one();
                }
                crate::journal::record(&applied, level);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(task_id, "task {task_id} poll result not recorded: {e}"),
        }
    }

    async fn ask(
        &self,
        kie: &KieClient,
        task_id: &str,
        submitted_at: Millis,
        next: Millis,
    ) -> Event {
        let answer = kie.record_info(task_id).await;
        match interpret(task_id, answer, self.clock.now() - submitted_at) {
            Verdict::Done(report) => Event::Polled(report),
            Verdict::Pending { detail, .. } => Event::PollPending {
                detail,
                next_poll_at: next,
            },
        }
    }
}

/// What a record-info answer means for a task still waiting for its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// KIE has a final result: images (never empty), or a failure with KIE's reason.
    Done(Report),
    /// No result yet: ask again later. `transient`: an error that may clear soon (network,
    /// 429, 455, 5xx), rather than "pending" or "generating".
    Pending { detail: String, transient: bool },
}

/// Reads one record-info answer the same way for the poller and for the confirmation of a
/// callback (`download`). `waited_ms`: how long ago the task was submitted (or its callback
/// arrived); "not found" means "not created yet" only for a while.
pub fn interpret(
    _task_id: &str,
    answer: Result<RecordInfo, KieError>,
    waited_ms: Millis,
) -> Verdict {
    let pending = |detail: String| Verdict::Pending {
        detail,
        transient: false,
    };
    match answer {
        Ok(info) => match info.status {
            CoverStatus::Success if !info.images.is_empty() => Verdict::Done(Report::Success {
                images: info.images,
            }),
            CoverStatus::Success => pending("record-info reports success but no images yet".into()),
            CoverStatus::Failed => {
                let code = info
                    .error_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "?".into());
                let msg = info
                    .error_message
                    .unwrap_or_else(|| "generation failed".into());
                Verdict::Done(Report::Failure {
                    reason: format!("KIE code {code}: {msg}"),
                })
            }
            CoverStatus::Pending | CoverStatus::Generating => {
                pending(format!("record-info: {:?}", info.status).to_lowercase())
            }
        },
        Err(KieError::NotFound) if waited_ms < NOT_FOUND_GRACE_MS => {
            pending("record-info: not found yet".into())
        }
        Err(KieError::NotFound) => Verdict::Done(Report::Failure {
            reason: format!(
                "KIE has no record of this task {} minutes after it was submitted; check the task id",
                NOT_FOUND_GRACE_MS / 60_000
            ),
        }),
        // Said once, as a warning, with the event that records it.
        Err(e) => Verdict::Pending {
            transient: e.is_transient(),
            detail: format!("{RECORD_INFO_FAILED}: {e}"),
        },
    }
}
