// SPDX-License-Identifier: Apache-2.0
//! `event-manager` glue for [`Net`]: a thin layer over `process_tx` /
//! `process_rx`.
//!
//! `init` registers the activation eventfd. Activation (and reset) write it;
//! the handler then registers the queue eventfds and the TAP fd (or drops the
//! retired ones). When RX runs out of guest buffers the TAP stays registered
//! with an empty interest set, so it costs nothing until the RX queue is
//! notified.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::rx::RxStatus;
use super::{Net, RX_INDEX, TX_INDEX};
use crate::net::Tap;

const DATA_ACTIVATE: u32 = 0;
const DATA_RX_QUEUE: u32 = 1;
const DATA_TX_QUEUE: u32 = 2;
const DATA_TAP: u32 = 3;

/// Which fds the handler has registered.
#[derive(Debug, Default)]
pub(crate) struct EventState {
    /// Set by `activate`: queue eventfds and TAP need registering.
    pub(crate) needs_register: bool,
    pub(crate) queues_registered: bool,
    pub(crate) tap_registered: bool,
    /// Whether the TAP is watched for readability (false while RX waits for
    /// guest buffers).
    pub(crate) tap_polling: bool,
}

impl<T: Tap> Net<T> {
    fn set_tap_polling(&mut self, ops: &mut EventOps, on: bool) {
        if !self.events.tap_registered || self.events.tap_polling == on {
            return;
        }
        let set = if on { EventSet::IN } else { EventSet::empty() };
        match ops.modify(Events::with_data(&self.tap, DATA_TAP, set)) {
            Ok(()) => self.events.tap_polling = on,
            Err(e) => log::error!("TAP {}: cannot change epoll interest: {e}", self.tap.name()),
        }
    }

    fn run_rx(&mut self, ops: &mut EventOps) {
        match self.process_rx() {
            Ok(RxStatus::NeedBuffers) => self.set_tap_polling(ops, false),
            Ok(RxStatus::Drained) | Ok(RxStatus::Budget) => self.set_tap_polling(ops, true),
            Err(e) => log::error!("{e}"),
        }
    }

    fn run_tx(&mut self) {
        if let Err(e) = self.process_tx() {
            log::error!("{e}");
        }
    }

    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.retired_evts.drain(..) {
            let _ = ops.remove(Events::empty(&evt));
        }
        let Some(active) = self.active.as_ref() else {
            self.events.queues_registered = false;
            self.events.needs_register = false;
            if self.events.tap_registered {
                let _ = ops.remove(Events::empty(&self.tap));
                self.events.tap_registered = false;
                self.events.tap_polling = false;
            }
            return;
        };
        if !self.events.needs_register {
            return;
        }
        self.events.needs_register = false;
        for (idx, data) in [(RX_INDEX, DATA_RX_QUEUE), (TX_INDEX, DATA_TX_QUEUE)] {
            if let Err(e) = ops.add(Events::with_data(
                &active.queue_evts[idx],
                data,
                EventSet::IN,
            )) {
                log::error!(
                    "virtio-net on TAP {}: cannot watch queue {idx}: {e}",
                    self.tap.name()
                );
            }
        }
        self.events.queues_registered = true;
        if !self.events.tap_registered {
            match ops.add(Events::with_data(&self.tap, DATA_TAP, EventSet::IN)) {
                Ok(()) => {
                    self.events.tap_registered = true;
                    self.events.tap_polling = true;
                }
                Err(e) => log::error!("TAP {}: cannot watch it: {e}", self.tap.name()),
            }
        }
        // The guest may have queued work before we were watching.
        self.run_tx();
        self.run_rx(ops);
    }

    fn drain_queue_evt(&self, idx: usize) {
        if let Some(active) = self.active.as_ref() {
            let _ = active.queue_evts[idx].read();
        }
    }
}

impl<T: Tap> MutEventSubscriber for Net<T> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            DATA_ACTIVATE,
            EventSet::IN,
        )) {
            log::error!(
                "virtio-net on TAP {}: cannot watch activation: {e}",
                self.tap.name()
            );
        }
        if self.active.is_some() {
            self.events.needs_register = true;
            self.sync_registrations(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use super::metrics::NetMetrics;
        match events.data() {
            DATA_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_registrations(ops);
            }
            DATA_RX_QUEUE => {
                NetMetrics::inc(&self.metrics.rx_queue_events);
                self.drain_queue_evt(RX_INDEX);
                self.run_rx(ops);
            }
            DATA_TX_QUEUE => {
                NetMetrics::inc(&self.metrics.tx_queue_events);
                self.drain_queue_evt(TX_INDEX);
                self.run_tx();
            }
            DATA_TAP => {
                NetMetrics::inc(&self.metrics.tap_events);
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    // E.g. the interface was deleted under us: epoll would
                    // report this forever, so stop watching the TAP.
                    NetMetrics::inc(&self.metrics.rx_tap_errors);
                    log::error!(
                        "TAP {} failed (deleted?); no longer receiving from it",
                        self.tap.name()
                    );
                    let _ = ops.remove(Events::empty(&self.tap));
                    self.events.tap_registered = false;
                    self.events.tap_polling = false;
                    return;
                }
                self.run_rx(ops);
            }
            other => log::warn!(
                "virtio-net on TAP {}: unexpected event {other}",
                self.tap.name()
            ),
        }
    }
}
