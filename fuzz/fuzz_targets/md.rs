//! MD RAID member (mdadm superblocks 1.x and 0.90, the filesystem or LVM2 PV inside a RAID1's
//! data area), from a hostile partition; the kept ranges must stay inside it and cover the
//! superblock.
#![no_main]
use libfuzzer_sys::fuzz_target;
use snapshot::ReadAt;

fuzz_target!(|data: &[u8]| {
    let img = bmr_fuzz::Sparse::parse(data, bmr_fuzz::MAX_FS_SIZE);
    let len = img.size();
    let ex = snapshot::fs::exclude::Exclusions::default();
    if let Some(Ok(a)) = snapshot::volume::md::analyze(&img, 0, len, &ex) {
        let m = &a.member;
        assert!(m.data_offset + m.data_size <= len, "data area past the partition");
        if let Some(&(_, end)) = a.used.ranges().last() {
            assert!(end <= len, "kept range ends at {end}, past the partition ({len})");
        }
        if let Some(at) = snapshot::volume::md::superblock_at(&m.metadata, len) {
            assert!(
                a.used.ranges().iter().any(|&(s, e)| s <= at && at < e),
                "the superblock at {at} is not kept"
            );
        }
    }
});
