//! Files of an NTFS volume by path: each directory's `$I30` index (the `$INDEX_ROOT` in its
//! record and the `INDX` blocks of its `$INDEX_ALLOCATION`) walked node by node from the root
//! directory (record 5), names compared case-insensitively as Windows does, file references
//! checked against the record's sequence number. The whole tree of a directory is visited, so no
//! upcase collation is needed; visits are capped. Read-only: used to find the files an exclusion
//! names.

use super::{
    attributes, data_runs, fixup_as, resident_value, runlist, Run, Volume, AT_ATTRIBUTE_LIST,
};
use crate::fs::le;
use anyhow::{bail, Result};

const ROOT_RECORD: u64 = 5;
const AT_INDEX_ROOT: u32 = 0x90;
const AT_INDEX_ALLOCATION: u32 = 0xA0;
const RECORD_IS_DIRECTORY: u16 = 0x2;
const ENTRY_HAS_SUBNODE: u32 = 0x1;
const ENTRY_LAST: u32 = 0x2;
/// Index blocks visited in one directory before it is refused (a cyclic tree would loop).
const MAX_NODES: usize = 1 << 14;

/// One `$I30` entry's record number and name.
pub(super) struct Entry {
    pub record: u64,
    pub sequence: u16,
    pub name: String,
    /// 0 POSIX, 1 Win32, 2 DOS (the 8.3 alias of a long name), 3 Win32 and DOS.
    pub namespace: u8,
}

