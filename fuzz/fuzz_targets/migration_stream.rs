// SPDX-License-Identifier: Apache-2.0
//! Fuzzes the migration receiver: any bytes, as a raw frame stream and
//! behind a valid `Hello` + `Config` handshake (so inputs reach the page and
//! state handling), must fail with an error or complete, never panic, write
//! outside guest memory or allocate without bound.

#![no_main]

use std::io::{self, Cursor, Read, Write};

use devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm::migration::protocol::{self, Hello, Message};
use vmm::migration::{receive, CpuFeatures, HookError, MigrationConfig, MigrationTarget};

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

    fn restore_and_run(&mut self, _state: Vec<u8>) -> Result<(), HookError> {
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
    );

    // The receiver behind a valid handshake.
    let mut t = target();
    let mut input = Message::Hello(Hello::ours()).encode();
    input.extend(Message::Config(t.config.clone()).encode());
    input.extend_from_slice(data);
    let _ = receive(
        &mut Script {
            input: Cursor::new(input),
        },
        &mut t,
    );
});
