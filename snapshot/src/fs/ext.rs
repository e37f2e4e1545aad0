//! ext2/3/4: the used-block map from the block bitmaps.
//!
//! Handles 32- and 64-byte group descriptors (64bit), flex_bg (metadata of a group living in
//! another group), sparse_super and sparse_super2 (which groups carry superblock backups),
//! meta_bg (descriptor blocks spread over the groups), bigalloc (bitmaps in clusters) and
//! BLOCK_UNINIT groups (no bitmap on disk: the group's own superblock backup and descriptor
//! blocks are what it uses). Every group's block bitmap, inode bitmap and inode table are marked
//! used wherever they are, whatever the bitmaps say.
//!
//! Checksums are verified as the kernel does before it trusts them: the superblock and block
//! bitmaps (metadata_csum, CRC32C) and every group descriptor (metadata_csum or uninit_bg CRC16).
//! A mismatch is damage: a flipped BLOCK_UNINIT flag or a cleared bitmap bit would otherwise drop
//! data from the map silently.
//!
//! The bitmaps are cross-checked against the filesystem's own counts and structures: each
//! group's free count in its descriptor, the superblock's total, and every group's superblock
//! backup, descriptor blocks, bitmaps and inode table, which must be marked used. Any
//! disagreement is damage (a bitmap with bits cleared, without checksums to notice): copied whole.
//!
//! A filesystem whose journal still needs recovery (not cleanly unmounted, or a crash-consistent
//! snapshot of a running system) may have on-disk bitmaps that miss blocks allocated by
//! transactions only the journal holds. The journal (jbd2, internal, v1/v2, 32/64-bit tags,
//! checksum v2/v3) is walked and every journaled copy of a block bitmap is ORed into the map: a
//! superset of what the filesystem uses once the journal is replayed. Journals that cannot be
//! read that way (external, fast commits, a pending resize) make the probe fail: copied whole.

pub mod files;

use super::exclude::{self, Exclusions, Hit};
use super::{bit_runs, extents_from, le, uncovered, Filesystem, FsKind, Part, Probe};
use crate::source::ReadAt;
use anyhow::{anyhow, bail, Context, Result};

const MAGIC: u16 = 0xEF53;

// s_feature_compat
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
// s_feature_incompat
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
// s_feature_ro_compat
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
// What ext3 understands (as blkid decides between ext2/3 and ext4).
const EXT3_INCOMPAT_SUPP: u32 = 0x2 | 0x4 | 0x10;
const EXT3_RO_COMPAT_SUPP: u32 = 0x1 | 0x2 | 0x4;

const INCOMPAT_CSUM_SEED: u32 = 0x2000;

const BG_BLOCK_UNINIT: u16 = 0x2;
/// Descriptors at least this long carry the high half of the block bitmap checksum.
const BG_BLOCK_BITMAP_CSUM_HI_END: u64 = 0x3A;

/// Largest single read of bitmap blocks.
const MAX_READ: u64 = 8 << 20;

/// `None` when the signature is absent.
pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64) -> Option<anyhow::Result<Probe>> {
    let part = Part { dev, offset, len };
    let mut sb = [0u8; 1024];
    if len < 2048 || part.read(1024, &mut sb, "ext superblock").is_err() {
        return None;
    }
    if le::u16(&sb, 0x38) != MAGIC {
        return None;
    }
    Some(map(&part, &sb))
}

/// An ext filesystem opened for reading its files (see [`files::Tree`]).
pub struct ExtFiles<'a> {
    part: Part<'a>,
    geo: Geometry,
    descs: Vec<Desc>,
}

impl<'a> ExtFiles<'a> {
    pub fn open(dev: &'a dyn ReadAt, offset: u64, len: u64) -> Result<ExtFiles<'a>> {
        let part = Part { dev, offset, len };
        let mut sb = [0u8; 1024];
        part.read(1024, &mut sb, "ext superblock")?;
        if le::u16(&sb, 0x38) != MAGIC {
            anyhow::bail!("no ext2/3/4 superblock at byte {offset}");
        }
        let geo = Geometry::from_superblock(&sb, len)?;
        let descs = read_descriptors(&part, &geo)?;
        Ok(ExtFiles { part, geo, descs })
    }

    pub fn tree(&self) -> files::Tree<'_> {
        files::Tree {
            part: &self.part,
            geo: &self.geo,
            descs: &self.descs,
        }
    }
}

