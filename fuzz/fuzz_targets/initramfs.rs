//! Initramfs reader (`drivers_inject::initramfs::list`): concatenated newc cpio segments, plain or
//! gzip/xz/zstd/lz4-legacy compressed, from a restored (hostile) root filesystem.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(l) = drivers_inject::initramfs::list(data) {
        let _ = l.modules();
    }
});
