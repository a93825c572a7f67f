// SPDX-License-Identifier: Apache-2.0
//! The virtio-blk device: configuration space, features and queue processing.

use std::path::PathBuf;
use std::sync::Arc;

use log::{error, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::BlockMetrics;
use super::request::{self, Limits, ParseError, Segment};
use super::*;
use crate::disk::DiskBackend;
use crate::virtio::{
    ActivateError, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_INT_CONFIG,
    VIRTIO_INT_VRING, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::GuestMemoryMmap;

/// Length of the configuration space we expose (up to `write_zeroes_may_unmap`
/// and its padding).
pub const CONFIG_LEN: usize = 60;

/// How the VMM describes a block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockArgs {
    /// Drive ID (also the default serial).
    pub id: String,
    /// Path of the disk image, kept for snapshots.
    pub path: PathBuf,
    /// Refuse writes even if the backend allows them.
    pub read_only: bool,
    /// GET_ID string; truncated to 20 bytes. Defaults to `id`.
    pub serial: Option<String>,
}

/// The virtio-blk configuration space fields we fill in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum bytes in one data segment.
    pub size_max: u32,
    /// Maximum number of data segments in one request.
    pub seg_max: u32,
    /// Logical block size.
    pub blk_size: u32,
    /// Maximum sectors in one discard range.
    pub max_discard_sectors: u32,
    /// Maximum ranges in one discard request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Maximum sectors in one write-zeroes range.
    pub max_write_zeroes_sectors: u32,
    /// Maximum ranges in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may deallocate.
    pub write_zeroes_may_unmap: bool,
}

impl BlockConfig {
    /// Defaults for a disk of `size` bytes.
    pub fn for_size(size: u64) -> Self {
        Self {
            capacity: size / SECTOR_SIZE,
            size_max: 1 << 20,
            seg_max: u32::from(QUEUE_SIZE) - 2,
            blk_size: 512,
            max_discard_sectors: u32::MAX >> 9,
            max_discard_seg: request::MAX_RANGES,
            discard_sector_alignment: 1,
            max_write_zeroes_sectors: u32::MAX >> 9,
            max_write_zeroes_seg: request::MAX_RANGES,
            write_zeroes_may_unmap: true,
        }
    }

    /// The little-endian configuration space layout.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20 geometry: unused.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        // 24..32 topology, 32 writeback, 33 unused, 34..36 num_queues: zero.
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = u8::from(self.write_zeroes_may_unmap);
        b
    }
}

/// A virtio block device.
pub struct Block {
    pub(super) args: BlockArgs,
    pub(super) serial: [u8; SERIAL_LEN],
    pub(super) read_only: bool,
    pub(super) disk: Box<dyn DiskBackend>,
    pub(super) config: BlockConfig,
    pub(super) avail_features: u64,
    pub(super) acked_features: u64,
    pub(super) mem: Option<GuestMemoryMmap>,
    pub(super) irq: Option<Arc<IrqTrigger>>,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) activated: bool,
    pub(super) broken: bool,
    /// Written on activate/reset; the event handler then (un)registers queues.
    pub(super) activate_evt: EventFd,
    /// Queue eventfds currently registered with the event loop.
    pub(super) registered_evts: Vec<EventFd>,
    pub(super) metrics: Arc<BlockMetrics>,
    segs: Vec<Segment>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("args", &self.args)
            .field("config", &self.config)
            .field("activated", &self.activated)
            .finish()
    }
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The activation eventfd could not be created.
    #[error("Cannot create the activation eventfd of block device {id}: {source}")]
    EventFd {
        /// Drive ID.
        id: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The backing file could not be swapped.
    #[error("Cannot swap the disk of block device {id}: {reason}")]
    Swap {
        /// Drive ID.
        id: String,
        /// Why.
        reason: String,
    },
    /// The saved state does not match the disk.
    #[error("Saved state of block device {id} does not match its disk: {reason}")]
    Mismatch {
        /// Drive ID.
        id: String,
        /// What differs.
        reason: String,
    },
}

fn serial_bytes(s: &str) -> [u8; SERIAL_LEN] {
    let mut b = [0u8; SERIAL_LEN];
    let n = s.len().min(SERIAL_LEN);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b
}

