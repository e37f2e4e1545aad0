//! A read-only view of a qcow2 backing chain: which guest clusters a given image allocates (the
//! failover VM's changes since that image became active) and the guest-visible bytes of the whole
//! chain at any offset.
//!
//! Why our own reader rather than `qemu-img map` + `qemu-nbd`: a round needs both the allocation
//! map of one frozen overlay and random reads of its chain; `qemu-nbd` needs an NBD client and a
//! daemon per round, `qemu-img convert` would copy the whole disk. The subset of qcow2 that QEMU
//! writes for a guest (version 2 and 3, standard and zero clusters, raw or qcow2 backing files) is
//! about two hundred lines; anything else (compressed or encrypted clusters, external data files,
//! extended L2 entries) is refused by name.
//!
//! Only frozen images are read for data: nothing writes them any more (QEMU keeps them open
//! read-only as backing files), so their tables cannot change under us. The active overlay of a
//! running VM is only ever asked for an allocation estimate.

use anyhow::{bail, Context, Result};
use snapshot::Extents;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"QFI\xfb";
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Incompatible feature bits we can read with: 0 = dirty (refcounts only), 3 = compression type
/// (only matters for compressed clusters, which we refuse anyway).
const INCOMPAT_OK: u64 = (1 << 0) | (1 << 3);
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;

/// Where the bytes of one guest cluster live in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    /// Not in this image: read the backing file.
    Unallocated,
    /// Allocated as zeros in this image.
    Zero,
    /// At this host offset of this image's file.
    Data(u64),
}

/// One qcow2 image (without its backing chain).
pub struct Qcow2 {
    path: PathBuf,
    file: File,
    pub size: u64,
    cluster_bits: u32,
    l1: Vec<u64>,
    /// Backing file path (resolved against this image's directory) and its format.
    pub backing: Option<(PathBuf, String)>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Whether the file at `path` starts with the qcow2 magic.
pub fn is_qcow2(path: &Path) -> Result<bool> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut m = [0u8; 4];
    Ok(f.read_exact_at(&mut m, 0).is_ok() && &m == MAGIC)
}

impl Qcow2 {
    pub fn open(path: &Path) -> Result<Qcow2> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let what = || path.display().to_string();
        let mut h = vec![0u8; 512];
        let n = file
            .read_at(&mut h, 0)
            .with_context(|| format!("reading {}", what()))?;
        if n < 72 || &h[..4] != MAGIC {
            bail!("{}: not a qcow2 image", what());
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            bail!("{}: qcow2 version {version} is not supported", what());
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            bail!("{}: cluster size 2^{cluster_bits} is not valid", what());
        }
        if be32(&h, 32) != 0 {
            bail!("{}: encrypted qcow2 images are not supported", what());
        }
        let (header_len, incompat) = if version == 3 {
            if n < 104 {
                bail!("{}: truncated qcow2 v3 header", what());
            }
            (be32(&h, 100) as usize, be64(&h, 72))
        } else {
            (72, 0)
        };
        if incompat & !INCOMPAT_OK != 0 {
            bail!(
                "{}: qcow2 incompatible features {:#x} are not supported (external data file, \
                 extended L2 entries or a corrupt image)",
                what(),
                incompat & !INCOMPAT_OK
            );
        }
        let size = be64(&h, 24);
        let l1_size = be32(&h, 36) as usize;
        let l1_offset = be64(&h, 40);
        let cluster = 1u64 << cluster_bits;
        let l2_entries = cluster / 8;
        let needed = size.div_ceil(cluster * l2_entries) as usize;
        if l1_size < needed || l1_size > (32 << 20) {
            bail!(
                "{}: L1 table of {l1_size} entries does not fit a {size}-byte disk",
                what()
            );
        }
        let mut raw = vec![0u8; l1_size * 8];
        file.read_exact_at(&mut raw, l1_offset)
            .with_context(|| format!("{}: reading the L1 table", what()))?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();

