//! An NTFS volume for file-level restore: directories listed from their `$I30` index (Win32 and
//! POSIX names; the DOS 8.3 aliases left out), each entry's modification time from its
//! `$STANDARD_INFORMATION`, its size and content from the unnamed `$DATA` (resident, or read
//! through its runlist with sparse runs as zeros). Compressed and encrypted files, reparse points
//! and attributes continued in extension records are refused by name.

use super::files::Entry;
use super::{attributes, resident_value, runlist, Run, Volume, AT_ATTRIBUTE_LIST, AT_DATA};
use crate::fs::{le, Part};
use crate::source::ReadAt;
use anyhow::{bail, Context, Result};

const ROOT_RECORD: u64 = 5;
const AT_STANDARD_INFORMATION: u32 = 0x10;
const AT_REPARSE_POINT: u32 = 0xC0;
const RECORD_IS_DIRECTORY: u16 = 0x2;
const NAMESPACE_DOS: u8 = 2;
/// Seconds from 1601-01-01 (NTFS time zero) to 1970-01-01.
const EPOCH_DIFF: u64 = 11_644_473_600;

pub struct NtfsFiles<'a> {
    part: Part<'a>,
    cluster: u64,
    record_size: u64,
    mft_runs: Vec<Run>,
    clusters: u64,
}

/// A file or directory of the volume.
pub struct Node {
    pub record: u64,
    pub name: String,
    pub dir: bool,
    /// A reparse point (symbolic link, junction, deduplicated file...): listed, not read.
    pub reparse: bool,
    pub size: u64,
    /// Modification time, seconds since the Unix epoch (0 before it).
    pub mtime: u64,
}

enum Data {
    Resident(Vec<u8>),
    /// The runs, the data size and the initialised size (past it the data reads as zeros).
    Runs(Vec<Run>, u64, u64),
}

impl<'a> NtfsFiles<'a> {
    pub fn open(dev: &'a dyn ReadAt, offset: u64, len: u64) -> Result<NtfsFiles<'a>> {
        let part = Part { dev, offset, len };
        let mut bs = [0u8; 512];
        part.read(0, &mut bs, "NTFS boot sector")?;
        if &bs[3..11] != b"NTFS    " {
            bail!("no NTFS boot sector at byte {offset}");
        }
        let (cluster, record_size, mft_runs, clusters) = {
            let (vol, clusters, _, _) = Volume::open(&part, &bs)?;
            (vol.cluster, vol.record_size, vol.mft_runs, clusters)
        };
        Ok(NtfsFiles {
            part,
            cluster,
            record_size,
            mft_runs,
            clusters,
        })
    }

    fn vol(&self) -> Volume<'_> {
        Volume {
            part: &self.part,
            cluster: self.cluster,
            record_size: self.record_size,
            mft_runs: self.mft_runs.clone(),
        }
    }

    fn node(&self, record: u64, sequence: u16, name: String) -> Result<(Node, Vec<u8>)> {
        let what = format!("MFT record {record} ({name})");
        let rec = self.vol().record(record, &what)?;
        if sequence != 0 && le::u16(&rec, 0x10) != sequence {
            bail!("{what}: the index names a stale record");
        }
        let attrs = attributes(&rec, &what)?;
        let mtime = attrs
            .iter()
            .find(|a| a.kind == AT_STANDARD_INFORMATION && !a.non_resident)
            .and_then(|a| resident_value(a, &what).ok())
            .map(|v| (le::u64(v, 0x08) / 10_000_000).saturating_sub(EPOCH_DIFF))
            .unwrap_or(0);
        let size = attrs
            .iter()
            .find(|a| {
                a.kind == AT_DATA && a.name_len == 0 && (!a.non_resident || le::u64(a.b, 0x10) == 0)
            })
            .map(|a| {
                if a.non_resident {
                    le::u64(a.b, 0x30)
                } else {
                    u64::from(le::u32(a.b, 0x10))
                }
            })
            .unwrap_or(0);
        let node = Node {
            record,
            name,
            dir: le::u16(&rec, 0x16) & RECORD_IS_DIRECTORY != 0,
            reparse: attrs.iter().any(|a| a.kind == AT_REPARSE_POINT),
            size,
            mtime,
        };
        Ok((node, rec))
    }

    pub fn root(&self) -> Result<Node> {
        Ok(self.node(ROOT_RECORD, 0, String::new())?.0)
    }

