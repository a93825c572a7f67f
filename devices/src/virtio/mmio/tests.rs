// SPDX-License-Identifier: Apache-2.0
//! Tests of the virtio-mmio transport against a dummy device.

use super::*;
use crate::virtio::{ActivateError, VIRTIO_INT_VRING, VIRTIO_RING_F_EVENT_IDX};
use vm_memory::GuestAddress;

const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | 0b101;

#[derive(Default)]
struct Dummy {
    acked: u64,
    config: [u8; 8],
    activated: bool,
    resets: u32,
    queues: Vec<Queue>,
    fail_activate: bool,
    broken: bool,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 32]
    }
    fn avail_features(&self) -> u64 {
        OFFERED
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        _irq: Arc<IrqTrigger>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        assert_eq!(queues.len(), queue_evts.len());
        if self.fail_activate {
            return Err(ActivateError::BadQueue("test".into()));
        }
        self.queues = queues;
        self.activated = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.activated = false;
        self.queues.clear();
    }
    fn is_activated(&self) -> bool {
        self.activated
    }
    fn queues(&self) -> &[Queue] {
        &self.queues
    }
    fn needs_reset(&self) -> bool {
        self.broken
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
    let dev = Arc::new(Mutex::new(Dummy::default()));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let t = MmioTransport::new(mem(), irq, dev.clone()).unwrap();
    (t, dev)
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport, features: u64) {
    wr(t, REG_STATUS, status::ACKNOWLEDGE);
    wr(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, REG_DRIVER_FEATURES_SEL, 0);
    wr(t, REG_DRIVER_FEATURES, features as u32);
    wr(t, REG_DRIVER_FEATURES_SEL, 1);
    wr(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    wr(
        t,
        REG_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

fn setup_queue(t: &mut MmioTransport, idx: u32, base: u64) {
    wr(t, REG_QUEUE_SEL, idx);
    wr(t, REG_QUEUE_NUM, 16);
    wr(t, REG_QUEUE_DESC_LOW, base as u32);
    wr(t, REG_QUEUE_DESC_HIGH, (base >> 32) as u32);
    wr(t, REG_QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
    wr(t, REG_QUEUE_AVAIL_HIGH, 0);
    wr(t, REG_QUEUE_USED_LOW, (base + 0x2000) as u32);
    wr(t, REG_QUEUE_USED_HIGH, 0);
    wr(t, REG_QUEUE_READY, 1);
}

const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

fn bring_up(t: &mut MmioTransport) {
    negotiate(
        t,
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
    );
    setup_queue(t, 0, 0x1_0000);
    setup_queue(t, 1, 0x2_0000);
    wr(t, REG_STATUS, ALL_OK);
}

#[test]
fn test_identity_registers() {
    let (mut t, _) = setup();
    assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
    assert_eq!(rd(&mut t, REG_VERSION), 2);
    assert_eq!(rd(&mut t, REG_DEVICE_ID), 42);
    assert_eq!(rd(&mut t, REG_VENDOR_ID), MMIO_VENDOR_ID);
    wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), OFFERED as u32);
    wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), (OFFERED >> 32) as u32);
    wr(&mut t, REG_DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0);
    wr(&mut t, REG_QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 32);
    wr(&mut t, REG_QUEUE_SEL, 2);
    assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0);
    assert_eq!(rd(&mut t, REG_SHM_LEN_LOW), u32::MAX);
    // Wrong access sizes read as zero and are ignored on write.
    let mut b = [0xffu8; 2];
    t.read(REG_MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    t.write(REG_STATUS, &[1, 0]);
    assert_eq!(rd(&mut t, REG_STATUS), 0);
    // Unknown offsets.
    assert_eq!(rd(&mut t, 0x0f0), 0);
    wr(&mut t, 0x0f0, 1);
}

