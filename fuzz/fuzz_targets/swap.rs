//! Linux swap header (v1 and the old v0 signature), from a hostile partition; the used-block map must stay inside the partition.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| bmr_fuzz::fuzz_fs(data, snapshot::fs::swap::probe));
