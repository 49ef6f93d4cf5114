//! TEST ONLY: deliberately broken builds as runtime switches, so the power-cut loop
//! (tests/it/power_loop.rs) can show that it catches each of them without a rebuild. Owns
//! reading `COVERD_TEST_BREAK` (once) and naming its variants; must not decide anything
//! itself: the three places that break (`store::writer`, `download::install`) ask
//! [`active`].
//!
//! `COVERD_TEST_BREAK=<ack-before-flush|skip-log-fdatasync|skip-image-dirsync>` makes coverd
//! break one of its durability promises on purpose:
//! - `ack-before-flush`: the store's writer answers an update (and so a callback its 200)
//!   as soon as its transaction is applied, before the flush round that makes it durable;
//! - `skip-log-fdatasync`: the flush round leaves out the `fdatasync` of sled's log after
//!   sled's own flush;
//! - `skip-image-dirsync`: an image's install leaves out the directory fsyncs after its
//!   rename.
//!
//! Unset (always, in production) it changes nothing; a value that names no variant is
//! ignored with a warning. The daemon logs a warning at start while one is active.
//! docs/reliability.md ("… and a loss of power") documents it.

use std::sync::OnceLock;

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
}
