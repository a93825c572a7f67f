// SPDX-License-Identifier: Apache-2.0
//! VMDK interoperability: qemu-img writes every VMDK subformat, wisp reads the
//! same bytes qemu-img does; images wisp's test builder writes (a stream with
//! its grain directory in the footer) read the same in qemu-img.
//!
//! Every test prints `SKIPPED: ...` and returns when qemu-img is not installed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use devices::disk::vmdk::build::stream_optimized_gd_at_end;
use devices::disk::{open_disk, probe_format, DiskBackend, DiskError, DiskOptions, ImageFormat};

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("wisp-vmdk-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: {tool} is not installed");
    }
    ok
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// 5 MiB + 7 sectors (not a whole number of grains), data in scattered runs.
fn pattern() -> Vec<u8> {
    let mut d = vec![0u8; (5 << 20) + 7 * 512];
    for (i, b) in d[..150_000].iter_mut().enumerate() {
        *b = (i * 7 % 253) as u8 + 1;
    }
    d[(2 << 20) - 100..(2 << 20) + 70_000].fill(0x5a);
    let n = d.len();
    d[n - 3000..].fill(0xc3);
    d
}

fn read_all(disk: &mut dyn DiskBackend) -> Vec<u8> {
    let mut out = vec![0u8; disk.size() as usize];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        disk.read_at(chunk, (i as u64) << 20).unwrap();
    }
    out
}

fn open_vmdk(path: &Path, format: Option<ImageFormat>) -> Result<Box<dyn DiskBackend>, DiskError> {
    let opts = DiskOptions {
        path: path.to_path_buf(),
        read_only: true,
        format,
    };
    // A qemu-img forked by a parallel test may briefly hold our flock.
    for _ in 0..50 {
        match open_disk(&opts) {
            Err(DiskError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other,
        }
    }
    open_disk(&opts)
}

fn subformat_reads_like_qemu(subformat: &str, probed_ok: bool) {
    if !have("qemu-img") {
        return;
    }
    let dir = Dir::new();
    let data = pattern();
    let raw = dir.join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    let img = dir.join("disk.vmdk");
    let opt = format!("subformat={subformat}");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &opt,
            s(&raw),
            s(&img),
        ],
    );
    assert_eq!(probe_format(&img).unwrap(), ImageFormat::Vmdk);
    let mut disk = open_vmdk(&img, Some(ImageFormat::Vmdk)).unwrap();
    assert_eq!(disk.size(), data.len() as u64, "{subformat}: virtual size");
    assert!(read_all(disk.as_mut()) == data, "{subformat}: data differs");
    drop(disk);
    // What qemu-img itself reads back is the source too (so both agree).
    let back = dir.join("back.raw");
    run(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", s(&img), s(&back)],
    );
    assert!(std::fs::read(&back).unwrap() == data);
    // Probed (no format=), single-file layouts open; descriptors naming other files do not.
    match open_vmdk(&img, None) {
        Ok(mut d) => {
            assert!(
                probed_ok,
                "{subformat}: a probed descriptor opened its extents"
            );
            assert!(read_all(d.as_mut()) == data);
        }
        Err(e) => {
            assert!(!probed_ok, "{subformat}: {e}");
            let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(text.contains("declare format=vmdk"), "{text}");
        }
    }
}

#[test]
fn test_monolithic_sparse_reads_like_qemu() {
    subformat_reads_like_qemu("monolithicSparse", true);
}

#[test]
fn test_stream_optimized_reads_like_qemu() {
    subformat_reads_like_qemu("streamOptimized", true);
}

#[test]
fn test_monolithic_flat_reads_like_qemu() {
    subformat_reads_like_qemu("monolithicFlat", false);
}

#[test]
fn test_two_gb_max_extent_sparse_reads_like_qemu() {
    subformat_reads_like_qemu("twoGbMaxExtentSparse", false);
}

#[test]
fn test_two_gb_max_extent_flat_reads_like_qemu() {
    subformat_reads_like_qemu("twoGbMaxExtentFlat", false);
}

