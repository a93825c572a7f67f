// SPDX-License-Identifier: Apache-2.0
//! Parsing sizes such as `512M` or `10G`.

/// A size that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid size '{0}' (expected a number with an optional K, M, G, T or P suffix)")]
pub struct SizeError(pub String);

/// Parses `N[K|M|G|T|P][iB|B]` (binary multiples) into bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(err()),
            };
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    if num.is_empty() {
        return Err(err());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(err);
    }
    let f: f64 = num.parse().map_err(|_| err())?;
    let bytes = f * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(err());
    }
    Ok(bytes as u64)
}

/// Formats bytes for humans, e.g. `10 GiB` or `1.5 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_suffixes_are_binary() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
    }

    #[test]
    fn test_parse_size_plain_number_is_bytes() {
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn test_parse_size_fraction_is_accepted() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
    }

    #[test]
    fn test_parse_size_garbage_is_error() {
        assert!(parse_size("ten").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("5X").is_err());
    }

    #[test]
    fn test_parse_size_overflow_is_error() {
        assert!(parse_size("99999999999P").is_err());
    }

    #[test]
    fn test_human_whole_units() {
        assert_eq!(human(10 << 30), "10 GiB");
        assert_eq!(human(1536 << 10), "1.50 MiB");
    }
}