        // Header extensions: only the backing file's format matters to us.
        let mut backing_format = None;
        let mut ext = vec![0u8; cluster as usize];
        let got = file.read_at(&mut ext, 0).unwrap_or(0);
        ext.truncate(got);
        let mut o = header_len;
        while o + 8 <= ext.len() {
            let (ty, len) = (be32(&ext, o), be32(&ext, o + 4) as usize);
            if ty == EXT_END || o + 8 + len > ext.len() {
                break;
            }
            if ty == EXT_BACKING_FORMAT {
                backing_format = Some(String::from_utf8_lossy(&ext[o + 8..o + 8 + len]).into());
            }
            o += 8 + len.div_ceil(8) * 8;
        }
        let (bf_off, bf_len) = (be64(&h, 8), be32(&h, 16) as usize);
        let backing = if bf_off != 0 && bf_len > 0 {
            if bf_len > 1023 {
                bail!("{}: backing file name too long", what());
            }
            let mut name = vec![0u8; bf_len];
            file.read_exact_at(&mut name, bf_off)
                .with_context(|| format!("{}: reading the backing file name", what()))?;
            let name = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
            let full = if name.is_absolute() {
                name
            } else {
                path.parent().unwrap_or(Path::new(".")).join(name)
            };
            let format = match backing_format {
                Some(f) => f,
                None if is_qcow2(&full)? => "qcow2".into(),
                None => "raw".into(),
            };
            Some((full, format))
        } else {
            None
        };
        Ok(Qcow2 {
            path: path.to_owned(),
            file,
            size,
            cluster_bits,
            l1,
            backing,
        })
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Read one L2 table (by L1 index); `None` when unallocated.
    fn l2_table(&self, l1_index: usize) -> Result<Option<Vec<u64>>> {
        let off = self.l1.get(l1_index).copied().unwrap_or(0) & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        self.file
            .read_exact_at(&mut raw, off)
            .with_context(|| format!("{}: reading an L2 table at {off}", self.path.display()))?;
        Ok(Some(raw.chunks_exact(8).map(|c| be64(c, 0)).collect()))
    }

    fn decode(&self, entry: u64, guest: u64) -> Result<Cluster> {
        if entry & L2_COMPRESSED != 0 {
            bail!(
                "{}: compressed cluster at guest offset {guest} (not written by a running VM; \
                 not supported)",
                self.path.display()
            );
        }
        let off = entry & OFFSET_MASK;
        Ok(if entry & L2_ZERO != 0 {
            Cluster::Zero
        } else if off == 0 {
            Cluster::Unallocated
        } else {
            Cluster::Data(off)
        })
    }

    /// Guest byte ranges this image allocates (data or zero clusters), in order.
    pub fn allocated(&self) -> Result<Extents> {
        let mut out = Extents::new();
        let cs = self.cluster_size();
        let span = cs * self.l2_entries();
        for i in 0..self.l1.len() {
            let Some(l2) = self.l2_table(i)? else {
                continue;
            };
            for (j, &e) in l2.iter().enumerate() {
                let guest = i as u64 * span + j as u64 * cs;
                if guest >= self.size {
                    break;
                }
                if self.decode(e, guest)? != Cluster::Unallocated {
                    out.add(guest, (guest + cs).min(self.size));
                }
            }
        }
        Ok(out)
    }

    /// Where the clusters covering `[off, off + len)` live, one entry per cluster.
    fn map(&self, off: u64, len: u64) -> Result<Vec<Cluster>> {
        let cs = self.cluster_size();
        let span = cs * self.l2_entries();
        let mut out = Vec::new();
        let mut cached: Option<(usize, Option<Vec<u64>>)> = None;
        let mut g = off / cs * cs;
        while g < off + len {
            let i = (g / span) as usize;
            if cached.as_ref().map(|c| c.0) != Some(i) {
                cached = Some((i, self.l2_table(i)?));
            }
            let entry = match &cached {
                Some((_, Some(l2))) => l2[((g % span) / cs) as usize],
                _ => 0,
            };
            out.push(self.decode(entry, g)?);
            g += cs;
        }
        Ok(out)
    }
}

/// One layer of a chain: a qcow2 image or the raw file at its bottom.
enum Layer {
    Qcow2(Qcow2),
    Raw { file: File, size: u64 },
}

/// A qcow2 image with its whole backing chain, readable at guest offsets. `Sync`: reads are
/// positional and the tables of frozen images do not change.
pub struct Chain {
    layers: Vec<Layer>,
    size: u64,
    path: PathBuf,
}

impl Chain {
    /// Open `top` and every backing file below it.
    pub fn open(top: &Path) -> Result<Chain> {
        let first = Qcow2::open(top)?;
        let size = first.size;
        let mut layers = vec![];
        let mut next = first.backing.clone();
        layers.push(Layer::Qcow2(first));
        while let Some((path, format)) = next.take() {
            if layers.len() > 256 {
                bail!("{}: backing chain deeper than 256 images", top.display());
            }
            match format.as_str() {
                "qcow2" => {
                    let img = Qcow2::open(&path)?;
                    next = img.backing.clone();
                    layers.push(Layer::Qcow2(img));
                }
                "raw" => {
                    let file = File::open(&path)
                        .with_context(|| format!("opening backing file {}", path.display()))?;
                    let size = file
                        .metadata()
                        .with_context(|| format!("reading {}", path.display()))?
                        .len();
                    layers.push(Layer::Raw { file, size });
                }
                other => bail!(
                    "{}: backing format {other:?} is not supported",
                    path.display()
                ),
            }
        }
        Ok(Chain {
            layers,
            size,
            path: top.to_owned(),
        })
    }

