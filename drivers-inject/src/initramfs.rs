//! Reading an initramfs as the kernel does: concatenated `newc` cpio segments, each plain or
//! compressed (gzip, xz, zstd, lz4 legacy: what initramfs-tools and dracut write), typically an
//! uncompressed early-microcode segment followed by the compressed main one. We only need the
//! names of the files inside (which kernel modules the image carries), never their contents.

use anyhow::{bail, Context, Result};
use std::io::Read;

/// The file names of every segment (paths without a leading `./` or `/`).
#[derive(Debug, Default)]
pub struct Listing {
    pub files: Vec<String>,
    /// One word per segment: `cpio`, `gzip`, `xz`, `zstd`, `lz4`.
    pub segments: Vec<&'static str>,
}

impl Listing {
    /// Module names (`nvme`, `nvme_core`: `-` as `_`) of the `.ko` files under `lib/modules/`.
    pub fn modules(&self) -> std::collections::BTreeSet<String> {
        self.files
            .iter()
            .filter(|f| f.contains("lib/modules/"))
            .filter_map(|f| {
                let base = f.rsplit('/').next()?;
                let (name, ext) = base.split_once(".ko")?;
                (ext.is_empty() || ext.starts_with('.')).then(|| name.replace('-', "_"))
            })
            .collect()
    }
}

/// An upper bound on what a decompressed segment may grow to (a hostile image cannot make us
/// allocate more than this). Real images unpack to 20-300 MiB; the boot image runs in 1 GiB.
const MAX_UNPACKED: u64 = 512 << 20;

pub fn read(path: &std::path::Path) -> Result<Listing> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    list(&data).with_context(|| format!("reading the initramfs {}", path.display()))
}

pub fn list(mut data: &[u8]) -> Result<Listing> {
    let mut out = Listing::default();
    loop {
        // Segments are padded with zeros to 4 (or 512) bytes.
        let skip = data.iter().take_while(|&&b| b == 0).count();
        data = &data[skip..];
        if data.is_empty() {
            break;
        }
        if data.starts_with(b"070701") || data.starts_with(b"070702") {
            let used = cpio(data, &mut out.files)?;
            out.segments.push("cpio");
            data = &data[used..];
            continue;
        }
        let (kind, unpacked, used) = decompress(data)?;
        out.segments.push(kind);
        let mut rest = &unpacked[..];
        while !rest.is_empty() {
            let skip = rest.iter().take_while(|&&b| b == 0).count();
            rest = &rest[skip..];
            if rest.is_empty() {
                break;
            }
            let used = cpio(rest, &mut out.files)?;
            rest = &rest[used..];
        }
        data = &data[used..];
    }
    Ok(out)
}

/// Decompresses the one stream at the start of `data`: (kind, bytes, compressed length), so
/// that segments after it (an appended cpio) are read too.
fn decompress(data: &[u8]) -> Result<(&'static str, Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut input = data;
    let kind = if data.starts_with(&[0x1f, 0x8b]) {
        flate2::bufread::GzDecoder::new(&mut input)
            .take(MAX_UNPACKED)
            .read_to_end(&mut out)
            .context("gzip segment")?;
        "gzip"
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::with_buffer(&mut input)
            .context("zstd segment")?
            .single_frame()
            .take(MAX_UNPACKED)
            .read_to_end(&mut out)
            .context("zstd segment")?;
        "zstd"
    } else if data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        // The decoder refuses bytes after the stream: cut at the stream's footer.
        let end = xz_end(data).context("xz segment: no stream footer")?;
        lzma_rs::xz_decompress(&mut &data[..end], &mut out)
            .map_err(|e| anyhow::anyhow!("xz segment: {e}"))?;
        input = &data[end..];
        "xz"
    } else if data.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        let used = lz4_legacy(&data[4..], &mut out)?;
        input = &data[4 + used..];
        "lz4"
    } else {
        bail!(
            "unknown segment format (magic {:02x?}): not cpio, gzip, xz, zstd or lz4",
            &data[..data.len().min(6)]
        );
    };
    if out.len() as u64 >= MAX_UNPACKED {
        bail!("{kind} segment: more than {MAX_UNPACKED} bytes unpacked");
    }
    Ok((kind, out, data.len() - input.len()))
}

/// The end of the first xz stream of `data`: its 12-byte footer (CRC32 of backward size and
/// flags, the header's stream flags, `YZ`) ends on a 4-byte boundary.
fn xz_end(data: &[u8]) -> Option<usize> {
    let flags = data.get(6..8)?;
    (24..=data.len()).step_by(4).find(|&e| {
        &data[e - 2..e] == b"YZ"
            && &data[e - 4..e - 2] == flags
            && crc32fast::hash(&data[e - 8..e - 2]).to_le_bytes() == data[e - 12..e - 8]
    })
}

