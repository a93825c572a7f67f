// SPDX-License-Identifier: Apache-2.0
//! Helpers for integration tests that run the real `wisp` binary.
