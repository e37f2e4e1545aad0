//! Positional I/O on a target: O_DIRECT with aligned buffers on block devices, the page cache on
//! files, and zeroing that lets the device do the work where it guarantees zeros.
//!
//! [`Disk`] does the alignment and the error context; the bytes go through a [`Medium`], a file
//! or block device here and a fault-injecting one in the writers' unit tests.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Memory alignment of every buffer handed to an O_DIRECT read or write (covers the DMA alignment
/// of every device we know).
pub const MEM_ALIGN: usize = 4096;

/// I/O granularity of direct I/O on files (the block size of every filesystem we write to).
const FILE_ALIGN: u64 = 4096;

/// A zeroed byte buffer whose start is aligned to [`MEM_ALIGN`], built from a plain `Vec` (no
/// unsafe): the slice starts at the first aligned address inside a slightly larger allocation.
/// A buffer of a huge page or more (a chunk's) starts on a huge page and is backed by huge
/// pages where the kernel has them ([`snapshot::sys::advise_huge_pages`]).
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        use snapshot::sys::{advise_huge_pages, HUGE_PAGE};
        let align = if len >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            MEM_ALIGN
        };
        // Zeroed by the allocator (fresh pages): the advice comes before they are touched.
        let mut raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align);
        if align == HUGE_PAGE {
            advise_huge_pages(&mut raw[start..start + len]);
        }
        AlignedBuf { raw, start, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// How a range is made to read back as zeros without writing it.
#[derive(Clone, Copy, Debug)]
pub enum Discard {
    /// Deallocate (a hole in a file; a discard that guarantees zeros on a device).
    Punch,
    /// The device's own write-zeroes.
    ZeroRange,
}

/// What the writers need of a target: positional reads and writes of whole buffers, discards,
/// and a flush to stable storage.
pub trait Medium: Send + Sync {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()>;
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()>;
    fn discard(&self, how: Discard, off: u64, len: u64) -> std::io::Result<()>;
    fn flush(&self) -> std::io::Result<()>;
    /// The open file, for ioctls (re-reading a partition table); `None` for other media.
    fn file(&self) -> Option<&File> {
        None
    }
}

impl Medium for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.read_exact_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.write_all_at(buf, off)
    }
    fn discard(&self, how: Discard, off: u64, len: u64) -> std::io::Result<()> {
        use rustix::fs::FallocateFlags as F;
        let mode = match how {
            Discard::Punch => F::PUNCH_HOLE,
            Discard::ZeroRange => F::ZERO_RANGE,
        };
        Ok(rustix::fs::fallocate(self, mode | F::KEEP_SIZE, off, len)?)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.sync_all()
    }
    fn file(&self) -> Option<&File> {
        Some(self)
    }
}

/// An open target: the medium, whether it is O_DIRECT, and the I/O granularity.
pub struct Disk {
    io: Box<dyn Medium>,
    pub direct: bool,
    /// Offsets and lengths of direct I/O are multiples of this (the logical sector size).
    pub align: u64,
    pub size: u64,
    pub name: String,
}

