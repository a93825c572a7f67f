// SPDX-License-Identifier: Apache-2.0
//! wisp's devices: the MMIO/PIO bus, legacy devices, disk backends and virtio devices.
//!
//! Every device keeps what a snapshot needs in a plain serializable `XxxState` struct
//! that lives beside it.

pub mod bus;
pub mod disk;
pub mod legacy;
pub mod net;
pub mod virtio;

/// Guest memory as every device sees it. The bitmap records pages written by
/// devices (not by vCPUs), which live migration adds to KVM's dirty log.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;
