//! Shedding: the open connections of one listener as the shedder sees them (`Conns`, each a
//! `Slot` idle, receiving a body, in its handler or shed, with when its last request started
//! or ended), the grace that keeps a connection young, closing the least recently active
//! sheddable ones when room is needed, and the marks a request leaves while it is received
//! and handled (`InFlight`, `BodyArrival`). Owns those states; must not accept connections
//! or read bodies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a connection is safe from shedding after it starts a phase (accepted, request
/// headers in, answer out). Well under the 2 s a callback must be answered in, so a
/// genuine request waiting in the kernel's queue behind a crowd gets a slot within it.
const SHED_GRACE: Duration = Duration::from_millis(500);
/// How often a full listener that found nothing to shed (everything within its grace)
/// looks again, besides waking when a slot frees.
pub(super) const SHED_RETRY: Duration = Duration::from_millis(50);

/// A connection between requests (keep-alive, headers arriving, answer being written).
const IDLE: u8 = 0;
/// A connection whose request is in the handler, its body (if any) complete: never shed.
const BUSY: u8 = 1;
/// Chosen for shedding; its task drops it.
const SHED: u8 = 2;
/// A connection whose request's headers have arrived but whose body is still arriving:
/// nothing has been done with the request yet, so it may be shed like an idle one.
const RECEIVING: u8 = 3;

/// One open connection, as the shedder sees it.
pub(super) struct Slot {
    pub(super) id: u64,
    epoch: Instant,
    state: AtomicU8,
    /// Milliseconds since the listener's epoch at which a request last started (its headers
    /// arrived) or ended; body bytes do not count, so a trickled body does not stay young.
    last_active: AtomicU64,
    pub(super) shed: CancellationToken,
}

/// The open connections of one listener.
pub(super) struct Conns {
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Slot>>>,
}

impl Default for Conns {
    fn default() -> Self {
        Conns {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl Slot {
    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active.store(now, Ordering::Relaxed);
    }
}

impl Conns {
    pub(super) fn register(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            epoch: self.epoch,
            state: AtomicU8::new(IDLE),
            last_active: AtomicU64::new(0),
            shed: CancellationToken::new(),
        });
        slot.touch();
        self.lock().insert(slot.id, slot.clone());
        slot
    }

    pub(super) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes up to `n` sheddable connections (idle, or receiving a body), least recently
    /// active first; returns how many. A connection that started its current phase (its
    /// accept, its request's headers, the end of its last answer) less than
    /// [`SHED_GRACE`] ago is left alone: a genuine request gets that long to arrive whole,
    /// however fast a crowd reconnects (with shedding by age alone, a crowd reconnecting
    /// at once made every new connection the oldest within milliseconds).
    pub(super) fn evict_idle(&self, n: usize) -> usize {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.evict_idle_at(n, now)
    }

    fn evict_idle_at(&self, n: usize, now_ms: u64) -> usize {
        let grace = u64::try_from(SHED_GRACE.as_millis()).unwrap_or(u64::MAX);
        let mut idle: Vec<(u64, Arc<Slot>)> = self
            .lock()
            .values()
            .filter(|s| sheddable(s.state.load(Ordering::Acquire)))
            .map(|s| (s.last_active.load(Ordering::Relaxed), s.clone()))
            .filter(|(at, _)| now_ms.saturating_sub(*at) >= grace)
            .collect();
        if idle.len() > n {
            idle.select_nth_unstable_by_key(n, |(at, _)| *at);
            idle.truncate(n);
        }
        let mut shed = 0;
        for (_, slot) in idle {
            // A request that entered its handler meanwhile keeps its connection.
            let taken = slot
                .state
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                    sheddable(s).then_some(SHED)
                })
                .is_ok();
            if taken {
                slot.shed.cancel();
                shed += 1;
            }
        }
        if shed > 0 {
            tracing::debug!(shed, "listener full: closed idle connections");
        }
        shed
    }
}

fn sheddable(state: u8) -> bool {
    state == IDLE || state == RECEIVING
}

/// Marks a connection's request as started (receiving its body, or in its handler if it
/// has none); idle again when dropped.
pub(super) struct InFlight<'a>(&'a Slot);

