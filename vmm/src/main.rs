// SPDX-License-Identifier: Apache-2.0
//! The `wisp` binary.

fn main() {}
