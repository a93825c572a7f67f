// SPDX-License-Identifier: Apache-2.0
//! Editing definitions: `wisp define`, `undefine`, `edit`, `dumpconfig`,
//! `autostart`.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::json;

use super::definition::Definition;
use super::store::{check_name, Store};
use super::Done;

/// `wisp define FILE`: validates and stores (or replaces) a definition.
pub fn define(store: &Store, file: &Path) -> anyhow::Result<Done> {
    let def = Definition::read(file)?;
    let existed = store.is_defined(&def.name);
    std::fs::create_dir_all(store.vm_dir(&def.name))
        .with_context(|| format!("Cannot create {}", store.vm_dir(&def.name).display()))?;
    let _lock = store.lock(&def.name)?;
    store.save(&def)?;
    let what = if existed { "redefined" } else { "defined" };
    let mut text = format!("VM '{}' {what} from {}", def.name, file.display());
    if existed && store.state(&def.name).is_active() {
        text.push_str(" (the running VM keeps its old configuration until it is restarted)");
    }
    Ok(Done {
        text,
        json: json!({ "name": def.name, "result": what, "path": store.config_path(&def.name) }),
    })
}

/// `wisp undefine NAME [--remove-disks]`.
pub fn undefine(store: &Store, name: &str, remove_disks: bool) -> anyhow::Result<Done> {
    let def = store.load(name)?;
    let _lock = store.lock(name)?;
    if store.state(name).is_active() {
        bail!("VM '{name}' is running: `wisp shutdown {name}` or `wisp destroy {name}` first");
    }
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    if remove_disks {
        for d in &def.vm.drives {
            let p = Path::new(&d.path_on_host);
            if d.is_read_only {
                kept.push(d.path_on_host.clone());
                continue;
            }
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_file() => {
                    std::fs::remove_file(p)
                        .with_context(|| format!("Cannot remove {}", p.display()))?;
                    removed.push(d.path_on_host.clone());
                }
                Ok(_) => bail!(
                    "Not removing {}: not a regular file; nothing was undefined",
                    p.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("Cannot inspect {}", p.display())),
            }
        }
    }
    vmm::registry::prune(&store.runtime_dir, name);
    let dir = store.vm_dir(name);
    std::fs::remove_dir_all(&dir).with_context(|| format!("Cannot remove {}", dir.display()))?;
    let mut text = format!("VM '{name}' undefined");
    for r in &removed {
        text.push_str(&format!("\nremoved disk {r}"));
    }
    for k in &kept {
        text.push_str(&format!("\nkept read-only disk {k} (it may be shared)"));
    }
    Ok(Done {
        text,
        json: json!({ "name": name, "removed_disks": removed, "kept_disks": kept }),
    })
}

/// `wisp dumpconfig NAME`: the stored definition.
pub fn dumpconfig(store: &Store, name: &str) -> anyhow::Result<Done> {
    let def = store.load(name)?;
    let text = def.to_json();
    let json = serde_json::from_str(&text)?;
    Ok(Done {
        text: text.trim_end().to_string(),
        json,
    })
}

/// `wisp autostart [--disable] NAME`.
pub fn autostart(store: &Store, name: &str, enable: bool) -> anyhow::Result<Done> {
    let mut def = store.load(name)?;
    let _lock = store.lock(name)?;
    def.autostart = enable;
    store.save(&def)?;
    let how = if enable { "marked" } else { "unmarked" };
    Ok(Done {
        text: format!("VM '{name}' {how} as autostarted"),
        json: json!({ "name": name, "autostart": enable }),
    })
}

/// `wisp edit NAME`: `$VISUAL`/`$EDITOR` (default `vi`) on a copy; the copy
/// replaces the definition only if it is valid and names the same VM.
pub fn edit(store: &Store, name: &str) -> anyhow::Result<Done> {
    check_name(name)?;
    let def = store.load(name)?;
    let _lock = store.lock(name)?;
    let original = def.to_json();
    let tmp = store.file(name, &format!(".edit-{}.json", std::process::id()));
    std::fs::write(&tmp, &original).with_context(|| format!("Cannot write {}", tmp.display()))?;
    let editor = ["VISUAL", "EDITOR"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| "vi".into());
    // Through the shell, so EDITOR may carry arguments ("code --wait").
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&tmp)
        .status();
    let result = (|| {
        let status = status.with_context(|| format!("Cannot run the editor '{editor}'"))?;
        if !status.success() {
            bail!("The editor '{editor}' failed ({status})");
        }
        let text = std::fs::read_to_string(&tmp)
            .with_context(|| format!("Cannot read back {}", tmp.display()))?;
        if text == original {
            return Ok(None);
        }
        let new = Definition::parse(&text)?;
        if new.name != name {
            bail!(
                "The edited definition renames the VM to '{}': renaming is not supported",
                new.name
            );
        }
        Ok(Some(new))
    })();
    let _ = std::fs::remove_file(&tmp);
    match result {
        Ok(None) => Ok(Done {
            text: format!("VM '{name}': definition unchanged"),
            json: json!({ "name": name, "result": "unchanged" }),
        }),
        Ok(Some(new)) => {
            store.save(&new)?;
            Ok(Done {
                text: format!("VM '{name}': definition updated"),
                json: json!({ "name": name, "result": "updated" }),
            })
        }
        Err(e) => Err(e.context(format!(
            "Definition of VM '{name}' not changed (kept {})",
            store.config_path(name).display()
        ))),
    }
}
