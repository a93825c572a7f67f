// SPDX-License-Identifier: Apache-2.0
//! The table of open API connections, so that slow or idle clients can never
//! lock the API out.
//!
//! Every accepted connection gets a slot. A connection is *busy* while the
//! VMM works on one of its requests (from the moment its body has been read
//! until the answer is ready) and *idle* otherwise: connected and silent,
//! part-way through a request head or body, or waiting between keep-alive
//! requests. When the table is full (or the process is out of descriptors), a
//! new connection evicts the idle one that has been quiet the longest: its
//! socket is closed at once. A busy connection is never evicted, so an
//! answered request is never lost; only when every slot is busy is a new
//! connection refused. A client that keeps reconnecting only evicts its own
//! older connections before a fresh one that has already sent its request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

#[derive(Debug)]
struct Slot {
    busy: bool,
    /// When it was last active, as a tick of [`Inner::clock`].
    last_active: u64,
    evict: Option<oneshot::Sender<()>>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// Counts activity: strictly ordered, unlike clock readings.
    clock: u64,
    slots: HashMap<u64, Slot>,
}

/// The shared table; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct Connections {
    inner: Arc<Mutex<Inner>>,
    max: usize,
}

/// What [`Connections::admit`] decided for a new connection.
#[derive(Debug)]
pub(super) enum Admission {
    /// Serve it; the receiver fires if it is evicted later.
    Admitted(Tracker, oneshot::Receiver<()>),
    /// Every slot is busy: close it.
    Full,
}

impl Connections {
    /// A table of at most `max` connections (at least one).
    pub(super) fn new(max: usize) -> Self {
        Self {
            inner: Arc::default(),
            max: max.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; a poisoned table is still
        // consistent (every update is a single insert/remove/assignment).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections in the table.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// Makes room for a new connection if the table is full, and admits it.
    pub(super) fn admit(&self) -> Admission {
        let mut t = self.lock();
        if t.slots.len() >= self.max && !evict_oldest_idle(&mut t) {
            return Admission::Full;
        }
        let id = t.next_id;
        t.next_id += 1;
        t.clock += 1;
        let last_active = t.clock;
        let (tx, rx) = oneshot::channel();
        t.slots.insert(
            id,
            Slot {
                busy: false,
                last_active,
                evict: Some(tx),
            },
        );
        Admission::Admitted(
            Tracker {
                table: self.clone(),
                id,
            },
            rx,
        )
    }

    /// Closes the longest-idle connection, e.g. to free a descriptor.
    /// Returns whether there was one.
    pub(super) fn evict_one(&self) -> bool {
        evict_oldest_idle(&mut self.lock())
    }
}

/// Removes the idle slot with the oldest activity and tells its task to close.
fn evict_oldest_idle(t: &mut Inner) -> bool {
    let victim = t
        .slots
        .iter()
        .filter(|(_, s)| !s.busy)
        .min_by_key(|(_, s)| s.last_active)
        .map(|(id, _)| *id);
    let Some(id) = victim else {
        return false;
    };
    if let Some(mut slot) = t.slots.remove(&id) {
        if let Some(tx) = slot.evict.take() {
            // The task may be ending on its own already: nothing to tell then.
            let _ = tx.send(());
        }
        // Debug only: a client flooding connections must not flood the log.
        log::debug!("API server: connection limit reached, closing the longest-idle connection");
    }
    true
}

/// One connection's slot, shared by its task and its request handler.
#[derive(Debug, Clone)]
pub(super) struct Tracker {
    table: Connections,
    id: u64,
}

impl Tracker {
    fn update(&self, busy: bool) {
        let mut t = self.table.lock();
        t.clock += 1;
        let now = t.clock;
        if let Some(s) = t.slots.get_mut(&self.id) {
            s.busy = busy;
            s.last_active = now;
        }
    }

    /// A request head arrived: the connection is active (still evictable).
    pub(super) fn active(&self) {
        self.update(false);
    }

    /// The VMM is working on a request: never evict until [`Self::idle`].
    pub(super) fn busy(&self) {
        self.update(true);
    }

    /// The answer is ready: evictable again, as the most recently active.
    pub(super) fn idle(&self) {
        self.update(false);
    }

    /// Frees the slot (the connection ended).
    pub(super) fn release(&self) {
        self.table.lock().slots.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(c: &Connections) -> (Tracker, oneshot::Receiver<()>) {
        match c.admit() {
            Admission::Admitted(t, rx) => (t, rx),
            Admission::Full => panic!("refused"),
        }
    }

    #[test]
    fn test_full_table_evicts_longest_idle_never_busy() {
        let c = Connections::new(3);
        let (a, mut a_rx) = admitted(&c);
        let (b, mut b_rx) = admitted(&c);
        let (d, mut d_rx) = admitted(&c);
        a.busy();
        b.active();
        d.active();
        // b is the oldest idle one (a is busy, d was active after b).
        let (_e, mut e_rx) = admitted(&c);
        assert_eq!(b_rx.try_recv(), Ok(()));
        assert!(a_rx.try_recv().is_err());
        assert!(d_rx.try_recv().is_err());
        assert_eq!(c.len(), 3);
        // A finished request makes a the most recently active: d goes next.
        a.idle();
        let _f = admitted(&c);
        assert_eq!(d_rx.try_recv(), Ok(()));
        assert!(a_rx.try_recv().is_err());
        assert!(e_rx.try_recv().is_err());
        // Releasing frees a slot without evicting anyone.
        a.release();
        let _g = admitted(&c);
        assert!(e_rx.try_recv().is_err());
    }

    #[test]
    fn test_all_busy_refuses_and_evict_one_needs_an_idle_slot() {
        let c = Connections::new(2);
        let (a, _a_rx) = admitted(&c);
        let (b, _b_rx) = admitted(&c);
        a.busy();
        b.busy();
        assert!(matches!(c.admit(), Admission::Full));
        assert!(!c.evict_one());
        b.idle();
        assert!(c.evict_one());
        assert_eq!(c.len(), 1);
    }
}