    /// The entries of directory `dir` (names as Windows shows them), sorted case-insensitively.
    pub fn list(&self, dir: &Node) -> Result<Vec<Node>> {
        let what = format!("directory {} (MFT record {})", dir.name, dir.record);
        let (_, rec) = self.node(dir.record, 0, dir.name.clone())?;
        let mut found: Vec<Entry> = Vec::new();
        self.vol().walk_i30(&rec, self.clusters, &what, &mut |e| {
            if e.namespace != NAMESPACE_DOS && e.record != dir.record {
                found.push(e);
            }
            false
        })?;
        // A name indexed twice (Win32 and POSIX spellings of one record) is listed once.
        found.sort_by(|a, b| a.record.cmp(&b.record).then(a.namespace.cmp(&b.namespace)));
        found.dedup_by(|a, b| a.record == b.record && a.name == b.name);
        let mut out = Vec::with_capacity(found.len());
        for e in found {
            // System files ($MFT, $Bitmap...) live in the root with records below 16.
            if dir.record == ROOT_RECORD && e.record < 16 {
                continue;
            }
            out.push(self.node(e.record, e.sequence, e.name)?.0);
        }
        out.sort_by_key(|n| n.name.to_lowercase());
        Ok(out)
    }

    /// `name` in directory `dir`, compared case-insensitively as Windows does.
    pub fn child(&self, dir: &Node, name: &str) -> Result<Option<Node>> {
        let what = format!("directory {} (MFT record {})", dir.name, dir.record);
        let (_, rec) = self.node(dir.record, 0, dir.name.clone())?;
        match self.vol().find(&rec, name, self.clusters, &what)? {
            Some(e) if !(dir.record == ROOT_RECORD && e.record < 16) => {
                Ok(Some(self.node(e.record, e.sequence, e.name)?.0))
            }
            _ => Ok(None),
        }
    }

    /// A reader of file `node`'s unnamed `$DATA`.
    pub fn reader(&self, node: &Node) -> Result<NtfsReader<'_>> {
        let what = format!("{} (MFT record {})", node.name, node.record);
        if node.dir || node.reparse {
            bail!("{what}: not a regular file");
        }
        let (_, rec) = self.node(node.record, 0, node.name.clone())?;
        let attrs = attributes(&rec, &what)?;
        if attrs.iter().any(|a| a.kind == AT_ATTRIBUTE_LIST) {
            bail!("{what}: its attributes continue in extension records (not read yet)");
        }
        let data: Vec<_> = attrs
            .iter()
            .filter(|a| a.kind == AT_DATA && a.name_len == 0)
            .collect();
        let Some(first) = data.first() else {
            bail!("{what}: no unnamed $DATA attribute");
        };
        let flags = le::u16(first.b, 0x0C);
        if flags & 0x0001 != 0 {
            bail!("{what}: NTFS-compressed files are not read yet");
        }
        if flags & 0x4000 != 0 {
            bail!("{what}: an encrypted (EFS) file cannot be read without its key");
        }
        let data = if first.non_resident {
            let mut runs = Vec::new();
            for a in &data {
                runs.extend(runlist(a, self.clusters, &what)?);
            }
            Data::Runs(runs, node.size, le::u64(first.b, 0x38))
        } else {
            Data::Resident(resident_value(first, &what)?.to_vec())
        };
        Ok(NtfsReader {
            files: self,
            data,
            pos: 0,
            what,
        })
    }
}

/// The content of one file, read on demand.
pub struct NtfsReader<'f> {
    files: &'f NtfsFiles<'f>,
    data: Data,
    pos: u64,
    what: String,
}

impl std::io::Read for NtfsReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = match &self.data {
            Data::Resident(v) => {
                let rest = v.get(self.pos as usize..).unwrap_or_default();
                let n = rest.len().min(buf.len());
                buf[..n].copy_from_slice(&rest[..n]);
                n
            }
            Data::Runs(runs, size, init) => {
                let n = (*size - self.pos.min(*size)).min(buf.len() as u64) as usize;
                // Bytes past the initialised size, or past the runs, read as zeros.
                let mapped: u64 =
                    runs.iter().map(|r| r.vcn + r.len).max().unwrap_or(0) * self.files.cluster;
                let m = (mapped.min(*init).saturating_sub(self.pos) as usize).min(n);
                self.files
                    .vol()
                    .read_stream(runs, self.pos, &mut buf[..m], &self.what)
                    .context("reading NTFS data")
                    .map_err(std::io::Error::other)?;
                buf[m..n].fill(0);
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}