/// The kernel's lz4 "legacy" framing: little-endian u32 compressed size, then a block that
/// decompresses to at most 8 MiB. It has no end marker: it ends at the data's end, at zero
/// padding, or where a size could not be a block's (a following cpio's `0707` magic).
/// Returns the bytes used.
fn lz4_legacy(data: &[u8], out: &mut Vec<u8>) -> Result<usize> {
    const BLOCK: usize = 8 << 20;
    let bound = BLOCK + BLOCK / 255 + 16;
    let total = data.len();
    let mut data = data;
    while data.len() >= 4 {
        let n = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if n == 0x184c2102 {
            data = &data[4..];
            continue;
        }
        if n == 0 || n > bound {
            break;
        }
        let block = data.get(4..4 + n).context("lz4 segment: truncated block")?;
        let start = out.len();
        out.resize(start + BLOCK, 0);
        let got = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| anyhow::anyhow!("lz4 segment: {e}"))?;
        out.truncate(start + got);
        if out.len() as u64 > MAX_UNPACKED {
            bail!("lz4 segment: more than {MAX_UNPACKED} bytes unpacked");
        }
        data = &data[4 + n..];
    }
    Ok(total - data.len())
}

fn hex_field(h: &[u8], i: usize) -> Result<usize> {
    let f = h
        .get(6 + i * 8..6 + i * 8 + 8)
        .context("cpio: truncated header")?;
    let s = std::str::from_utf8(f).context("cpio: header is not hex")?;
    usize::from_str_radix(s, 16).with_context(|| format!("cpio: bad header field {s:?}"))
}

const fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Reads one newc archive up to and including its `TRAILER!!!`; returns the bytes used.
fn cpio(data: &[u8], files: &mut Vec<String>) -> Result<usize> {
    let mut pos = 0;
    loop {
        let h = data.get(pos..pos + 110).context("cpio: truncated header")?;
        if !(h.starts_with(b"070701") || h.starts_with(b"070702")) {
            bail!("cpio: bad magic at offset {pos}");
        }
        let filesize = hex_field(h, 6)?;
        let namesize = hex_field(h, 11)?;
        let name_start = pos + 110;
        let name = data
            .get(name_start..name_start + namesize)
            .context("cpio: truncated name")?;
        let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(name)).into_owned();
        let data_start = pad4(name_start + namesize);
        let next = pad4(
            data_start
                .checked_add(filesize)
                .context("cpio: size overflow")?,
        );
        if next > pad4(data.len()) {
            bail!("cpio: {name}: truncated data");
        }
        if name == "TRAILER!!!" {
            return Ok(next.min(data.len()));
        }
        files.push(
            name.trim_start_matches("./")
                .trim_start_matches('/')
                .to_string(),
        );
        pos = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newc(files: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for (i, name) in files.iter().chain(&["TRAILER!!!"]).enumerate() {
            let body: &[u8] = if *name == "TRAILER!!!" { b"" } else { b"data" };
            let hdr = format!(
                "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                i,
                0o100644,
                0,
                0,
                1,
                0,
                body.len(),
                0,
                0,
                0,
                0,
                name.len() + 1,
                0
            );
            v.extend_from_slice(hdr.as_bytes());
            v.extend_from_slice(name.as_bytes());
            v.push(0);
            while !v.len().is_multiple_of(4) {
                v.push(0);
            }
            v.extend_from_slice(body);
            while !v.len().is_multiple_of(4) {
                v.push(0);
            }
        }
        v
    }

    #[test]
    fn early_cpio_then_compressed_main() {
        let early = newc(&["kernel/x86/microcode/GenuineIntel.bin"]);
        let main = newc(&[
            "usr/lib/modules/6.1.0-9-amd64/kernel/drivers/nvme/host/nvme-core.ko.xz",
            "./lib/modules/6.1.0-9-amd64/kernel/drivers/block/virtio_blk.ko",
            "bin/sh",
        ]);
        for kind in ["gzip", "zstd", "xz", "lz4"] {
            let packed = match kind {
                "gzip" => {
                    let mut e =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    std::io::Write::write_all(&mut e, &main).unwrap();
                    e.finish().unwrap()
                }
                "zstd" => zstd::encode_all(&main[..], 3).unwrap(),
                "xz" => {
                    let mut out = Vec::new();
                    lzma_rs::xz_compress(&mut &main[..], &mut out).unwrap();
                    out
                }
                _ => {
                    let block = lz4_flex::block::compress(&main);
                    let mut out = vec![0x02, 0x21, 0x4c, 0x18];
                    out.extend_from_slice(&(block.len() as u32).to_le_bytes());
                    out.extend_from_slice(&block);
                    out
                }
            };
            let mut img = early.clone();
            img.resize(512, 0);
            img.extend_from_slice(&packed);
            let l = list(&img).unwrap();
            assert_eq!(l.segments, ["cpio", kind]);
            let m: Vec<String> = l.modules().into_iter().collect();
            assert_eq!(m, ["nvme_core", "virtio_blk"], "{kind}");
            // A segment appended after the compressed one (the adaptation's fallback).
            img.resize(img.len().div_ceil(4) * 4, 0);
            img.extend_from_slice(&newc(&["lib/modules/6.1.0-9-amd64/kernel/nvme.ko"]));
            let l = list(&img).unwrap();
            assert_eq!(l.segments, ["cpio", kind, "cpio"], "{kind}");
            assert!(l.modules().contains("nvme"), "{kind}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"070701zzzz"[..],
            &[0x1f, 0x8b, 1, 2, 3][..],
            &[0x28, 0xb5, 0x2f, 0xfd, 0][..],
            &[0x02, 0x21, 0x4c, 0x18, 0xff, 0xff, 0xff, 0x7f][..],
            b"hello world",
        ] {
            assert!(list(bad).is_err());
        }
        let mut truncated = newc(&["a/b"]);
        truncated.truncate(120);
        assert!(list(&truncated).is_err());
    }
}