impl Block {
    /// A block device over `disk`; read-only if `args.read_only` or the backend is.
    pub fn new(args: BlockArgs, disk: Box<dyn DiskBackend>) -> Result<Self, BlockError> {
        let config = BlockConfig::for_size(disk.size());
        Self::with_config(args, disk, config)
    }

    pub(super) fn with_config(
        args: BlockArgs,
        disk: Box<dyn DiskBackend>,
        config: BlockConfig,
    ) -> Result<Self, BlockError> {
        let read_only = args.read_only || disk.read_only();
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| BlockError::EventFd {
            id: args.id.clone(),
            source,
        })?;
        let serial = serial_bytes(args.serial.as_deref().unwrap_or(&args.id));
        Ok(Self {
            args,
            serial,
            read_only,
            disk,
            config,
            avail_features,
            acked_features: 0,
            mem: None,
            irq: None,
            queues: Vec::new(),
            queue_evts: Vec::new(),
            activated: false,
            broken: false,
            activate_evt,
            registered_evts: Vec::new(),
            metrics: Arc::new(BlockMetrics::default()),
            segs: Vec::with_capacity(config.seg_max as usize),
        })
    }

    /// Drive ID.
    pub fn id(&self) -> &str {
        &self.args.id
    }

    /// The device's counters (shareable; read without locking the device).
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// The configuration space contents.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Whether the device refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Releases the image lock for a same-host migration handover.
    pub fn release_lock(&mut self) -> std::io::Result<()> {
        self.disk.release_lock()
    }

    /// Takes the image lock back after a failed handover.
    pub fn reacquire_lock(&mut self) -> std::io::Result<()> {
        self.disk.reacquire_lock()
    }

    /// Makes every write completed so far durable (before a snapshot).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.disk.flush()
    }

    /// Path of the disk image.
    pub fn path(&self) -> &std::path::Path {
        &self.args.path
    }

    /// Swaps the backing image of a live device (`PATCH /drives`): everything
    /// written so far is flushed to the old image first; the capacity follows
    /// the new image. A writable device cannot be given a read-only image, as
    /// the driver already negotiated it writable. The caller raises the
    /// config-change interrupt.
    pub fn replace_disk(
        &mut self,
        path: std::path::PathBuf,
        disk: Box<dyn DiskBackend>,
    ) -> Result<(), BlockError> {
        let swap_err = |reason: String| BlockError::Swap {
            id: self.args.id.clone(),
            reason,
        };
        if !self.read_only && disk.read_only() {
            return Err(swap_err(format!(
                "{} is read-only but the drive is writable",
                path.display()
            )));
        }
        self.disk
            .flush()
            .map_err(|e| swap_err(format!("flushing the old image failed: {e}")))?;
        self.disk = disk;
        self.config.capacity = self.disk.size() / SECTOR_SIZE;
        self.args.path = path;
        Ok(())
    }

    fn limits(&self) -> Limits {
        let acked = |bit: u32| self.acked_features & (1 << bit) != 0;
        Limits {
            capacity: self.config.capacity,
            seg_max: self.config.seg_max,
            size_max: self.config.size_max,
            read_only: self.read_only,
            max_discard_sectors: self.config.max_discard_sectors,
            max_discard_seg: self.config.max_discard_seg,
            max_write_zeroes_sectors: self.config.max_write_zeroes_sectors,
            max_write_zeroes_seg: self.config.max_write_zeroes_seg,
            discard: acked(VIRTIO_BLK_F_DISCARD),
            write_zeroes: acked(VIRTIO_BLK_F_WRITE_ZEROES),
        }
    }

    fn mark_broken(&mut self, why: &str) {
        error!(
            "virtio-blk {}: broken queue, device needs reset: {why}",
            self.args.id
        );
        self.broken = true;
        self.metrics.inc_broken();
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.trigger(VIRTIO_INT_CONFIG) {
                warn!("virtio-blk {}: cannot raise interrupt: {e}", self.args.id);
            }
        }
    }

    /// Processes every available request on the queue. Returns whether the
    /// driver must be interrupted (honours `VIRTIO_RING_F_EVENT_IDX`).
    pub fn process_queue(&mut self) -> bool {
        if !self.activated || self.broken {
            return false;
        }
        let limits = self.limits();
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.first_mut()) else {
            return false;
        };
        let event_idx = queue.event_idx_enabled();
        let mut used_any = false;
        let mut broken: Option<String> = None;
        'outer: loop {
            if event_idx {
                if let Err(e) = queue.disable_notification(mem) {
                    broken = Some(format!("cannot disable notifications: {e}"));
                    break;
                }
            }
            loop {
                let chain = match queue.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        broken = Some(format!("bad available ring: {e}"));
                        break 'outer;
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let len = handle_chain(
                    mem,
                    &mut *self.disk,
                    chain,
                    &limits,
                    &mut self.segs,
                    &self.serial,
                    &self.metrics,
                );
                if let Err(e) = queue.add_used(mem, head, len) {
                    broken = Some(format!("cannot add used entry for head {head}: {e}"));
                    break 'outer;
                }
                used_any = true;
            }
            if !event_idx {
                break;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    broken = Some(format!("cannot enable notifications: {e}"));
                    break;
                }
            }
        }
        let notify = if used_any && broken.is_none() {
            match queue.needs_notification(mem) {
                Ok(n) => n,
                Err(e) => {
                    broken = Some(format!("cannot read used event: {e}"));
                    true
                }
            }
        } else {
            used_any
        };
        if let Some(why) = broken {
            self.mark_broken(&why);
        }
        notify
    }

    /// Interrupts the driver for used buffers.
    pub fn signal_used(&self) {
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.trigger(VIRTIO_INT_VRING) {
                warn!("virtio-blk {}: cannot raise interrupt: {e}", self.args.id);
            }
        }
    }

    /// Processes the queue and interrupts the driver if needed.
    pub fn process_and_signal(&mut self) {
        if self.process_queue() {
            self.signal_used();
        }
    }
}

