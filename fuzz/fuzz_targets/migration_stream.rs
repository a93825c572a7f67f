// SPDX-License-Identifier: Apache-2.0
//! Fuzzes the migration receiver: any bytes, as a raw frame stream, behind a
//! valid `Hello` + `Config` handshake, and re-framed with valid CRCs (so
//! inputs reach the page and state handling), must fail with an error or
//! complete, never panic, write outside guest memory or allocate without
//! bound.

#![no_main]

use std::io::{self, Cursor, Read, Write};

use devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm::migration::protocol::{self, FrameBuf, Hello, Message};
use vmm::migration::{
    receive, Connection, CpuFeatures, HookError, MigrationConfig, MigrationTarget, ReceiveOptions,
};

struct Target {
    mem: GuestMemoryMmap,
    config: MigrationConfig,
}

impl MigrationTarget for Target {
    fn config(&self) -> MigrationConfig {
        self.config.clone()
    }

    fn host_cpu(&self) -> CpuFeatures {
        self.config.cpu.clone()
    }

    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn restore(&mut self, _state: Vec<u8>) -> Result<(), HookError> {
        Ok(())
    }

    fn run(&mut self) -> Result<(), HookError> {
        Ok(())
    }
}

struct Script {
    input: Cursor<Vec<u8>>,
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Connection for Script {
    fn set_read_timeout(&mut self, _: Option<std::time::Duration>) -> io::Result<()> {
        Ok(())
    }

    fn set_write_timeout(&mut self, _: Option<std::time::Duration>) -> io::Result<()> {
        Ok(())
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn target() -> Target {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10_0000), 0x4000),
    ])
    .expect("small guest memory");
    let config = MigrationConfig {
        memory: MigrationConfig::memory_of(&mem),
        vcpus: 1,
        ..Default::default()
    };
    Target { mem, config }
}

/// Splits `data` into frames `tag: u8 | len: u16 LE | payload` and encodes
/// each with a correct length and CRC.
fn reframe(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut f = FrameBuf::default();
    while data.len() >= 3 {
        let tag = u32::from(data[0] % 17);
        let len = (usize::from(u16::from_le_bytes([data[1], data[2]]))).min(data.len() - 3);
        f.begin(tag);
        f.put(&data[3..3 + len]);
        f.finish();
        out.extend_from_slice(&f.buf);
        data = &data[3 + len..];
    }
    out
}

fn handshake(t: &Target) -> Vec<u8> {
    let mut input = Message::Hello(Hello::ours()).encode();
    input.extend(
        Message::Auth {
            nonce: [0; 32],
            proof: None,
        }
        .encode(),
    );
    input.extend(Message::Config(t.config.clone()).encode());
    input
}

fuzz_target!(|data: &[u8]| {
    // Raw frames.
    let mut r = data;
    while protocol::read_message(&mut r).is_ok() {}

    // The receiver on the raw bytes.
    let mut t = target();
    let _ = receive(
        &mut Script {
            input: Cursor::new(data.to_vec()),
        },
        &mut t,
        &ReceiveOptions::default(),
    );

    // The receiver behind a valid handshake, raw and re-framed.
    for tail in [data.to_vec(), reframe(data)] {
        let mut t = target();
        let mut input = handshake(&t);
        input.extend_from_slice(&tail);
        let _ = receive(
            &mut Script {
                input: Cursor::new(input),
            },
            &mut t,
            &ReceiveOptions::default(),
        );
    }
});
