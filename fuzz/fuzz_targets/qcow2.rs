//! qcow2 reader of the failover VMs' overlays (`appliance/src/failover/qcow2.rs`, compiled here
//! from its source file: the appliance is a binary crate): header, extensions, L1/L2 tables,
//! allocation map and guest reads. The input is a sparse image written to a file in /dev/shm.
#![no_main]
use bmr_fuzz::Sparse;
use libfuzzer_sys::fuzz_target;
use snapshot::ReadAt;
use std::path::PathBuf;
use std::sync::OnceLock;

#[path = "../../appliance/src/failover/qcow2.rs"]
#[allow(dead_code)]
mod qcow2;

/// One directory per process holding the image; a backing file name in a hostile image resolves
/// against it, where nothing else exists.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let d = PathBuf::from(format!("{base}/bmr-fuzz-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let img = Sparse::parse(data, 64 << 20);
    let path = dir().join("top.qcow2");
    let f = std::fs::File::create(&path).expect("scratch file");
    img.write_to(&f).expect("write scratch file");
    drop(f);
    let Ok(q) = qcow2::Qcow2::open(&path) else {
        return;
    };
    let _ = q.allocated();
    // A backing file elsewhere on this machine is not the fuzzer's to open.
    if q.backing
        .as_ref()
        .is_some_and(|(p, _)| !p.starts_with(dir()))
    {
        return;
    }
    let Ok(chain) = qcow2::Chain::open(&path) else {
        return;
    };
    let size = chain.size();
    let mut buf = vec![0u8; 64 << 10];
    for off in [0, size / 3, size.saturating_sub(buf.len() as u64)] {
        let n = (buf.len() as u64).min(size - off.min(size)) as usize;
        let _ = chain.read_at(&mut buf[..n], off);
    }
});
