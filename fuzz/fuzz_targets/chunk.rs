//! Chunk blob (`chunks/xx/<digest>`) from a hostile store or appliance: header checks and zstd
//! decoding, with the uncompressed length bounded by the header (at most 4 MiB).
#![no_main]
use libfuzzer_sys::fuzz_target;
use snapshot::format::blob;
use snapshot::format::Digest;

fuzz_target!(|data: &[u8]| {
    // The digest the reader expects: the real one half of the time, so that decoding reaches the
    // hash check both ways.
    let expected = Digest::of(data);
    let _ = blob::check_header(data, data.len() as u64, &expected);
    let _ = blob::check_header(
        &data[..data.len().min(blob::PROBE_LEN)],
        data.len() as u64,
        &expected,
    );
    if let Ok(out) = blob::decode_unverified(data, &expected) {
        assert!(out.len() as u64 <= snapshot::CHUNK_SIZE);
        let d = Digest::of(&out);
        assert!(blob::decode_chunk(data, &d).is_ok());
    }
});