/// Executes one chain and returns the used length.
fn handle_chain<M>(
    mem: &GuestMemoryMmap,
    disk: &mut dyn DiskBackend,
    chain: virtio_queue::DescriptorChain<M>,
    limits: &Limits,
    segs: &mut Vec<Segment>,
    serial: &[u8; SERIAL_LEN],
    metrics: &BlockMetrics,
) -> u32
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    metrics.inc_requests();
    let (req, completion) = match request::parse(mem, chain, limits, segs) {
        Ok(req) => {
            let c = request::execute(mem, disk, &req, segs, limits, serial);
            if c.status == super::VIRTIO_BLK_S_OK {
                metrics.record_ok(req.kind);
            }
            (req.status, c)
        }
        Err(ParseError::NoStatus) => {
            metrics.inc_invalid();
            return 0;
        }
        Err(ParseError::Invalid { status, reason }) => {
            warn!("virtio-blk: {reason}");
            metrics.inc_invalid();
            (
                status,
                request::Completion {
                    status: VIRTIO_BLK_S_IOERR,
                    len: 1,
                    read: 0,
                    written: 0,
                },
            )
        }
    };
    metrics.record(&completion);
    if request::write_status(mem, completion.status, req) {
        completion.len
    } else {
        // Unreachable: the status address was checked while parsing.
        0
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
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
        crate::virtio::read_config_space(&self.config.to_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE (not offered).
        warn!(
            "virtio-blk {}: ignored config write of {} bytes at {offset:#x}",
            self.args.id,
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Arc<IrqTrigger>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 || queue_evts.len() != 1 {
            return Err(ActivateError::BadQueue(format!(
                "virtio-blk needs 1 queue, got {}",
                queues.len()
            )));
        }
        self.mem = Some(mem);
        self.irq = Some(irq);
        self.queues = queues;
        self.queue_evts = queue_evts;
        self.activated = true;
        // `broken` is only cleared by reset(): a restored broken device stays so.
        self.activate_evt.write(1).map_err(ActivateError::Events)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.activated = false;
        self.broken = false;
        self.acked_features = 0;
        self.queues.clear();
        self.queue_evts.clear();
        self.mem = None;
        self.irq = None;
        // The event handler unregisters the old queue eventfds.
        if let Err(e) = self.activate_evt.write(1) {
            warn!("virtio-blk {}: cannot signal reset: {e}", self.args.id);
        }
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
