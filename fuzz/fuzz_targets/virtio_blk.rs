// SPDX-License-Identifier: Apache-2.0
//! Fuzzes virtio-blk request parsing and execution: the input becomes the
//! guest's descriptor table, available ring and buffers; the device must
//! never panic, hang or touch memory it was not given.
#![no_main]

use std::sync::Arc;

use devices::disk::{check_range, DiskBackend};
use devices::virtio::block::{Block, BlockArgs};
use devices::virtio::{IrqTrigger, VirtioDevice};
use devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: u64 = 0x1_0000;
const QSIZE: u16 = 16;

struct VecDisk(Vec<u8>);

impl DiskBackend for VecDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let o = offset as usize;
        self.0[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        check_range(self.size(), offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> std::io::Result<()> {
        check_range(self.size(), offset, len)?;
        self.0[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // Two adjacent regions so requests can straddle a region boundary.
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), (MEM / 2) as usize),
        (GuestAddress(MEM / 2), (MEM / 2) as usize),
    ]) else {
        return;
    };
    // Input layout: [flags byte][event-idx byte][rest -> guest memory from 0].
    let features = u64::from(data[0]);
    let event_idx = data[1] & 1 != 0;
    let body = &data[2..];
    let n = body.len().min(MEM as usize);
    let _ = mem.write_slice(&body[..n], GuestAddress(0));

    let args = BlockArgs {
        id: "fuzz".into(),
        path: "/dev/null".into(),
        read_only: features & 0x80 != 0,
        serial: None,
    };
    let Ok(mut dev) = Block::new(args, Box::new(VecDisk(vec![0; 64 * 512]))) else {
        return;
    };
    // Randomly drop DISCARD / WRITE_ZEROES from the negotiated set.
    let mut acked = dev.avail_features();
    if features & 1 != 0 {
        acked &= !(1 << 13);
    }
    if features & 2 != 0 {
        acked &= !(1 << 14);
    }
    dev.set_acked_features(acked);

    let Ok(mut q) = Queue::new(QSIZE) else { return };
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    q.set_event_idx(event_idx);
    let (Ok(irq_evt), Ok(q_evt)) = (EventFd::new(EFD_NONBLOCK), EventFd::new(EFD_NONBLOCK)) else {
        return;
    };
    let irq = Arc::new(IrqTrigger::new(irq_evt));
    if dev.activate(mem.clone(), irq, vec![q], vec![q_evt]).is_err() {
        return;
    }
    // Twice: the second pass sees the device's own used-ring updates.
    dev.process_queue();
    dev.process_queue();
});
