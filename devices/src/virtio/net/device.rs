// SPDX-License-Identifier: Apache-2.0
//! The virtio-net device: features, config space, activation and reset.

use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::NetMetrics;
use super::{
    tap_offload_flags, BASE_FEATURES, CONFIG_SPACE_LEN, EVENT_IDX_FEATURE, NUM_QUEUES, QUEUE_SIZE,
    RX_BUF_LEN, VIRTIO_ID_NET,
};
use crate::net::{MacAddr, Tap};
use crate::virtio::{ActivateError, IrqTrigger, VirtioDevice, VIRTIO_INT_VRING};
use crate::GuestMemoryMmap;

/// Smallest MTU accepted (IPv4 minimum).
pub const MIN_MTU: u16 = 68;

/// Why a virtio-net device could not be created or run.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MTU is outside what Ethernet over a TAP allows.
    #[error("Invalid MTU {mtu} for TAP {tap}: must be between 68 and 65535")]
    Mtu {
        /// The TAP.
        tap: String,
        /// The rejected MTU.
        mtu: u16,
    },
    /// The queue size is not a power of two between 2 and 32768.
    #[error("Invalid queue size {size} for TAP {tap}: must be a power of two between 2 and 32768")]
    QueueSize {
        /// The TAP.
        tap: String,
        /// The rejected size.
        size: u16,
    },
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd for the virtio-net device on TAP {tap}: {source}")]
    EventFd {
        /// The TAP.
        tap: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The virtio-queue layer reported an error on guest-provided rings.
    #[error("virtio-net on TAP {tap}: queue error: {source}")]
    Queue {
        /// The TAP.
        tap: String,
        /// The queue error.
        #[source]
        source: virtio_queue::Error,
    },
    /// The interrupt could not be raised.
    #[error("virtio-net on TAP {tap}: cannot raise interrupt: {source}")]
    Interrupt {
        /// The TAP.
        tap: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// How to build a [`Net`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// The MTU advertised to the guest (`VIRTIO_NET_F_MTU`); set the TAP's to match.
    pub mtu: u16,
    /// Maximum queue size offered for both queues.
    pub queue_size: u16,
    /// Whether to offer `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
}

impl NetConfig {
    /// Defaults: MTU 1500, 256-entry queues, event index offered.
    pub fn new(mac: MacAddr) -> Self {
        Self {
            mac,
            mtu: 1500,
            queue_size: QUEUE_SIZE,
            event_idx: true,
        }
    }
}

/// What exists only between activation and reset.
pub(crate) struct Active {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) irq: Arc<IrqTrigger>,
    pub(crate) queues: Vec<Queue>,
    pub(crate) queue_evts: Vec<EventFd>,
}

