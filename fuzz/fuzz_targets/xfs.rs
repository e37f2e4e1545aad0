//! XFS: superblock, AGF/AGFL, the by-block free-space btrees, the log's record headers, used-block map and its cross-checks, from a hostile partition; the used-block map must stay inside the partition.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| bmr_fuzz::fuzz_fs(data, snapshot::fs::xfs::probe));
