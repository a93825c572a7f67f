// SPDX-License-Identifier: Apache-2.0
//! Round trips, truncations, bit flips and hostile frames.

use super::*;
use crate::migration::config::{CpuFeatures, DeviceSummary, RegionSpec};

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello::ours()),
        Message::Challenge { nonce: [7; 32] },
        Message::Auth {
            nonce: [8; 32],
            proof: Some([9; 32]),
        },
        Message::Auth {
            nonce: [8; 32],
            proof: None,
        },
        Message::AuthOk {
            proof: Some([10; 32]),
        },
        Message::AuthOk { proof: None },
        Message::Config(MigrationConfig {
            memory: vec![RegionSpec {
                guest_addr: 0x1000_0000,
                size: 1 << 30,
            }],
            vcpus: 4,
            devices: vec![DeviceSummary {
                kind: "net".into(),
                id: "eth0".into(),
            }],
            cpu: CpuFeatures {
                vendor: "AuthenticAMD".into(),
                leaf1_ecx: 1,
                leaf1_edx: 2,
                leaf7_ebx: 3,
                leaf7_ecx: 4,
                leaf7_edx: 5,
            },
        }),
        Message::Accept,
        Message::Refuse {
            reason: "vCPU count differs".into(),
        },
        Message::Pages(Pages {
            region: 1,
            first_page: 77,
            count: 10,
            present: vec![0b0000_0101, 0b10],
            data: (0..3 * PAGE_SIZE).map(|i| i as u8).collect(),
        }),
        Message::State(vec![9; 1000]),
        Message::State(vec![]),
        Message::Complete,
        Message::Ready,
        Message::Go,
        Message::Running,
        Message::Cancel {
            reason: "user".into(),
        },
        Message::Error {
            message: "restore failed".into(),
        },
    ]
}

#[test]
fn test_protocol_every_message_round_trips() {
    let mut stream = Vec::new();
    for m in all_messages() {
        write_message(&mut stream, &m).unwrap();
    }
    let mut r = stream.as_slice();
    for m in all_messages() {
        assert_eq!(read_message(&mut r).unwrap(), m);
    }
    assert!(matches!(
        read_message(&mut r),
        Err(ProtocolError::Truncated)
    ));
}

#[test]
fn test_protocol_every_truncation_is_an_error() {
    for m in all_messages() {
        let f = m.encode();
        for cut in 0..f.len() {
            let e = read_message(&mut &f[..cut]).unwrap_err();
            assert!(
                matches!(e, ProtocolError::Truncated),
                "{} cut {cut}: {e}",
                m.name()
            );
        }
    }
}

#[test]
fn test_protocol_every_bit_flip_is_an_error() {
    for m in all_messages() {
        let f = m.encode();
        // Flip one bit per byte (every byte for small frames).
        let step = (f.len() / 512).max(1);
        for i in (0..f.len()).step_by(step) {
            let mut g = f.clone();
            g[i] ^= 1 << (i % 8);
            assert!(
                read_message(&mut g.as_slice()).is_err(),
                "{} byte {i}",
                m.name()
            );
        }
    }
}

fn frame(tag: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = FrameBuf::default();
    f.begin(tag);
    f.put(payload);
    f.finish();
    f.buf
}

#[test]
fn test_protocol_hostile_frames_rejected() {
    let e = |b: Vec<u8>| read_message(&mut b.as_slice()).unwrap_err();
    assert!(matches!(e(frame(99, b"")), ProtocolError::UnknownTag(99)));
    let mut big = 5u32.to_le_bytes().to_vec();
    big.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(e(big), ProtocolError::Oversize { .. }));
    assert!(matches!(
        e(frame(tag::ACCEPT, b"x")),
        ProtocolError::Malformed { .. }
    ));
    let mut hello = frame(tag::HELLO, b"");
    hello.truncate(0);
    hello.extend(frame(tag::HELLO, b"NOTWISP!\x01\0\0\0\0\0"));
    assert!(matches!(e(hello), ProtocolError::BadMagic(_)));
    assert!(matches!(
        e(frame(tag::HELLO, b"WISPMIGR\x01")),
        ProtocolError::Malformed { .. }
    ));
    assert!(matches!(
        e(frame(tag::CONFIG, &[0xff; 7])),
        ProtocolError::Malformed { .. }
    ));
    assert!(matches!(
        e(frame(tag::ERROR, &[5, b'a'])),
        ProtocolError::Malformed { .. }
    ));
    // Pages: zero count, too many, data length mismatch, stray bitmap bits.
    let pages = |count: u32, map: &[u8], data: usize| {
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&count.to_le_bytes());
        p.extend_from_slice(map);
        p.extend(std::iter::repeat_n(1u8, data));
        frame(tag::PAGES, &p)
    };
    assert!(matches!(
        e(pages(0, &[], 0)),
        ProtocolError::Malformed { .. }
    ));
    assert!(matches!(
        e(pages(257, &[0; 33], 0)),
        ProtocolError::Malformed { .. }
    ));
    assert!(matches!(
        e(pages(8, &[1], 0)),
        ProtocolError::Malformed { .. }
    ));
    assert!(matches!(
        e(pages(8, &[1], PAGE_SIZE + 1)),
        ProtocolError::Malformed { .. }
    ));
    assert!(matches!(
        e(pages(3, &[0b1000], 0)),
        ProtocolError::Malformed { .. }
    ));
    assert!(read_message(&mut pages(3, &[0b100], PAGE_SIZE).as_slice()).is_ok());
    // Auth messages: short nonces, bad flags, short or long proofs.
    for bad in [
        frame(tag::CHALLENGE, &[0; 31]),
        frame(tag::CHALLENGE, &[0; 33]),
        frame(tag::AUTH, &[0; 32]),
        frame(tag::AUTH, &[[0; 32].as_slice(), &[2]].concat()),
        frame(tag::AUTH, &[[0; 32].as_slice(), &[1], &[0; 31]].concat()),
        frame(tag::AUTH, &[[0; 32].as_slice(), &[0], &[0]].concat()),
        frame(tag::AUTH_OK, &[]),
        frame(tag::AUTH_OK, &[[1].as_slice(), &[0; 33]].concat()),
    ] {
        assert!(matches!(e(bad), ProtocolError::Malformed { .. }));
    }
    let mut over = vec![0u8; MAX_STATE_CHUNK + 1];
    over[0] = 1;
    assert!(matches!(
        e(frame(tag::STATE, &over)),
        ProtocolError::Malformed { .. }
    ));
}

#[test]
fn test_protocol_hello_version_check() {
    let mut h = Hello::ours();
    h.check().unwrap();
    // Version 1 had no Ready/Go commit, version 2 no Challenge/Auth:
    // refused, like a future one.
    for old in [1, 2, 4] {
        h.protocol_version = old;
        let m = Message::Hello(h.clone());
        let Message::Hello(back) = read_message(&mut m.encode().as_slice()).unwrap() else {
            panic!()
        };
        let e = back.check().unwrap_err();
        assert!(
            matches!(e, ProtocolError::UnsupportedVersion { theirs, .. } if theirs == old),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("version {old}")), "{e}");
    }
    h.magic = *b"XXXXXXXX";
    assert!(matches!(h.check(), Err(ProtocolError::BadMagic(_))));
}
