//! The INF parser and the repository on the real INF files the Debian packages hold (found with
//! `apt-file search -x '\.inf$'`; the others are font metrics and INI files, not Windows INFs):
//!
//! - QEMU's `qemupciserial.inf` (qemu-system-data, installed with QEMU): a real driver INF with
//!   `[Manufacturer]` decorations (`NTx86`, `NTAMD64`), models, `Include=mf.inf` / `Needs` of a
//!   system INF, `.HW` and `.Services` sections and binary `AddReg` lines;
//! - Wine's `wine.inf` (libwine, fetched with `apt-get download` and cached under
//!   `target/fixtures/real-infs/`): 2,700 lines and 79 sections of setup INF with `[Strings]`, services,
//!   registry and file sections for every architecture.
//!
//! Each is parsed, also as UTF-16LE with a BOM (how most vendor INFs are written), with every
//! section header of the file found in order, tokens substituted from `[Strings]`, and the
//! package chosen for its device.

use drivers_inject::windows::hwid::PciIds;
use drivers_inject::windows::inf::Inf;
use drivers_inject::windows::repo::{Repo, WindowsTarget};
use std::path::{Path, PathBuf};
use std::process::Command;

const QEMU_SERIAL: &str = "/usr/share/doc/qemu-system-data/qemupciserial.inf";

fn headers(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix('['))
        .filter_map(|l| l.split_once(']').map(|(n, _)| n.trim().to_string()))
        .fold(Vec::new(), |mut v, n| {
            if !v.iter().any(|s: &String| s.eq_ignore_ascii_case(&n)) {
                v.push(n);
            }
            v
        })
}

fn utf16le_bom(text: &str) -> Vec<u8> {
    let mut v = vec![0xFF, 0xFE];
    v.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    v
}

/// Parses `bytes` as UTF-8 and as UTF-16LE: the same sections, in file order, either way.
fn parse_both(name: &str, bytes: &[u8]) -> Inf {
    let text = String::from_utf8_lossy(bytes);
    let inf = Inf::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(inf.section_names(), headers(&text), "{name}: sections");
    let wide = Inf::parse(&utf16le_bom(&text)).unwrap_or_else(|e| panic!("{name} UTF-16: {e:#}"));
    assert_eq!(wide.section_names(), inf.section_names(), "{name}: UTF-16");
    for s in inf.section_names() {
        assert_eq!(wide.section(s), inf.section(s), "{name} [{s}] as UTF-16");
    }
    inf
}

#[test]
fn qemu_pci_serial_inf_is_chosen_for_its_device() {
    let bytes = std::fs::read(QEMU_SERIAL).unwrap_or_else(|e| {
        panic!("{QEMU_SERIAL}: {e} (qemu-system-data; scripts/setup installs QEMU)")
    });
    let inf = parse_both("qemupciserial.inf", &bytes);
    assert_eq!(
        inf.get("Version", "Provider"),
        Some("QEMU"),
        "%QEMU% substituted"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(QEMU_SERIAL, dir.path().join("qemupciserial.inf")).unwrap();
    let repo = Repo::scan(dir.path()).unwrap();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    // QEMU's pci-serial-2x as Linux shows it.
    let dev =
        PciIds::from_modalias("pci:v00001B36d00000003sv00001AF4sd00001100bc07sc00i02", 1).unwrap();
    let os = WindowsTarget::server_2019();
    let c = repo.candidates(&dev, &os);
    let best = c.first().expect("the 2-port card is in the NTAMD64 models");
    assert_eq!(best.matched, "PCI\\VEN_1B36&DEV_0003");
    assert_eq!(best.install, "ComPort_inst2");
    assert!(best.description.contains("QEMU"), "{}", best.description);
    let install = best.package.install(&best.install, &repo).unwrap();
    // mf.inf is Windows' own: the plan says what it takes from it.
    assert!(
        install
            .system_needs
            .iter()
            .any(|n| n.contains("MFINSTALL.mf") && n.contains("mf.inf")),
        "{:?}",
        install.system_needs
    );
    // A 32-bit Windows takes the NTx86 models.
    let x86 = WindowsTarget {
        arch: "x86".into(),
        ..WindowsTarget::server_2019()
    };
    assert_eq!(
        repo.candidates(&dev, &x86)
            .first()
            .map(|k| k.install.as_str()),
        Some("ComPort_inst2")
    );
}

/// wine.inf from the libwine package, cached.
fn wine_inf() -> PathBuf {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures/real-infs");
    let inf = cache.join("wine.inf");
    if inf.exists() {
        return inf;
    }
    std::fs::create_dir_all(&cache).unwrap();
    let dl = Command::new("apt-get")
        .args(["download", "libwine"])
        .current_dir(&cache)
        .output()
        .expect("running apt-get download");
    assert!(
        dl.status.success(),
        "apt-get download libwine: {}",
        String::from_utf8_lossy(&dl.stderr)
    );
    let deb = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("the libwine package");
    let out = Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -xO ./usr/share/wine/wine.inf > \"$2.part\" && mv \"$2.part\" \"$2\"")
        .arg("sh")
        .arg(&deb)
        .arg(&inf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "extracting wine.inf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&deb).unwrap();
    inf
}

#[test]
fn wine_setup_inf_parses_whole() {
    let path = wine_inf();
    let bytes = std::fs::read(&path).unwrap();
    let inf = parse_both("wine.inf", &bytes);
    assert!(
        inf.section_names().len() > 50,
        "{}",
        inf.section_names().len()
    );
    // Signature is quoted; tokens from [Strings] are substituted in every section.
    assert_eq!(inf.get("version", "Signature"), Some("$CHICAGO$"));
    let unresolved: Vec<String> = inf
        .section_names()
        .iter()
        .filter(|s| !s.to_ascii_lowercase().starts_with("strings"))
        .flat_map(|s| inf.section(s).unwrap_or(&[]).iter())
        .flat_map(|l| l.values.iter().chain(l.key.iter()))
        .filter(|v| {
            // %Name% tokens that [Strings] defines must be gone; dirids (%11%) stay.
            v.split('%')
                .skip(1)
                .step_by(2)
                .any(|t| !t.is_empty() && !t.chars().all(|c| c.is_ascii_digit()))
        })
        .cloned()
        .collect();
    let strings: Vec<String> = inf
        .section("Strings")
        .unwrap_or(&[])
        .iter()
        .filter_map(|l| l.key.clone())
        .collect();
    for u in &unresolved {
        for s in &strings {
            assert!(
                !u.to_ascii_lowercase()
                    .contains(&format!("%{}%", s.to_ascii_lowercase())),
                "{u}: %{s}% is in [Strings] but was not substituted"
            );
        }
    }
    // Its services are read like a driver's.
    let services: Vec<_> = inf
        .values("DefaultInstall.NT.Services", "AddService")
        .collect();
    assert!(!services.is_empty(), "AddService lines");
    for l in services {
        let svc = l.value(0);
        let section = l.value(2);
        assert!(!svc.is_empty() && inf.has(section), "{l:?}");
    }
}