impl Volume<'_> {
    /// The `$DATA` runs (in stream order) of the file at `path` (absolute, `/`- or `\`-separated); `None` when a
    /// component is missing, a directory is not one, the file is a directory or its data is
    /// resident. A file whose `$DATA` lives in extension records is an error (not read).
    pub(super) fn file_runs(&self, path: &str, clusters: u64) -> Result<Option<Vec<Run>>> {
        let mut rec = self.record(ROOT_RECORD, "MFT record 5 (root directory)")?;
        let mut at = String::new();
        for name in path.split(['/', '\\']).filter(|c| !c.is_empty()) {
            if le::u16(&rec, 0x16) & RECORD_IS_DIRECTORY == 0 {
                return Ok(None);
            }
            let what = if at.is_empty() {
                "root directory".to_string()
            } else {
                format!("directory {at}")
            };
            let Some(e) = self.find(&rec, name, clusters, &what)? else {
                return Ok(None);
            };
            at = format!("{at}\\{}", e.name);
            rec = self.record(e.record, &format!("MFT record {} ({at})", e.record))?;
            if e.sequence != 0 && le::u16(&rec, 0x10) != e.sequence {
                bail!("{at}: the index names a stale MFT record {}", e.record);
            }
        }
        if le::u16(&rec, 0x16) & RECORD_IS_DIRECTORY != 0 {
            return Ok(None);
        }
        let attrs = attributes(&rec, &at)?;
        if attrs.iter().any(|a| a.kind == AT_ATTRIBUTE_LIST) {
            bail!("{at}: its attributes continue in extension records (not read)");
        }
        if attrs
            .iter()
            .any(|a| a.kind == super::AT_DATA && a.name_len == 0 && !a.non_resident)
        {
            return Ok(None);
        }
        Ok(Some(data_runs(&rec, clusters, &at)?.0))
    }

    /// Look `name` up in the `$I30` index of directory record `rec`.
    pub(super) fn find(
        &self,
        rec: &[u8],
        name: &str,
        clusters: u64,
        what: &str,
    ) -> Result<Option<Entry>> {
        let want = name.to_lowercase();
        let mut hit = None;
        self.walk_i30(rec, clusters, what, &mut |e| {
            if e.name.to_lowercase() == want {
                hit = Some(e);
                true
            } else {
                false
            }
        })?;
        Ok(hit)
    }

    /// Visit every entry of the `$I30` index of directory record `rec`: the `$INDEX_ROOT`, then
    /// the `INDX` blocks its entries point to. `f` returns `true` to stop.
    pub(super) fn walk_i30(
        &self,
        rec: &[u8],
        clusters: u64,
        what: &str,
        f: &mut dyn FnMut(Entry) -> bool,
    ) -> Result<()> {
        let attrs = attributes(rec, what)?;
        let i30 = |a: &&super::Attr| a.name_len == 4;
        let Some(root) = attrs.iter().filter(i30).find(|a| a.kind == AT_INDEX_ROOT) else {
            bail!("{what}: no $I30 index root");
        };
        let v = resident_value(root, what)?;
        let block_size = u64::from(le::u32(v, 8));
        if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
            bail!("{what}: index block size {block_size} is invalid");
        }
        let mut pending: Vec<u64> = Vec::new();
        if entries(v.get(16..).unwrap_or_default(), &mut pending, what, f)? {
            return Ok(());
        }
        if pending.is_empty() {
            return Ok(());
        }
        let Some(alloc) = attrs
            .iter()
            .filter(i30)
            .find(|a| a.kind == AT_INDEX_ALLOCATION && a.non_resident)
        else {
            bail!("{what}: the index has subnodes but no $INDEX_ALLOCATION");
        };
        let runs = runlist(alloc, clusters, what)?;
        // VCNs count clusters, or 512-byte units when index blocks are smaller than a cluster.
        let unit = if block_size >= self.cluster {
            self.cluster
        } else {
            512
        };
        let mut seen = 0usize;
        let mut block = vec![0u8; block_size as usize];
        while let Some(vcn) = pending.pop() {
            seen += 1;
            if seen > MAX_NODES {
                bail!("{what}: more than {MAX_NODES} index blocks (a cycle?)");
            }
            let node = format!("{what}: index block at VCN {vcn}");
            let off = vcn
                .checked_mul(unit)
                .ok_or_else(|| anyhow::anyhow!("{node}: offset overflows"))?;
            self.read_stream(&runs, off, &mut block, &node)?;
            fixup_as(&mut block, b"INDX", &node)?;
            if entries(
                block.get(0x18..).unwrap_or_default(),
                &mut pending,
                &node,
                f,
            )? {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Visit the entries of one index node (`h` starts at its index header); subnode VCNs go to
/// `pending`. Returns `true` when `f` stopped the walk.
fn entries(
    h: &[u8],
    pending: &mut Vec<u64>,
    what: &str,
    f: &mut dyn FnMut(Entry) -> bool,
) -> Result<bool> {
    let start = le::u32(h, 0) as usize;
    let end = (le::u32(h, 4) as usize).min(h.len());
    let mut pos = start;
    while pos + 16 <= end {
        let e = &h[pos..end];
        let len = usize::from(le::u16(e, 8));
        let key_len = usize::from(le::u16(e, 10));
        let flags = le::u32(e, 12);
        if len < 16 || len > e.len() || 16 + key_len > len {
            bail!("{what}: index entry at byte {pos} is damaged");
        }
        if flags & ENTRY_HAS_SUBNODE != 0 {
            if len < 24 {
                bail!("{what}: index entry at byte {pos} is too short for its subnode");
            }
            pending.push(le::u64(e, len - 8));
        }
        if flags & ENTRY_LAST != 0 {
            break;
        }
        let key = &e[16..16 + key_len];
        let n = usize::from(key.get(0x40).copied().unwrap_or(0));
        if let Some(raw) = key.get(0x42..0x42 + 2 * n) {
            let units: Vec<u16> = raw
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let r = le::u64(e, 0);
            let entry = Entry {
                record: r & 0xFFFF_FFFF_FFFF,
                sequence: (r >> 48) as u16,
                name: String::from_utf16_lossy(&units),
                namespace: key.get(0x41).copied().unwrap_or(0),
            };
            if f(entry) {
                return Ok(true);
            }
        }
        pos += len;
    }
    Ok(false)
}
