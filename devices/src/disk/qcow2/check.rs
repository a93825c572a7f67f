// SPDX-License-Identifier: Apache-2.0
//! Consistency check and refcount repair, counting what QEMU counts: the
//! active and snapshot L1/L2 tables, the snapshot table and the bitmaps.

use std::collections::HashMap;
use std::io;

use super::{header, tables, Mapping, Qcow2Disk, COPIED, OFFSET_MASK};

/// Most messages a report keeps.
const MAX_MESSAGES: usize = 64;
/// Reserved bits of L1 entries, standard L2 entries and refcount table entries.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const REFTABLE_RESERVED: u64 = !OFFSET_MASK;

/// What `check -r` may fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Only clusters with a refcount that nothing references.
    Leaks,
    /// Leaks, wrong refcounts, wrong COPIED flags and the corrupt bit.
    All,
}

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
    /// Why a requested repair was refused (the image was left untouched).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair_refused: Option<String>,
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

    fn corrupt(&mut self, msg: String) {
        self.corruptions += 1;
        self.note(format!("ERROR {msg}"));
    }
}

/// What a cluster is used as; two uses of one cluster are an alias unless
/// both are data (shared clusters) or both L2 tables (shared with snapshots).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    Data,
    L2,
    Meta,
}

/// Reference counts as the tables imply them.
struct Walk {
    refs: Vec<u64>,
    uses: Vec<Option<Use>>,
    report: CheckReport,
    bits: u32,
    /// Why a repair would be unsafe (the references themselves are broken).
    unrepairable: Option<String>,
}

impl Walk {
    fn unsafe_to_repair(&mut self, why: &str) {
        self.unrepairable.get_or_insert_with(|| why.to_string());
    }

    /// Counts `count` references of kind `u` to bytes `[off, off + len)`.
    fn mark(&mut self, u: Use, what: &str, off: u64, len: u64, count: u64) {
        let first = off >> self.bits;
        let last = (off.saturating_add(len.max(1)) - 1) >> self.bits;
        for c in first..=last {
            let Some(r) = self.refs.get_mut(c as usize) else {
                self.report
                    .corrupt(format!("{what} at {off:#x} lies past the end of the file"));
                self.unsafe_to_repair("a table points past the end of the file");
                return;
            };
            *r += count;
            let prev = &mut self.uses[c as usize];
            match *prev {
                None => *prev = Some(u),
                Some(p) if p == u && u != Use::Meta => {}
                Some(p) => {
                    let at = c << self.bits;
                    let other = match p {
                        Use::Data => "data",
                        Use::L2 => "an L2 table",
                        Use::Meta => "other metadata",
                    };
                    self.report
                        .corrupt(format!("cluster {at:#x} is used as {what} and as {other}"));
                    self.unsafe_to_repair("metadata clusters are aliased");
                }
            }
        }
    }
}

/// A refcount that differs from the references.
struct RefcountFix {
    cluster: u64,
    want: u64,
    /// The refcount is above the references (QEMU calls that a leak).
    leak: bool,
}

/// A table entry whose COPIED flag disagrees with its cluster's refcount.
enum FlagFix {
    L1(usize, u64),
    L2(u64, usize, u64),
}

impl Qcow2Disk {
    /// Checks the image; see [`Qcow2Disk::check_and_repair`].
    pub fn check(&mut self, repair: bool) -> io::Result<CheckReport> {
        self.check_and_repair(repair.then_some(Repair::All))
    }

