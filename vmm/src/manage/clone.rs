// SPDX-License-Identifier: Apache-2.0
//! `wisp clone SRC NEW [--linked]`, as virt-clone: a new definition with new
//! random (locally administered) MACs and new disk files next to the
//! source's: full copies (reflinked when the filesystem can, else sparse
//! copies through `wisp image clone`), or with `--linked` qcow2 overlays
//! backed by the source's disks. Read-only disks are shared, not copied.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use api::models::DriveFormat;
use serde_json::json;

use super::store::{check_name, Store};
use super::Done;

/// A random unicast, locally administered MAC address.
pub fn random_mac() -> anyhow::Result<String> {
    let mut b = [0u8; 6];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("Cannot read /dev/urandom")?;
    b[0] = (b[0] & 0xfc) | 0x02;
    Ok(b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// The clone's file for a disk of `src` named `path`.
pub fn clone_path(path: &Path, src: &str, new: &str, linked: bool) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let new_stem = if stem.contains(src) {
        stem.replacen(src, new, 1)
    } else {
        format!("{stem}-{new}")
    };
    let ext = if linked {
        Some("qcow2".to_string())
    } else {
        path.extension().map(|e| e.to_string_lossy().into_owned())
    };
    let file = match ext {
        Some(e) => format!("{new_stem}.{e}"),
        None => new_stem,
    };
    path.with_file_name(file)
}

/// Tries a reflink (FICLONE) copy of a raw image; false if unsupported.
fn reflink(src: &Path, dst: &Path) -> anyhow::Result<bool> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    let mut magic = [0u8; 4];
    let s = std::fs::File::open(src).with_context(|| format!("Cannot open {}", src.display()))?;
    use std::os::unix::fs::FileExt;
    if s.read_at(&mut magic, 0).unwrap_or(0) == 4 && &magic == b"QFI\xfb" {
        return Ok(false);
    }
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .with_context(|| format!("Cannot create {}", dst.display()))?;
    // SAFETY: FICLONE takes the source descriptor; both descriptors are ours.
    if unsafe { libc::ioctl(d.as_raw_fd(), FICLONE, s.as_raw_fd()) } == 0 {
        return Ok(true);
    }
    drop(d);
    std::fs::remove_file(dst).with_context(|| format!("Cannot remove {}", dst.display()))?;
    Ok(false)
}

fn copy_disk(src: &Path, dst: &Path, linked: bool) -> anyhow::Result<()> {
    if !linked && reflink(src, dst)? {
        return Ok(());
    }
    let code = crate::image::run(crate::image::ImageCommand::Clone {
        linked,
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
    })?;
    if code != 0 {
        bail!("Copying {} to {} failed", src.display(), dst.display());
    }
    Ok(())
}

/// `wisp clone SRC NEW [--linked]`.
pub fn clone(store: &Store, src: &str, new: &str, linked: bool) -> anyhow::Result<Done> {
    check_name(new)?;
    let mut def = store.load(src)?;
    if store.is_defined(new) {
        bail!("A VM named '{new}' is already defined");
    }
    if store.state(new).is_active() {
        bail!("A VM named '{new}' is running");
    }
    let _lock = store.lock(src)?;
    if store.state(src).is_active() {
        bail!("VM '{src}' is running: shut it down before cloning it");
    }
    // Plan every new file first; never overwrite one.
    let mut copies = Vec::new();
    for d in def.vm.drives.iter_mut().filter(|d| !d.is_read_only) {
        let from = PathBuf::from(&d.path_on_host);
        let to = clone_path(&from, src, new, linked);
        if to.exists() {
            bail!("{} already exists: not overwriting it", to.display());
        }
        d.path_on_host = to.display().to_string();
        if linked {
            d.format = Some(DriveFormat::Qcow2);
        }
        copies.push((from, to));
    }
    let mut done: Vec<&PathBuf> = Vec::new();
    for (from, to) in &copies {
        if let Err(e) = copy_disk(from, to, linked) {
            let _ = std::fs::remove_file(to);
            for d in done {
                let _ = std::fs::remove_file(d);
            }
            return Err(e.context(format!("Cannot clone VM '{src}'")));
        }
        done.push(to);
    }
    let mut notes = Vec::new();
    for n in &mut def.vm.network_interfaces {
        n.guest_mac = Some(random_mac()?);
        notes.push(format!(
            "NIC {} uses TAP '{}' like '{src}': give it its own with `wisp edit {new}` to run both at once",
            n.iface_id, n.host_dev_name
        ));
    }
    if linked && !copies.is_empty() {
        notes.push(format!(
            "the disks of '{src}' are now backing files of '{new}': writing to them (starting '{src}') corrupts the clone"
        ));
    }
    def.name = new.to_string();
    def.autostart = false;
    store.save(&def)?;
    let mut text = format!("VM '{new}' cloned from '{src}'");
    for (from, to) in &copies {
        text.push_str(&format!("\n{} -> {}", from.display(), to.display()));
    }
    for n in &notes {
        text.push_str(&format!("\nnote: {n}"));
    }
    Ok(Done {
        text,
        json: json!({
            "name": new,
            "source": src,
            "linked": linked,
            "disks": copies.iter().map(|(f, t)| json!({"from": f, "to": t})).collect::<Vec<_>>(),
            "macs": def.vm.network_interfaces.iter().map(|n| n.guest_mac.clone()).collect::<Vec<_>>(),
            "notes": notes,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_clone_paths_and_macs() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            clone_path(&p("/v/web.img"), "web", "web2", false),
            p("/v/web2.img")
        );
        assert_eq!(
            clone_path(&p("/v/web-root.qcow2"), "web", "db", false),
            p("/v/db-root.qcow2")
        );
        assert_eq!(
            clone_path(&p("/v/root.img"), "web", "db", false),
            p("/v/root-db.img")
        );
        assert_eq!(
            clone_path(&p("/v/root.img"), "web", "db", true),
            p("/v/root-db.qcow2")
        );
        assert_eq!(
            clone_path(&p("/v/disk"), "web", "db", false),
            p("/v/disk-db")
        );
        let a = random_mac().unwrap();
        let b = random_mac().unwrap();
        assert_ne!(a, b);
        let first = u8::from_str_radix(&a[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "unicast, locally administered: {a}");
        assert_eq!(a.len(), 17);
    }
}
