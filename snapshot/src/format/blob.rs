//! Chunk blob: a 16-byte header then the payload (zstd, or raw when zstd does not shrink it).
//!
//! ```text
//! 0   8  magic  "BMRCHUNK"
//! 8   2  version (u16 LE) = 1
//! 10  1  encoding: 0 raw, 1 zstd
//! 11  1  reserved, 0
//! 12  4  uncompressed length (u32 LE)
//! 16  .. payload
//! ```

use super::Digest;
use thiserror::Error;

pub const MAGIC: &[u8; 8] = b"BMRCHUNK";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
/// Largest blob a reader accepts: the header and a 4 MiB chunk, plus zstd's worst-case expansion
/// (writers store raw when zstd does not shrink, so theirs are never longer than header + chunk).
pub const MAX_BLOB_LEN: u64 = HEADER_LEN as u64 + super::CHUNK_SIZE + (64 << 10);
const ENC_RAW: u8 = 0;
const ENC_ZSTD: u8 = 1;

/// Why a chunk blob was refused. Callers match on it to tell "corrupt" from "missing".
#[derive(Debug, Error)]
pub enum ChunkError {
    #[error("chunk {0}: truncated blob ({1} bytes)")]
    Truncated(Digest, usize),
    #[error("chunk {0}: bad magic, not a chunk blob")]
    BadMagic(Digest),
    #[error("chunk {0}: unsupported blob version {1}")]
    Version(Digest, u16),
    #[error("chunk {0}: unknown encoding {1}")]
    Encoding(Digest, u8),
    #[error("chunk {0}: payload does not decompress: {1}")]
    Decompress(Digest, String),
    #[error("chunk {0}: length {1} differs from header {2}")]
    Length(Digest, usize, usize),
    #[error("chunk {expected}: content hashes to {actual} (corrupt)")]
    Digest { expected: Digest, actual: Digest },
}

/// Encode `data` as a blob at zstd `level` (ingest uses 4: see docs/benchmarks.md); raw when
/// zstd does not shrink it.
pub fn encode_chunk(data: &[u8], level: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + data.len() / 2);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(ENC_ZSTD);
    out.push(0);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    match zstd::bulk::compress(data, level) {
        Ok(z) if z.len() < data.len() => out.extend_from_slice(&z),
        _ => {
            out[10] = ENC_RAW;
            out.extend_from_slice(data);
        }
    }
    out
}

/// The first bytes of every zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Bytes of a blob that [`check_header`] needs: the header and the start of the payload.
pub const PROBE_LEN: usize = HEADER_LEN + 4;

/// The cheap checks of a stored blob, without decompressing: magic, version, encoding, length
/// field, and the payload's start (a zstd frame) or length (raw). `start` is the blob's first
/// bytes (at least [`PROBE_LEN`] when the blob is that long), `total` its whole length. Catches
/// truncation, zeroed or garbled headers; a flipped bit inside a zstd payload needs
/// [`decode_chunk`]. Returns the uncompressed length.
pub fn check_header(start: &[u8], total: u64, d: &Digest) -> Result<usize, ChunkError> {
    let e = *d;
    if start.len() < HEADER_LEN || total < HEADER_LEN as u64 {
        return Err(ChunkError::Truncated(e, total as usize));
    }
    if &start[..8] != MAGIC {
        return Err(ChunkError::BadMagic(e));
    }
    let version = u16::from_le_bytes([start[8], start[9]]);
    if version != VERSION {
        return Err(ChunkError::Version(e, version));
    }
    let len = u32::from_le_bytes([start[12], start[13], start[14], start[15]]) as usize;
    if len as u64 > super::CHUNK_SIZE {
        return Err(ChunkError::Length(e, len, super::CHUNK_SIZE as usize));
    }
    let payload = total - HEADER_LEN as u64;
    match start[10] {
        ENC_RAW if payload != len as u64 => Err(ChunkError::Length(e, payload as usize, len)),
        ENC_RAW => Ok(len),
        ENC_ZSTD if start.len() < PROBE_LEN || start[HEADER_LEN..PROBE_LEN] != ZSTD_MAGIC => Err(
            ChunkError::Decompress(e, "payload is not a zstd frame".into()),
        ),
        ENC_ZSTD => Ok(len),
        other => Err(ChunkError::Encoding(e, other)),
    }
}

/// Whether a blob starting with `head` (its header) stores its payload raw: the payload is then
/// the chunk itself, and a reader may receive it straight into the buffer it writes from.
pub fn is_raw(head: &[u8]) -> bool {
    head.len() >= HEADER_LEN && head[10] == ENC_RAW
}

/// [`decode_chunk_into`] of a raw blob whose header is `head`, whose whole length is `total` and
/// whose payload was received straight into `out`: the header checked, the chunk hashed.
pub fn check_raw_into(
    head: &[u8],
    total: u64,
    out: &[u8],
    expected: &Digest,
) -> Result<usize, ChunkError> {
    // A zstd header fails here: `head` holds no payload to probe.
    let len = check_header(head, total, expected)?;
    if out.len() < len {
        return Err(ChunkError::Length(*expected, len, out.len()));
    }
    hashes_to(&out[..len], expected)
}

