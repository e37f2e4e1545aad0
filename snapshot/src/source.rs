//! Disks to read from: raw image files and block devices, read with positional reads.

use anyhow::{Context, Result};
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// Positional reads from a disk-like object; shared by the probes, the chunker and tests.
pub trait ReadAt: Sync {
    /// Fill `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn size(&self) -> u64;
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len() as u64)
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past end")
            })?;
        buf.copy_from_slice(&self[offset as usize..end as usize]);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.as_slice().read_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

/// A source disk: an image file or a block device.
#[derive(Debug)]
pub struct DiskSource {
    pub path: PathBuf,
    file: File,
    size: u64,
    /// Logical/physical sector size reported by the kernel for block devices; `None` for files.
    pub device_sectors: Option<(u32, u32)>,
}

impl DiskSource {
    pub fn open(path: &Path) -> Result<DiskSource> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        let (size, device_sectors) = if meta.file_type().is_block_device() {
            let size = crate::sys::device_size(&file)
                .with_context(|| format!("reading the size of {}", path.display()))?;
            let ss = crate::sys::sector_sizes(&file)
                .with_context(|| format!("reading the sector size of {}", path.display()))?;
            (size, Some(ss))
        } else if meta.is_file() {
            (meta.len(), None)
        } else {
            anyhow::bail!("{}: not a regular file or block device", path.display());
        };
        Ok(DiskSource {
            path: path.to_owned(),
            file,
            size,
            device_sectors,
        })
    }
}

impl ReadAt for DiskSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.size
    }
}