#[test]
fn test_feature_negotiation() {
    let (mut t, dev) = setup();
    negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | 1);
    assert_eq!(
        rd(&mut t, REG_STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
    assert_eq!(dev.lock().unwrap().acked, (1 << VIRTIO_F_VERSION_1) | 1);
    // Features are frozen after FEATURES_OK.
    wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
    wr(&mut t, REG_DRIVER_FEATURES, 0);
    assert_eq!(t.save().driver_features, (1 << VIRTIO_F_VERSION_1) | 1);
}

#[test]
fn test_feature_negotiation_refused() {
    // No VERSION_1.
    let (mut t, dev) = setup();
    negotiate(&mut t, 1);
    assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(dev.lock().unwrap().acked, 0);
    // Unoffered feature.
    let (mut t, _) = setup();
    negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | 0b10);
    assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
    // A feature above bit 63.
    let (mut t, _) = setup();
    wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, REG_DRIVER_FEATURES_SEL, 2);
    wr(&mut t, REG_DRIVER_FEATURES, 1);
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
    // Features written before DRIVER are ignored.
    let (mut t, _) = setup();
    wr(&mut t, REG_DRIVER_FEATURES, 1);
    assert_eq!(t.save().driver_features, 0);
}

#[test]
fn test_status_state_machine() {
    let (mut t, _) = setup();
    // Skipping ACKNOWLEDGE.
    wr(&mut t, REG_STATUS, status::DRIVER);
    assert_eq!(rd(&mut t, REG_STATUS), 0);
    wr(&mut t, REG_STATUS, status::ACKNOWLEDGE);
    // DRIVER_OK before FEATURES_OK.
    wr(
        &mut t,
        REG_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE);
    // Clearing bits is ignored.
    wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, REG_STATUS, status::ACKNOWLEDGE);
    assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
    // The driver cannot set DEVICE_NEEDS_RESET.
    wr(
        &mut t,
        REG_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
    );
    assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
    // FAILED sticks.
    wr(
        &mut t,
        REG_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
    );
    assert_eq!(
        rd(&mut t, REG_STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED
    );
}

#[test]
fn test_activation_and_reset() {
    let (mut t, dev) = setup();
    bring_up(&mut t);
    assert_eq!(rd(&mut t, REG_STATUS), ALL_OK);
    {
        let d = dev.lock().unwrap();
        assert!(d.activated);
        assert_eq!(d.queues.len(), 2);
        assert_eq!(d.queues[0].size(), 16);
        assert!(d.queues[0].event_idx_enabled());
        assert_eq!(d.queues[1].desc_table(), 0x2_0000);
    }
    wr(&mut t, REG_QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
    assert_eq!(rd(&mut t, REG_QUEUE_AVAIL_LOW), 0x2_1000);
    // Queue registers are frozen after DRIVER_OK.
    wr(&mut t, REG_QUEUE_DESC_LOW, 0x5000);
    assert_eq!(rd(&mut t, REG_QUEUE_DESC_LOW), 0x2_0000);

    // Interrupt status and ack.
    t.irq()
        .trigger(VIRTIO_INT_VRING | VIRTIO_INT_CONFIG)
        .unwrap();
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 3);
    wr(&mut t, REG_INTERRUPT_ACK, VIRTIO_INT_VRING);
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), VIRTIO_INT_CONFIG);

    // Notify reaching the bus signals the queue eventfd.
    wr(&mut t, NOTIFY_REG_OFFSET, 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    wr(&mut t, NOTIFY_REG_OFFSET, 7);

    wr(&mut t, REG_STATUS, 0);
    assert_eq!(rd(&mut t, REG_STATUS), 0);
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
    let d = dev.lock().unwrap();
    assert!(!d.activated);
    assert_eq!(d.resets, 1);
    drop(d);
    wr(&mut t, REG_QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
    assert_eq!(rd(&mut t, REG_QUEUE_DESC_LOW), 0);
    // It can be brought up again.
    bring_up(&mut t);
    assert!(dev.lock().unwrap().activated);
}

#[test]
fn test_bad_queue_config_needs_reset() {
    // A queue outside guest memory.
    let (mut t, dev) = setup();
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 0x1_0000);
    setup_queue(&mut t, 1, 0xffff_0000);
    wr(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(rd(&mut t, REG_STATUS), ALL_OK | status::DEVICE_NEEDS_RESET);
    assert!(!dev.lock().unwrap().activated);
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), VIRTIO_INT_CONFIG);
    wr(&mut t, REG_STATUS, 0);
    assert_eq!(rd(&mut t, REG_STATUS), 0);

    // A queue that is not ready.
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 0x1_0000);
    wr(&mut t, REG_STATUS, ALL_OK);
    assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);

    // Invalid sizes.
    for size in [0u32, 3, 64, 0x1_0000] {
        let (mut t, _) = setup();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_NUM, size);
        assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    // Misaligned ring address is refused by virtio-queue and caught at DRIVER_OK.
    let (mut t, _) = setup();
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 0x1_0000);
    setup_queue(&mut t, 1, 0x2_0000);
    wr(&mut t, REG_QUEUE_SEL, 1);
    wr(&mut t, REG_QUEUE_USED_LOW, 0x2_2001);
    wr(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(rd(&mut t, REG_STATUS), ALL_OK);

    // Activation failure in the device.
    let (mut t, dev) = setup();
    dev.lock().unwrap().fail_activate = true;
    bring_up(&mut t);
    assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);

    // The device itself reports a broken ring.
    let (mut t, dev) = setup();
    bring_up(&mut t);
    dev.lock().unwrap().broken = true;
    assert_eq!(rd(&mut t, REG_STATUS), ALL_OK | status::DEVICE_NEEDS_RESET);
}

