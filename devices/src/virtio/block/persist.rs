// SPDX-License-Identifier: Apache-2.0
//! Serializable state of a virtio-blk device.
//!
//! Queue state lives in the transport's state ([`crate::virtio::mmio::MmioTransportState`]);
//! the transport re-activates the restored device.

use serde::{Deserialize, Serialize};

use super::device::{BlockArgs, BlockConfig, BlockError};
use super::Block;
use crate::disk::DiskBackend;
use crate::virtio::VirtioDevice;

/// Everything needed to rebuild a block device (with its disk reopened by the VMM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Drive ID, disk path, read-only flag and serial as configured.
    pub args: BlockArgs,
    /// Effective read-only flag (configuration or backend).
    pub read_only: bool,
    /// Configuration space.
    pub config: BlockConfig,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the device was activated (the transport re-activates it).
    pub activated: bool,
    /// Whether the device had flagged DEVICE_NEEDS_RESET.
    pub broken: bool,
}

impl Block {
    /// Saves the device's state; call with the vCPUs and event loop paused.
    pub fn save(&self) -> BlockState {
        BlockState {
            args: self.args.clone(),
            read_only: self.read_only,
            config: self.config,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            activated: self.activated,
            broken: self.broken,
        }
    }

    /// Rebuilds a (not yet activated) device over the reopened `disk`. Fails if
    /// the disk no longer matches the saved capacity or writability.
    pub fn restore(state: &BlockState, disk: Box<dyn DiskBackend>) -> Result<Self, BlockError> {
        let mismatch = |reason: String| BlockError::Mismatch {
            id: state.args.id.clone(),
            reason,
        };
        let capacity = disk.size() / super::SECTOR_SIZE;
        if capacity != state.config.capacity {
            return Err(mismatch(format!(
                "capacity {capacity} sectors, saved {}",
                state.config.capacity
            )));
        }
        let mut dev = Self::with_config(state.args.clone(), disk, state.config)?;
        if dev.read_only != state.read_only || dev.avail_features != state.avail_features {
            return Err(mismatch("read-only flag or features differ".into()));
        }
        dev.set_acked_features(state.acked_features);
        dev.broken = state.broken;
        Ok(dev)
    }
}
