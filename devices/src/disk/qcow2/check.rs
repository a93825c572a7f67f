// SPDX-License-Identifier: Apache-2.0
//! Consistency check and refcount repair.

use std::io;

use super::{Mapping, Qcow2Disk, COPIED, OFFSET_MASK};

/// Most messages a report keeps.
const MAX_MESSAGES: usize = 64;

/// What `check` found (and, with repair, fixed).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Refcounts lower or higher than the references, and broken tables.
    pub corruptions: u64,
    /// Clusters with a refcount that nothing references.
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// Clusters referenced by the image.
    pub allocated_clusters: u64,
    /// End of the used part of the file.
    pub image_end_offset: u64,
    /// The first problems found, one line each.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// Whether nothing is left to fix.
    pub fn is_clean(&self) -> bool {
        self.corruptions == self.corruptions_fixed && self.leaks == self.leaks_fixed
    }

    fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }
}

/// A table entry whose COPIED flag disagrees with its cluster's refcount.
enum FlagFix {
    /// L1 index and corrected entry.
    L1(usize, u64),
    /// L2 table offset, index and corrected entry.
    L2(u64, usize, u64),
}

impl Qcow2Disk {
    /// COPIED must be set exactly on entries whose cluster has refcount one
    /// (as the references, `refs`, count it).
    fn check_copied_flags(
        &mut self,
        refs: &[u64],
        report: &mut CheckReport,
    ) -> io::Result<Vec<FlagFix>> {
        let bits = self.cluster_bits;
        let sole = |off: u64| refs.get((off >> bits) as usize) == Some(&1);
        let mut fixes = Vec::new();
        let l1 = self.l1.clone();
        let mut walked = std::collections::HashSet::new();
        for (l1i, &e) in l1.iter().enumerate() {
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            let want = if sole(l2off) { e | COPIED } else { e & !COPIED };
            if want != e {
                report.corruptions += 1;
                report.note(format!("L1 entry {l1i}: wrong COPIED flag"));
                fixes.push(FlagFix::L1(l1i, want));
            }
            if !walked.insert(l2off) {
                continue;
            }
            let Some(table) = self
                .l2_table(l1i, false)?
                .and_then(|o| self.l2.get(o).cloned())
            else {
                continue;
            };
            for (l2i, &entry) in table.iter().enumerate() {
                let off = match self.mapping(entry) {
                    Ok(Mapping::Data { off, .. })
                    | Ok(Mapping::Zero {
                        prealloc: Some(off),
                        ..
                    }) => off,
                    _ => continue,
                };
                let want = if sole(off) {
                    entry | COPIED
                } else {
                    entry & !COPIED
                };
                if want != entry {
                    report.corruptions += 1;
                    report.note(format!(
                        "L2 table at {l2off:#x}, entry {l2i}: wrong COPIED flag"
                    ));
                    fixes.push(FlagFix::L2(l2off, l2i, want));
                }
            }
        }
        Ok(fixes)
    }

