//! LVM2 physical volume (label, PV header, metadata area header, VG metadata text, LV segments and
//! the filesystems inside the LVs), from a hostile partition; the kept ranges must stay inside it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use snapshot::ReadAt;

fuzz_target!(|data: &[u8]| {
    let img = bmr_fuzz::Sparse::parse(data, bmr_fuzz::MAX_FS_SIZE);
    let len = img.size();
    if let Some(Ok(a)) =
        snapshot::volume::lvm::analyze(&img, 0, len, &snapshot::fs::exclude::Exclusions::default())
    {
        if let Some(&(_, end)) = a.used.ranges().last() {
            assert!(
                end <= len,
                "kept range ends at {end}, past the partition ({len})"
            );
        }
        assert!(a.pv.pe_start < len);
    }
    // The metadata text parser alone, on the raw bytes.
    let _ = snapshot::volume::lvmtext::parse(data);
});
