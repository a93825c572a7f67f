// SPDX-License-Identifier: Apache-2.0
//! Fuzzes the snapshot state-file decoder: any bytes, as a whole file and as
//! a payload behind a valid header (so inputs get past the CRC check and
//! reach the postcard decoder), must decode or fail with an error, never
//! panic or allocate without bound.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmm::persist::format::{decode_state, ARCH, FORMAT_VERSION, HEADER_LEN, MAGIC};
use vmm::vstate::{vcpu_state::VcpuState, vm_state::VmState};

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let mut arch = [0u8; 8];
    arch[..ARCH.len()].copy_from_slice(ARCH.as_bytes());
    out.extend_from_slice(&arch);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.state");
    let _ = decode_state::<VmState>(data, path);
    let img = framed(data);
    let _ = decode_state::<VmState>(&img, path);
    let _ = decode_state::<Vec<VcpuState>>(&img, path);
});
