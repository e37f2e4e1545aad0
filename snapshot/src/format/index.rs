//! Chunk index (`disk<N>.idx`): a 64-byte header then one 32-byte digest per 4 MiB slot.
//!
//! ```text
//! 0   8  magic "BMRINDEX"
//! 8   4  version (u32 LE) = 1
//! 12  4  header length (u32 LE) = 64
//! 16  8  disk size in bytes (u64 LE)
//! 24  8  chunk size in bytes (u64 LE)
//! 32  8  slot count (u64 LE) = ceil(disk size / chunk size)
//! 40 24  reserved, zero
//! 64 ..  slot count x 32-byte SHA-256 digests; all-zero = unused
//! ```

use super::{Digest, CHUNK_SIZE};
use anyhow::{bail, Result};

pub const MAGIC: &[u8; 8] = b"BMRINDEX";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
const UNUSED: [u8; 32] = [0; 32];
/// Largest disk an index may describe: 64 TiB (16 Mi slots, a 512 MiB index).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// Length in bytes of the index file of a disk of `disk_size` bytes.
pub fn file_len(disk_size: u64) -> u64 {
    HEADER_LEN as u64 + 32 * disk_size.div_ceil(CHUNK_SIZE)
}

/// What one 4 MiB slot of a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// No filesystem data here: nothing stored, nothing to write.
    Unused,
    /// All zeros: never fetched, written as zeros.
    Zeros,
    /// Stored chunk with this digest.
    Data(Digest),
}

/// The chunk index of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndex {
    pub disk_size: u64,
    pub chunk_size: u64,
    entries: Vec<Digest>,
}

impl ChunkIndex {
    /// An index of `disk_size` bytes with every slot unused.
    pub fn new(disk_size: u64) -> ChunkIndex {
        let count = disk_size.div_ceil(CHUNK_SIZE) as usize;
        ChunkIndex {
            disk_size,
            chunk_size: CHUNK_SIZE,
            entries: vec![Digest(UNUSED); count],
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Byte offset and length of slot `i` on the disk.
    pub fn span(&self, i: usize) -> (u64, u64) {
        let off = i as u64 * self.chunk_size;
        (off, self.chunk_size.min(self.disk_size - off))
    }

    /// Whether `data` (slot `i`'s bytes as read from a disk) is what the index says is there;
    /// an unused slot holds anything.
    pub fn holds(&self, i: usize, data: &[u8]) -> bool {
        match self.slot(i) {
            Slot::Unused => true,
            Slot::Zeros => crate::chunker::is_zero(data),
            Slot::Data(d) => Digest::of(data) == d,
        }
    }

    pub fn slot(&self, i: usize) -> Slot {
        let d = self.entries[i];
        if d.0 == UNUSED {
            Slot::Unused
        } else if d == Digest::zeros(self.span(i).1) {
            Slot::Zeros
        } else {
            Slot::Data(d)
        }
    }

    /// Raw digest of slot `i` (all-zero for unused).
    pub fn digest(&self, i: usize) -> Digest {
        self.entries[i]
    }

    pub fn set(&mut self, i: usize, slot: Slot) {
        self.entries[i] = match slot {
            Slot::Unused => Digest(UNUSED),
            Slot::Zeros => Digest::zeros(self.span(i).1),
            Slot::Data(d) => d,
        };
    }

    pub fn slots(&self) -> impl Iterator<Item = (usize, Slot)> + '_ {
        (0..self.len()).map(|i| (i, self.slot(i)))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 32 * self.entries.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        out.resize(HEADER_LEN, 0);
        for d in &self.entries {
            out.extend_from_slice(&d.0);
        }
        out
    }

    /// Parse an index; `origin` names the file or URL for the error.
    pub fn parse(b: &[u8], origin: &str) -> Result<ChunkIndex> {
        if b.len() < HEADER_LEN {
            bail!("{origin}: truncated chunk index ({} bytes)", b.len());
        }
        if &b[..8] != MAGIC {
            bail!("{origin}: not a chunk index (bad magic)");
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            bail!("{origin}: chunk index version {version} is not supported (this build reads {VERSION})");
        }
        if u32_at(12) as usize != HEADER_LEN {
            bail!(
                "{origin}: chunk index header length {} is not {HEADER_LEN}",
                u32_at(12)
            );
        }
        let (disk_size, chunk_size, count) = (u64_at(16), u64_at(24), u64_at(32));
        if chunk_size != CHUNK_SIZE {
            bail!("{origin}: chunk size {chunk_size} is not supported");
        }
        if disk_size > MAX_DISK_SIZE {
            bail!("{origin}: a disk of {disk_size} bytes is larger than this build supports ({MAX_DISK_SIZE} bytes)");
        }
        if count != disk_size.div_ceil(chunk_size) {
            bail!("{origin}: {count} slots do not cover a disk of {disk_size} bytes");
        }
        let body = &b[HEADER_LEN..];
        if body.len() as u64 != count * 32 {
            bail!(
                "{origin}: chunk index body is {} bytes, expected {}",
                body.len(),
                count * 32
            );
        }
        let entries = body
            .chunks_exact(32)
            .map(|c| Digest(c.try_into().expect("32 bytes")))
            .collect();
        Ok(ChunkIndex {
            disk_size,
            chunk_size,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_slots() {
        let mut idx = ChunkIndex::new(3 * CHUNK_SIZE + 512);
        assert_eq!(idx.len(), 4);
        assert_eq!(idx.span(3), (3 * CHUNK_SIZE, 512));
        idx.set(1, Slot::Zeros);
        idx.set(2, Slot::Data(Digest::of(b"x")));
        idx.set(3, Slot::Zeros);
        let back = ChunkIndex::parse(&idx.to_bytes(), "t").unwrap();
        assert_eq!(back, idx);
        assert_eq!(back.slot(0), Slot::Unused);
        assert_eq!(back.slot(1), Slot::Zeros);
        assert_eq!(back.slot(3), Slot::Zeros);
        assert_eq!(back.slot(2), Slot::Data(Digest::of(b"x")));
    }

    #[test]
    fn malformed_is_refused() {
        let b = ChunkIndex::new(CHUNK_SIZE).to_bytes();
        assert!(ChunkIndex::parse(&b[..70], "t").is_err());
        let mut v = b.clone();
        v[8] = 2;
        assert!(ChunkIndex::parse(&v, "t")
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        let mut v = b.clone();
        v[16] = 0xff;
        assert!(ChunkIndex::parse(&v, "t").is_err());
    }
}
