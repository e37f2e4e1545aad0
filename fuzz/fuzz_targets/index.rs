//! Chunk index (`disk<N>.idx`) from a hostile store or appliance; what parses must write back
//! byte for byte, but for the reserved header bytes (40..64), which the reader ignores (the
//! manifest's `index_sha256` covers them).
#![no_main]
use libfuzzer_sys::fuzz_target;
use snapshot::format::index::ChunkIndex;

fuzz_target!(|data: &[u8]| {
    if let Ok(idx) = ChunkIndex::parse(data, "fuzz") {
        for (i, _) in idx.slots() {
            let (off, len) = idx.span(i);
            assert!(off + len <= idx.disk_size);
        }
        let mut want = data.to_vec();
        want[40..64].fill(0);
        assert_eq!(idx.to_bytes(), want, "index does not round-trip");
    }
});