/// The files `ex` names in the ext filesystem at `offset` of `dev`, with the structures no
/// exclusion may touch (group metadata, the journal), for [`super::exclude::apply`]. The default
/// names and the swap files of `/etc/fstab` count only when they hold a swap header.
pub(crate) fn excluded(
    dev: &dyn ReadAt,
    offset: u64,
    len: u64,
    ex: &Exclusions,
) -> Result<exclude::Found> {
    let part = Part { dev, offset, len };
    let mut sb = [0u8; 1024];
    part.read(1024, &mut sb, "ext superblock")?;
    let geo = Geometry::from_superblock(&sb, len)?;
    let descs = read_descriptors(&part, &geo)?;
    let tree = files::Tree {
        part: &part,
        geo: &geo,
        descs: &descs,
    };
    let mut found = exclude::Found::default();
    let mut critical = vec![(0, geo.first_data_block + 1)];
    for (g, d) in descs.iter().enumerate() {
        critical.push((d.block_bitmap, d.block_bitmap + 1));
        critical.push((d.inode_bitmap, d.inode_bitmap + 1));
        critical.push((d.inode_table, d.inode_table + geo.inode_table_blocks));
        geo.super_and_gdt(g as u64, &mut critical);
    }
    if le::u32(&sb, 0x5C) & COMPAT_HAS_JOURNAL != 0 && le::u32(&sb, 0xE0) != 0 {
        let j = tree.inode(u64::from(le::u32(&sb, 0xE0)))?;
        critical.extend(
            tree.runs(&j)?
                .iter()
                .map(|r| (r.physical, r.physical + r.len)),
        );
    }
    let bs = geo.bs;
    found.critical = extents_from(
        critical
            .into_iter()
            .map(|(s, e)| (s.saturating_mul(bs), e.saturating_mul(bs)))
            .collect(),
    );
    let mut paths: Vec<(String, bool)> = ex
        .paths
        .iter()
        .map(|p| (p.clone(), exclude::DEFAULT_PATHS.contains(&p.as_str())))
        .collect();
    if ex.fstab_swap {
        if let Some(fstab) = tree.lookup("/etc/fstab")?.filter(|i| i.is_file()) {
            for p in exclude::fstab_swap_files(&tree.read(&fstab, 1 << 20)?) {
                if !paths.iter().any(|(q, _)| *q == p) {
                    paths.push((p, true));
                }
            }
        }
    }
    for (path, needs_header) in paths {
        let hit = (|| -> Result<Option<Hit>> {
            let Some(ino) = tree.lookup(&path)?.filter(|i| i.is_file()) else {
                return Ok(None);
            };
            let verified = !needs_header || exclude::is_swap_header(&tree.read(&ino, 4096)?);
            let ranges = tree
                .runs(&ino)?
                .iter()
                .map(|r| (r.logical * bs, r.physical * bs, (r.physical + r.len) * bs))
                .collect();
            Ok(Some(Hit {
                path: path.clone(),
                ranges,
                verified,
            }))
        })();
        match hit {
            Ok(Some(h)) => found.hits.push(h),
            Ok(None) => {}
            Err(e) => found.notes.push(format!("{path} is kept whole: {e:#}")),
        }
    }
    Ok(found)
}

/// The superblock fields the map needs, checked.
struct Geometry {
    bs: u64,
    /// Blocks per allocation cluster (1 without bigalloc).
    ratio: u64,
    blocks: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    clusters_per_group: u64,
    groups: u64,
    desc_size: u64,
    desc_per_block: u64,
    desc_blocks: u64,
    reserved_gdt: u64,
    inode_table_blocks: u64,
    inode_size: u64,
    inodes_per_group: u64,
    meta_bg: bool,
    first_meta_bg: u64,
    sparse_super: bool,
    sparse_super2: Option<[u64; 2]>,
    has_64bit: bool,
    csum: bool,
    checksum: Checksum,
}

/// How group descriptors (and bitmaps) are checksummed.
enum Checksum {
    None,
    /// uninit_bg: CRC16 over the UUID, group number and descriptor.
    Gdt([u8; 16]),
    /// metadata_csum: CRC32C from this seed.
    Meta(u32),
}

