// SPDX-License-Identifier: Apache-2.0
//! `PUT /boot-source`.

use serde::{Deserialize, Serialize};

use super::{validate_path, ModelError};

/// Longest kernel command line accepted (x86 boot protocol limit).
pub const MAX_BOOT_ARGS_LEN: usize = 2047;

/// Kernel, optional initrd and command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel image (ELF vmlinux or bzImage).
    pub kernel_image_path: String,
    /// Host path of the initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSource {
    /// Checks paths and the command line length.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_path("kernel_image_path", &self.kernel_image_path)?;
        if let Some(p) = &self.initrd_path {
            validate_path("initrd_path", p)?;
        }
        if let Some(a) = &self.boot_args {
            if a.len() > MAX_BOOT_ARGS_LEN {
                return Err(ModelError::invalid(
                    "boot_args",
                    format!("longer than {MAX_BOOT_ARGS_LEN} bytes"),
                ));
            }
            if a.contains('\0') {
                return Err(ModelError::invalid("boot_args", "contains a NUL byte"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let b: BootSource = serde_json::from_str(
            r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0","initrd_path":"/i"}"#,
        )
        .unwrap();
        assert!(b.validate().is_ok());
        assert_eq!(b.initrd_path.as_deref(), Some("/i"));
        assert!(serde_json::from_str::<BootSource>(r#"{"boot_args":"x"}"#).is_err());
        assert!(serde_json::from_str::<BootSource>(r#"{"kernel_image_path":"/k","x":1}"#).is_err());
        let long = BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: Some("a".repeat(5000)),
        };
        assert!(long.validate().is_err());
    }
}
