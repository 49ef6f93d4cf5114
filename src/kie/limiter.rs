//! The client-side rate limit of KIE calls: a sliding window of call starts and a pause for
//! everybody after a 429. Owns only timing (tokio time, so paused test time works).
//!
//! It must not speak HTTP or know KIE's endpoints: the client calls `acquire` and `pause`.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Client-side rate limit: at most `limit` calls started in any sliding window, and a pause
/// of one whole window for everybody after KIE answered 429. Uses `tokio::time`, so it works
/// under paused test time. Waiters are served in arrival order.
pub struct RateLimiter {
    limit: usize,
    window: Duration,
    starts: tokio::sync::Mutex<VecDeque<Instant>>,
    paused_until: std::sync::Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// `limit` calls per `window`; a limit of 0 is treated as 1.
    pub fn new(limit: u32, window: Duration) -> RateLimiter {
        RateLimiter {
            limit: usize::try_from(limit.max(1)).unwrap_or(usize::MAX),
            window,
            starts: tokio::sync::Mutex::new(VecDeque::new()),
            paused_until: std::sync::Mutex::new(None),
        }
    }

    /// Waits until a call may start, and counts it as started.
    pub async fn acquire(&self) {
        // Holding the lock while sleeping queues later callers fairly behind this one.
        let mut starts = self.starts.lock().await;
        loop {
            let now = Instant::now();
            if let Some(until) = self.paused_until() {
                if until > now {
                    tokio::time::sleep_until(until).await;
                    continue;
                }
            }
            while starts.front().is_some_and(|&t| t + self.window <= now) {
                starts.pop_front();
            }
            if starts.len() < self.limit {
                starts.push_back(now);
                return;
            }
            if let Some(&oldest) = starts.front() {
                tokio::time::sleep_until(oldest + self.window).await;
            }
        }
    }

    /// Blocks every call for one whole window from now (KIE answered 429).
    pub fn pause(&self) {
        let until = Instant::now() + self.window;
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }

    /// When the current 429 pause ends, if one was ever set (it may lie in the past).
    pub fn paused_until(&self) -> Option<Instant> {
        *self.paused_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limit", &self.limit)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}