/// `data`'s length if it hashes to `expected`.
fn hashes_to(data: &[u8], expected: &Digest) -> Result<usize, ChunkError> {
    let actual = Digest::of(data);
    if actual != *expected {
        return Err(ChunkError::Digest {
            expected: *expected,
            actual,
        });
    }
    Ok(data.len())
}

/// Decode a blob without checking its digest: for callers that compare the bytes with the ones
/// they hold (ingest), which is as strong and cheaper than hashing again.
pub fn decode_unverified(blob: &[u8], expected: &Digest) -> Result<Vec<u8>, ChunkError> {
    let mut data = vec![0u8; check_header(blob, blob.len() as u64, expected)?];
    decode_into(blob, expected, &mut data)?;
    Ok(data)
}

/// Decode a blob and check that it hashes to `expected`: no unverified byte leaves this function.
pub fn decode_chunk(blob: &[u8], expected: &Digest) -> Result<Vec<u8>, ChunkError> {
    let mut data = vec![0u8; check_header(blob, blob.len() as u64, expected)?];
    decode_chunk_into(blob, expected, &mut data)?;
    Ok(data)
}

/// [`decode_chunk`] into the caller's buffer (the restorer decodes straight into the aligned
/// buffer it writes from: no copy and no allocation per chunk); returns the chunk's length.
/// `out` must hold the chunk (a [`crate::CHUNK_SIZE`] buffer holds any).
pub fn decode_chunk_into(
    blob: &[u8],
    expected: &Digest,
    out: &mut [u8],
) -> Result<usize, ChunkError> {
    let len = decode_into(blob, expected, out)?;
    hashes_to(&out[..len], expected)
}

/// The payload of a blob decoded into `out[..len]`, unverified; returns `len`.
fn decode_into(blob: &[u8], expected: &Digest, out: &mut [u8]) -> Result<usize, ChunkError> {
    let e = *expected;
    let len = check_header(blob, blob.len() as u64, expected)?;
    if out.len() < len {
        return Err(ChunkError::Length(e, len, out.len()));
    }
    let payload = &blob[HEADER_LEN..];
    let out = &mut out[..len];
    let n = match blob[10] {
        ENC_RAW => {
            out.copy_from_slice(payload);
            len
        }
        _ => zstd::bulk::decompress_to_buffer(payload, out)
            .map_err(|err| ChunkError::Decompress(e, err.to_string()))?,
    };
    if n != len {
        return Err(ChunkError::Length(e, n, len));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_compressible_and_random() {
        let text = b"hello world ".repeat(1000);
        let mut random = vec![0u8; 10000];
        getrandom::getrandom(&mut random).unwrap();
        for data in [&text[..], &random[..], &[][..]] {
            let d = Digest::of(data);
            let blob = encode_chunk(data, 3);
            assert_eq!(decode_chunk(&blob, &d).unwrap(), data);
        }
        assert!(encode_chunk(&text, 3).len() < text.len() / 10);
        assert_eq!(encode_chunk(&random, 3).len(), random.len() + HEADER_LEN);
    }

    #[test]
    fn decodes_into_a_buffer_that_holds_it_and_refuses_a_short_one() {
        let data = b"into the caller's buffer ".repeat(300);
        let d = Digest::of(&data);
        for blob in [encode_chunk(&data, 3), {
            let mut raw = encode_chunk(&data, 3)[..HEADER_LEN].to_vec();
            raw[10] = ENC_RAW;
            raw.extend_from_slice(&data);
            raw
        }] {
            let mut out = vec![0xaau8; data.len() + 100];
            assert_eq!(decode_chunk_into(&blob, &d, &mut out).unwrap(), data.len());
            assert_eq!(&out[..data.len()], &data[..]);
            let mut short = vec![0u8; data.len() - 1];
            assert!(matches!(
                decode_chunk_into(&blob, &d, &mut short),
                Err(ChunkError::Length(..))
            ));
        }
    }

    #[test]
    fn corruption_is_detected() {
        let data = b"some chunk data".repeat(100);
        let d = Digest::of(&data);
        let blob = encode_chunk(&data, 3);
        assert!(matches!(
            decode_chunk(&blob[..10], &d),
            Err(ChunkError::Truncated(..))
        ));
        let mut bad = blob.clone();
        bad[0] ^= 1;
        assert!(matches!(
            decode_chunk(&bad, &d),
            Err(ChunkError::BadMagic(..))
        ));
        let mut bad = blob.clone();
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        assert!(decode_chunk(&bad, &d).is_err());
        let other = Digest::of(b"x");
        assert!(matches!(
            decode_chunk(&blob, &other),
            Err(ChunkError::Digest { .. })
        ));
    }
}
