// SPDX-License-Identifier: Apache-2.0
//! Host side of guest networking: TAP devices, Linux bridge ports and MAC
//! addresses.
//!
//! The VMM calls [`open_tap`] to get a configured TAP (and a bridge-port guard)
//! and hands the TAP to [`crate::virtio::net::Net`].

pub mod bridge;
pub mod fake;
pub mod ifctl;
pub mod mac;
pub mod tap;

pub use bridge::{BridgeError, BridgePort};
pub use mac::{MacAddr, MacError};
pub use tap::{FrameIov, GuestIovMut, GuestSlice, Tap, TapDevice, TapError, VNET_HDR_LEN};

/// Why [`open_tap`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Opening or configuring the TAP failed.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Attaching to the bridge failed.
    #[error(transparent)]
    Bridge(#[from] BridgeError),
}

/// Opens (creating if missing) the TAP `name`, gives it the MAC `tap_mac` if
/// this call created it (see [`MacAddr::tap_side`]; a pre-existing TAP keeps
/// its own), sets its MTU if given, attaches it to `bridge` if given, and
/// brings it up. Keep the returned [`BridgePort`] alive for the VM's lifetime
/// and call [`BridgePort::teardown`] on shutdown (dropping it does the same).
pub fn open_tap(
    name: &str,
    bridge: Option<&str>,
    mtu: Option<u16>,
    tap_mac: Option<MacAddr>,
) -> Result<(TapDevice, Option<BridgePort>), SetupError> {
    let tap = TapDevice::open(name)?;
    if let Some(mac) = tap_mac.filter(|_| tap.created()) {
        // Before joining the bridge, which may adopt the address.
        tap.set_mac(mac)?;
    }
    if let Some(mtu) = mtu {
        tap.set_mtu(mtu)?;
    }
    let port = match bridge {
        Some(bridge) => Some(BridgePort::attach(&tap, bridge)?),
        None => {
            tap.set_up(true)?;
            None
        }
    };
    Ok((tap, port))
}
