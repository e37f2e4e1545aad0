//! A small seeded generator (SplitMix64) and the content kinds fixtures are filled with. Same seed,
//! same bytes, on every machine: fixtures are reproducible without the `rand` crate.

use serde::{Deserialize, Serialize};

/// SplitMix64: fast, 64-bit state, good enough statistics for test data.
#[derive(Debug, Clone)]
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed ^ 0x6a09_e667_f3bc_c909)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }
}

/// Write `size` incompressible bytes from `seed` to `path`, streamed in 4 MiB pieces (the same
/// bytes for the same seed: a test regenerates them to compare).
pub fn write_random(path: &std::path::Path, size: u64, seed: u64) {
    use std::io::Write;
    let mut rng = Prng::new(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("creating the file"));
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("writing the file");
        left -= n as u64;
    }
    f.flush().expect("writing the file");
}

/// What a generated file holds. Equal values give equal bytes (that is how duplicates are made).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// Incompressible bytes.
    Random { seed: u64, len: u64 },
    /// English-like lines of words: compresses about 3-5x.
    Text { seed: u64, len: u64 },
    /// Binary-like data: zero runs, small integers, repeats and some noise (compresses about 2x).
    Binary { seed: u64, len: u64 },
    /// `marker` repeated to `len` bytes: recognisable anywhere on a disk.
    Pattern { marker: String, len: u64 },
    /// A file with a hole: `data` random bytes, a `hole`, `data` random bytes again.
    Sparse { seed: u64, data: u64, hole: u64 },
    /// A copy of a file of the build machine (e.g. `/usr/bin/ls`); its bytes enter the recipe hash.
    Copy { src: String },
    /// Literal text.
    Literal { text: String },
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "server",
    "disk",
    "backup",
    "restore",
    "snapshot",
    "kernel",
    "module",
    "driver",
    "network",
    "interface",
    "partition",
    "filesystem",
    "block",
    "inode",
    "journal",
    "mount",
    "device",
    "volume",
    "sector",
    "cluster",
    "bitmap",
    "allocation",
    "firmware",
    "controller",
    "appliance",
    "failover",
    "failback",
    "image",
    "request",
    "response",
    "error",
    "warning",
    "info",
    "debug",
    "started",
    "stopped",
    "service",
    "systemd",
    "daemon",
    "config",
    "user",
    "root",
    "admin",
    "password",
    "login",
    "session",
    "process",
    "thread",
    "memory",
    "cache",
    "buffer",
    "queue",
    "socket",
    "address",
    "port",
    "connection",
    "timeout",
    "retry",
    "checksum",
    "digest",
    "signature",
    "manifest",
    "index",
    "chunk",
    "store",
    "upload",
    "download",
    "progress",
    "complete",
    "failed",
    "success",
    "unit",
];