    /// Recomputes every refcount from the tables and compares with the stored ones.
    pub fn check(&mut self, repair: bool) -> io::Result<CheckReport> {
        if repair {
            self.check_writable()?;
        }
        self.flush_metadata()?;
        if self.header.nb_snapshots > 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "checking images with internal snapshots is not supported",
            ));
        }
        let cs = self.cs();
        let n = (self.next_free >> self.cluster_bits) as usize;
        let mut refs = vec![0u64; n];
        let mut report = CheckReport::default();
        let bits = self.cluster_bits;
        let mut mark = |report: &mut CheckReport, what: &str, off: u64, len: u64| {
            let first = off >> bits;
            let last = (off + len.max(1) - 1) >> bits;
            for c in first..=last {
                match refs.get_mut(c as usize) {
                    Some(r) => *r += 1,
                    None => {
                        report.corruptions += 1;
                        report.note(format!("{what} at {off:#x} lies past the end of the file"));
                        return;
                    }
                }
            }
        };
        mark(&mut report, "header", 0, cs);
        let h = self.header.clone();
        if h.l1_size > 0 {
            mark(
                &mut report,
                "L1 table",
                h.l1_table_offset,
                u64::from(h.l1_size) * 8,
            );
        }
        mark(
            &mut report,
            "refcount table",
            self.rc.table_offset,
            self.rc.table_clusters * cs,
        );
        for &e in &self.rc.table {
            let off = e & OFFSET_MASK;
            if off != 0 {
                mark(&mut report, "refcount block", off, cs);
            }
        }
        let l1 = self.l1.clone();
        let mut walked = std::collections::HashSet::new();
        for (l1i, &e) in l1.iter().enumerate() {
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            mark(&mut report, "L2 table", l2off, cs);
            // A table shared by several L1 entries is counted each time
            // (the refcount check then reports it) but walked once.
            if !walked.insert(l2off) {
                continue;
            }
            let Some(Some(table)) = self.l2_table(l1i, false)?.map(|o| self.l2.get(o).cloned())
            else {
                continue;
            };
            for (l2i, &entry) in table.iter().enumerate() {
                match self.mapping(entry) {
                    Ok(Mapping::Data { off, .. })
                    | Ok(Mapping::Zero {
                        prealloc: Some(off),
                        ..
                    }) => mark(&mut report, "data cluster", off, cs),
                    Ok(Mapping::Compressed { off, len }) => {
                        mark(&mut report, "compressed cluster", off, len)
                    }
                    Ok(_) => {}
                    Err(err) => {
                        report.corruptions += 1;
                        report.note(format!("L2 table at {l2off:#x}, entry {l2i}: {err}"));
                    }
                }
            }
        }
        let flag_fixes = self.check_copied_flags(&refs, &mut report)?;
        let mut fixes = Vec::new();
        for (c, &want) in refs.iter().enumerate() {
            let have = self.rc.get(&self.file, c as u64)?;
            if have == want {
                continue;
            }
            let off = (c as u64) << self.cluster_bits;
            if want == 0 {
                report.leaks += 1;
                report.note(format!("Leaked cluster at {off:#x} (refcount {have})"));
            } else {
                report.corruptions += 1;
                report.note(format!(
                    "Cluster at {off:#x} has refcount {have} but {want} references"
                ));
            }
            fixes.push((c as u64, want, want == 0));
        }
        // Refcounts of clusters past the end of the file, in the block that
        // covers the end, are leaks too. (Blocks wholly past the end are not
        // walked: a hostile table could make that unbounded.)
        let per = self.rc.per_block();
        let last = n as u64 / per;
        let has_block = self
            .rc
            .table
            .get(last as usize)
            .is_some_and(|e| e & OFFSET_MASK != 0);
        if has_block {
            for c in n as u64..(last + 1) * per {
                if self.rc.get(&self.file, c)? != 0 {
                    report.leaks += 1;
                    report.note(format!(
                        "Leaked cluster at {:#x} past the end of the file",
                        c << self.cluster_bits
                    ));
                    fixes.push((c, 0, true));
                }
            }
        }
        report.allocated_clusters = refs.iter().filter(|&&r| r > 0).count() as u64;
        report.image_end_offset = self.next_free;
        if repair && !(fixes.is_empty() && flag_fixes.is_empty()) {
            for fix in flag_fixes {
                match fix {
                    FlagFix::L1(i, e) => {
                        self.l1[i] = e;
                        self.l1_dirty = true;
                    }
                    FlagFix::L2(table, i, e) => self.set_l2_entry(table, i, e)?,
                }
                report.corruptions_fixed += 1;
            }
            for (c, want, leak) in fixes {
                self.rc.set(&self.file, c, want, &mut self.next_free)?;
                if leak {
                    report.leaks_fixed += 1;
                } else {
                    report.corruptions_fixed += 1;
                }
            }
            self.data_dirty = true;
            self.flush_metadata()?;
        }
        Ok(report)
    }
}
