// SPDX-License-Identifier: Apache-2.0
//! Opens arbitrary bytes as a qcow2 image, reads it all, checks it, and writes to it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::disk::qcow2::fuzz_one(data);
});