    /// Read the guest bytes at `[off, off + buf.len())` from layer `k` down.
    fn read_from(&self, k: usize, buf: &mut [u8], off: u64) -> Result<()> {
        let Some(layer) = self.layers.get(k) else {
            buf.fill(0);
            return Ok(());
        };
        match layer {
            Layer::Raw { file, size } => {
                let avail = size.saturating_sub(off).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..avail], off)
                    .with_context(|| format!("reading the base image at {off}"))?;
                buf[avail..].fill(0);
            }
            Layer::Qcow2(img) => {
                let cs = img.cluster_size();
                let avail = img.size.saturating_sub(off).min(buf.len() as u64) as usize;
                buf[avail..].fill(0);
                let map = img.map(off, avail as u64)?;
                // Walk runs of clusters with the same kind so that backing reads stay large.
                let mut pos = 0usize;
                let mut idx = 0usize;
                while pos < avail {
                    let g = off + pos as u64;
                    let cluster_end = ((g / cs) + 1) * cs;
                    let mut end = (cluster_end - off).min(avail as u64) as usize;
                    let kind = map[idx];
                    idx += 1;
                    if kind == Cluster::Unallocated {
                        while end < avail && map[idx] == Cluster::Unallocated {
                            end = (end + cs as usize).min(avail);
                            idx += 1;
                        }
                    }
                    let part = &mut buf[pos..end];
                    match kind {
                        Cluster::Unallocated => self.read_from(k + 1, part, g)?,
                        Cluster::Zero => part.fill(0),
                        Cluster::Data(host) => img
                            .file
                            .read_exact_at(part, host + g % cs)
                            .with_context(|| {
                                format!("{}: reading guest offset {g}", img.path.display())
                            })?,
                    }
                    pos = end;
                }
            }
        }
        Ok(())
    }
}

impl snapshot::ReadAt for Chain {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the disk",
            ));
        }
        self.read_from(0, buf, offset)
            .map_err(|e| std::io::Error::other(format!("{}: {e:#}", self.path.display())))
    }

    fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::ReadAt;
    use std::process::Command;

    fn have_qemu_img() -> bool {
        Command::new("qemu-img").arg("--version").output().is_ok()
    }

    fn run(cmd: &mut Command) {
        let out = cmd.output().expect("runs");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A raw base, two qcow2 layers written with qemu-io; our reads equal `qemu-img convert`'s.
    #[test]
    fn chain_reads_match_qemu() {
        if !have_qemu_img() {
            eprintln!("qemu-img missing: skipped");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        let size = 24u64 << 20;
        let mut data = vec![0u8; size as usize];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i as u64).wrapping_mul(2654435761).to_le_bytes()[1];
        }
        std::fs::write(&base, &data).unwrap();
        let ov0 = d.path().join("ov0.qcow2");
        let ov1 = d.path().join("ov1.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"])
            .arg(&ov0));
        run(Command::new("qemu-io")
            .arg("-c")
            .arg("write -P 0xaa 4096 8192")
            .arg("-c")
            .arg("write -z 8388608 1048576")
            .arg("-c")
            .arg("write -P 0x11 20971000 3000")
            .arg(&ov0));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(&ov0)
            .args(["-F", "qcow2"])
            .arg(&ov1));
        run(Command::new("qemu-io")
            .arg("-c")
            .arg("write -P 0x55 4000000 300000")
            .arg(&ov1));

        let top = Qcow2::open(&ov1).unwrap();
        let alloc = top.allocated().unwrap();
        assert_eq!(alloc.ranges(), &[(3997696, 4325376)]);
        let mid = Qcow2::open(&ov0).unwrap();
        assert_eq!(
            mid.allocated().unwrap().ranges(),
            &[(0, 65536), (8388608, 9437184), (20905984, 20971520 + 65536)]
        );

        let flat = d.path().join("flat.raw");
        run(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&ov1)
            .arg(&flat));
        let want = std::fs::read(&flat).unwrap();
        let chain = Chain::open(&ov1).unwrap();
        assert_eq!(chain.size(), size);
        let mut got = vec![0u8; size as usize];
        chain.read_at(&mut got, 0).unwrap();
        assert!(got == want, "whole-disk read differs from qemu-img convert");
        // Unaligned reads across layer boundaries.
        for (off, len) in [
            (4095u64, 3u64),
            (3_999_999, 400_000),
            (8_388_000, 2_000_000),
        ] {
            let mut b = vec![0u8; len as usize];
            chain.read_at(&mut b, off).unwrap();
            assert!(
                b[..] == want[off as usize..(off + len) as usize],
                "at {off}"
            );
        }
    }
}
