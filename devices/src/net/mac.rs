// SPDX-License-Identifier: Apache-2.0
//! Ethernet MAC addresses: parsing `aa:bb:cc:dd:ee:ff` and generating a stable,
//! locally administered unicast address from a seed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Length of a MAC address in bytes.
pub const MAC_LEN: usize = 6;

/// Why a MAC address string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    /// Not six colon-separated groups of two hex digits.
    #[error("Invalid MAC address '{0}': expected six hex byte pairs like aa:bb:cc:dd:ee:ff")]
    Syntax(String),
    /// The group bit is set: a NIC needs a unicast address.
    #[error("Invalid MAC address '{0}': multicast addresses cannot be assigned to a NIC")]
    Multicast(String),
    /// 00:00:00:00:00:00 is not a usable address.
    #[error("Invalid MAC address '{0}': the all-zero address cannot be assigned to a NIC")]
    Zero(String),
}

/// A unicast Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr([u8; MAC_LEN]);

impl MacAddr {
    /// Wraps raw bytes, rejecting multicast and all-zero addresses.
    pub fn from_bytes(bytes: [u8; MAC_LEN]) -> Result<Self, MacError> {
        let mac = MacAddr(bytes);
        if bytes[0] & 0x01 != 0 {
            return Err(MacError::Multicast(mac.to_string()));
        }
        if bytes == [0; MAC_LEN] {
            return Err(MacError::Zero(mac.to_string()));
        }
        Ok(mac)
    }

    /// A locally administered unicast address derived from `seed` (e.g. the VM
    /// name and TAP name): the same seed always yields the same address.
    pub fn generate(seed: &str) -> Self {
        // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        let h = hash.to_be_bytes();
        let mut bytes = [h[2], h[3], h[4], h[5], h[6], h[7]];
        // Clear the multicast bit, set the locally administered bit.
        bytes[0] = (bytes[0] & 0xfe) | 0x02;
        if bytes[1..] == [0; 5] {
            bytes[5] = 1;
        }
        MacAddr(bytes)
    }

    /// The six address bytes.
    pub fn bytes(&self) -> [u8; MAC_LEN] {
        self.0
    }

    /// The address wisp gives a TAP it creates for a guest with this MAC:
    /// the guest's address with the first byte replaced by `0xfe` (`0xfa` if
    /// the guest's already is `0xfe`), as libvirt does. A Linux bridge takes
    /// the lowest MAC of its ports, so a high first byte keeps TAPs from
    /// lending the bridge their address when it has other ports; and being
    /// derived from the guest's MAC, a TAP re-created on restore gets the
    /// same address, so a bridge that does take it keeps its MAC and the
    /// guest's cached neighbour entry for the bridge stays valid.
    pub fn tap_side(&self) -> Self {
        let mut bytes = self.0;
        bytes[0] = if bytes[0] == 0xfe { 0xfa } else { 0xfe };
        MacAddr(bytes)
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || MacError::Syntax(s.to_string());
        let mut bytes = [0u8; MAC_LEN];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        MacAddr::from_bytes(bytes)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let mac: MacAddr = "02:AB:cd:00:11:ff".parse().unwrap();
        assert_eq!(mac.bytes(), [0x02, 0xab, 0xcd, 0x00, 0x11, 0xff]);
        assert_eq!(mac.to_string(), "02:ab:cd:00:11:ff");
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02-00-00-00-00-01",
            "2:00:00:00:00:01",
            "02:00:00:00:00:0g",
            "02:00:00:00:00:+1",
            "02:00:00:00:00:01:",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(MacError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacError::Multicast(_))
        ));
        assert!(matches!(
            "ff:ff:ff:ff:ff:ff".parse::<MacAddr>(),
            Err(MacError::Multicast(_))
        ));
        assert!(matches!(
            "00:00:00:00:00:00".parse::<MacAddr>(),
            Err(MacError::Zero(_))
        ));
        let msg = "03:00:00:00:00:01"
            .parse::<MacAddr>()
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("Invalid MAC address '03:00:00:00:00:01'"));
    }

    #[test]
    fn generate_is_stable_local_unicast() {
        let a = MacAddr::generate("vm1/tap0");
        assert_eq!(a, MacAddr::generate("vm1/tap0"));
        assert_ne!(a, MacAddr::generate("vm1/tap1"));
        for seed in ["", "x", "vm1/tap0", "another-vm/wisp-tap7"] {
            let b = MacAddr::generate(seed).bytes();
            assert_eq!(b[0] & 0x01, 0, "unicast");
            assert_eq!(b[0] & 0x02, 0x02, "locally administered");
            assert!(MacAddr::from_bytes(b).is_ok());
        }
    }

    #[test]
    fn tap_side_is_stable_high_local_unicast_and_never_the_guests() {
        let guest: MacAddr = "52:54:00:77:00:0c".parse().unwrap();
        assert_eq!(guest.tap_side().to_string(), "fe:54:00:77:00:0c");
        assert_eq!(guest.tap_side(), guest.tap_side());
        let fe: MacAddr = "fe:54:00:77:00:0c".parse().unwrap();
        assert_eq!(fe.tap_side().to_string(), "fa:54:00:77:00:0c");
        for g in [guest, fe, MacAddr::generate("vm/tap")] {
            let t = g.tap_side();
            assert_ne!(t, g);
            assert_eq!(t.bytes()[1..], g.bytes()[1..]);
            assert!(MacAddr::from_bytes(t.bytes()).is_ok(), "unicast");
            assert_eq!(t.bytes()[0] & 0x02, 0x02, "locally administered");
        }
    }
}
