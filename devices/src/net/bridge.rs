// SPDX-License-Identifier: Apache-2.0
//! Attaching a TAP to an existing Linux bridge, and undoing it.
//!
//! [`BridgePort`] is a guard: [`BridgePort::teardown`] (also run on drop)
//! removes the TAP from the bridge and brings down a TAP that wisp created. A
//! created TAP is non-persistent, so the kernel deletes it once its fd closes,
//! whichever way the process ends.

use std::io;

use super::ifctl;
use super::tap::TapDevice;

/// Why a TAP could not be attached to or detached from a bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The bridge name cannot be an interface name.
    #[error("Invalid bridge name '{bridge}': {reason}")]
    InvalidName {
        /// The rejected name.
        bridge: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No interface has the bridge's name.
    #[error("Bridge {bridge} does not exist (attaching TAP {tap})")]
    NoSuchBridge {
        /// The bridge.
        bridge: String,
        /// The TAP.
        tap: String,
    },
    /// The interface exists but is not a Linux bridge.
    #[error("Interface {bridge} is not a Linux bridge (attaching TAP {tap})")]
    NotABridge {
        /// The interface.
        bridge: String,
        /// The TAP.
        tap: String,
    },
    /// The TAP already belongs to a bridge or bond.
    #[error("TAP {tap} is already attached to a bridge or bond; cannot attach it to {bridge}")]
    AlreadyAttached {
        /// The bridge.
        bridge: String,
        /// The TAP.
        tap: String,
    },
    /// Any other failure while attaching.
    #[error("Cannot attach TAP {tap} to bridge {bridge}: {source}")]
    Attach {
        /// The bridge.
        bridge: String,
        /// The TAP.
        tap: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Removing the TAP from the bridge failed.
    #[error("Cannot detach TAP {tap} from bridge {bridge}: {source}")]
    Detach {
        /// The bridge.
        bridge: String,
        /// The TAP.
        tap: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A TAP attached to a bridge; detached again by [`BridgePort::teardown`] or drop.
#[derive(Debug)]
pub struct BridgePort {
    bridge: String,
    tap: String,
    tap_index: u32,
    created_tap: bool,
    attached: bool,
    /// Whether this VMM owns the TAP's bridge membership; teardown leaves a
    /// port alone while another VMM owns it (live migration on one host).
    owned: bool,
}

fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENXIO))
}

impl BridgePort {
    /// Adds `tap` as a port of the existing bridge `bridge` and brings the TAP up.
    pub fn attach(tap: &TapDevice, bridge: &str) -> Result<Self, BridgeError> {
        use super::tap::Tap;
        let tap_name = tap.name().to_string();
        if let Some(reason) = ifctl::name_problem(bridge) {
            return Err(BridgeError::InvalidName {
                bridge: bridge.to_string(),
                reason,
            });
        }
        let attach_err = |source| BridgeError::Attach {
            bridge: bridge.to_string(),
            tap: tap_name.clone(),
            source,
        };
        let no_bridge = || BridgeError::NoSuchBridge {
            bridge: bridge.to_string(),
            tap: tap_name.clone(),
        };
        if ifctl::if_index(bridge).map_err(attach_err)?.is_none() {
            return Err(no_bridge());
        }
        let tap_index = tap
            .if_index()
            .map_err(|e| attach_err(io::Error::other(e.to_string())))?;
        if let Err(e) = ifctl::bridge_port(bridge, tap_index, true) {
            return Err(match e.raw_os_error() {
                Some(libc::ENODEV) => no_bridge(),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => BridgeError::NotABridge {
                    bridge: bridge.to_string(),
                    tap: tap_name.clone(),
                },
                Some(libc::EBUSY) => BridgeError::AlreadyAttached {
                    bridge: bridge.to_string(),
                    tap: tap_name.clone(),
                },
                _ => attach_err(e),
            });
        }
        let mut port = BridgePort {
            bridge: bridge.to_string(),
            tap: tap_name.clone(),
            tap_index,
            created_tap: tap.created(),
            attached: true,
            owned: true,
        };
        if let Err(e) = ifctl::set_up(&port.tap, true) {
            let err = attach_err(e);
            let _ = port.teardown();
            return Err(err);
        }
        Ok(port)
    }

    /// The port of a TAP handed over by another VMM that attached it to
    /// `bridge`. Not owned until [`BridgePort::take_over`]: until then the
    /// other VMM may still use it, and teardown leaves it alone.
    pub fn adopt(tap: &TapDevice, bridge: &str) -> Result<Self, BridgeError> {
        use super::tap::Tap;
        let tap_index = tap.if_index().map_err(|e| BridgeError::Attach {
            bridge: bridge.to_string(),
            tap: tap.name().to_string(),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(BridgePort {
            bridge: bridge.to_string(),
            tap: tap.name().to_string(),
            tap_index,
            created_tap: tap.created(),
            attached: true,
            owned: false,
        })
    }

    /// Hands the port over to another VMM: teardown will leave it attached.
    pub fn hand_over(&mut self) {
        self.owned = false;
    }

    /// Takes the port (back): teardown detaches it again.
    pub fn take_over(&mut self) {
        self.owned = true;
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The TAP's name.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// Whether the TAP is still attached (teardown has not run).
    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Removes the TAP from the bridge, and brings it down if wisp created it.
    /// Idempotent; a TAP that has already disappeared counts as detached; a
    /// port handed over to another VMM is left alone.
    pub fn teardown(&mut self) -> Result<(), BridgeError> {
        if !self.attached || !self.owned {
            return Ok(());
        }
        self.attached = false;
        // Only detach if the interface under that index is still our TAP.
        match ifctl::if_index(&self.tap) {
            Ok(Some(idx)) if idx == self.tap_index => {}
            _ => return Ok(()),
        }
        if let Err(e) = ifctl::bridge_port(&self.bridge, self.tap_index, false) {
            // EINVAL: no longer a port of this bridge.
            if !is_gone(&e) && e.raw_os_error() != Some(libc::EINVAL) {
                return Err(BridgeError::Detach {
                    bridge: self.bridge.clone(),
                    tap: self.tap.clone(),
                    source: e,
                });
            }
        }
        if self.created_tap {
            if let Err(e) = ifctl::set_up(&self.tap, false) {
                if !is_gone(&e) {
                    log::warn!("Cannot bring down TAP {}: {e}", self.tap);
                }
            }
        }
        Ok(())
    }
}

impl Drop for BridgePort {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            log::warn!("{e}");
        }
    }
}
