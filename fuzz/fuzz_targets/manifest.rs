//! Snapshot manifest (`manifest.json`) and `store.json` from a hostile store or appliance; a
//! manifest that parses must serialise and parse again to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use snapshot::format::StoreInfo;
use snapshot::Manifest;

fuzz_target!(|data: &[u8]| {
    let _ = StoreInfo::parse(data, "fuzz");
    if let Ok(m) = Manifest::parse(data, "fuzz") {
        let _ = m.order();
        for d in &m.disks {
            let _ = d.index_name();
            let _ = snapshot::format::index::file_len(d.size);
            let _ = d.table.partitions(d.logical_sector);
            let _ = d.table.table_regions(d.size, d.logical_sector);
        }
        let again = Manifest::parse(&m.to_bytes(), "fuzz").expect("a parsed manifest re-parses");
        assert_eq!(again, m, "manifest does not round-trip");
    }
});