/// A 5 GiB split image has three extents; writes across the 2 GiB boundary
/// land in two files and read back whole.
fn split_image_crosses_extents(subformat: &str) {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = Dir::new();
    let img = dir.join("big.vmdk");
    let opt = format!("subformat={subformat}");
    run(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", "-o", &opt, s(&img), "5G"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 0x5a 2047M 2M",
            "-c",
            "write -P 0x11 5119M 1M",
            s(&img),
        ],
    );
    let mut disk = open_vmdk(&img, Some(ImageFormat::Vmdk)).unwrap();
    assert_eq!(disk.size(), 5 << 30);
    let mut buf = vec![0u8; 4 << 20];
    disk.read_at(&mut buf, 2046 << 20).unwrap();
    assert!(buf[..1 << 20].iter().all(|&b| b == 0));
    assert!(
        buf[1 << 20..3 << 20].iter().all(|&b| b == 0x5a),
        "{subformat}: across 2 GiB"
    );
    assert!(buf[3 << 20..].iter().all(|&b| b == 0));
    disk.read_at(&mut buf[..1 << 20], 5119 << 20).unwrap();
    assert!(
        buf[..1 << 20].iter().all(|&b| b == 0x11),
        "{subformat}: last MiB"
    );
}

#[test]
fn test_two_gb_max_extent_sparse_crosses_extents() {
    split_image_crosses_extents("twoGbMaxExtentSparse");
}

#[test]
fn test_two_gb_max_extent_flat_crosses_extents() {
    split_image_crosses_extents("twoGbMaxExtentFlat");
}

#[test]
fn test_stream_with_footer_directory_reads_the_same_in_qemu() {
    if !have("qemu-img") {
        return;
    }
    let dir = Dir::new();
    let data = pattern();
    let img = dir.join("ovf.vmdk");
    std::fs::write(&img, stream_optimized_gd_at_end(&data)).unwrap();
    let back = dir.join("back.raw");
    run(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", s(&img), s(&back)],
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "qemu-img reads other bytes"
    );
    let mut disk = open_vmdk(&img, None).unwrap();
    assert!(read_all(disk.as_mut()) == data, "wisp reads other bytes");
}

#[test]
fn test_esxi_vmfs_descriptor_with_flat_file() {
    if !have("qemu-img") {
        return;
    }
    let dir = Dir::new();
    let data = pattern();
    std::fs::write(dir.join("vm-flat.vmdk"), &data).unwrap();
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"vmfs\"\n\n# Extent description\nRW {} VMFS \"vm-flat.vmdk\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\nddb.virtualHWVersion = \"13\"\n",
        data.len() / 512
    );
    let img = dir.join("vm.vmdk");
    std::fs::write(&img, desc).unwrap();
    let back = dir.join("back.raw");
    run(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", s(&img), s(&back)],
    );
    assert!(std::fs::read(&back).unwrap() == data);
    let mut disk = open_vmdk(&img, Some(ImageFormat::Vmdk)).unwrap();
    assert!(read_all(disk.as_mut()) == data);
}

#[test]
fn test_zeroed_grains_read_as_zeros() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = Dir::new();
    let data = pattern();
    let raw = dir.join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    let img = dir.join("z.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            s(&raw),
            s(&img),
        ],
    );
    run("qemu-io", &["-f", "vmdk", "-c", "write -z 0 64k", s(&img)]);
    let mut want = data.clone();
    want[..65536].fill(0);
    let mut disk = open_vmdk(&img, None).unwrap();
    assert!(read_all(disk.as_mut()) == want);
}

