// SPDX-License-Identifier: Apache-2.0
//! qcow2 images with damaged headers and tables: refused, or read-only.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::*;

#[test]
fn test_qcow2_hostile_bad_magic() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 0, b"QFI\x00");
    assert!(matches!(qcow2_error(&p), Qcow2Error::BadMagic));
}

#[test]
fn test_qcow2_hostile_version() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 4, &4u32.to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::Version(4)));
}

#[test]
fn test_qcow2_hostile_cluster_bits_too_small() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 20, &8u32.to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::ClusterBits(8)));
}

#[test]
fn test_qcow2_hostile_cluster_bits_too_large() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 20, &40u32.to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::ClusterBits(40)));
}

#[test]
fn test_qcow2_hostile_encryption() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 32, &1u32.to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::Encrypted));
}

#[test]
fn test_qcow2_hostile_external_data_file() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(
        &p,
        header::OFF_INCOMPAT,
        &header::INCOMPAT_DATA_FILE.to_be_bytes(),
    );
    assert!(matches!(qcow2_error(&p), Qcow2Error::ExternalDataFile));
}

#[test]
fn test_qcow2_hostile_extended_l2() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(
        &p,
        header::OFF_INCOMPAT,
        &header::INCOMPAT_EXTL2.to_be_bytes(),
    );
    assert!(matches!(qcow2_error(&p), Qcow2Error::ExtendedL2));
}

#[test]
fn test_qcow2_hostile_unknown_incompatible_bit() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, header::OFF_INCOMPAT, &(1u64 << 40).to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::UnknownFeatures(b) if b == 1 << 40));
}

#[test]
fn test_qcow2_hostile_refcount_order() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 96, &7u32.to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::RefcountOrder(7)));
}

#[test]
fn test_qcow2_hostile_header_length() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 100, &20u32.to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::HeaderLength(20)));
}

#[test]
fn test_qcow2_hostile_huge_virtual_size() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, header::OFF_SIZE, &(1u64 << 62).to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::VirtualSize(_)));
}

#[test]
fn test_qcow2_hostile_l1_too_small_for_size() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, header::OFF_SIZE, &(1u64 << 40).to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::L1TooSmall { .. }));
}

#[test]
fn test_qcow2_hostile_l1_past_eof() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    assert!(matches!(
        qcow2_error(&p),
        Qcow2Error::TableOutOfBounds {
            table: "L1 table",
            ..
        }
    ));
}

#[test]
fn test_qcow2_hostile_l1_in_header() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 40, &0u64.to_be_bytes());
    assert!(matches!(
        qcow2_error(&p),
        Qcow2Error::TableOutOfBounds { .. }
    ));
}

#[test]
fn test_qcow2_hostile_refcount_table_misaligned() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, header::OFF_REFTABLE, &(CS + 8).to_be_bytes());
    assert!(matches!(
        qcow2_error(&p),
        Qcow2Error::TableOutOfBounds {
            table: "refcount table",
            ..
        }
    ));
}

#[test]
fn test_qcow2_hostile_refcount_table_too_large() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 56, &u32::MAX.to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::TableTooLarge { .. }));
}

#[test]
fn test_qcow2_hostile_refcount_block_past_eof() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, CS, &(1u64 << 40).to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::Io { .. }));
}

#[test]
fn test_qcow2_hostile_l2_table_past_eof() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, L1_OFF, &((1u64 << 40) | COPIED).to_be_bytes());
    assert!(matches!(
        qcow2_error(&p),
        Qcow2Error::TableOutOfBounds {
            table: "L2 table",
            ..
        }
    ));
}

#[test]
fn test_qcow2_hostile_backing_name_outside_header_cluster() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 8, &(CS - 4).to_be_bytes());
    patch(&p, 16, &100u32.to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::BackingName));
}

#[test]
fn test_qcow2_hostile_truncated_header() {
    let dir = TempDir::new();
    let p = dir.join("t.qcow2");
    std::fs::write(&p, b"QFI\xfb\x00\x00\x00\x03").unwrap();
    assert!(matches!(qcow2_error(&p), Qcow2Error::Truncated { .. }));
}

#[test]
fn test_qcow2_hostile_corrupt_bit_allows_read_only() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(
        &p,
        header::OFF_INCOMPAT,
        &header::INCOMPAT_CORRUPT.to_be_bytes(),
    );
    assert!(matches!(qcow2_error(&p), Qcow2Error::Corrupt));
    assert!(open(&p, true).is_ok());
}

#[test]
fn test_qcow2_hostile_snapshots_refuse_read_write() {
    let dir = TempDir::new();
    let p = small(&dir);
    patch(&p, 60, &1u32.to_be_bytes());
    assert!(matches!(qcow2_error(&p), Qcow2Error::Snapshots));
}

#[test]
fn test_qcow2_hostile_misaligned_data_cluster_is_read_error() {
    let dir = TempDir::new();
    let p = written(&dir);
    patch(&p, L2_OFF, &((DATA_OFF + 512) | COPIED).to_be_bytes());
    assert_refused_inconsistent(&p);
    let mut buf = [0u8; 8];
    let mut ro = open(&p, true).unwrap();
    assert_eq!(
        ro.read_at(&mut buf, 0).unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );
    drop(ro);
    let mut d = repair_open(&p);
    let err = d.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert_eq!(
        d.write_at(&buf, 0).unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );
}

#[test]
fn test_qcow2_hostile_data_cluster_in_header_is_refused() {
    let dir = TempDir::new();
    let p = written(&dir);
    patch(&p, L2_OFF, &COPIED.to_be_bytes());
    let mut d = open(&p, false).unwrap();
    // Offset 0 without the zero flag is "unallocated": writing allocates anew.
    d.write_at(b"safe", 0).unwrap();
    let mut hdr = [0u8; 4];
    File::open(&p).unwrap().read_exact_at(&mut hdr, 0).unwrap();
    assert_eq!(&hdr, &MAGIC);
}

#[test]
fn test_qcow2_hostile_data_cluster_past_eof_is_write_error() {
    let dir = TempDir::new();
    let p = written(&dir);
    patch(&p, L2_OFF, &((1u64 << 45) | COPIED).to_be_bytes());
    assert_refused_inconsistent(&p);
    let mut d = repair_open(&p);
    let err = d.write_at(b"x", 0).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[test]
fn test_qcow2_hostile_compressed_garbage_is_read_error() {
    let dir = TempDir::new();
    let p = written(&dir);
    patch(&p, L2_OFF, &(COMPRESSED | DATA_OFF).to_be_bytes());
    patch(&p, DATA_OFF, &[0xff; 512]);
    let mut d = open(&p, true).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        d.read_at(&mut buf, 0).unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );
}