impl<'a> InFlight<'a> {
    /// `None` if the connection was shed.
    pub(super) fn begin(slot: &'a Slot, has_body: bool) -> Option<InFlight<'a>> {
        let state = if has_body { RECEIVING } else { BUSY };
        slot.state
            .compare_exchange(IDLE, state, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        slot.touch();
        Some(InFlight(slot))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Recorded before going idle, so a shedder never sees a fresh idle connection as old.
        self.0.touch();
        // A shed connection stays shed.
        let _ = self
            .0
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != SHED).then_some(IDLE)
            });
    }
}

/// Put in a request's extensions by [`serve`](super::serve) while its body is arriving: the body's
/// deadline, and the connection to mark busy once the body is complete.
#[derive(Clone)]
pub(super) struct BodyArrival {
    pub(super) slot: Arc<Slot>,
    pub(super) timeout: Duration,
}

impl BodyArrival {
    /// The body is complete: the request enters its handler and its connection can no
    /// longer be shed. `false` if it was shed first.
    pub(super) fn complete(&self) -> bool {
        self.slot
            .state
            .compare_exchange(RECEIVING, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::BODY_TIMEOUT;

    #[test]
    fn shedding_takes_the_least_recently_active_idle_connections_never_a_busy_one() {
        let conns = Conns::default();
        let (busy, newer, older) = (conns.register(), conns.register(), conns.register());
        let in_handler = InFlight::begin(&busy, false).unwrap();
        for (slot, at) in [(&busy, 1), (&newer, 500), (&older, 300)] {
            slot.last_active.store(at, Ordering::Relaxed);
        }
        let late = 10_000;
        assert_eq!(conns.evict_idle_at(1, late), 1);
        assert!(older.shed.is_cancelled() && !newer.shed.is_cancelled());
        // A request arriving on a shed connection is not handled.
        assert!(InFlight::begin(&older, false).is_none());
        assert_eq!(conns.evict_idle_at(10, late), 1);
        assert!(newer.shed.is_cancelled());
        assert!(
            !busy.shed.is_cancelled(),
            "a connection in its handler is never shed"
        );
        drop(in_handler);
        busy.last_active.store(1, Ordering::Relaxed);
        assert_eq!(conns.evict_idle_at(10, late), 1);
        assert!(busy.shed.is_cancelled());
    }

    #[test]
    fn a_body_still_arriving_is_shed_oldest_first_and_a_complete_one_never() {
        let conns = Conns::default();
        let (trickling, fresh, complete) = (conns.register(), conns.register(), conns.register());
        let arrival = |slot: &Arc<Slot>| BodyArrival {
            slot: slot.clone(),
            timeout: BODY_TIMEOUT,
        };
        let _t = InFlight::begin(&trickling, true).unwrap();
        let _f = InFlight::begin(&fresh, true).unwrap();
        let c = InFlight::begin(&complete, true).unwrap();
        assert!(arrival(&complete).complete(), "its body arrived");
        // Headers long ago, a byte a moment ago: the age counts from the headers.
        for (slot, at) in [(&trickling, 1), (&fresh, 900), (&complete, 0)] {
            slot.last_active.store(at, Ordering::Relaxed);
        }
        let late = 10_000;
        assert_eq!(conns.evict_idle_at(1, late), 1);
        assert!(trickling.shed.is_cancelled() && !fresh.shed.is_cancelled());
        // The shed body completes too late: the request is not handled.
        assert!(!arrival(&trickling).complete());
        assert_eq!(
            conns.evict_idle_at(10, late),
            1,
            "only the other body still arriving"
        );
        assert!(fresh.shed.is_cancelled() && !complete.shed.is_cancelled());
        // Once handled, the connection is idle again and sheddable.
        drop(c);
        complete.last_active.store(0, Ordering::Relaxed);
        assert_eq!(conns.evict_idle_at(10, late), 1);
        assert!(complete.shed.is_cancelled());
    }

    #[test]
    fn a_connection_within_its_grace_is_never_shed() {
        let conns = Conns::default();
        let (young, old) = (conns.register(), conns.register());
        let _r = InFlight::begin(&young, true).unwrap();
        let grace = u64::try_from(SHED_GRACE.as_millis()).unwrap();
        young
            .last_active
            .store(10_000 - grace + 1, Ordering::Relaxed);
        old.last_active.store(10_000 - grace, Ordering::Relaxed);
        assert_eq!(conns.evict_idle_at(10, 10_000), 1);
        assert!(old.shed.is_cancelled() && !young.shed.is_cancelled());
        assert_eq!(conns.evict_idle_at(10, 10_000), 0, "the young one waits");
    }
}
