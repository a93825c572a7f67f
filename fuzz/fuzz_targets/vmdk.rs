// SPDX-License-Identifier: Apache-2.0
//! Opens arbitrary bytes as a VMDK (sparse header, footer or text descriptor) and reads it all.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::disk::vmdk::fuzz_one(data);
});
