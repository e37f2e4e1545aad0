//! A filesystem whose allocation data cannot be trusted (here NTFS with `$Bitmap` zeroed) is
//! ingested whole: a warning line in the summary, the reason in the manifest's partition entry,
//! and the snapshot reads back byte for byte.

mod common;

use bmr_tests::util::Cmd;
use common::{same_bytes, Env};
use std::os::unix::fs::FileExt;

#[test]
fn ntfs_with_zeroed_bitmap_is_ingested_whole_and_said() {
    let env = Env::new("damaged_ntfs_bitmap");
    let img = env.path("ntfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    Cmd::new("mkntfs")
        .args(["-F", "-Q", "-q", "-c", "4096"])
        .arg(&img)
        .run()
        .ok();
    let file = env.path("data.bin");
    std::fs::write(&file, vec![0x42u8; 3 << 20]).unwrap();
    Cmd::new("ntfscp")
        .arg("-f")
        .arg(&img)
        .arg(&file)
        .arg("data.bin")
        .run()
        .ok();
    // Find $Bitmap's cluster by its contents, and zero it.
    let bitmap = Cmd::new("ntfscat")
        .arg(&img)
        .arg("$Bitmap")
        .run()
        .ok()
        .stdout_bytes;
    let bytes = std::fs::read(&img).unwrap();
    let at = (0..bytes.len() / 4096)
        .map(|c| c * 4096)
        .find(|&o| bytes[o..].starts_with(&bitmap))
        .expect("$Bitmap in the image");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&vec![0; bitmap.len()], at as u64).unwrap();
    drop(f);

    let out = env.ingest_ok("n", "s1", &[&img]);
    assert!(
        out.stdout.lines().any(|l| l
            .trim()
            .starts_with("warning: disk 0 partition 0: copied whole: ntfs:")
            && l.contains("$Bitmap")),
        "no warning in the summary\n{}",
        out.describe()
    );
    let m = env.manifest("n", "s1");
    let p = &m.disks[0].partitions[0];
    assert!(
        p.whole.as_deref().is_some_and(|w| w.contains("$Bitmap")),
        "{p:?}"
    );
    let rb = env
        .read_back(env.store.to_str().unwrap(), "n", "s1", &env.path("rb"))
        .unwrap();
    assert!(
        same_bytes(&img, &rb[0]),
        "the read-back differs from the image"
    );
}