impl Geometry {
    fn from_superblock(sb: &[u8], len: u64) -> Result<Geometry> {
        let compat = le::u32(sb, 0x5C);
        let incompat = le::u32(sb, 0x60);
        let ro = le::u32(sb, 0x64);
        if incompat & INCOMPAT_JOURNAL_DEV != 0 {
            bail!("this is an external ext journal device, not a filesystem; copied whole");
        }
        let log = le::u32(sb, 0x18);
        if log > 6 {
            bail!("superblock: s_log_block_size {log} is invalid (block size above 64 KiB)");
        }
        let bs = 1024u64 << log;
        let has_64bit = incompat & INCOMPAT_64BIT != 0;
        let blocks = u64::from(le::u32(sb, 0x4))
            | if has_64bit {
                u64::from(le::u32(sb, 0x150)) << 32
            } else {
                0
            };
        let first_data_block = u64::from(le::u32(sb, 0x14));
        let bigalloc = ro & RO_COMPAT_BIGALLOC != 0;
        let ratio = if bigalloc {
            let clog = le::u32(sb, 0x1C);
            if clog < log || clog > 6 + 16 {
                bail!("superblock: cluster size 2^(10+{clog}) is invalid for {bs}-byte blocks");
            }
            1u64 << (clog - log)
        } else {
            1
        };
        if bigalloc && bs == 1024 {
            bail!("bigalloc with 1 KiB blocks is not supported; copied whole");
        }
        let blocks_per_group = u64::from(le::u32(sb, 0x20));
        let clusters_per_group = if bigalloc {
            u64::from(le::u32(sb, 0x24))
        } else {
            blocks_per_group
        };
        if clusters_per_group == 0 || clusters_per_group > 8 * bs {
            bail!(
                "superblock: {clusters_per_group} blocks (clusters) per group does not fit one \
                 {bs}-byte bitmap block"
            );
        }
        if blocks_per_group != clusters_per_group.saturating_mul(ratio) {
            bail!(
                "superblock: {blocks_per_group} blocks per group is not {clusters_per_group} \
                 clusters of {ratio} blocks"
            );
        }
        let inodes_per_group = u64::from(le::u32(sb, 0x28));
        if inodes_per_group == 0 || inodes_per_group > 8 * bs {
            bail!("superblock: {inodes_per_group} inodes per group is invalid");
        }
        let inode_size = if le::u32(sb, 0x4C) == 0 {
            128
        } else {
            u64::from(le::u16(sb, 0x58))
        };
        if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > bs {
            bail!("superblock: inode size {inode_size} is invalid");
        }
        let expected_first = u64::from(bs == 1024);
        if first_data_block != expected_first {
            bail!(
                "superblock: first data block {first_data_block} should be {expected_first} for \
                 {bs}-byte blocks"
            );
        }
        if blocks <= first_data_block {
            bail!("superblock: block count {blocks} is too small");
        }
        let fs_bytes = blocks
            .checked_mul(bs)
            .ok_or_else(|| anyhow!("superblock: block count {blocks} overflows"))?;
        if fs_bytes > len {
            bail!(
                "superblock: the filesystem spans {fs_bytes} bytes ({blocks} blocks of {bs}) but \
                 the partition holds only {len}: truncated image or wrong partition size"
            );
        }
        let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
        let inodes = u64::from(le::u32(sb, 0x0));
        if inodes != groups * inodes_per_group {
            bail!(
                "superblock: {inodes} inodes is not {groups} groups x {inodes_per_group} inodes \
                 per group"
            );
        }
        let desc_size = if has_64bit {
            let d = u64::from(le::u16(sb, 0xFE));
            if d < 64 || !d.is_power_of_two() || d > bs {
                bail!("superblock: group descriptor size {d} is invalid for a 64bit filesystem");
            }
            d
        } else {
            32
        };
        let desc_per_block = bs / desc_size;
        let desc_blocks = groups.div_ceil(desc_per_block);
        let meta_bg = incompat & INCOMPAT_META_BG != 0;
        let first_meta_bg = u64::from(le::u32(sb, 0x104));
        if meta_bg && first_meta_bg > desc_blocks {
            bail!(
                "superblock: first meta_bg {first_meta_bg} is past the {desc_blocks} descriptor blocks"
            );
        }
        let sparse_super2 = (compat & COMPAT_SPARSE_SUPER2 != 0)
            .then(|| [u64::from(le::u32(sb, 0x24C)), u64::from(le::u32(sb, 0x250))]);
        Ok(Geometry {
            bs,
            ratio,
            blocks,
            first_data_block,
            blocks_per_group,
            clusters_per_group,
            groups,
            desc_size,
            desc_per_block,
            desc_blocks,
            reserved_gdt: u64::from(le::u16(sb, 0xCE)),
            inode_table_blocks: (inodes_per_group * inode_size).div_ceil(bs),
            inode_size,
            inodes_per_group,
            meta_bg,
            first_meta_bg,
            sparse_super: ro & RO_COMPAT_SPARSE_SUPER != 0,
            sparse_super2,
            has_64bit,
            csum: ro & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0,
            checksum: if ro & RO_COMPAT_METADATA_CSUM != 0 {
                let stored = le::u32(sb, 0x3FC);
                let computed = crc32c(!0, sb.get(..0x3FC).unwrap_or_default());
                if stored != computed {
                    bail!(
                        "superblock checksum mismatch (stored {stored:08x}, computed {computed:08x})"
                    );
                }
                Checksum::Meta(if incompat & INCOMPAT_CSUM_SEED != 0 {
                    le::u32(sb, 0x270)
                } else {
                    crc32c(!0, &le::bytes::<16>(sb, 0x68))
                })
            } else if ro & RO_COMPAT_GDT_CSUM != 0 {
                Checksum::Gdt(le::bytes(sb, 0x68))
            } else {
                Checksum::None
            },
        })
    }

    fn group_first(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if let Some(b) = self.sparse_super2 {
            return g == b[0] || g == b[1];
        }
        if g <= 1 || !self.sparse_super {
            return true;
        }
        if g & 1 == 0 {
            return false;
        }
        let power_of = |mut a: u64, b: u64| loop {
            if a < b {
                return false;
            }
            if a == b {
                return true;
            }
            if !a.is_multiple_of(b) {
                return false;
            }
            a /= b;
        };
        power_of(g, 3) || power_of(g, 5) || power_of(g, 7)
    }

    /// Block holding group-descriptor block `i` (primary copy).
    fn desc_block(&self, i: u64) -> u64 {
        if !self.meta_bg || i < self.first_meta_bg {
            return self.first_data_block + 1 + i;
        }
        let g = i * self.desc_per_block;
        self.group_first(g) + u64::from(self.has_super(g))
    }