impl Disk {
    /// Open a target for writing. Block devices are opened O_DIRECT and O_EXCL: the kernel then
    /// refuses them while mounted or claimed, and nobody else can claim them while we write.
    /// Files are opened O_DIRECT too when their filesystem supports it and their size is a whole
    /// number of 4 KiB blocks (no page cache to fill and flush: several times faster on big
    /// images), buffered otherwise.
    pub fn open(path: &Path, block: bool, align: u32, size: u64) -> Result<Disk> {
        if !block && size.is_multiple_of(FILE_ALIGN) {
            let direct = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path);
            if let Ok(file) = direct {
                return Ok(Disk {
                    io: Box::new(file),
                    direct: true,
                    align: FILE_ALIGN,
                    size,
                    name: path.display().to_string(),
                });
            }
        }
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if block {
            o.custom_flags(libc::O_DIRECT | libc::O_EXCL);
        }
        let file = o.open(path).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                " (in use: mounted, or claimed by another device)"
            } else {
                ""
            };
            anyhow::Error::new(e).context(format!("opening {} for writing{hint}", path.display()))
        })?;
        Ok(Disk {
            io: Box::new(file),
            direct: block,
            align: if block { align as u64 } else { 1 },
            size,
            name: path.display().to_string(),
        })
    }

    /// Open a target for reading only (verify); O_DIRECT on block devices so what is compared is
    /// what is on the medium.
    pub fn open_read(path: &Path, block: bool, align: u32, size: u64) -> Result<Disk> {
        let mut o = OpenOptions::new();
        o.read(true);
        if block {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Disk {
            io: Box::new(file),
            direct: block,
            align: if block { align as u64 } else { 1 },
            size,
            name: path.display().to_string(),
        })
    }

    /// A buffered target on any medium (the writers' tests use a fault-injecting one).
    #[cfg(test)]
    pub fn on(io: Box<dyn Medium>, size: u64, name: &str) -> Disk {
        Disk {
            io,
            direct: false,
            align: 1,
            size,
            name: name.to_string(),
        }
    }

    /// The open file or device, when the medium is one.
    pub fn file(&self) -> Option<&File> {
        self.io.file()
    }

    /// Whether `[off, off + len)` is a hole of a file: it reads back as zeros, and nothing there
    /// needs reading to know it. Block devices and other media have no holes.
    pub fn is_hole(&self, off: u64, len: u64) -> bool {
        let Some(f) = self.file() else {
            return false;
        };
        match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(off)) {
            Ok(next) => next >= off + len,
            // No data from `off` to the end of the file.
            Err(e) => e == rustix::io::Errno::NXIO,
        }
    }

    /// `[off, off + len)` widened to the I/O granularity and clipped to the disk.
    pub fn widen(&self, off: u64, len: u64) -> (u64, u64) {
        let a = self.align;
        let start = off / a * a;
        let end = (off + len).div_ceil(a) * a;
        (start, end.min(self.size.max(off + len)) - start)
    }

    /// Read `[off, off + len)` into `buf` (an aligned buffer of at least `len` plus one alignment
    /// unit) through the widened range; returns the requested bytes within `buf`.
    pub fn read_span<'b>(&self, off: u64, len: u64, buf: &'b mut AlignedBuf) -> Result<&'b [u8]> {
        let (ws, wl) = self.widen(off, len);
        self.read_at(&mut buf[..wl as usize], ws)?;
        let o = (off - ws) as usize;
        Ok(&buf[o..o + len as usize])
    }

    /// Whether `buf` can be written at `off` as it is: always when buffered; for direct I/O when
    /// `buf` starts at a [`MEM_ALIGN`] address and `off` and its length are multiples of `align`.
    pub fn takes(&self, buf: &[u8], off: u64) -> bool {
        !self.direct
            || ((buf.as_ptr() as usize).is_multiple_of(MEM_ALIGN)
                && off.is_multiple_of(self.align)
                && (buf.len() as u64).is_multiple_of(self.align))
    }

    /// Write `buf` at `off`. For direct I/O, `buf` must come from an [`AlignedBuf`] and `off` and
    /// the length must be multiples of `align` (callers widen with [`Disk::widen`]).
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.io
            .write_at(buf, off)
            .with_context(|| format!("{}: writing {} bytes at offset {off}", self.name, buf.len()))
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.io
            .read_at(buf, off)
            .with_context(|| format!("{}: reading {} bytes at offset {off}", self.name, buf.len()))
    }

    /// Make `[off, off + len)` read back as zeros: a discard where the device guarantees zeros
    /// after it (a hole in a file), else the device's write-zeroes, else plain writes.
    pub fn zero(&self, off: u64, len: u64, zeros: &AlignedBuf) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let aligned = off.is_multiple_of(self.align) && len.is_multiple_of(self.align);
        if aligned {
            for how in [Discard::Punch, Discard::ZeroRange] {
                if self.io.discard(how, off, len).is_ok() {
                    return Ok(());
                }
            }
        }
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(zeros.len() as u64);
            if pos.is_multiple_of(self.align) && n.is_multiple_of(self.align) {
                self.write_at(&zeros[..n as usize], pos)?;
            } else {
                // Direct I/O in whole blocks: read, zero the part, write back.
                let (ws, wl) = self.widen(pos, n);
                let mut buf = AlignedBuf::new(wl as usize);
                self.read_at(&mut buf, ws)?;
                buf[(pos - ws) as usize..(pos - ws + n) as usize].fill(0);
                self.write_at(&buf, ws)?;
            }
            pos += n;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.io
            .flush()
            .with_context(|| format!("{}: fsync", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned() {
        for n in [512, 4096, 4 << 20] {
            let b = AlignedBuf::new(n);
            assert_eq!(b.as_ptr() as usize % MEM_ALIGN, 0);
            assert_eq!(b.len(), n);
            assert!(b.iter().all(|&x| x == 0));
        }
        // A chunk buffer starts on a huge page, so that the kernel can back it with huge pages.
        let b = AlignedBuf::new(4 << 20);
        assert_eq!(b.as_ptr() as usize % snapshot::sys::HUGE_PAGE, 0);
    }

    #[test]
    fn holes_are_found_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.img");
        let f = File::create(&p).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        drop(f);
        let d = Disk::open(&p, false, 512, 16 << 20).unwrap();
        assert!(d.is_hole(0, 8 << 20));
        assert!(!d.is_hole(0, (8 << 20) + 1));
        assert!(!d.is_hole(8 << 20, 4096));
        assert!(d.is_hole(12 << 20, 4 << 20));
    }

    #[test]
    fn zero_punches_or_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.img");
        std::fs::write(&p, vec![0xffu8; 3 << 20]).unwrap();
        let d = Disk::open(&p, false, 512, 3 << 20).unwrap();
        let zeros = AlignedBuf::new(1 << 20);
        d.zero(4096, 1 << 20, &zeros).unwrap();
        d.zero(5, 7, &zeros).unwrap();
        let back = std::fs::read(&p).unwrap();
        assert!(back[4096..4096 + (1 << 20)].iter().all(|&b| b == 0));
        assert!(back[5..12].iter().all(|&b| b == 0));
        assert_eq!(back[4], 0xff);
        assert_eq!(back[12], 0xff);
        assert_eq!(back[(1 << 20) + 4096], 0xff);
    }
}
