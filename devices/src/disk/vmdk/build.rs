// SPDX-License-Identifier: Apache-2.0
//! Writes small sparse VMDKs for tests and fuzz seeds, in the layouts qemu-img
//! does not produce: a stream with its grain directory in the footer
//! (`GD_AT_END`, as VMware's OVF exports are), and sparse images with a
//! chosen redundant grain directory. Not a general VMDK writer.

use super::header::{
    SparseHeader, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT, FLAG_RGD, GD_AT_END, SECTOR,
};

const GRAIN_SECTORS: u64 = 128;
const GTES: u64 = 512;

fn pad(out: &mut Vec<u8>) {
    let rem = out.len() % SECTOR as usize;
    if rem != 0 {
        out.resize(out.len() + SECTOR as usize - rem, 0);
    }
}

fn sector(out: &[u8]) -> u64 {
    out.len() as u64 / SECTOR
}

fn marker(out: &mut Vec<u8>, val: u64, kind: u32) {
    let mut m = [0u8; 512];
    m[..8].copy_from_slice(&val.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&m);
}

fn header(capacity: u64, flags: u32, compressed: bool, desc_sectors: u64) -> SparseHeader {
    SparseHeader {
        version: if compressed { 3 } else { 1 },
        flags: flags | FLAG_NL_DETECT,
        capacity,
        grain_sectors: GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_sectors: desc_sectors,
        gtes_per_gt: GTES as u32,
        rgd_offset: None,
        gd_offset: 0,
        overhead: 128,
        unclean_shutdown: false,
        compressed,
        markers: compressed,
        gd_from_footer: false,
    }
}

fn descriptor(create_type: &str, sectors: u64) -> Vec<u8> {
    let mut d = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"{create_type}\"\n\nRW {sectors} SPARSE \"disk.vmdk\"\n"
    )
    .into_bytes();
    pad(&mut d);
    d
}

fn grains(disk: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    disk.chunks((GRAIN_SECTORS * SECTOR) as usize)
        .enumerate()
        .filter(|(_, g)| g.iter().any(|&b| b != 0))
        .map(|(i, g)| (i as u64, g))
}

fn tables(entries: &[u32]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// A streamOptimized image of `disk` (a whole number of sectors) whose grain
/// directory, tables and footer follow the grains, with markers throughout.
#[doc(hidden)]
pub fn stream_optimized_gd_at_end(disk: &[u8]) -> Vec<u8> {
    let capacity = disk.len() as u64 / SECTOR;
    let desc = descriptor("streamOptimized", capacity);
    let mut h = header(
        capacity,
        FLAG_COMPRESSED | FLAG_MARKERS,
        true,
        sector(&desc),
    );
    // overHead: the sectors before the first grain.
    h.overhead = 1 + sector(&desc);
    let mut out = h.encode(GD_AT_END).to_vec();
    out.extend_from_slice(&desc);
    let n_grains = capacity.div_ceil(GRAIN_SECTORS);
    let mut gte = vec![0u32; n_grains.div_ceil(GTES) as usize * GTES as usize];
    for (i, g) in grains(disk) {
        gte[i as usize] = sector(&out) as u32;
        let packed = miniz_oxide::deflate::compress_to_vec_zlib(g, 6);
        out.extend_from_slice(&(i * GRAIN_SECTORS).to_le_bytes());
        out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        out.extend_from_slice(&packed);
        pad(&mut out);
    }
    let mut gd = Vec::new();
    for gt in gte.chunks(GTES as usize) {
        marker(&mut out, GTES * 4 / SECTOR, 1);
        gd.push(sector(&out) as u32);
        out.extend_from_slice(&tables(gt));
    }
    marker(&mut out, (gd.len() as u64 * 4).div_ceil(SECTOR), 2);
    h.gd_offset = sector(&out);
    out.extend_from_slice(&tables(&gd));
    pad(&mut out);
    marker(&mut out, 1, 3);
    out.extend_from_slice(&h.encode(h.gd_offset));
    marker(&mut out, 0, 0);
    out
}

/// A monolithicSparse image of `disk` with a grain directory and a redundant
/// one (with its own tables). With `break_primary` the primary directory's
/// first entry points past the end of the file.
#[doc(hidden)]
pub fn monolithic_sparse(disk: &[u8], break_primary: bool) -> Vec<u8> {
    let capacity = disk.len() as u64 / SECTOR;
    let desc = descriptor("monolithicSparse", capacity);
    let mut h = header(capacity, FLAG_RGD, false, sector(&desc));
    let n_gts = capacity.div_ceil(GRAIN_SECTORS).div_ceil(GTES) as usize;
    let gd_bytes = (n_gts * 4).div_ceil(SECTOR as usize) * SECTOR as usize;
    let gt_bytes = (GTES * 4) as usize;
    // Layout: header, descriptor, RGD, RGTs, GD, GTs, grains.
    let rgd = 1 + sector(&desc);
    let rgts = rgd + gd_bytes as u64 / SECTOR;
    let gd = rgts + (n_gts * gt_bytes) as u64 / SECTOR;
    let gts = gd + gd_bytes as u64 / SECTOR;
    let data = gts + (n_gts * gt_bytes) as u64 / SECTOR;
    h.rgd_offset = Some(rgd);
    h.overhead = data;
    let mut gte = vec![0u32; n_gts * GTES as usize];
    let mut payload = Vec::new();
    for (i, g) in grains(disk) {
        gte[i as usize] = (data + payload.len() as u64 / SECTOR) as u32;
        payload.extend_from_slice(g);
        pad(&mut payload);
    }
    let dir = |first: u64| -> Vec<u8> {
        let mut v: Vec<u8> = (0..n_gts as u64)
            .flat_map(|i| ((first + i * gt_bytes as u64 / SECTOR) as u32).to_le_bytes())
            .collect();
        v.resize(gd_bytes, 0);
        v
    };
    let mut out = h.encode(gd).to_vec();
    out.extend_from_slice(&desc);
    out.extend_from_slice(&dir(rgts));
    out.extend_from_slice(&tables(&gte));
    let mut primary = dir(gts);
    if break_primary && n_gts > 0 {
        primary[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    }
    out.extend_from_slice(&primary);
    out.extend_from_slice(&tables(&gte));
    out.extend_from_slice(&payload);
    out
}