    /// Superblock backup and descriptor blocks (old-style and reserved, or the meta_bg one) that
    /// group `g` carries, as block ranges.
    fn super_and_gdt(&self, g: u64, out: &mut Vec<(u64, u64)>) {
        let start = self.group_first(g);
        let has_super = self.has_super(g);
        if has_super {
            out.push((start, start + 1));
        }
        if !self.meta_bg || g / self.desc_per_block < self.first_meta_bg {
            if has_super {
                let n = if self.meta_bg {
                    self.first_meta_bg
                } else {
                    self.desc_blocks + self.reserved_gdt
                };
                let end = (start + 1 + n).min(self.blocks);
                out.push((start + 1, end.max(start + 1)));
            }
        } else {
            let r = g % self.desc_per_block;
            if r == 0 || r == 1 || r == self.desc_per_block - 1 {
                let b = start + u64::from(has_super);
                out.push((b, b + 1));
            }
        }
    }
}

struct Desc {
    /// Free clusters the descriptor counts.
    free: u64,
    /// Stored checksum of the block bitmap (metadata_csum; 16 or 32 bits).
    bitmap_csum: u32,
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    flags: u16,
}

fn read_descriptors(part: &Part, geo: &Geometry) -> Result<Vec<Desc>> {
    let bs = geo.bs;
    let mut raw = Vec::new();
    let mut i = 0;
    while i < geo.desc_blocks {
        // Consecutive descriptor blocks are read together.
        let start = geo.desc_block(i);
        let mut n = 1;
        while i + n < geo.desc_blocks && geo.desc_block(i + n) == start + n && n * bs < MAX_READ {
            n += 1;
        }
        if start + n > geo.blocks {
            bail!(
                "group descriptor block {i} at block {start} lies past the end of the filesystem \
                 ({} blocks)",
                geo.blocks
            );
        }
        let v = part.read_vec(
            start * bs,
            n * bs,
            &format!("group descriptor blocks {i}..{} (block {start})", i + n),
        )?;
        raw.extend_from_slice(&v);
        i += n;
    }
    let ds = geo.desc_size as usize;
    let mut out = Vec::with_capacity(geo.groups as usize);
    for g in 0..geo.groups {
        let d = raw
            .get(g as usize * ds..(g as usize + 1) * ds)
            .ok_or_else(|| anyhow!("group descriptor {g} is missing"))?;
        let hi = |off: usize| -> u64 {
            if geo.has_64bit {
                u64::from(le::u32(d, off)) << 32
            } else {
                0
            }
        };
        let stored = le::u16(d, 0x1E);
        let computed = match &geo.checksum {
            Checksum::None => stored,
            Checksum::Gdt(uuid) => {
                let mut c = crc16(0xFFFF, uuid);
                c = crc16(c, &(g as u32).to_le_bytes());
                c = crc16(c, d.get(..0x1E).unwrap_or_default());
                if geo.has_64bit {
                    c = crc16(c, d.get(0x20..).unwrap_or_default());
                }
                c
            }
            Checksum::Meta(seed) => {
                let mut c = crc32c(*seed, &(g as u32).to_le_bytes());
                c = crc32c(c, d.get(..0x1E).unwrap_or_default());
                c = crc32c(c, &[0, 0]);
                c = crc32c(c, d.get(0x20..).unwrap_or_default());
                (c & 0xFFFF) as u16
            }
        };
        if stored != computed {
            bail!(
                "group descriptor {g} (descriptor block {}, block {}): checksum mismatch (stored \
                 {stored:04x}, computed {computed:04x})",
                g / geo.desc_per_block,
                geo.desc_block(g / geo.desc_per_block)
            );
        }
        let desc = Desc {
            free: u64::from(le::u16(d, 0x0C))
                | if geo.has_64bit && geo.desc_size >= 64 {
                    u64::from(le::u16(d, 0x2C)) << 16
                } else {
                    0
                },
            bitmap_csum: u32::from(le::u16(d, 0x18))
                | if geo.desc_size >= BG_BLOCK_BITMAP_CSUM_HI_END {
                    u32::from(le::u16(d, 0x38)) << 16
                } else {
                    0
                },
            block_bitmap: u64::from(le::u32(d, 0x0)) | hi(0x20),
            inode_bitmap: u64::from(le::u32(d, 0x4)) | hi(0x24),
            inode_table: u64::from(le::u32(d, 0x8)) | hi(0x28),
            flags: le::u16(d, 0x12),
        };
        let at = |what: &str, b: u64, n: u64| -> Result<()> {
            if b < geo.first_data_block || b.checked_add(n).is_none_or(|e| e > geo.blocks) {
                bail!(
                    "group descriptor {g} (descriptor block {}, block {}): {what} at block {b} \
                     lies outside the filesystem (blocks {}..{})",
                    g / geo.desc_per_block,
                    geo.desc_block(g / geo.desc_per_block),
                    geo.first_data_block,
                    geo.blocks
                );
            }
            Ok(())
        };
        at("block bitmap", desc.block_bitmap, 1)?;
        at("inode bitmap", desc.inode_bitmap, 1)?;
        at("inode table", desc.inode_table, geo.inode_table_blocks)?;
        out.push(desc);
    }
    Ok(out)
}

/// ext2, ext3 or ext4, decided from the feature flags as blkid does.
fn kind_of(sb: &[u8]) -> FsKind {
    let incompat = le::u32(sb, 0x60);
    let ro = le::u32(sb, 0x64);
    let compat = le::u32(sb, 0x5C);
    if incompat & !EXT3_INCOMPAT_SUPP != 0 || ro & !EXT3_RO_COMPAT_SUPP != 0 {
        FsKind::Ext4
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext2
    }
}

