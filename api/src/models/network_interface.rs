// SPDX-License-Identifier: Apache-2.0
//! `PUT /network-interfaces/{iface_id}`.

use serde::{Deserialize, Serialize};

use super::drive::RateLimiter;
use super::{validate_id, ModelError};

/// Longest Linux interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// Smallest MTU accepted (IPv4 minimum).
pub const MIN_MTU: u16 = 68;

/// A virtio-net device backed by a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Unique id, also in the URL.
    pub iface_id: String,
    /// Host TAP device name.
    pub host_dev_name: String,
    /// Guest MAC address `xx:xx:xx:xx:xx:xx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Receive rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
    /// Host bridge to attach the TAP device to (wisp extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// MTU of the TAP device and guest NIC (wisp extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

impl NetworkInterface {
    /// Checks id, names, MAC and MTU.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_id("iface_id", &self.iface_id)?;
        validate_ifname("host_dev_name", &self.host_dev_name)?;
        if let Some(b) = &self.bridge {
            validate_ifname("bridge", b)?;
        }
        if let Some(m) = &self.guest_mac {
            parse_mac(m)?;
        }
        if let Some(mtu) = self.mtu {
            if mtu < MIN_MTU {
                return Err(ModelError::invalid(
                    "mtu",
                    format!("{mtu} is below {MIN_MTU}"),
                ));
            }
        }
        for r in [&self.rx_rate_limiter, &self.tx_rate_limiter]
            .into_iter()
            .flatten()
        {
            r.validate()?;
        }
        Ok(())
    }

    /// The guest MAC as bytes, if set and well formed.
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        self.guest_mac.as_deref().and_then(|m| parse_mac(m).ok())
    }
}

/// `PATCH /network-interfaces/{iface_id}`: change rate limits after boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// Id of the interface, also in the URL.
    pub iface_id: String,
    /// New receive rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl PartialNetworkInterface {
    /// Checks the id and limits.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_id("iface_id", &self.iface_id)?;
        for r in [&self.rx_rate_limiter, &self.tx_rate_limiter]
            .into_iter()
            .flatten()
        {
            r.validate()?;
        }
        Ok(())
    }
}

pub(crate) fn validate_ifname(field: &'static str, name: &str) -> Result<(), ModelError> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN {
        return Err(ModelError::invalid(
            field,
            format!("must be 1..={MAX_IFNAME_LEN} bytes"),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
    {
        return Err(ModelError::invalid(
            field,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    Ok(())
}

/// Parses `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ModelError> {
    let err = || ModelError::invalid("guest_mac", format!("{s:?} is not xx:xx:xx:xx:xx:xx"));
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next().ok_or_else(err)?;
        if p.len() != 2 {
            return Err(err());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
    }
    if parts.next().is_some() {
        return Err(err());
    }
    if out[0] & 1 == 1 {
        return Err(ModelError::invalid(
            "guest_mac",
            format!("{s} is a multicast address"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkInterface, String> {
        let n: NetworkInterface = serde_json::from_str(s).map_err(|e| e.to_string())?;
        n.validate().map_err(|e| e.to_string())?;
        Ok(n)
    }

    #[test]
    fn good() {
        let n = parse(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:AC:10:00:02","bridge":"br0","mtu":1500}"#,
        )
        .unwrap();
        assert_eq!(n.mac_bytes(), Some([6, 0, 0xac, 0x10, 0, 2]));
        assert!(parse(r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#).is_ok());
    }

    #[test]
    fn bad() {
        assert!(parse(r#"{"iface_id":"eth0"}"#).is_err());
        assert!(
            parse(r#"{"iface_id":"eth0","host_dev_name":"a-very-long-tap-name"}"#)
                .unwrap_err()
                .contains("host_dev_name")
        );
        assert!(parse(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"zz:00:00:00:00:00"}"#
        )
        .unwrap_err()
        .contains("guest_mac"));
        assert!(parse(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00"}"#
        )
        .is_err());
        assert!(parse(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"01:00:00:00:00:00"}"#
        )
        .is_err());
        assert!(parse(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00:00:00"}"#
        )
        .is_err());
        assert!(
            parse(r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":20}"#)
                .unwrap_err()
                .contains("mtu")
        );
        assert!(parse(r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":70000}"#).is_err());
        assert!(parse(r#"{"iface_id":"eth0","host_dev_name":"tap0","vlan":3}"#).is_err());
    }

    #[test]
    fn patch() {
        let p: PartialNetworkInterface = serde_json::from_str(
            r#"{"iface_id":"eth0","rx_rate_limiter":{"bandwidth":{"size":10,"refill_time":5}}}"#,
        )
        .unwrap();
        assert!(p.validate().is_ok());
        assert!(serde_json::from_str::<PartialNetworkInterface>(
            r#"{"iface_id":"eth0","host_dev_name":"tap1"}"#
        )
        .is_err());
    }
}
