// SPDX-License-Identifier: Apache-2.0
//! Snapshot persistence: the versioned state file and the guest memory file.

pub mod format;
pub mod memory;

pub use format::{read_state_file, write_state_file, FormatError};
pub use memory::{
    dirty_bitmaps, dump_memory, dump_memory_diff, dump_memory_diff_atomic, map_memory_file,
    set_dirty_logging, DumpStats, MemoryFileError, MemoryLayout, MemoryRegionLayout,
};