/// Which ext variant the superblock announces (for reporting damage), if it has the magic.
pub(crate) fn kind_hint(dev: &dyn ReadAt, offset: u64, len: u64) -> Option<FsKind> {
    let part = Part { dev, offset, len };
    let mut sb = [0u8; 1024];
    part.read(1024, &mut sb, "ext superblock").ok()?;
    (le::u16(&sb, 0x38) == MAGIC).then(|| kind_of(&sb))
}

fn map(part: &Part, sb: &[u8]) -> Result<Probe> {
    let geo = Geometry::from_superblock(sb, part.len).context("ext superblock at byte 1024")?;
    let incompat = le::u32(sb, 0x60);
    let kind = kind_of(sb);
    let descs = read_descriptors(part, &geo)?;
    // A journal that still needs recovery may hold newer copies of block bitmaps than the disk:
    // the map is the union of both, a superset of what the filesystem uses after replay.
    // Until the journal is replayed, a bitmap and its descriptor's checksum may disagree.
    let recovering = incompat & INCOMPAT_RECOVER != 0;
    let journaled = if recovering {
        journal::bitmaps(part, &geo, &descs, sb)
            .context("the journal needs recovery, but reading it failed")?
    } else {
        Vec::new()
    };
    let bs = geo.bs;
    // Used block ranges; sorted and merged at the end. What the bitmaps say is kept apart from
    // what is used whatever they say, to cross-check the one against the other.
    let mut used: Vec<(u64, u64)> = Vec::new();
    let mut from_bitmaps: Vec<(u64, u64)> = Vec::new();
    // Boot block and primary superblock.
    used.push((0, geo.first_data_block + 1));
    let mut to_read: Vec<(u64, u64)> = Vec::new(); // (bitmap block, group)
    for (g, d) in descs.iter().enumerate() {
        let g = g as u64;
        used.push((d.block_bitmap, d.block_bitmap + 1));
        used.push((d.inode_bitmap, d.inode_bitmap + 1));
        used.push((d.inode_table, d.inode_table + geo.inode_table_blocks));
        if geo.csum && d.flags & BG_BLOCK_UNINIT != 0 {
            geo.super_and_gdt(g, &mut used);
        } else {
            to_read.push((d.block_bitmap, g));
        }
    }
    let mut read_group = vec![false; descs.len()];
    let group_clusters = |g: u64| {
        (geo.blocks - geo.group_first(g))
            .div_ceil(geo.ratio)
            .min(geo.clusters_per_group)
    };
    let add_bits = |g: u64, bm: &[u8], out: &mut Vec<(u64, u64)>| -> u64 {
        let first = geo.group_first(g);
        let mut set = 0;
        bit_runs(bm, group_clusters(g), |s, e| {
            set += e - s;
            out.push((
                first + s * geo.ratio,
                (first + e * geo.ratio).min(geo.blocks),
            ));
        });
        set
    };
    to_read.sort_unstable();
    let mut i = 0;
    while i < to_read.len() {
        let (start, _) = to_read[i];
        let mut j = i + 1;
        while j < to_read.len()
            && to_read[j].0 == start + (j - i) as u64
            && ((j - i) as u64) * bs < MAX_READ
        {
            j += 1;
        }
        let n = (j - i) as u64;
        let buf = part.read_vec(
            start * bs,
            n * bs,
            &format!("block bitmap of group {} (block {start})", to_read[i].1),
        )?;
        for (k, &(bb, g)) in to_read[i..j].iter().enumerate() {
            let bm = buf
                .get(k * bs as usize..(k + 1) * bs as usize)
                .unwrap_or_default();
            if let (Checksum::Meta(seed), false) = (&geo.checksum, recovering) {
                let mut c = crc32c(
                    *seed,
                    bm.get(..(geo.clusters_per_group / 8) as usize)
                        .unwrap_or_default(),
                );
                if geo.desc_size < BG_BLOCK_BITMAP_CSUM_HI_END {
                    c &= 0xFFFF;
                }
                let stored = descs.get(g as usize).map_or(0, |d| d.bitmap_csum);
                if c != stored {
                    bail!(
                        "block bitmap of group {g} (block {bb}): checksum mismatch (stored \
                         {stored:08x}, computed {c:08x})"
                    );
                }
            }
            let set = add_bits(g, bm, &mut from_bitmaps);
            if let Some(r) = read_group.get_mut(g as usize) {
                *r = true;
            }
            // Until the journal is replayed, the on-disk counts may lag the bitmaps.
            let free = descs.get(g as usize).map_or(0, |d| d.free);
            let total = group_clusters(g);
            if !recovering && total - set.min(total) != free {
                bail!(
                    "the block bitmap of group {g} (block {bb}) leaves {} of its {total} clusters \
                     free, but its group descriptor counts {free} free: the allocation data is \
                     damaged",
                    total - set.min(total)
                );
            }
        }
        i = j;
    }
    for (g, bm) in &journaled {
        add_bits(*g, bm, &mut from_bitmaps);
    }
    check_allocation(&geo, sb, &descs, &read_group, &from_bitmaps, recovering)?;
    used.extend(from_bitmaps);
    let mut bytes: Vec<(u64, u64)> = used.into_iter().map(|(s, e)| (s * bs, e * bs)).collect();
    let fs_size = geo.blocks * bs;
    bytes.push((fs_size, part.len));
    let used = extents_from(bytes);
    let label_raw = sb.get(0x78..0x88).unwrap_or_default();
    let label_len = label_raw
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(label_raw.len());
    let label =
        String::from_utf8_lossy(label_raw.get(..label_len).unwrap_or_default()).into_owned();
    let u: [u8; 16] = le::bytes(sb, 0x68);
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&u[0..4]),
        hex::encode(&u[4..6]),
        hex::encode(&u[6..8]),
        hex::encode(&u[8..10]),
        hex::encode(&u[10..16])
    );
    Ok(Probe {
        fs: Filesystem {
            kind,
            uuid: (u != [0; 16]).then_some(uuid),
            label: (!label.is_empty()).then_some(label),
            block_size: bs as u32,
            size: fs_size,
            used: used.len(),
        },
        used,
    })
}

