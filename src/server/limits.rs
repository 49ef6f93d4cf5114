//! How many connections each listener holds: [`Limits`] (the cap, and whether a full
//! listener sheds idle connections), the callback listener's cap derived from the
//! file-descriptor limit (raised to the hard limit at start) less what the rest of the
//! daemon needs. Owns those numbers; must not accept, shed or serve connections.

/// File descriptors kept back from the callback listener for everything else: the admin
/// socket's and the metrics listener's connections (256 + 64), downloads (a socket and a
/// temp file each, at most 64 at once), the store's files, KIE calls, logs.
pub const RESERVED_FDS: u64 = 768;
/// The callback listener never holds more connections than this, whatever the fd limit
/// (each one can pin two [`MAX_BUF_BYTES`](super::MAX_BUF_BYTES) buffers besides the kernel's).
pub const MAX_PUBLIC_CONNECTIONS: usize = 16_384;
/// ... nor fewer than this, even under a tiny fd limit (shedding then does the work).
pub const MIN_PUBLIC_CONNECTIONS: usize = 64;
/// How many connections a listener holds, and whether it sheds idle ones when full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    /// Close the least recently active idle connections to make room (a listener that
    /// strangers can reach); without it a full listener waits for a connection to end.
    pub shed_idle: bool,
}

impl Limits {
    /// The callback listener: reachable by anyone, sheds.
    pub fn public(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            shed_idle: true,
        }
    }

    /// The admin socket: only the daemon's user (and root) can connect, every connection
    /// is an operator's command that may wait in its handler (a submit behind the rate
    /// limiter), and one not yet sending must not be taken for a loiterer: no shedding.
    pub const ADMIN: Limits = Limits {
        max_connections: 256,
        shed_idle: false,
    };

    /// The metrics listener: scrapers, a TCP port; sheds like the public one.
    pub const METRICS: Limits = Limits {
        max_connections: 64,
        shed_idle: true,
    };
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (best effort: a sandbox may refuse) and
/// returns the soft limit now in force (`None`: unlimited).
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return limit.maximum,
            Err(e) => tracing::warn!(
                "cannot raise the open-file limit from {} to {}: {e}; fewer callback connections fit",
                limit.current.unwrap_or(0),
                limit
                    .maximum
                    .map_or("unlimited".to_string(), |m| m.to_string()),
            ),
        }
    }
    limit.current
}

/// How many connections the callback listener may hold under a soft fd limit of `fds`:
/// the limit less [`RESERVED_FDS`], within
/// [`MIN_PUBLIC_CONNECTIONS`]..=[`MAX_PUBLIC_CONNECTIONS`].
pub fn public_connection_cap(fds: Option<u64>) -> usize {
    let Some(fds) = fds else {
        return MAX_PUBLIC_CONNECTIONS;
    };
    let spare = fds.saturating_sub(RESERVED_FDS);
    usize::try_from(spare)
        .unwrap_or(usize::MAX)
        .clamp(MIN_PUBLIC_CONNECTIONS, MAX_PUBLIC_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callback_cap_follows_the_fd_limit_within_bounds() {
        assert_eq!(public_connection_cap(Some(8192)), 8192 - 768);
        assert_eq!(public_connection_cap(Some(1024)), 256);
        assert_eq!(public_connection_cap(Some(512)), MIN_PUBLIC_CONNECTIONS);
        assert_eq!(public_connection_cap(Some(1 << 20)), MAX_PUBLIC_CONNECTIONS);
        assert_eq!(public_connection_cap(None), MAX_PUBLIC_CONNECTIONS);
    }
}
