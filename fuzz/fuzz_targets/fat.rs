//! FAT12/16/32: boot sector, FATs (both copies), root directory label, from a hostile partition; the used-block map must stay inside the partition.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| bmr_fuzz::fuzz_fs(data, snapshot::fs::fat::probe));