/// Cross-check the block bitmaps (`from_bitmaps`, block ranges of the groups in `read_group`
/// and of the journal's copies) against the filesystem's own structures: the superblock's free
/// count must be the sum of the groups' (the groups' own counts are checked as their bitmaps
/// are read), and every group's superblock backup, descriptor blocks, bitmaps and inode table
/// must be marked used in the bitmap that covers them. A bitmap with cleared bits (no checksum
/// to catch it) would otherwise drop data from the map silently.
fn check_allocation(
    geo: &Geometry,
    sb: &[u8],
    descs: &[Desc],
    read_group: &[bool],
    from_bitmaps: &[(u64, u64)],
    recovering: bool,
) -> Result<()> {
    if !recovering {
        let sb_free = u64::from(le::u32(sb, 0x0C))
            | if geo.has_64bit {
                u64::from(le::u32(sb, 0x158)) << 32
            } else {
                0
            };
        let groups_free = descs
            .iter()
            .map(|d| d.free)
            .sum::<u64>()
            .saturating_mul(geo.ratio);
        if sb_free != groups_free {
            bail!(
                "the superblock counts {sb_free} free blocks, its group descriptors {groups_free}: \
                 the allocation data is damaged"
            );
        }
    }
    let bm = extents_from(from_bitmaps.to_vec());
    let mut meta = Vec::new();
    for (g, d) in descs.iter().enumerate() {
        let g = g as u64;
        let mut sg = Vec::new();
        geo.super_and_gdt(g, &mut sg);
        meta.extend(
            sg.into_iter()
                .map(|r| (g, "superblock backup or descriptor blocks", r)),
        );
        meta.push((g, "block bitmap", (d.block_bitmap, d.block_bitmap + 1)));
        meta.push((g, "inode bitmap", (d.inode_bitmap, d.inode_bitmap + 1)));
        let it = (d.inode_table, d.inode_table + geo.inode_table_blocks);
        meta.push((g, "inode table", it));
    }
    for (g, what, (start, end)) in meta {
        // Only where a bitmap was read: a BLOCK_UNINIT group has none on disk.
        let mut s = start.max(geo.first_data_block);
        while s < end {
            let holder = (s - geo.first_data_block) / geo.blocks_per_group;
            let e = end.min(geo.group_first(holder + 1));
            if read_group.get(holder as usize).copied().unwrap_or(false) {
                if let Some((first, missing)) = uncovered(&bm, s, e) {
                    bail!(
                        "the block bitmap of group {holder} marks {missing} block(s) of group {g}'s \
                         {what} (blocks {start}..{end}) free, from block {first}: the allocation \
                         data is damaged"
                    );
                }
            }
            s = e;
        }
    }
    Ok(())
}

/// Just enough of jbd2 to find the block bitmaps a journal would replay.
mod journal {
    use super::{le, Desc, Geometry, Part};
    use anyhow::{anyhow, bail, Context, Result};
    use std::collections::HashMap;

    const JBD2_MAGIC: u32 = 0xC03B_3998;
    const BT_DESCRIPTOR: u32 = 1;
    const BT_COMMIT: u32 = 2;
    const BT_SB_V1: u32 = 3;
    const BT_SB_V2: u32 = 4;
    const BT_REVOKE: u32 = 5;
    const INCOMPAT_64BIT: u32 = 0x2;
    const INCOMPAT_CSUM_V2: u32 = 0x8;
    const INCOMPAT_CSUM_V3: u32 = 0x10;
    const INCOMPAT_FAST_COMMIT: u32 = 0x20;
    const FLAG_ESCAPE: u32 = 1;
    const FLAG_SAME_UUID: u32 = 2;
    const FLAG_LAST_TAG: u32 = 8;
    const EXTENTS_FL: u32 = 0x80000;
    const EXTENT_MAGIC: u16 = 0xF30A;

    fn be32(b: &[u8], off: usize) -> u32 {
        u32::from_be_bytes(le::bytes(b, off))
    }
    fn be16(b: &[u8], off: usize) -> u16 {
        u16::from_be_bytes(le::bytes(b, off))
    }

    /// Logical -> physical extents of a file: (logical block, physical block, count).
    type Map = Vec<(u64, u64, u64)>;

