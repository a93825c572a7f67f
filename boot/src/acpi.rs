// SPDX-License-Identifier: Apache-2.0
//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT, MADT and a
//! DSDT that declares the serial port, the i8042 keyboard controller, the
//! virtio-mmio devices and the S5 sleep state, built with the `acpi_tables`
//! crate.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    ACPI_END, ACPI_PM_PORT, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, ACPI_START, APIC_START, COM1_IRQ,
    COM1_PORT, GED_IRQ, GED_PORT, I8042_IRQ, I8042_PORT, IOAPIC_START,
};
use crate::BootError;

const OEM_ID: [u8; 6] = *b"WISPVM";
const OEM_TABLE_ID: [u8; 8] = *b"WISPMVM ";
const OEM_REVISION: u32 = 1;
// IA-PC boot architecture flags: no VGA, no CMOS RTC.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

/// One virtio-mmio device as the guest must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// MMIO window base.
    pub base: u64,
    /// MMIO window length.
    pub len: u64,
    /// Interrupt line (GSI on the IOAPIC).
    pub gsi: u32,
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// The i8042 keyboard controller. The FADT of a hardware-reduced platform
/// does not claim an 8042, so Linux only drives it if ACPI lists a PS/2
/// keyboard (PNP0303) with its data and command ports and IRQ 1. No mouse
/// (PNP0F13): the kernel then leaves the AUX port alone.
fn ps2_keyboard(body: &mut Vec<u8>) {
    let status_port = I8042_PORT + 4;
    aml::Device::new(
        "_SB_.PS2_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new("_STA".into(), &0x0fu8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(I8042_PORT, I8042_PORT, 1, 1),
                    &aml::IO::new(status_port, status_port, 1, 1),
                    &aml::Interrupt::new(true, true, false, false, I8042_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The Generic Event Device: its `_EVT` notifies the power button.
fn ged(body: &mut Vec<u8>) {
    let ged_port = usize::from(GED_PORT);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, true, false, false, GED_IRQ,
                )]),
            ),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemIO,
                &ged_port,
                &1usize,
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::Byte,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::Preserve,
                vec![aml::FieldEntry::Named(*b"GDAT", 8)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &aml::Path::new("GDAT")),
                    &aml::If::new(
                        &aml::Equal::new(
                            &aml::And::new(&aml::ZERO, &aml::Local(0), &aml::ONE),
                            &aml::ONE,
                        ),
                        vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The DSDT body: COM1, the i8042, the virtio-mmio devices and `\_S5`.
pub fn dsdt_body(devices: &[MmioDeviceInfo]) -> Result<Vec<u8>, BootError> {
    let mut body = Vec::new();

    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    ps2_keyboard(&mut body);

    for (i, d) in devices.iter().enumerate() {
        let base = u32::try_from(d.base).map_err(|_| BootError::GuestWrite {
            what: "DSDT",
            detail: format!("virtio-mmio window {:#x} is above 4 GiB", d.base),
        })?;
        let len = u32::try_from(d.len).unwrap_or(u32::MAX);
        let uid = i as u32;
        let path = format!("_SB_.V{:03X}", i);
        aml::Device::new(
            path.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, base, len),
                        &aml::Interrupt::new(true, true, false, false, d.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut body);
    }

    // The power button, signalled through the Generic Event Device.
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut body);
    ged(&mut body);

    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&ACPI_S5_SLP_TYP, &ACPI_S5_SLP_TYP, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    Ok(body)
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Writes all ACPI tables into `[ACPI_START, ACPI_END)`; returns the RSDP address.
pub fn setup_acpi<M: GuestMemoryBackend>(
    mem: &M,
    cpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<u64, BootError> {
    let mut next = ACPI_START + 0x40; // the RSDP sits at ACPI_START
    let mut tables: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut place = |bytes: Vec<u8>| -> u64 {
        let addr = next;
        next = (next + bytes.len() as u64 + 0xf) & !0xf;
        tables.push((addr, bytes));
        addr
    };

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_body(devices)?);
    let dsdt_addr = place(dsdt.as_slice().to_vec());

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sleep_control_reg = io_gas(ACPI_PM_PORT);
    fadt.sleep_status_reg = io_gas(ACPI_PM_PORT);
    fadt.reset_reg = io_gas(ACPI_PM_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"WISPVMM\0").into();
    let fadt_addr = place(aml_bytes(&fadt.finalize()));

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus, IOAPIC_START as u32, 0));
    let madt_addr = place(aml_bytes(&madt));

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(aml_bytes(&xsdt));

    if next > ACPI_END {
        return Err(BootError::GuestWrite {
            what: "ACPI tables",
            detail: format!("{} bytes do not fit", next - ACPI_START),
        });
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    tables.push((ACPI_START, aml_bytes(&rsdp)));
    for (addr, bytes) in tables {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|e| BootError::GuestWrite {
                what: "ACPI tables",
                detail: e.to_string(),
            })?;
    }
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table_at(mem: &GuestMemoryMmap<()>, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    #[test]
    fn test_acpi_tables_checksum_and_list_cpus_and_devices() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let devs = [MmioDeviceInfo {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        }];
        let rsdp_addr = setup_acpi(&mem, 3, &devs).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(sum(&xsdt), 0);
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = table_at(&mem, entries[0]);
        let madt = table_at(&mem, entries[1]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(sum(&fadt), 0);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(sum(&madt), 0);
        let lapics = {
            let mut n = 0;
            let mut off = 44;
            while off + 2 <= madt.len() {
                if madt[off] == 0 {
                    n += 1;
                }
                off += madt[off + 1] as usize;
            }
            n
        };
        assert_eq!(lapics, 3);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(sum(&dsdt), 0);
        let has = |pat: &[u8]| dsdt.windows(pat.len()).any(|w| w == pat);
        assert!(has(b"LNRO0005"));
        assert!(has(b"_S5_"));
        assert!(has(b"ACPI0013") && has(b"_EVT") && has(b"GDAT"));
        assert!(has(&0xd000_0000u32.to_le_bytes()));
    }

    #[test]
    fn test_dsdt_declares_the_i8042_keyboard_for_linux_pnp() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        setup_acpi(&mem, 1, &[]).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(ACPI_START)).unwrap();
        let xsdt = table_at(&mem, u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        let fadt = table_at(&mem, u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        let dsdt = table_at(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(sum(&dsdt), 0, "DSDT checksum");
        // The device's package: from its name to the next DeviceOp.
        let find = |hay: &[u8], pat: &[u8]| hay.windows(pat.len()).position(|w| w == pat);
        let at = find(&dsdt, b"PS2_").expect("PS2_ device");
        let end = find(&dsdt[at..], &[0x5b, 0x82]).map_or(dsdt.len(), |e| at + e);
        let dev = &dsdt[at..end];
        let has = |pat: &[u8]| find(dev, pat).is_some();
        // _HID EisaId("PNP0303") = DWord 0x0303d041.
        assert!(has(b"_HID\x0c\x41\xd0\x03\x03"), "{dev:02x?}");
        // _STA = 0x0f: present, enabled, shown, functioning.
        assert!(has(b"_STA\x0a\x0f"), "{dev:02x?}");
        // IO(Decode16, 0x60, 0x60, 1, 1) and IO(Decode16, 0x64, 0x64, 1, 1).
        assert!(has(&[0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01]));
        assert!(has(&[0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01]));
        // Extended interrupt descriptor: consumer, edge, active high, IRQ 1.
        assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x01, 0x00, 0x00, 0x00]));
    }
}
