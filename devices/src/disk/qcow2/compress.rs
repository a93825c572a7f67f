// SPDX-License-Identifier: Apache-2.0
//! Decompression of compressed clusters (raw deflate or zstd).

use std::io::{self, Read};

use super::header::Compression;
use super::invalid;

/// Inflates `input` into exactly `cluster_size` bytes.
///
/// `input` may carry trailing bytes of the next compressed cluster; decoding
/// stops once a whole cluster came out.
pub fn decompress(method: Compression, input: &[u8], cluster_size: usize) -> io::Result<Vec<u8>> {
    match method {
        Compression::Deflate => {
            let out = miniz_oxide::inflate::decompress_to_vec_with_limit(input, cluster_size)
                .map_err(|e| invalid(format!("deflate stream is corrupt: {e}")))?;
            if out.len() != cluster_size {
                return Err(invalid(format!(
                    "compressed cluster inflates to {} bytes instead of {cluster_size}",
                    out.len()
                )));
            }
            Ok(out)
        }
        Compression::Zstd => {
            let mut src = input;
            let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
                .map_err(|e| invalid(format!("zstd frame is corrupt: {e}")))?;
            let mut out = vec![0u8; cluster_size];
            dec.read_exact(&mut out)
                .map_err(|e| invalid(format!("zstd frame is corrupt: {e}")))?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_decompress_deflate_roundtrip_with_trailing_bytes() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        packed.extend_from_slice(&[0xff; 100]);
        assert_eq!(
            decompress(Compression::Deflate, &packed, 4096).unwrap(),
            data
        );
    }

    #[test]
    fn test_decompress_deflate_short_output_is_invalid_data() {
        let packed = miniz_oxide::deflate::compress_to_vec(&[1u8; 100], 6);
        let err = decompress(Compression::Deflate, &packed, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn test_decompress_garbage_is_invalid_data() {
        let err = decompress(Compression::Zstd, &[0x11; 64], 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