    fn read_inode(part: &Part, geo: &Geometry, descs: &[Desc], ino: u64) -> Result<Vec<u8>> {
        let idx = ino
            .checked_sub(1)
            .ok_or_else(|| anyhow!("journal inode number 0"))?;
        let g = idx / geo.inodes_per_group;
        let d = descs
            .get(g as usize)
            .ok_or_else(|| anyhow!("journal inode {ino} is past the last group"))?;
        let off = d.inode_table * geo.bs + (idx % geo.inodes_per_group) * geo.inode_size;
        part.read_vec(off, geo.inode_size, &format!("journal inode {ino}"))
    }

    fn check_block(geo: &Geometry, b: u64, what: &str) -> Result<()> {
        if b >= geo.blocks {
            bail!("{what}: block {b} lies past the end of the filesystem");
        }
        Ok(())
    }

    fn extent_node(
        part: &Part,
        geo: &Geometry,
        node: &[u8],
        depth_left: u32,
        out: &mut Map,
        budget: &mut u32,
    ) -> Result<()> {
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| anyhow!("journal extent tree is too large"))?;
        if le::u16(node, 0) != EXTENT_MAGIC {
            bail!("journal extent tree: bad node magic");
        }
        let entries = usize::from(le::u16(node, 2));
        let depth = u32::from(le::u16(node, 6));
        if depth > depth_left || 12 + entries * 12 > node.len() {
            bail!("journal extent tree: bad node header");
        }
        for i in 0..entries {
            let e = node.get(12 + 12 * i..24 + 12 * i).unwrap_or_default();
            if depth == 0 {
                let lblk = u64::from(le::u32(e, 0));
                let mut len = u64::from(le::u16(e, 4));
                if len > 32768 {
                    len -= 32768;
                }
                let start = u64::from(le::u16(e, 6)) << 32 | u64::from(le::u32(e, 8));
                check_block(geo, start + len.saturating_sub(1), "journal extent")?;
                out.push((lblk, start, len));
            } else {
                let leaf = u64::from(le::u32(e, 4)) | u64::from(le::u16(e, 8)) << 32;
                check_block(geo, leaf, "journal extent index")?;
                let child = part.read_vec(leaf * geo.bs, geo.bs, "journal extent tree node")?;
                extent_node(part, geo, &child, depth - 1, out, budget)?;
            }
        }
        Ok(())
    }

    /// Block-mapped (ext2/3 style) files: 12 direct pointers and three levels of indirection.
    fn indirect(
        part: &Part,
        geo: &Geometry,
        block: u64,
        level: u32,
        lblk: &mut u64,
        out: &mut Map,
        budget: &mut u32,
    ) -> Result<()> {
        let per = geo.bs / 4;
        let span = per.pow(level);
        if block == 0 {
            *lblk += span;
            return Ok(());
        }
        check_block(geo, block, "journal indirect block")?;
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| anyhow!("journal block map is too large"))?;
        let b = part.read_vec(block * geo.bs, geo.bs, "journal indirect block")?;
        for i in 0..per as usize {
            let p = u64::from(le::u32(&b, 4 * i));
            if level == 1 {
                if p != 0 {
                    check_block(geo, p, "journal block")?;
                    out.push((*lblk, p, 1));
                }
                *lblk += 1;
            } else {
                indirect(part, geo, p, level - 1, lblk, out, budget)?;
            }
        }
        Ok(())
    }

    fn file_map(part: &Part, geo: &Geometry, inode: &[u8]) -> Result<Map> {
        let iblock = inode.get(0x28..0x28 + 60).unwrap_or_default();
        let mut out = Map::new();
        let mut budget = 100_000;
        if le::u32(inode, 0x20) & EXTENTS_FL != 0 {
            extent_node(part, geo, iblock, 5, &mut out, &mut budget)?;
        } else {
            let mut lblk = 0;
            for i in 0..12 {
                let p = u64::from(le::u32(iblock, 4 * i));
                if p != 0 {
                    check_block(geo, p, "journal block")?;
                    out.push((lblk, p, 1));
                }
                lblk += 1;
            }
            for (i, level) in [(12, 1), (13, 2), (14, 3)] {
                let p = u64::from(le::u32(iblock, 4 * i));
                indirect(part, geo, p, level, &mut lblk, &mut out, &mut budget)?;
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    struct Journal<'a> {
        part: &'a Part<'a>,
        bs: u64,
        map: Map,
    }

    impl Journal<'_> {
        fn read(&self, j: u64) -> Result<Vec<u8>> {
            let i = self.map.partition_point(|&(l, _, _)| l <= j);
            let (l, p, _) = i
                .checked_sub(1)
                .and_then(|i| self.map.get(i))
                .copied()
                .filter(|&(l, _, n)| j < l + n)
                .ok_or_else(|| anyhow!("journal block {j} is not mapped"))?;
            let fs_block = p + (j - l);
            self.part
                .read_vec(fs_block * self.bs, self.bs, &format!("journal block {j}"))
        }
    }

    /// Every block-bitmap copy the journal holds (group, bitmap bytes), in journal order.
    pub(super) fn bitmaps(
        part: &Part,
        geo: &Geometry,
        descs: &[Desc],
        sb: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let ino = u64::from(le::u32(sb, 0xE0));
        if ino == 0 || le::u32(sb, 0xE4) != 0 {
            bail!("the journal is on an external device");
        }
        let inode = read_inode(part, geo, descs, ino)?;
        let map = file_map(part, geo, &inode).context("mapping the journal inode")?;
        let j = Journal {
            part,
            bs: geo.bs,
            map,
        };
        let jsb = j.read(0).context("journal superblock")?;
        let btype = be32(&jsb, 4);
        if be32(&jsb, 0) != JBD2_MAGIC || !matches!(btype, BT_SB_V1 | BT_SB_V2) {
            bail!("journal superblock: bad magic or type");
        }
        if u64::from(be32(&jsb, 0xC)) != geo.bs {
            bail!("journal block size differs from the filesystem's");
        }
        let maxlen = u64::from(be32(&jsb, 0x10));
        let first = u64::from(be32(&jsb, 0x14));
        let mut seq = be32(&jsb, 0x18);
        let start = u64::from(be32(&jsb, 0x1C));
        if start == 0 {
            return Ok(Vec::new());
        }
        if first == 0 || first >= maxlen || start < first || start >= maxlen {
            bail!("journal superblock: first {first}, start {start}, length {maxlen} are inconsistent");
        }
        let incompat = if btype == BT_SB_V2 {
            be32(&jsb, 0x28)
        } else {
            0
        };
        if incompat & INCOMPAT_FAST_COMMIT != 0 {
            bail!("the journal uses fast commits, which record allocations outside the bitmaps");
        }
        let csum3 = incompat & INCOMPAT_CSUM_V3 != 0;
        let csum2 = incompat & INCOMPAT_CSUM_V2 != 0;
        let b64 = incompat & INCOMPAT_64BIT != 0;
        let tag_bytes: usize = if csum3 {
            16
        } else {
            let sz = 12 + if csum2 { 2 } else { 0 };
            if b64 {
                sz
            } else {
                sz - 4
            }
        };
        let tail = if csum2 || csum3 { 4 } else { 0 };
        let bs = geo.bs as usize;
        let wrap = |b: u64| if b >= maxlen { b - maxlen + first } else { b };
        let bitmap_of: HashMap<u64, u64> = descs
            .iter()
            .enumerate()
            .map(|(g, d)| (d.block_bitmap, g as u64))
            .collect();
        let sb_block = geo.first_data_block;
        let mut out = Vec::new();
        let mut blk = start;
        let mut steps = 0u64;
        loop {
            steps += 1;
            if steps > 2 * maxlen {
                bail!("the journal does not end");
            }
            let b = j.read(blk)?;
            if be32(&b, 0) != JBD2_MAGIC || be32(&b, 8) != seq {
                break;
            }
            match be32(&b, 4) {
                BT_DESCRIPTOR => {
                    let mut next = wrap(blk + 1);
                    let mut off = 12;
                    while off + tag_bytes <= bs - tail {
                        let lo = u64::from(be32(&b, off));
                        let (flags, hi) = if csum3 {
                            (be32(&b, off + 4), u64::from(be32(&b, off + 8)))
                        } else {
                            let hi = if b64 { u64::from(be32(&b, off + 8)) } else { 0 };
                            (u32::from(be16(&b, off + 6)), hi)
                        };
                        let target = lo | if b64 { hi << 32 } else { 0 };
                        if let Some(&g) = bitmap_of.get(&target) {
                            let mut data = j.read(next)?;
                            if flags & FLAG_ESCAPE != 0 {
                                le::put(&mut data, 0, &JBD2_MAGIC.to_be_bytes());
                            }
                            out.push((g, data));
                        } else if target == sb_block {
                            let data = j.read(next)?;
                            let at = if geo.bs == 1024 { 0 } else { 1024 };
                            let lo = u64::from(le::u32(&data, at + 4));
                            let hi = u64::from(le::u32(&data, at + 0x150));
                            let blocks = if geo.has_64bit { lo | hi << 32 } else { lo };
                            if le::u16(&data, at + 0x38) == 0xEF53 && blocks != geo.blocks {
                                bail!(
                                    "the journal holds a superblock with {blocks} blocks (the disk \
                                     says {}): a resize is pending",
                                    geo.blocks
                                );
                            }
                        }
                        next = wrap(next + 1);
                        off += tag_bytes;
                        if flags & FLAG_SAME_UUID == 0 {
                            off += 16;
                        }
                        if flags & FLAG_LAST_TAG != 0 {
                            break;
                        }
                    }
                    blk = next;
                }
                BT_COMMIT => {
                    seq = seq.wrapping_add(1);
                    blk = wrap(blk + 1);
                }
                BT_REVOKE => blk = wrap(blk + 1),
                _ => break,
            }
        }
        Ok(out)
    }
}

/// CRC32C (Castagnoli), without the final inversion, as ext4 chains it.
fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC16 (poly 0x8005, reflected), as Linux's crc16() for uninit_bg descriptor checksums.
fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_references() {
        // CRC-32C check value of "123456789" (with the usual inversions around it).
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
        // CRC-16/ARC check value.
        assert_eq!(crc16(0, b"123456789"), 0xBB3D);
    }
}
