//! MBR with extended/logical partition chains (EBRs) from a hostile disk.
#![no_main]
use bmr_fuzz::{exercise_table, Sparse, MAX_DISK_SIZE};
use libfuzzer_sys::fuzz_target;
use snapshot::ptable::{mbr, PartitionTable};
use snapshot::ReadAt;

fuzz_target!(|data: &[u8]| {
    let img = Sparse::parse(data, MAX_DISK_SIZE);
    let _ = mbr::is_protective(&img);
    for s in [512, 4096] {
        if let Ok(Some(m)) = mbr::Mbr::read(&img, s) {
            exercise_table(&PartitionTable::Mbr(m), s, img.size());
        }
    }
    if let Ok((t, s)) = PartitionTable::read(&img, Some(512)) {
        exercise_table(&t, s, img.size());
    }
});