impl Content {
    pub fn len(&self) -> u64 {
        match self {
            Content::Random { len, .. }
            | Content::Text { len, .. }
            | Content::Binary { len, .. }
            | Content::Pattern { len, .. } => *len,
            Content::Sparse { data, hole, .. } => 2 * data + hole,
            Content::Copy { src } => std::fs::metadata(src).map(|m| m.len()).unwrap_or(0),
            Content::Literal { text } => text.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stream the content to `out` in pieces; `hole(n)` is called for sparse gaps (the writer
    /// seeks over them). Returns an error only from `out`/`hole` or reading a `Copy` source.
    pub fn generate(
        &self,
        out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
        hole: &mut dyn FnMut(u64) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        const PIECE: usize = 1 << 20;
        match self {
            Content::Random { seed, len } => {
                let mut g = Prng::new(*seed);
                let mut buf = vec![0u8; PIECE];
                let mut left = *len;
                while left > 0 {
                    let n = left.min(PIECE as u64) as usize;
                    g.fill(&mut buf[..n]);
                    out(&buf[..n])?;
                    left -= n as u64;
                }
            }
            Content::Text { seed, len } => {
                let mut g = Prng::new(*seed);
                let mut buf = Vec::with_capacity(PIECE + 256);
                let mut left = *len;
                while left > 0 {
                    buf.clear();
                    while (buf.len() as u64) < left.min(PIECE as u64) {
                        let words = 4 + g.below(12);
                        for w in 0..words {
                            if w > 0 {
                                buf.push(b' ');
                            }
                            buf.extend_from_slice(
                                WORDS[g.below(WORDS.len() as u64) as usize].as_bytes(),
                            );
                        }
                        buf.extend_from_slice(if g.below(8) == 0 { b".\n\n" } else { b".\n" });
                    }
                    let n = left.min(buf.len() as u64) as usize;
                    out(&buf[..n])?;
                    left -= n as u64;
                }
            }
            Content::Binary { seed, len } => {
                let mut g = Prng::new(*seed);
                let mut buf = vec![0u8; PIECE];
                let mut left = *len;
                while left > 0 {
                    let n = left.min(PIECE as u64) as usize;
                    for (k, block) in buf[..n].chunks_mut(64).enumerate() {
                        match g.below(8) {
                            0 | 1 => block.fill(0),
                            2 | 3 => {
                                for b in block.iter_mut() {
                                    *b = (g.next_u64() & 0x0f) as u8;
                                }
                            }
                            4 if k > 4 => {
                                // a repeat of an instruction-like sequence
                                for (i, b) in block.iter_mut().enumerate() {
                                    *b = [0x48, 0x89, 0xe5, 0x41, 0x57, 0xc3, 0x0f, 0x1f][i % 8];
                                }
                            }
                            _ => g.fill(block),
                        }
                    }
                    out(&buf[..n])?;
                    left -= n as u64;
                }
            }
            Content::Pattern { marker, len } => {
                let m = marker.as_bytes();
                let mut buf = Vec::with_capacity(PIECE + m.len());
                while buf.len() < PIECE {
                    buf.extend_from_slice(m);
                }
                let mut left = *len;
                while left > 0 {
                    let n = left.min(PIECE as u64) as usize;
                    // restart the pattern at each piece only at marker boundaries
                    let n = if n == PIECE {
                        PIECE - PIECE % m.len()
                    } else {
                        n
                    };
                    out(&buf[..n])?;
                    left -= n as u64;
                }
            }
            Content::Sparse {
                seed,
                data,
                hole: gap,
            } => {
                Content::Random {
                    seed: *seed,
                    len: *data,
                }
                .generate(out, hole)?;
                hole(*gap)?;
                Content::Random {
                    seed: seed.wrapping_add(1),
                    len: *data,
                }
                .generate(out, hole)?;
            }
            Content::Copy { src } => {
                let bytes = std::fs::read(src)?;
                out(&bytes)?;
            }
            Content::Literal { text } => out(text.as_bytes())?,
        }
        Ok(())
    }

    /// The bytes in memory (holes as zeros); for small contents and tests.
    pub fn bytes(&self) -> std::io::Result<Vec<u8>> {
        let v = std::cell::RefCell::new(Vec::new());
        self.generate(
            &mut |b| {
                v.borrow_mut().extend_from_slice(b);
                Ok(())
            },
            &mut |n| {
                let mut v = v.borrow_mut();
                let len = v.len();
                v.resize(len + n as usize, 0);
                Ok(())
            },
        )?;
        Ok(v.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sized() {
        for c in [
            Content::Random {
                seed: 1,
                len: 3_000_001,
            },
            Content::Text {
                seed: 2,
                len: 1_234_567,
            },
            Content::Binary {
                seed: 3,
                len: 2_000_003,
            },
            Content::Pattern {
                marker: "ABCDEFG".into(),
                len: 2_500_000,
            },
            Content::Sparse {
                seed: 4,
                data: 10_000,
                hole: 1 << 20,
            },
        ] {
            let a = c.bytes().unwrap();
            assert_eq!(a.len() as u64, c.len(), "{c:?}");
            assert_eq!(a, c.bytes().unwrap());
        }
        let p = Content::Pattern {
            marker: "ABCDEFG".into(),
            len: 2_500_000,
        }
        .bytes()
        .unwrap();
        assert!(p.chunks(7).all(|c| "ABCDEFG".as_bytes().starts_with(c)));
        assert_ne!(
            Content::Random { seed: 1, len: 64 }.bytes().unwrap(),
            Content::Random { seed: 2, len: 64 }.bytes().unwrap()
        );
    }
}
