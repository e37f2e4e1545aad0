//! NTFS: boot sector, MFT records (fixups, attributes, runlists), $Bitmap, $LogFile, from a hostile partition; the used-block map must stay inside the partition.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| bmr_fuzz::fuzz_fs(data, snapshot::fs::ntfs::probe));