#[test]
fn test_config_space_forwarded() {
    let (mut t, _) = setup();
    t.write(CONFIG_SPACE_OFFSET + 2, &[0xaa, 0xbb]);
    let mut b = [0u8; 4];
    t.read(CONFIG_SPACE_OFFSET, &mut b);
    assert_eq!(b, [0, 0, 0xaa, 0xbb]);
    let mut b = [0xffu8; 1];
    t.read(CONFIG_SPACE_OFFSET + 100, &mut b);
    assert_eq!(b, [0]);
    assert_eq!(rd(&mut t, REG_CONFIG_GENERATION), 0);
    t.config_changed();
    assert_eq!(rd(&mut t, REG_CONFIG_GENERATION), 1);
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), VIRTIO_INT_CONFIG);
}

#[test]
fn test_save_restore_round_trip() {
    let (mut t, dev) = setup();
    bring_up(&mut t);
    dev.lock().unwrap().queues[0].set_next_avail(3);
    dev.lock().unwrap().queues[0].set_next_used(2);
    t.irq().trigger(VIRTIO_INT_VRING).unwrap();
    let s = t.save();
    assert_eq!(s.queues[0].next_avail, 3);
    let json = serde_json::to_string(&s).unwrap();
    let s2: MmioTransportState = serde_json::from_str(&json).unwrap();

    let dev2 = Arc::new(Mutex::new(Dummy::default()));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let t2 = MmioTransport::restore(mem(), irq, dev2.clone(), &s2).unwrap();
    assert!(dev2.lock().unwrap().activated);
    assert_eq!(dev2.lock().unwrap().queues[0].next_used(), 2);
    assert_eq!(t2.save(), s);

    // Mismatched state is refused.
    let mut bad = s.clone();
    bad.queues.pop();
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let dev3 = Arc::new(Mutex::new(Dummy::default()));
    assert!(MmioTransport::restore(mem(), irq.clone(), dev3.clone(), &bad).is_err());
    let mut bad = s;
    bad.acked_features |= 0b10;
    assert!(MmioTransport::restore(mem(), irq, dev3, &bad).is_err());
}