    /// Recomputes every refcount from the tables and compares with the
    /// stored ones, then fixes what `repair` allows. A repair is refused
    /// (nothing written, `repair_refused` says why) when the tables
    /// themselves are broken: fixing refcounts then could free live data.
    pub fn check_and_repair(&mut self, repair: Option<Repair>) -> io::Result<CheckReport> {
        if repair.is_some() {
            self.check_writable()?;
        }
        if let Some(e) = &self.tables_error {
            return Err(super::invalid(e.clone()));
        }
        self.flush_metadata()?;
        let (mut walk, l2_refs) = self.walk()?;
        let mut fixes = self.compare_refcounts(&mut walk)?;
        // Fixes the repair will apply (QEMU: refcounts above the references
        // are leaks, below them errors); COPIED flags are judged against
        // the refcounts as they will be.
        fixes.retain(|f| match repair {
            _ if walk.unrepairable.is_some() => false,
            None => false,
            Some(Repair::Leaks) => f.leak,
            Some(Repair::All) => true,
        });
        let after_fix: HashMap<u64, u64> = fixes.iter().map(|f| (f.cluster, f.want)).collect();
        let flag_fixes = self.check_copied_flags(&mut walk, &l2_refs, &after_fix)?;
        let mut report = std::mem::take(&mut walk.report);
        let flagged = self.header.incompatible_features & header::INCOMPAT_CORRUPT != 0;
        if flagged {
            report.corrupt("the image is marked corrupt".into());
        }
        let Some(mode) = repair else {
            return Ok(report);
        };
        if let Some(why) = walk.unrepairable {
            report.repair_refused = Some(format!(
                "{why}; repairing refcounts cannot be done safely (copy the data out with `wisp image convert`)"
            ));
            return Ok(report);
        }
        let (mut fixed_c, mut fixed_l) = (0, 0);
        if mode == Repair::All {
            for fix in flag_fixes {
                match fix {
                    FlagFix::L1(i, e) => {
                        self.l1[i] = e;
                        self.l1_dirty = true;
                    }
                    FlagFix::L2(table, i, e) => self.set_l2_entry(table, i, e)?,
                }
                fixed_c += 1;
            }
        }
        for f in fixes {
            self.rc_set(f.cluster, f.want)?;
            if f.leak {
                fixed_l += 1;
            } else {
                fixed_c += 1;
            }
        }
        self.data_dirty = true;
        self.flush_metadata()?;
        let mut after = self.check_and_repair(None)?;
        if mode == Repair::All && after.corruptions == u64::from(flagged) {
            self.clear_incompat(header::INCOMPAT_CORRUPT | header::INCOMPAT_DIRTY)?;
            after.corruptions = 0;
            fixed_c += u64::from(flagged);
        }
        let mut messages = report.messages;
        messages.extend(after.messages);
        messages.truncate(MAX_MESSAGES);
        Ok(CheckReport {
            corruptions: after.corruptions + fixed_c,
            leaks: after.leaks + fixed_l,
            corruptions_fixed: fixed_c,
            leaks_fixed: fixed_l,
            messages,
            ..after
        })
    }

    fn clear_incompat(&mut self, bits: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.header.incompatible_features &= !bits;
        self.file.write_all_at(
            &self.header.incompatible_features.to_be_bytes(),
            header::OFF_INCOMPAT,
        )?;
        self.file.sync_data()
    }

    /// Counts every reference; returns the walk and, per L2 table, how many
    /// L1 entries (active or snapshot) name it.
    fn walk(&mut self) -> io::Result<(Walk, HashMap<u64, u64>)> {
        let cs = self.cs();
        let n = (self.next_free >> self.cluster_bits) as usize;
        let mut w = Walk {
            refs: vec![0; n],
            uses: vec![None; n],
            report: CheckReport::default(),
            bits: self.cluster_bits,
            unrepairable: None,
        };
        w.mark(Use::Meta, "header", 0, cs, 1);
        let h = self.header.clone();
        if h.l1_size > 0 {
            let bytes = u64::from(h.l1_size) * 8;
            w.mark(Use::Meta, "L1 table", h.l1_table_offset, bytes, 1);
        }
        let rt_bytes = self.rc.table_clusters * cs;
        w.mark(
            Use::Meta,
            "refcount table",
            self.rc.table_offset,
            rt_bytes,
            1,
        );
        for (i, &e) in self.rc.table.iter().enumerate() {
            if e & REFTABLE_RESERVED != 0 {
                w.report
                    .corrupt(format!("refcount table entry {i} ({e:#x}) is misaligned"));
                w.unsafe_to_repair("the refcount table is damaged");
            } else if e != 0 {
                w.mark(Use::Meta, "refcount block", e, cs, 1);
            }
        }
        if let Some(e) = &self.snapshots_error {
            w.report.corrupt(format!("snapshot table: {e}"));
            w.unsafe_to_repair("the snapshot table is damaged");
        }
        let mut l2_refs = HashMap::new();
        let l1 = self.l1.clone();
        self.count_l1(&mut w, &mut l2_refs, &l1, "L1");
        if self.snapshots.bytes > 0 {
            let s = &self.snapshots;
            w.mark(Use::Meta, "snapshot table", s.offset, s.bytes, 1);
        }
        for (i, sl1) in self.snapshots.l1s.clone().into_iter().enumerate() {
            let bytes = u64::from(sl1.entries) * 8;
            w.mark(Use::Meta, "snapshot L1 table", sl1.offset, bytes, 1);
            let table = tables::read_l1(&self.file, sl1)?;
            self.count_l1(&mut w, &mut l2_refs, &table, &format!("snapshot {i} L1"));
        }
        self.count_bitmaps(&mut w)?;
        let mut tables: Vec<(u64, u64)> = l2_refs.iter().map(|(&o, &c)| (o, c)).collect();
        tables.sort_unstable();
        for (off, count) in tables {
            self.count_l2(&mut w, off, count)?;
        }
        Ok((w, l2_refs))
    }

