//! TEST ONLY: deliberately broken builds as runtime switches, so the power-cut loop
//! (tests/it/power_loop.rs) can show that it catches each of them without a rebuild, and
//! the kill and power loops' short notification backoff. Owns reading `COVERD_TEST_BREAK`
//! and `COVERD_TEST_NOTIFY_BACKOFF` (once each) and naming the variants; must not decide
//! anything itself: the places that break (`store::writer`, `store::open`, `download::install`)
//! ask [`active`], `notify::backoff` asks [`notify_backoff`].
//!
//! `COVERD_TEST_BREAK=<ack-before-flush|skip-log-fdatasync|skip-image-dirsync>` makes coverd
//! break one of its durability promises on purpose:
//! - `ack-before-flush`: the store's writer answers an update (and so a callback its 200)
//!   as soon as its transaction is applied, before the flush round that makes it durable;
//! - `skip-log-fdatasync`: the flush round leaves out the `fdatasync` of sled's log after
//!   sled's own flush, and sled's periodic flush (whose `fsync` of the log would make the
//!   same write durable by luck, up to 500 ms later) is off;
//! - `skip-image-dirsync`: an image's install leaves out the directory fsyncs after its
//!   rename.
//!
//! Unset (always, in production) it changes nothing; a value that names no variant is
//! ignored with a warning. The daemon logs a warning at start while one is active.
//! docs/reliability.md ("… and a loss of power") documents it.
//!
//! `COVERD_TEST_NOTIFY_BACKOFF=<duration>` (e.g. `100ms`, at most 5 s) breaks SPEC's
//! notification backoff on purpose: the first retry after a failed attempt comes after that
//! base instead of 5 s, doubling as before up to 720 times the base (5 s → 1 h). The kill
//! and power loops (tests/it/kill_loop.rs) use it so that a notification answered 500 is
//! retried within their cycles, across their kills, instead of minutes later. Unset it
//! changes nothing; a value that is not a duration within bounds is ignored with a warning.

use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that selects a broken variant.
pub const VAR: &str = "COVERD_TEST_BREAK";

/// A promise broken on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Break {
    AckBeforeFlush,
    SkipLogFdatasync,
    SkipImageDirsync,
}

impl Break {
    pub const ALL: [Break; 3] = [
        Break::AckBeforeFlush,
        Break::SkipLogFdatasync,
        Break::SkipImageDirsync,
    ];

    /// Its value of `COVERD_TEST_BREAK`.
    pub fn name(self) -> &'static str {
        match self {
            Break::AckBeforeFlush => "ack-before-flush",
            Break::SkipLogFdatasync => "skip-log-fdatasync",
            Break::SkipImageDirsync => "skip-image-dirsync",
        }
    }

    pub fn parse(s: &str) -> Option<Break> {
        Break::ALL.into_iter().find(|b| b.name() == s)
    }
}

/// The variant `COVERD_TEST_BREAK` selects in this process, read once; `None` when unset or
/// naming no variant.
pub fn selected() -> Option<Break> {
    static SELECTED: OnceLock<Option<Break>> = OnceLock::new();
    *SELECTED.get_or_init(|| {
        let value = std::env::var_os(VAR)?;
        let found = value.to_str().and_then(Break::parse);
        if found.is_none() {
            tracing::warn!("{VAR}={value:?} names no broken variant; ignored");
        }
        found
    })
}

/// Whether `b` is the variant broken on purpose in this process.
pub fn active(b: Break) -> bool {
    selected() == Some(b)
}

/// The environment variable that shortens the notification backoff.
pub const NOTIFY_BACKOFF_VAR: &str = "COVERD_TEST_NOTIFY_BACKOFF";
/// The longest base `COVERD_TEST_NOTIFY_BACKOFF` may set (SPEC's own base).
const NOTIFY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The notification backoff's base set by `COVERD_TEST_NOTIFY_BACKOFF` in this process,
/// read once; `None` when unset or not a duration from 1 ms to 5 s.
pub fn notify_backoff() -> Option<Duration> {
    static BASE: OnceLock<Option<Duration>> = OnceLock::new();
    *BASE.get_or_init(|| {
        let value = std::env::var_os(NOTIFY_BACKOFF_VAR)?;
        let found = value.to_str().and_then(parse_backoff);
        if found.is_none() {
            tracing::warn!(
                "{NOTIFY_BACKOFF_VAR}={value:?} is not a duration from 1ms to 5s; ignored"
            );
        }
        found
    })
}

fn parse_backoff(s: &str) -> Option<Duration> {
    humantime::parse_duration(s.trim())
        .ok()
        .filter(|d| *d >= Duration::from_millis(1) && *d <= NOTIFY_BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in Break::ALL {
            assert_eq!(Break::parse(b.name()), Some(b));
        }
        assert_eq!(Break::parse("ack"), None);
    }

    #[test]
    fn notify_backoff_takes_a_bounded_duration() {
        assert_eq!(parse_backoff("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_backoff(" 5s "), Some(Duration::from_secs(5)));
        for bad in ["", "0ms", "6s", "1h", "fast", "-1s"] {
            assert_eq!(parse_backoff(bad), None, "{bad:?}");
        }
    }
}