/// A virtio-net device over a TAP-like backend `T`.
pub struct Net<T: Tap> {
    pub(crate) tap: T,
    pub(crate) config: NetConfig,
    pub(crate) avail_features: u64,
    pub(crate) acked_features: u64,
    pub(crate) queue_sizes: [u16; NUM_QUEUES],
    /// Written on activation and reset so the event handler (re)registers fds.
    pub(crate) activate_evt: EventFd,
    pub(crate) active: Option<Active>,
    /// Queue eventfds of a reset device, kept open until the event handler
    /// has unregistered them.
    pub(crate) retired_evts: Vec<EventFd>,
    /// Frame read from the TAP: header + data.
    pub(crate) rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` not yet delivered (0 = none).
    pub(crate) rx_pending: usize,
    /// Guest chains set aside for the pending frame (MRG_RXBUF), and their
    /// total capacity.
    pub(crate) rx_reserved: Vec<super::rx::RxChain>,
    pub(crate) rx_reserved_cap: usize,
    /// A malformed chain was consumed between reserved ones, so they are not
    /// the last `rx_reserved.len()` chains popped.
    pub(crate) rx_reserved_gap: bool,
    pub(crate) metrics: Arc<NetMetrics>,
    pub(crate) events: super::event_handler::EventState,
}

impl<T: Tap> std::fmt::Debug for Net<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("config", &self.config)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.active.is_some())
            .field("rx_pending", &self.rx_pending)
            .finish()
    }
}

impl<T: Tap> Net<T> {
    /// A device over `tap`. The TAP should already be configured (see
    /// [`crate::net::open_tap`]); offloads are set on activation.
    pub fn new(tap: T, config: NetConfig) -> Result<Self, NetError> {
        let tap_name = tap.name().to_string();
        if config.mtu < MIN_MTU {
            return Err(NetError::Mtu {
                tap: tap_name,
                mtu: config.mtu,
            });
        }
        if !config.queue_size.is_power_of_two()
            || config.queue_size < 2
            || config.queue_size > 32768
        {
            return Err(NetError::QueueSize {
                tap: tap_name,
                size: config.queue_size,
            });
        }
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| NetError::EventFd {
            tap: tap_name,
            source,
        })?;
        let mut avail_features = BASE_FEATURES;
        if config.event_idx {
            avail_features |= EVENT_IDX_FEATURE;
        }
        Ok(Net {
            tap,
            queue_sizes: [config.queue_size; NUM_QUEUES],
            config,
            avail_features,
            acked_features: 0,
            activate_evt,
            active: None,
            retired_evts: Vec::new(),
            rx_buf: vec![0u8; RX_BUF_LEN],
            rx_pending: 0,
            rx_reserved: Vec::new(),
            rx_reserved_cap: 0,
            rx_reserved_gap: false,
            metrics: Arc::new(NetMetrics::default()),
            events: Default::default(),
        })
    }

    /// The counters of this device.
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// The backend.
    pub fn tap(&self) -> &T {
        &self.tap
    }

    /// The device configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Whether a frame read from the TAP waits for guest RX buffers.
    pub fn rx_frame_pending(&self) -> bool {
        self.rx_pending != 0
    }

    /// The eventfd the event handler watches for activation and reset.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    fn config_bytes(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut cfg = [0u8; CONFIG_SPACE_LEN];
        cfg[..6].copy_from_slice(&self.config.mac.bytes());
        let status = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;
        cfg[6..8].copy_from_slice(&status.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        cfg
    }

    pub(crate) fn has_feature(&self, feature: u64) -> bool {
        self.acked_features & feature == feature
    }

    /// Raises the vring interrupt if `queue` wants one. A failure is logged and
    /// counted: the device keeps running.
    pub(crate) fn signal_used(&mut self, queue: usize) {
        let tap = &self.tap;
        let metrics = &self.metrics;
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(q) = active.queues.get_mut(queue) else {
            return;
        };
        match q.needs_notification(&active.mem) {
            Ok(false) => {}
            Ok(true) => {
                NetMetrics::inc(&metrics.interrupts);
                if let Err(e) = active.irq.trigger(VIRTIO_INT_VRING) {
                    log::error!(
                        "virtio-net on TAP {}: cannot raise interrupt: {e}",
                        tap.name()
                    );
                }
            }
            Err(e) => {
                NetMetrics::inc(&metrics.queue_errors);
                log::warn!("virtio-net on TAP {}: {e}", tap.name());
                // Interrupt anyway: a spurious interrupt is harmless.
                let _ = active.irq.trigger(VIRTIO_INT_VRING);
            }
        }
    }
}

/// Returns a chain to the guest. A head outside the queue (a bogus avail-ring
/// entry) cannot be returned; it is counted and skipped so the queue keeps
/// running.
pub(crate) fn add_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32, m: &NetMetrics) {
    if let Err(e) = q.add_used(mem, head, len) {
        NetMetrics::inc(&m.queue_errors);
        log::debug!("virtio-net: cannot return chain {head}: {e}");
    }
}

impl<T: Tap> VirtioDevice for Net<T> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| a.queues.as_slice())
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only in virtio 1.x (the MAC is writable only
        // with VIRTIO_NET_F_CTRL_MAC_ADDR, which is not offered).
        log::debug!(
            "virtio-net on TAP {}: ignoring config write of {} bytes at {offset}",
            self.tap.name(),
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Arc<IrqTrigger>,
        mut queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES || queue_evts.len() != NUM_QUEUES {
            return Err(ActivateError::BadQueue(format!(
                "virtio-net on TAP {} needs {NUM_QUEUES} queues and eventfds, got {} and {}",
                self.tap.name(),
                queues.len(),
                queue_evts.len()
            )));
        }
        let event_idx = self.has_feature(EVENT_IDX_FEATURE);
        for q in queues.iter_mut() {
            q.set_event_idx(event_idx);
        }
        self.tap
            .set_offload(tap_offload_flags(self.acked_features))
            .map_err(|e| ActivateError::Events(io::Error::other(e.to_string())))?;
        if let Some(old) = self.active.take() {
            self.retired_evts.extend(old.queue_evts);
        }
        self.rx_reserved.clear();
        self.rx_reserved_cap = 0;
        self.events.needs_register = true;
        self.active = Some(Active {
            mem,
            irq,
            queues,
            queue_evts,
        });
        self.activate_evt.write(1).map_err(ActivateError::Events)?;
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            self.retired_evts.extend(active.queue_evts);
        }
        self.rx_pending = 0;
        self.rx_reserved.clear();
        self.rx_reserved_cap = 0;
        self.acked_features = 0;
        if let Err(e) = self.tap.set_offload(0) {
            log::warn!("{e}");
        }
        if let Err(e) = self.activate_evt.write(1) {
            log::warn!(
                "virtio-net on TAP {}: cannot signal reset: {e}",
                self.tap.name()
            );
        }
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}