    /// Checks the entries of an L1 table and tallies the L2 tables it names.
    fn count_l1(&self, w: &mut Walk, l2_refs: &mut HashMap<u64, u64>, l1: &[u64], name: &str) {
        for (i, &e) in l1.iter().enumerate() {
            if e & L1_RESERVED != 0 {
                w.report
                    .corrupt(format!("{name} entry {i} ({e:#x}) has reserved bits set"));
                w.unsafe_to_repair("an L1 entry has reserved bits set");
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(self.cs()) {
                w.report
                    .corrupt(format!("{name} entry {i}: L2 table {off:#x} is misaligned"));
                w.unsafe_to_repair("an L2 table is misaligned");
                continue;
            }
            *l2_refs.entry(off).or_insert(0) += 1;
        }
    }

    /// Counts an L2 table named `count` times, and its clusters as often.
    fn count_l2(&mut self, w: &mut Walk, l2off: u64, count: u64) -> io::Result<()> {
        let cs = self.cs();
        w.mark(Use::L2, "L2 table", l2off, cs, count);
        if l2off >= self.next_free {
            return Ok(()); // Reported by mark; it would read as zeros.
        }
        self.load_l2(l2off)?;
        let Some(table) = self.l2.get(l2off).cloned() else {
            return Ok(());
        };
        for (l2i, &entry) in table.iter().enumerate() {
            if entry == 0 {
                continue;
            }
            let at = || format!("L2 table {l2off:#x} entry {l2i}");
            let m = self.mapping(entry);
            if entry & super::COMPRESSED == 0 && entry & L2_RESERVED != 0 {
                w.report
                    .corrupt(format!("{} ({entry:#x}) has reserved bits set", at()));
                w.unsafe_to_repair("an L2 entry has reserved bits set");
            }
            match m {
                Ok(Mapping::Data { off, .. })
                | Ok(Mapping::Zero {
                    prealloc: Some(off),
                    ..
                }) => w.mark(Use::Data, "data cluster", off, cs, count),
                Ok(Mapping::Compressed { off, len }) => {
                    if entry & COPIED != 0 {
                        w.report
                            .corrupt(format!("{}: compressed cluster flagged COPIED", at()));
                        w.unsafe_to_repair("a compressed cluster is flagged COPIED");
                    }
                    w.mark(Use::Data, "compressed cluster", off, len, count)
                }
                Ok(_) => {}
                Err(err) => {
                    w.report.corrupt(format!("{}: {err}", at()));
                    w.unsafe_to_repair("an L2 entry is invalid");
                }
            }
        }
        Ok(())
    }

    /// Counts the bitmap directory, the bitmap tables and their data.
    fn count_bitmaps(&mut self, w: &mut Walk) -> io::Result<()> {
        let Some(b) = self.bitmaps.clone() else {
            return Ok(());
        };
        let cs = self.cs();
        w.mark(Use::Meta, "bitmap directory", b.offset, b.bytes, 1);
        for bm in &b.list {
            let bytes = u64::from(bm.table_entries) * 8;
            w.mark(Use::Meta, "bitmap table", bm.table_offset, bytes, 1);
            for off in tables::bitmap_data(&self.file, bm)? {
                if !off.is_multiple_of(cs) {
                    w.report.corrupt(format!(
                        "bitmap '{}' data cluster {off:#x} is misaligned",
                        bm.name
                    ));
                    w.unsafe_to_repair("a bitmap table is damaged");
                    continue;
                }
                w.mark(Use::Data, "bitmap data", off, cs, 1);
            }
        }
        Ok(())
    }

    /// The refcount of the cluster at `off` once `after_fix` is applied.
    fn refcount_after(&mut self, off: u64, after_fix: &HashMap<u64, u64>) -> io::Result<u64> {
        let c = off >> self.cluster_bits;
        match after_fix.get(&c) {
            Some(&v) => Ok(v),
            None => self.rc.get(&self.file, c),
        }
    }

    /// COPIED must be set exactly on active L1/L2 entries whose cluster has
    /// refcount one (the stored one, as QEMU checks, or the repaired one).
    fn check_copied_flags(
        &mut self,
        w: &mut Walk,
        l2_refs: &HashMap<u64, u64>,
        after_fix: &HashMap<u64, u64>,
    ) -> io::Result<Vec<FlagFix>> {
        let mut fixes = Vec::new();
        let mut walked = std::collections::HashSet::new();
        for (l1i, &e) in self.l1.clone().iter().enumerate() {
            let l2off = e & OFFSET_MASK;
            if l2off == 0 || !l2_refs.contains_key(&l2off) {
                continue;
            }
            let sole = self.refcount_after(l2off, after_fix)? == 1;
            let want = if sole { e | COPIED } else { e & !COPIED };
            if want != e {
                w.report
                    .corrupt(format!("L1 entry {l1i}: wrong COPIED flag"));
                fixes.push(FlagFix::L1(l1i, want));
            }
            if !walked.insert(l2off) {
                continue;
            }
            self.load_l2(l2off)?;
            let Some(table) = self.l2.get(l2off).cloned() else {
                continue;
            };
            for (l2i, &entry) in table.iter().enumerate().filter(|(_, &e)| e != 0) {
                let off = match self.mapping(entry) {
                    Ok(Mapping::Data { off, .. })
                    | Ok(Mapping::Zero {
                        prealloc: Some(off),
                        ..
                    }) => off,
                    _ => continue,
                };
                let sole = self.refcount_after(off, after_fix)? == 1;
                let want = if sole {
                    entry | COPIED
                } else {
                    entry & !COPIED
                };
                if want != entry {
                    w.report.corrupt(format!(
                        "L2 table {l2off:#x} entry {l2i}: wrong COPIED flag"
                    ));
                    fixes.push(FlagFix::L2(l2off, l2i, want));
                }
            }
        }
        Ok(fixes)
    }

    /// Compares stored refcounts with the references; returns the fixes.
    /// (Refcounts of clusters past the end of the file are not looked at,
    /// as by QEMU: allocation overwrites them.)
    fn compare_refcounts(&mut self, w: &mut Walk) -> io::Result<Vec<RefcountFix>> {
        let mut fixes = Vec::new();
        let max = self.rc.max_value();
        for c in 0..w.refs.len() {
            let want = w.refs[c];
            let have = self.rc.get(&self.file, c as u64)?;
            if have == want {
                continue;
            }
            let off = (c as u64) << self.cluster_bits;
            let leak = have > want;
            if leak {
                w.report.leaks += 1;
                w.report.note(format!(
                    "Leaked cluster {off:#x} refcount={have} reference={want}"
                ));
            } else if want > max {
                w.report.corrupt(format!(
                    "cluster {off:#x} has {want} references, more than the refcount width holds"
                ));
                w.unsafe_to_repair("a refcount would overflow");
                continue;
            } else {
                w.report
                    .corrupt(format!("cluster {off:#x} refcount={have} reference={want}"));
            }
            fixes.push(RefcountFix {
                cluster: c as u64,
                want,
                leak,
            });
        }
        w.report.allocated_clusters = w.refs.iter().filter(|&&r| r > 0).count() as u64;
        w.report.image_end_offset = self.next_free;
        Ok(fixes)
    }
}
