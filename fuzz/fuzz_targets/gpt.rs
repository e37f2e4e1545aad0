//! GPT (512- and 4096-byte sectors, primary and backup headers, entry arrays) from a hostile disk.
#![no_main]
use bmr_fuzz::{exercise_table, Sparse, MAX_DISK_SIZE};
use libfuzzer_sys::fuzz_target;
use snapshot::ptable::{gpt::Gpt, PartitionTable};
use snapshot::ReadAt;

fuzz_target!(|data: &[u8]| {
    let img = Sparse::parse(data, MAX_DISK_SIZE);
    for s in [512, 4096] {
        if let Ok(Some(g)) = Gpt::read(&img, s) {
            exercise_table(&PartitionTable::Gpt(g), s, img.size());
        }
    }
    if let Ok((t, s)) = PartitionTable::read(&img, None) {
        exercise_table(&t, s, img.size());
    }
});
