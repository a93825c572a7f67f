// SPDX-License-Identifier: Apache-2.0
//! The Intel MultiProcessor table (MP spec 1.4) in the EBDA: processors, the
//! ISA bus, the IOAPIC and the legacy interrupt routing. Kernels without ACPI
//! find their vCPUs here.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::BootError;

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const IOAPIC_PINS: u8 = 24;
const MPF_LEN: usize = 16;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP table bytes for `cpus` processors, to be placed at `base`.
pub fn build(cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut body = Vec::new();
    for id in 0..cpus {
        body.push(0u8); // processor
        body.push(id);
        body.push(APIC_VERSION);
        body.push(CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 });
        body.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        body.extend_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC
        body.extend_from_slice(&[0u8; 8]);
    }
    body.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    body.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]);
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for irq in 0..IOAPIC_PINS {
        // ISA IRQ n on IOAPIC pin n (bus-default polarity and trigger).
        body.extend_from_slice(&[3, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    body.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]); // LINT0
    body.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]); // LINT1
    let entries = u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2;

    let mut table = Vec::with_capacity(44 + body.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + body.len()) as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, below
    table.extend_from_slice(b"WISP    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entries.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_LEN + table.len());
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&((base + MPF_LEN as u64) as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MPC_SPEC);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0u8; 5]);
    mpf[10] = checksum(&mpf[..MPF_LEN]);
    mpf.extend_from_slice(&table);
    mpf
}

/// Writes the MP table for `cpus` processors at the start of the EBDA.
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, cpus: u8) -> Result<(), BootError> {
    if cpus == 0 || cpus > 254 {
        return Err(BootError::TooManyVcpus(cpus.into()));
    }
    mem.write_slice(&build(cpus, EBDA_START), GuestAddress(EBDA_START))
        .map_err(|e| BootError::GuestWrite {
            what: "MP table",
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mptable_checksums_and_cpu_count() {
        let t = build(4, EBDA_START);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..MPF_LEN].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[MPF_LEN..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let cpus = table[44..].chunks(20).take(4).filter(|c| c[0] == 0).count();
        assert_eq!(cpus, 4);
        assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
    }
}
