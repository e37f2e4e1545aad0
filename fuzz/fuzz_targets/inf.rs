//! Windows INF parser (`drivers_inject::windows::inf::Inf::parse`): UTF-16 LE/BE (BOM or not),
//! UTF-8, Latin-1, sections, quoting, `%token%` strings, continuations, from a hostile driver
//! repository; then the lookups the driver choice makes on the result (`repo::Package`,
//! `Repo::candidates`, `Package::install` with Include/Needs), the package built in memory.
#![no_main]
use drivers_inject::windows::hwid::PciIds;
use drivers_inject::windows::inf::Inf;
use drivers_inject::windows::repo::{Package, Repo, WindowsTarget};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

/// A package as `Package::read` makes it, from an INF already parsed (its path is only a name:
/// `Include` resolves to the packages of the same folder).
fn package(name: &str, inf: Inf) -> Package {
    Package {
        inf_path: PathBuf::from(format!("/fuzz/{name}")),
        class: inf.get("Version", "Class").unwrap_or("").to_string(),
        class_guid: inf.get("Version", "ClassGUID").unwrap_or("").to_string(),
        provider: inf.get("Version", "Provider").unwrap_or("").to_string(),
        catalog: inf
            .get("Version", "CatalogFile.NTamd64")
            .or_else(|| inf.get("Version", "CatalogFile"))
            .map(str::to_string),
        date: (0, 0, 0),
        version: [0; 4],
        inf,
    }
}

/// The included INF of the RAID fixture, a sibling the input may `Include`.
const COMMON: &str = "[Version]\r\nSignature=\"$Windows NT$\"\r\n\r\n[esr_common.Install]\r\n\
CopyFiles = esr_common_files\r\nAddReg = esr_common_reg\r\n\r\n[esr_common_files]\r\nesrlib.sys\r\n\
\r\n[esr_common_reg]\r\nHKR,,\"CommonSetting\",0x00010001,7\r\n";

fn devices() -> Vec<PciIds> {
    let dev = |vendor, device, subvendor, subdevice, class, revision| PciIds {
        vendor,
        device,
        subvendor,
        subdevice,
        class,
        revision,
    };
    vec![
        dev(0x1AF4, 0x1001, 0x1AF4, 0x0002, (1, 0, 0), 0),
        dev(0x1AF4, 0x1042, 0x1AF4, 0x1100, (1, 0, 0), 1),
        dev(0x1AF4, 0x1000, 0x1AF4, 0x0001, (2, 0, 0), 0),
        dev(0x1000, 0x00AF, 0x1000, 0x4000, (1, 4, 0), 0),
    ]
}

fuzz_target!(|data: &[u8]| {
    let Ok(inf) = Inf::parse(data) else {
        return;
    };
    // Every named section exists, and its lines are in file order.
    for name in inf.section_names() {
        let lines = inf.section(name).expect("a named section exists");
        assert!(
            lines.windows(2).all(|w| w[0].at < w[1].at),
            "{name}: lines out of order"
        );
        for l in lines {
            if let Some(k) = &l.key {
                let _ = inf.get(name, k);
                let _ = inf.list(name, k);
            }
        }
    }
    let names: Vec<String> = inf.section_names().iter().take(64).cloned().collect();
    let repo = Repo {
        packages: vec![
            package("fuzz.inf", inf),
            package(
                "esrcommon.inf",
                Inf::parse(COMMON.as_bytes()).expect("fixture INF"),
            ),
        ],
        errors: Vec::new(),
    };
    let p = &repo.packages[0];
    let mut old = WindowsTarget::server_2019();
    (old.major, old.minor, old.build) = (6, 1, 7601);
    for os in [WindowsTarget::server_2019(), old] {
        for m in p.models_sections(&os) {
            assert!(p.inf.has(&m), "models section {m} does not exist");
        }
        for dev in devices() {
            let ids = dev.ids().len() as u32;
            for c in repo.candidates(&dev, &os) {
                assert!(c.rank < 2 * ids, "rank {} of {} IDs", c.rank, ids);
                let _ = c.package.install(&c.install, &repo);
            }
        }
    }
    // Every section as a DDInstall section, matched or not.
    for s in &names {
        let _ = p.install(s, &repo);
    }
});
