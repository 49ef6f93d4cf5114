//! When to try again, for every part that retries (image downloads, KIE calls, outbound
//! notifications), each with its own parameters: the backoff policy (exponential from a
//! base, capped, jittered, never sooner than a server's `Retry-After`), attempt budgets
//! (attempts since the last manual retry, against a maximum), which HTTP statuses are
//! transient whatever the peer, one reading of a reqwest error that got no answer, and how
//! long to wait after a store error. Owns no I/O, clock or state; must not decide what a
//! failure does to a task or a notification (`machine` does, from the budget it is given)
//! or read a peer's answer bodies (`kie::wire` reads KIE's codes).

use std::time::Duration;

/// After a store error (a read, or a write the store refused), the same work is tried again
/// this much later: soon enough to resume at once when the store is back, late enough not to
/// spin on a failing one.
pub const STORE_RETRY: Duration = Duration::from_secs(1);

/// How the computed wait is spread, so that many failures at one moment do not all come
/// back at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// Uniform in `[0, nominal]` ("full jitter"): the widest spread, for many independent
    /// fetches from many hosts.
    Full,
    /// Uniform in `nominal × [1 - f, 1 + f]`, kept within `[base, max]`: a wait that is
    /// never much shorter than said, for one receiver that is coming back.
    Proportional(f64),
}

/// An exponential backoff: retry `n` (1 = the first) waits `base × 2^(n-1)`, at most
/// `max`, jittered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    /// The wait before retry number `attempt` (1 = the first retry), and at least
    /// `min(retry_after, max)` when the server said when to come back.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let unit = rand::random::<f64>();
        let exp = 2u32.saturating_pow(attempt.saturating_sub(1));
        let nominal = self.base.saturating_mul(exp).min(self.max);
        let jittered = match self.jitter {
            Jitter::Full => nominal.mul_f64(unit),
            Jitter::Proportional(f) => nominal
                .mul_f64(1.0 - f + 2.0 * f * unit)
                .clamp(self.base, self.max),
        };
        match retry_after {
            Some(wait) => jittered.max(wait.min(self.max)),
            None => jittered,
        }
    }
}

/// Attempts that count toward a budget: those made since `budget_start` (moved by a manual
/// retry or redeliver, which gives a fresh budget).
pub fn budget_used(attempts: u32, budget_start: u32) -> u32 {
    attempts.saturating_sub(budget_start)
}

/// Whether another attempt may follow `used` failed ones under a budget of `max_attempts`.
pub fn within_budget(used: u32, max_attempts: u32) -> bool {
    used < max_attempts
}

/// HTTP statuses worth another attempt from any server: 408 Request Timeout, 425 Too Early,
/// 429 Too Many Requests and every 5xx. (A peer may add its own: KIE's 455 maintenance is
/// read by `kie::wire`; a file host's 206 by `fetch`.)
pub fn transient_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500..=599)
}

/// How a request that got no HTTP answer failed, from reqwest's error. Every one of these is
/// transient: the next attempt may connect, or be answered in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAnswer {
    /// Setting up the connection (TCP, TLS) took longer than the connect timeout.
    ConnectTimedOut,
    /// The connection could not be made (refused, DNS, TLS).
    CannotConnect,
    /// Connected, but the answer did not come in time.
    TimedOut,
    /// Anything else on the way (the connection broke, a protocol error).
    Failed,
}

impl NoAnswer {
    pub fn of(e: &reqwest::Error) -> NoAnswer {
        match (e.is_connect(), e.is_timeout()) {
            (true, true) => NoAnswer::ConnectTimedOut,
            (true, false) => NoAnswer::CannotConnect,
            (false, true) => NoAnswer::TimedOut,
            (false, false) => NoAnswer::Failed,
        }
    }

    /// Either timeout.
    pub fn is_timeout(self) -> bool {
        matches!(self, NoAnswer::ConnectTimedOut | NoAnswer::TimedOut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moved from `fetch` (the downloads' backoff).
    #[test]
    fn backoff_bounds() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(300);
        let policy = Backoff {
            base,
            max,
            jitter: Jitter::Full,
        };
        for attempt in [0, 1, 2, 3, 5, 8, 9, 40, u32::MAX] {
            let cap = match attempt {
                0 | 1 => base,
                n if n < 20 => (base * 2u32.pow(n - 1)).min(max),
                _ => max,
            };
            for _ in 0..200 {
                let d = policy.delay(attempt, None);
                assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
            }
        }
        // Full jitter: the spread reaches both ends of the range.
        let delays: Vec<_> = (0..500).map(|_| policy.delay(4, None)).collect();
        assert!(delays.iter().any(|d| *d < Duration::from_secs(2)));
        assert!(delays.iter().any(|d| *d > Duration::from_secs(14)));
        // Retry-After is a floor, itself capped at max.
        for _ in 0..200 {
            let d = policy.delay(1, Some(Duration::from_secs(60)));
            assert!(
                d >= Duration::from_secs(60) && d <= Duration::from_secs(60),
                "{d:?}"
            );
            let d = policy.delay(1, Some(Duration::from_secs(3600)));
            assert_eq!(d, max);
            let d = policy.delay(3, Some(Duration::from_secs(1)));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(8),
                "{d:?}"
            );
        }
    }

    /// Moved from `notify` (the notifications' backoff).
    #[test]
    fn backoff_doubles_from_5s_up_to_an_hour_with_jitter() {
        let policy = crate::notify::BACKOFF;
        for _ in 0..200 {
            let first = policy.delay(1, None);
            assert!(
                first >= policy.base && first <= Duration::from_secs(6),
                "{first:?}"
            );
            let third = policy.delay(3, None);
            assert!(third >= Duration::from_secs(16) && third <= Duration::from_secs(24));
            for attempt in [11, 12, 40, u32::MAX] {
                let late = policy.delay(attempt, None);
                assert!(
                    late <= policy.max && late >= policy.max.mul_f64(0.8),
                    "{late:?}"
                );
            }
        }
    }

    #[test]
    fn budgets_count_from_the_last_manual_retry() {
        assert_eq!(budget_used(5, 2), 3);
        assert_eq!(budget_used(1, 2), 0);
        assert!(within_budget(2, 3));
        assert!(!within_budget(3, 3));
    }

    #[test]
    fn transient_statuses() {
        for s in [408, 425, 429, 500, 502, 503, 599] {
            assert!(transient_status(s), "{s}");
        }
        for s in [200, 206, 301, 400, 401, 403, 404, 410, 455, 600] {
            assert!(!transient_status(s), "{s}");
        }
    }
}
