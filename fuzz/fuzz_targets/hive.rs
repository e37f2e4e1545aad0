//! Registry hive reader (`drivers_inject::windows::hive`): the regf reader behind `Hive::export`,
//! `export_all`, `key`, `value` and the reads of `Hive::script` (base block, nk/vk cells,
//! lf/lh/li/ri subkey lists, value lists, big data), from a restored (hostile) Windows volume;
//! and the `.reg` export text parser (`parse_export`) on the same bytes read as text. The reader
//! takes a path: the input is written to one file per process (in /dev/shm, else the temporary
//! directory), rewritten every run.
#![no_main]
use drivers_inject::windows::hive::{decode_reg, parse_export, Data, Edit, Hive};
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The scratch file of this process, in /dev/shm when there is one (a file rewritten on ext4
/// waits for I/O: 1,400 executions per second instead of 12,000), else in the temporary
/// directory. Files that ended processes left there are removed first.
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix("bmr-fuzz-hive-"));
            if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        dir.join(format!("bmr-fuzz-hive-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(path(), data).expect("scratch file");
    let hive = Hive::new(path(), "HKEY_LOCAL_MACHINE\\SYSTEM");
    if let Ok(all) = hive.export_all() {
        for (lk, k) in &all.keys {
            assert_eq!(lk, &k.path.to_lowercase());
        }
    }
    let _ = hive.export("ControlSet001\\Services", Some(2));
    let _ = hive.key("Select");
    let _ = hive.value("Select", "Current");
    // The `hivexsh -w` script of an injection reads every value of the keys it sets.
    let _ = hive.script(&[
        Edit::Set {
            key: "ControlSet001\\Services\\viostor".into(),
            name: "Start".into(),
            data: Data::Dword(0),
        },
        Edit::Delete {
            key: "ControlSet001\\Services\\disk".into(),
            name: "ImagePath".into(),
        },
        Edit::DeleteKey {
            key: "ControlSet002".into(),
        },
    ]);
    let _ = parse_export(&decode_reg(data), "HKEY_LOCAL_MACHINE\\SYSTEM");
});
