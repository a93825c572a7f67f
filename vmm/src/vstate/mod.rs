// SPDX-License-Identifier: Apache-2.0
//! KVM state: the VM (memory, irqchip, PIT) and the vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
