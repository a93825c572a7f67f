// SPDX-License-Identifier: Apache-2.0
//! x86_64 boot: guest memory layout, kernel loading, boot parameters and tables.