#[test]
fn test_hostile_header_of_a_qemu_image_names_the_field() {
    if !have("qemu-img") {
        return;
    }
    let dir = Dir::new();
    let img = dir.join("h.vmdk");
    run("qemu-img", &["create", "-q", "-f", "vmdk", s(&img), "64M"]);
    let pristine = std::fs::read(&img).unwrap();
    for (off, bytes, field) in [
        (56usize, (1u64 << 40).to_le_bytes().to_vec(), "gdOffset"),
        (12, u64::MAX.to_le_bytes().to_vec(), "capacity"),
        (20, 3u64.to_le_bytes().to_vec(), "grainSize"),
        (44, 0u32.to_le_bytes().to_vec(), "numGTEsPerGT"),
    ] {
        let mut m = pristine.clone();
        m[off..off + bytes.len()].copy_from_slice(&bytes);
        std::fs::write(&img, &m).unwrap();
        let err = open_vmdk(&img, None).err().unwrap();
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(text.contains(field), "{field}: {text}");
    }
    // A grain table entry past the end of the file is a read error, not a panic.
    let mut m = pristine.clone();
    let gd = u64::from_le_bytes(m[56..64].try_into().unwrap()) as usize * 512;
    let gt = u32::from_le_bytes(m[gd..gd + 4].try_into().unwrap()) as usize * 512;
    m[gt..gt + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    std::fs::write(&img, &m).unwrap();
    let mut disk = open_vmdk(&img, None).unwrap();
    let mut buf = [0u8; 512];
    let err = disk.read_at(&mut buf, 0).unwrap_err();
    assert!(
        err.to_string().contains("past the end of the file"),
        "{err}"
    );
    let f = File::open(&img).unwrap();
    let mut magic = [0u8; 4];
    f.read_exact_at(&mut magic, 0).unwrap();
    assert_eq!(&magic, b"KDMV");
}

#[test]
fn test_opening_read_write_is_refused_with_a_hint() {
    if !have("qemu-img") {
        return;
    }
    let dir = Dir::new();
    let img = dir.join("rw.vmdk");
    run("qemu-img", &["create", "-q", "-f", "vmdk", s(&img), "1M"]);
    for format in [None, Some(ImageFormat::Vmdk)] {
        let err = open_disk(&DiskOptions {
            path: img.clone(),
            read_only: false,
            format,
        })
        .err()
        .unwrap();
        assert!(matches!(err, DiskError::VmdkReadOnly { .. }), "{err}");
        assert!(err.to_string().contains("readonly=on"));
    }
}

/// Formats qemu-img writes that wisp cannot read are refused by name when probed.
#[test]
fn test_probe_names_formats_wisp_cannot_read() {
    if !have("qemu-img") {
        return;
    }
    let dir = Dir::new();
    for (fmt, name, extra) in [
        ("vdi", "vdi", vec![]),
        ("vhdx", "vhdx", vec![]),
        ("vpc", "vpc", vec![]),
        ("vpc", "vpc (fixed VHD)", vec!["-o", "subformat=fixed"]),
        ("qed", "qed", vec![]),
        ("parallels", "parallels", vec![]),
    ] {
        let img = dir.join(&format!("x.{fmt}"));
        let _ = std::fs::remove_file(&img);
        let mut args = vec!["create", "-q", "-f", fmt];
        args.extend(extra);
        args.extend([s(&img), "4M"]);
        run("qemu-img", &args);
        let err = probe_format(&img).unwrap_err();
        assert!(
            err.to_string().contains(&format!("is a {name} image")),
            "{fmt}: {err}"
        );
        let err = open_disk(&DiskOptions::new(&img)).err().unwrap();
        assert!(
            matches!(err, DiskError::UnsupportedFormat { .. }),
            "{fmt}: {err}"
        );
    }
    let luks = dir.join("x.luks");
    let made = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=pw",
            "-f",
            "luks",
        ])
        .args(["-o", "key-secret=s0,iter-time=10", s(&luks), "4M"])
        .status()
        .is_ok_and(|st| st.success());
    if made {
        assert!(probe_format(&luks)
            .unwrap_err()
            .to_string()
            .contains("is a luks image"));
    } else {
        eprintln!("SKIPPED luks case: this qemu-img cannot create luks images");
    }
}
