//! The poll fallback: tasks still `submitted` are looked up on KIE's record-info when their
//! poll is due (the store's poll index), until a result arrives or `poll.give_up_after`
//! passes; its loop is `schedule`'s (store pause, sleep until due). Owns the schedule of
//! polls; must not read KIE's answers (`kie::verdict` says what a record-info answer means
//! for a waiting task), fetch images (`download`) or decide transitions (`machine`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kie::KieClient;
use crate::kie::verdict::{RECORD_INFO_FAILED, Verdict, interpret};
use crate::machine::{Ctx, Event};
use crate::metrics::Metrics;
use crate::model::{Clock, Millis, Task, millis};
use crate::schedule::{self, Flow};
use crate::store::{IfMissing, Store};

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
            self.ask(kie, &task, next).await
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
                crate::logline::record(&applied, level);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(task_id, "task {task_id} poll result not recorded: {e}"),
        }
    }

    async fn ask(&self, kie: &KieClient, task: &Task, next: Millis) -> Event {
        let task_id = task.task_id.as_str();
        let answer = kie.details(task.kind, task_id).await;
        match interpret(task_id, answer, self.clock.now() - task.submitted_at) {
            Verdict::Done(report) => Event::Polled(report),
            Verdict::Pending { detail, .. } => Event::PollPending {
                detail,
                next_poll_at: next,
            },
        }
    }
}
