//! A target that fails once, where a test says: the writers' unit tests run on it to show that
//! every failure ends in a clear error and a wiped table.

use crate::dio::{Discard, Medium};
use std::fs::File;
use std::io::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// The first write that covers this offset fails with EIO (discards covering it are not
    /// supported, so zeroing comes down to writes too).
    WriteAt(u64),
    /// The first write that covers this offset stores only its first half, then the device stops.
    ShortWriteAt(u64),
    /// The n-th flush (from 1) fails with EIO.
    Flush(usize),
}

/// A file that behaves until its fault fires once, then behaves again (so a wipe can follow).
pub struct Faulty {
    file: File,
    fault: Fault,
    flushes: AtomicUsize,
    fired: AtomicBool,
}

impl Faulty {
    pub fn new(file: File, fault: Fault) -> Faulty {
        Faulty {
            file,
            fault,
            flushes: AtomicUsize::new(0),
            fired: AtomicBool::new(false),
        }
    }

    /// Whether the fault has fired.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    fn fire(&self) -> bool {
        !self.fired.swap(true, Ordering::SeqCst)
    }

    fn covers(at: u64, off: u64, len: u64) -> bool {
        off <= at && at < off + len
    }
}

fn eio() -> Error {
    Error::from_raw_os_error(libc::EIO)
}

impl Medium for Faulty {
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.file.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        let len = buf.len() as u64;
        match self.fault {
            Fault::WriteAt(at) if Self::covers(at, off, len) && self.fire() => Err(eio()),
            Fault::ShortWriteAt(at) if Self::covers(at, off, len) && self.fire() => {
                Medium::write_at(&self.file, &buf[..buf.len() / 2], off)?;
                Err(Error::new(
                    ErrorKind::WriteZero,
                    "failed to write whole buffer",
                ))
            }
            _ => Medium::write_at(&self.file, buf, off),
        }
    }

    fn discard(&self, how: Discard, off: u64, len: u64) -> Result<()> {
        match self.fault {
            Fault::WriteAt(at) if Self::covers(at, off, len) => {
                Err(Error::from_raw_os_error(libc::EOPNOTSUPP))
            }
            _ => self.file.discard(how, off, len),
        }
    }

    fn flush(&self) -> Result<()> {
        let n = self.flushes.fetch_add(1, Ordering::SeqCst) + 1;
        match self.fault {
            Fault::Flush(k) if k == n && self.fire() => Err(eio()),
            _ => self.file.flush(),
        }
    }
}

impl Medium for std::sync::Arc<Faulty> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.as_ref().read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.as_ref().write_at(buf, off)
    }
    fn discard(&self, how: Discard, off: u64, len: u64) -> Result<()> {
        self.as_ref().discard(how, off, len)
    }
    fn flush(&self) -> Result<()> {
        self.as_ref().flush()
    }
}
