// SPDX-License-Identifier: Apache-2.0
//! The validated VM configuration: plain data built from the CLI or the API,
//! no live objects. Devices are created from it by the builder.

use std::path::PathBuf;

use devices::disk::ImageFormat;
use serde::{Deserialize, Serialize};

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SerialConfig {
    /// Standard input/output (input only when stdin is a terminal).
    #[default]
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
    /// A Unix socket one console client at a time attaches to (`wisp
    /// console`), output also appended to `log` when given.
    Socket {
        /// The socket the VMM listens on.
        path: PathBuf,
        /// Where all guest output is also appended.
        log: Option<PathBuf>,
    },
}

impl std::str::FromStr for SerialConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" | "off" => Ok(Self::None),
            _ => {
                if let Some(spec) = s.strip_prefix("socket=") {
                    let (path, log) = match spec.split_once(",log=") {
                        Some((p, l)) => (p, Some(l)),
                        None => (spec, None),
                    };
                    if path.is_empty() || log.is_some_and(str::is_empty) {
                        return Err(ConfigError::Serial(s.to_string()));
                    }
                    return Ok(Self::Socket {
                        path: path.into(),
                        log: log.map(PathBuf::from),
                    });
                }
                match s.strip_prefix("file=") {
                    Some(p) if !p.is_empty() => Ok(Self::File(p.into())),
                    _ => Err(ConfigError::Serial(s.to_string())),
                }
            }
        }
    }
}

/// Errors in the configuration the user gave.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size that does not parse.
    #[error(
        "Invalid size '{0}': expected a number with an optional K, M, G or T suffix (e.g. 512M)"
    )]
    Size(String),
    /// A bad serial spec.
    #[error("Invalid serial '{0}': expected stdio, none, file=PATH or socket=PATH[,log=FILE]")]
    Serial(String),
    /// A bad vCPU count.
    #[error("Invalid vCPU count {0}: {1}")]
    Vcpus(u64, String),
    /// Memory out of range.
    #[error("Invalid memory size {0} bytes: {1}")]
    Memory(u64, String),
    /// A bad device option list.
    #[error("Invalid {kind} option '{opt}': {why}")]
    DeviceOption {
        /// `--disk` or `--net`.
        kind: &'static str,
        /// The offending option.
        opt: String,
        /// What is wrong.
        why: String,
    },
}

/// Parses a size like `512M`, `4G`, `1024` (bytes), `64K`; `MiB`/`GiB` forms too.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| ConfigError::Size(s.into()))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(ConfigError::Size(s.into())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| ConfigError::Size(s.into()))
}

/// (De)serializes an image format by its name, the encoding state files
/// have always used for this field.
mod format_name {
    use devices::disk::ImageFormat;
    use serde::{de::Error, Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(f: &Option<ImageFormat>, s: S) -> Result<S::Ok, S::Error> {
        f.map(ImageFormat::name).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ImageFormat>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|n| n.parse().map_err(D::Error::custom))
            .transpose()
    }
}

/// A disk as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Image path.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Drive id (API `drive_id`).
    pub id: String,
    /// Serial returned by GET_ID.
    pub serial: Option<String>,
    /// Image format; `None` probes (and then never follows backing files).
    #[serde(with = "format_name")]
    pub format: Option<ImageFormat>,
    /// Whether this is the root device.
    pub root: bool,
}

/// A network interface as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Interface id (API `iface_id`).
    pub id: String,
    /// TAP device name.
    pub tap: String,
    /// Guest MAC; generated when absent.
    pub mac: Option<String>,
    /// Linux bridge to attach the TAP to.
    pub bridge: Option<String>,
    /// MTU.
    pub mtu: Option<u16>,
}

/// Splits `key=value,key=value` device options.
pub fn parse_kv(kind: &'static str, spec: &str) -> Result<Vec<(String, String)>, ConfigError> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(ConfigError::DeviceOption {
                kind,
                opt: p.to_string(),
                why: "expected key=value".into(),
            }),
        })
        .collect()
}

fn parse_bool(kind: &'static str, k: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(ConfigError::DeviceOption {
            kind,
            opt: format!("{k}={v}"),
            why: "expected on or off".into(),
        }),
    }
}

