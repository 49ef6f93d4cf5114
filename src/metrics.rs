//! Prometheus metrics at `metrics_listen` (`GET /metrics`, text format 0.0.4): in-process
//! counters bumped by the loops, plus per-state task gauges read from the store's counters.
//! Owns the counters and their rendering; must not change any state.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::Counts;

/// Counters since the daemon started.
#[derive(Debug, Default)]
pub struct Metrics {
    pub callbacks_accepted: AtomicU64,
    pub callbacks_rejected: AtomicU64,
    pub callbacks_unavailable: AtomicU64,
    pub images_stored: AtomicU64,
    pub image_retries: AtomicU64,
    pub images_failed: AtomicU64,
    pub polls: AtomicU64,
}

impl Metrics {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one callback answer by its status code.
    pub fn callback_answered(&self, status: u16) {
        match status {
            200 => Metrics::bump(&self.callbacks_accepted),
            503 => Metrics::bump(&self.callbacks_unavailable),
            _ => Metrics::bump(&self.callbacks_rejected),
        }
    }

    pub fn render(&self, tasks: &Counts) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out += "# HELP coverd_tasks Tasks per state.\n# TYPE coverd_tasks gauge\n";
        for (state, n) in [
            ("submitted", tasks.submitted),
            ("received", tasks.received),
            ("downloaded", tasks.downloaded),
            ("failed", tasks.failed),
        ] {
            let _ = writeln!(out, "coverd_tasks{{state=\"{state}\"}} {n}");
        }
        out += "# HELP coverd_callbacks_total Callback deliveries by answer.\n# TYPE coverd_callbacks_total counter\n";
        for (answer, c) in [
            ("accepted", &self.callbacks_accepted),
            ("rejected", &self.callbacks_rejected),
            ("unavailable", &self.callbacks_unavailable),
        ] {
            let _ = writeln!(
                out,
                "coverd_callbacks_total{{answer=\"{answer}\"}} {}",
                get(c)
            );
        }
        out += "# HELP coverd_image_fetches_total Image fetches by result.\n# TYPE coverd_image_fetches_total counter\n";
        for (result, c) in [
            ("stored", &self.images_stored),
            ("retry", &self.image_retries),
            ("failed", &self.images_failed),
        ] {
            let _ = writeln!(
                out,
                "coverd_image_fetches_total{{result=\"{result}\"}} {}",
                get(c)
            );
        }
        out += "# HELP coverd_polls_total record-info polls made.\n# TYPE coverd_polls_total counter\n";
        let _ = writeln!(out, "coverd_polls_total {}", get(&self.polls));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.callback_answered(200);
        m.callback_answered(404);
        Metrics::bump(&m.images_stored);
        let text = m.render(&Counts {
            submitted: 1,
            received: 2,
            downloaded: 3,
            failed: 4,
        });
        assert!(text.contains("coverd_tasks{state=\"failed\"} 4\n"));
        assert!(text.contains("coverd_callbacks_total{answer=\"accepted\"} 1\n"));
        assert!(text.contains("coverd_callbacks_total{answer=\"rejected\"} 1\n"));
        assert!(text.contains("coverd_image_fetches_total{result=\"stored\"} 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.split(' ').count(), 2, "{line}");
        }
    }
}
