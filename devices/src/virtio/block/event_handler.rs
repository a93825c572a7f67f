// SPDX-License-Identifier: Apache-2.0
//! Event-loop glue: the block device as an `event_manager` subscriber.
//!
//! `init()` registers the activation eventfd. Activation and reset (which run
//! on a vCPU thread, through the transport) write that eventfd; the handler then
//! swaps the registered queue eventfds. A queue eventfd event processes the queue.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};

use super::Block;

impl Block {
    fn sync_registration(&mut self, ops: &mut EventOps) {
        for evt in self.registered_evts.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                warn!(
                    "virtio-blk {}: cannot unregister queue event: {e}",
                    self.args.id
                );
            }
        }
        if !self.activated {
            return;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            let copy = match evt.try_clone() {
                Ok(c) => c,
                Err(e) => {
                    error!(
                        "virtio-blk {}: cannot clone queue eventfd: {e}",
                        self.args.id
                    );
                    continue;
                }
            };
            if let Err(e) = ops.add(Events::with_data(&copy, i as u32, EventSet::IN)) {
                error!(
                    "virtio-blk {}: cannot register queue event: {e}",
                    self.args.id
                );
                continue;
            }
            self.registered_evts.push(copy);
        }
        // Requests may have been queued before registration (e.g. on restore).
        self.process_and_signal();
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            error!(
                "virtio-blk {}: cannot register activation event: {e}",
                self.args.id
            );
        }
        // A device activated before registration (restore) starts now.
        if self.activated {
            let _ = self.activate_evt.read();
            self.sync_registration(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::unix::io::AsRawFd;
        if events.fd() == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            self.sync_registration(ops);
            return;
        }
        let Some(evt) = self
            .registered_evts
            .iter()
            .find(|e| e.as_raw_fd() == events.fd())
        else {
            warn!(
                "virtio-blk {}: event for unknown fd {}",
                self.args.id,
                events.fd()
            );
            return;
        };
        // EAGAIN just means another wakeup already drained it.
        let _ = evt.read();
        self.process_and_signal();
    }
}