impl DiskConfig {
    /// Parses `path=IMG[,readonly=on][,id=NAME][,serial=STR][,format=raw|qcow2|vmdk][,root=on]`;
    /// `index` names the drive when `id` is absent.
    pub fn parse(spec: &str, index: usize) -> Result<Self, ConfigError> {
        const K: &str = "--disk";
        let mut d = DiskConfig {
            path: PathBuf::new(),
            read_only: false,
            id: format!("disk{index}"),
            serial: None,
            format: None,
            root: false,
        };
        let mut root = None;
        for (k, v) in parse_kv(K, spec)? {
            match k.as_str() {
                "path" => d.path = v.into(),
                "readonly" | "ro" => d.read_only = parse_bool(K, &k, &v)?,
                "id" => d.id = v,
                "serial" => {
                    if v.len() > 20 {
                        return Err(ConfigError::DeviceOption {
                            kind: K,
                            opt: format!("serial={v}"),
                            why: "at most 20 bytes".into(),
                        });
                    }
                    d.serial = Some(v)
                }
                "format" => match v.parse::<ImageFormat>() {
                    Ok(f) => d.format = Some(f),
                    Err(_) => {
                        return Err(ConfigError::DeviceOption {
                            kind: K,
                            opt: format!("format={v}"),
                            why: "expected raw, qcow2 or vmdk".into(),
                        })
                    }
                },
                "root" => root = Some(parse_bool(K, &k, &v)?),
                _ => {
                    return Err(ConfigError::DeviceOption {
                        kind: K,
                        opt: k,
                        why: "unknown option (known: path, readonly, id, serial, format, root)"
                            .into(),
                    })
                }
            }
        }
        if d.path.as_os_str().is_empty() {
            return Err(ConfigError::DeviceOption {
                kind: K,
                opt: spec.into(),
                why: "path=IMG is required".into(),
            });
        }
        if d.format == Some(ImageFormat::Vmdk) && !d.read_only {
            return Err(ConfigError::DeviceOption {
                kind: K,
                opt: "format=vmdk".into(),
                why: "wisp opens VMDK images read-only: add readonly=on (or convert the image \
                      with `wisp image convert -O qcow2`)"
                    .into(),
            });
        }
        d.root = root.unwrap_or(index == 0);
        Ok(d)
    }
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=MAC][,bridge=BR][,mtu=N][,id=NAME]`.
    pub fn parse(spec: &str, index: usize) -> Result<Self, ConfigError> {
        const K: &str = "--net";
        let mut n = NetConfig {
            id: format!("net{index}"),
            tap: String::new(),
            mac: None,
            bridge: None,
            mtu: None,
        };
        for (k, v) in parse_kv(K, spec)? {
            match k.as_str() {
                "tap" => n.tap = v,
                "mac" => n.mac = Some(v),
                "bridge" => n.bridge = Some(v),
                "id" => n.id = v,
                "mtu" => {
                    n.mtu = Some(v.parse().ok().filter(|m| (68..=65535).contains(m)).ok_or(
                        ConfigError::DeviceOption {
                            kind: K,
                            opt: format!("mtu={v}"),
                            why: "expected 68..65535".into(),
                        },
                    )?)
                }
                _ => {
                    return Err(ConfigError::DeviceOption {
                        kind: K,
                        opt: k,
                        why: "unknown option (known: tap, mac, bridge, mtu, id)".into(),
                    })
                }
            }
        }
        if n.tap.is_empty() {
            return Err(ConfigError::DeviceOption {
                kind: K,
                opt: spec.into(),
                why: "tap=NAME is required".into(),
            });
        }
        Ok(n)
    }
}

/// Everything needed to build a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux, PVH ELF or bzImage).
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line as the user gave it.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// Serial console destination.
    pub serial: SerialConfig,
    /// Disks, in order.
    pub disks: Vec<DiskConfig>,
    /// Network interfaces, in order.
    pub nets: Vec<NetConfig>,
    /// Log dirty pages from boot (for Diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// The default command line when none is given: the console on COM1.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Checks a vCPU count against wisp's and KVM's limits.
/// The limit is Firecracker's (`api::models::machine_config::MAX_VCPUS`), the
/// same on the command line and the API.
pub fn check_vcpus(n: u64, kvm_max: usize) -> Result<u8, ConfigError> {
    let limit = api::models::machine_config::MAX_VCPUS;
    if n == 0 {
        return Err(ConfigError::Vcpus(n, "at least 1 is needed".into()));
    }
    if n > u64::from(limit) {
        return Err(ConfigError::Vcpus(n, format!("at most {limit}")));
    }
    if n > kvm_max as u64 {
        return Err(ConfigError::Vcpus(
            n,
            format!("at most {kvm_max} on this host"),
        ));
    }
    Ok(n as u8)
}

/// Checks a memory size: at least the minimum, page aligned, at most host RAM.
pub fn check_memory(size: u64, host_ram: u64) -> Result<u64, ConfigError> {
    if size < boot::layout::MIN_MEM_SIZE {
        return Err(ConfigError::Memory(
            size,
            format!(
                "at least {} MiB is needed",
                boot::layout::MIN_MEM_SIZE >> 20
            ),
        ));
    }
    if !size.is_multiple_of(4096) {
        return Err(ConfigError::Memory(
            size,
            "must be a multiple of 4 KiB".into(),
        ));
    }
    if size > host_ram {
        return Err(ConfigError::Memory(
            size,
            format!("larger than this host's RAM ({} MiB)", host_ram >> 20),
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_disk_format_keeps_the_string_encoding_of_state_files() {
        // What DiskConfig was when state files stored the format as a string.
        #[derive(Serialize)]
        struct Stored<'a> {
            path: PathBuf,
            read_only: bool,
            id: String,
            serial: Option<String>,
            format: Option<&'a str>,
            root: bool,
        }
        let stored = |format| Stored {
            path: "/img".into(),
            read_only: false,
            id: "d".into(),
            serial: None,
            format,
            root: true,
        };
        for (name, format) in [
            (Some("qcow2"), Some(ImageFormat::Qcow2)),
            (Some("raw"), Some(ImageFormat::Raw)),
            (Some("vmdk"), Some(ImageFormat::Vmdk)),
            (None, None),
        ] {
            let d = DiskConfig {
                path: "/img".into(),
                read_only: false,
                id: "d".into(),
                serial: None,
                format,
                root: true,
            };
            let bytes = postcard::to_stdvec(&stored(name)).unwrap();
            assert_eq!(postcard::to_stdvec(&d).unwrap(), bytes);
            assert_eq!(postcard::from_bytes::<DiskConfig>(&bytes).unwrap(), d);
        }
        let bad = postcard::to_stdvec(&stored(Some("vdi"))).unwrap();
        assert!(postcard::from_bytes::<DiskConfig>(&bad).is_err());
    }

    #[test]
    fn test_parse_size_suffixes_and_errors() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn test_serial_config_parse() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("none".parse(), Ok(SerialConfig::None));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!("file=".parse::<SerialConfig>().is_err());
        assert_eq!(
            "socket=/s,log=/l".parse(),
            Ok(SerialConfig::Socket {
                path: "/s".into(),
                log: Some("/l".into())
            })
        );
        assert_eq!(
            "socket=/s".parse(),
            Ok(SerialConfig::Socket {
                path: "/s".into(),
                log: None
            })
        );
        assert!("socket=".parse::<SerialConfig>().is_err());
        assert!("socket=/s,log=".parse::<SerialConfig>().is_err());
        assert!("tcp".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn test_disk_config_parse() {
        let d = DiskConfig::parse("path=/a.img,readonly=on,serial=abc", 0).unwrap();
        assert!(d.read_only && d.root);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(d.id, "disk0");
        assert!(!DiskConfig::parse("path=/b.img", 1).unwrap().root);
        assert!(DiskConfig::parse("readonly=on", 0).is_err());
        assert!(DiskConfig::parse("path=/a,bogus=1", 0).is_err());
        assert!(DiskConfig::parse("path=/a,readonly=maybe", 0).is_err());
        assert!(DiskConfig::parse("path=/a,serial=012345678901234567890", 0).is_err());
    }

    #[test]
    fn test_disk_config_vmdk_needs_readonly() {
        let d = DiskConfig::parse("path=/a.vmdk,format=vmdk,readonly=on", 0).unwrap();
        assert_eq!(d.format, Some(ImageFormat::Vmdk));
        let err = DiskConfig::parse("path=/a.vmdk,format=vmdk", 0).unwrap_err();
        assert!(err.to_string().contains("readonly=on"), "{err}");
    }

    #[test]
    fn test_net_config_parse() {
        let n = NetConfig::parse("tap=tap0,bridge=br0,mtu=1500", 0).unwrap();
        assert_eq!(n.bridge.as_deref(), Some("br0"));
        assert_eq!(n.mtu, Some(1500));
        assert!(NetConfig::parse("bridge=br0", 0).is_err());
        assert!(NetConfig::parse("tap=t,mtu=10", 0).is_err());
    }

    #[test]
    fn test_limits() {
        assert!(check_vcpus(0, 1024).is_err());
        assert!(check_vcpus(300, 1024).is_err());
        // The API's limit, also on the command line.
        assert_eq!(check_vcpus(32, 1024), Ok(32));
        assert!(check_vcpus(33, 1024)
            .unwrap_err()
            .to_string()
            .contains("at most 32"));
        assert!(check_vcpus(3, 2).is_err());
        assert_eq!(check_vcpus(2, 1024), Ok(2));
        assert!(check_memory(1 << 20, 1 << 34).is_err());
        assert!(check_memory((64 << 20) + 1, 1 << 34).is_err());
        assert!(check_memory(1 << 35, 1 << 34).is_err());
        assert_eq!(check_memory(128 << 20, 1 << 34), Ok(128 << 20));
    }
}
