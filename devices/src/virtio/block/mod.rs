// SPDX-License-Identifier: Apache-2.0
//! virtio-blk: a block device over any [`crate::disk::DiskBackend`].
//!
//! One request queue of [`QUEUE_SIZE`] entries. Requests are parsed and
//! validated against guest memory and the disk in [`request`], executed
//! synchronously on the event-loop thread, and completed in order.
//!
//! # Wiring (VMM side)
//!
//! ```ignore
//! let disk: Box<dyn DiskBackend> = /* raw or qcow2 backend */;
//! let blk = Arc::new(Mutex::new(Block::new(
//!     BlockArgs { id, path, read_only, serial: None },
//!     disk,
//! )?));
//! let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK)?));
//! vm_fd.register_irqfd(&irq.evt, gsi)?;
//! let transport = MmioTransport::new(guest_mem.clone(), irq, blk.clone())?;
//! for (i, evt) in transport.queue_evts().iter().enumerate() {
//!     vm_fd.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), i as u32)?;
//! }
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)?;
//! event_manager.add_subscriber(blk); // Arc<Mutex<Block>>: MutEventSubscriber
//! // kernel cmdline: virtio_mmio.device=4K@<base>:<gsi>
//! ```

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod persist;
pub mod request;

#[cfg(test)]
mod tests;

pub use device::{Block, BlockArgs, BlockConfig};
pub use metrics::BlockMetrics;
pub use persist::BlockState;

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol (independent of `blk_size`).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID serial string.
pub const SERIAL_LEN: usize = 20;

/// Feature bit: `size_max` is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Feature bit: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature bit: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature bit: FLUSH is supported.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Feature bit: DISCARD is supported.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// Feature bit: WRITE_ZEROES is supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: get the device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request type: discard ranges.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Request type: zero ranges.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: I/O or request error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Discard/write-zeroes segment flag: the range may be deallocated.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
