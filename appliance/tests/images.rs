//! Images from others: ingest opens a qcow2 or VMDK without following anything out of it. A VMDK
//! whose extents lie outside the image's directory, a qcow2 or VMDK with a backing file, a qcow2
//! with an external data file: refused with one line, nothing stored. Legitimate qcow2 and
//! monolithic-sparse VMDK images still ingest and read back exactly.

mod common;

use bmr_tests::util::{Cmd, Output};
use common::{same_bytes, Env};
use std::path::{Path, PathBuf};

fn qemu_img<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Cmd::new("qemu-img").args(args).run().ok()
}

/// A raw disk of `mib` MiB of pseudo-random bytes (no table: ingest copies it whole).
fn raw_disk(path: &Path, mib: usize) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(path, bytes).unwrap();
}

/// Panics unless the ingest failed with one short error line naming every one of `what`, and
/// stored no snapshot.
fn assert_refused(env: &Env, host: &str, out: &Output, what: &[&str]) {
    assert!(!out.success(), "ingest accepted it\n{}", out.describe());
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let last = lines.last().copied().unwrap_or("");
    assert!(
        last.starts_with("appliance: error:"),
        "no error line\n{}",
        out.describe()
    );
    for w in what {
        assert!(last.contains(w), "{last:?} should mention {w:?}");
    }
    assert!(
        lines.len() <= 3,
        "the error is not short\n{}",
        out.describe()
    );
    assert!(!env.store.join(format!("hosts/{host}/latest")).exists());
}

/// A monolithicFlat VMDK descriptor of `sectors` sectors whose one extent is `extent`.
fn flat_descriptor(path: &Path, extent: &str, sectors: u64) {
    std::fs::write(
        path,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\n\n# Extent description\nRW {sectors} FLAT \"{extent}\" 0\n\n\
             ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"1\"\n\
             ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n"
        ),
    )
    .unwrap();
}

fn images_dir(env: &Env) -> PathBuf {
    let d = env.path("images");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn vmdk_extents_outside_the_image_directory_are_refused() {
    let env = Env::new("images_vmdk_outside");
    let dir = images_dir(&env);
    let private = env.path("private");
    std::fs::create_dir_all(&private).unwrap();
    let secret = private.join("secret.key");
    std::fs::write(&secret, vec![0x5a; 4096]).unwrap();
    let passwd_sectors = (std::fs::metadata("/etc/passwd").unwrap().len() / 512).max(1);
    let link = dir.join("linked-flat.bin");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let cases: [(&str, String, u64); 4] = [
        ("passwd", "/etc/passwd".into(), passwd_sectors),
        ("absolute", secret.display().to_string(), 8),
        ("relative", "../private/secret.key".into(), 8),
        ("symlink", "linked-flat.bin".into(), 8),
    ];
    for (name, extent, sectors) in cases {
        let vmdk = dir.join(format!("{name}.vmdk"));
        flat_descriptor(&vmdk, &extent, sectors);
        let host = format!("v{name}");
        let out = env.ingest(&host, Some("s1"), &[&vmdk]);
        assert_refused(&env, &host, &out, &[&format!("{name}.vmdk"), "outside"]);
    }
    // A protocol name (qemu would open it as such, whatever file of that name exists).
    let vmdk = dir.join("proto.vmdk");
    std::fs::write(dir.join("nbd:x"), vec![0u8; 4096]).unwrap();
    flat_descriptor(&vmdk, "nbd:x", 8);
    let out = env.ingest("vproto", Some("s1"), &[&vmdk]);
    assert_refused(&env, "vproto", &out, &["proto.vmdk", "nbd:x"]);
}

#[test]
fn backing_files_and_external_data_files_are_refused() {
    let env = Env::new("images_backing");
    let dir = images_dir(&env);
    let key = env.store.join("private/signing.key");
    assert!(key.is_file(), "appliance init made no signing key");
    // A qcow2 backed by the store's signing key, by absolute path and relative to the image.
    let evil = dir.join("evil.qcow2");
    qemu_img([
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-u".as_ref(),
        "-b".as_ref(),
        key.as_os_str(),
        "-F".as_ref(),
        "raw".as_ref(),
        evil.as_os_str(),
        "1M".as_ref(),
    ]);
    let out = env.ingest("q1", Some("s1"), &[&evil]);
    assert_refused(&env, "q1", &out, &["evil.qcow2", "backing file"]);
    let rel = dir.join("rel.qcow2");
    qemu_img(
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "../store/private/signing.key",
            "-F",
            "raw",
        ]
        .map(std::ffi::OsStr::new)
        .into_iter()
        .chain([rel.as_os_str(), "1M".as_ref()]),
    );
    let out = env.ingest("q2", Some("s1"), &[&rel]);
    assert_refused(&env, "q2", &out, &["rel.qcow2", "backing file"]);
    // A VMDK whose descriptor names a parent.
    let base = dir.join("base.vmdk");
    raw_disk(&dir.join("base.raw"), 1);
    qemu_img([
        "convert".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "vmdk".as_ref(),
        dir.join("base.raw").as_os_str(),
        base.as_os_str(),
    ]);
    let child = dir.join("child.vmdk");
    qemu_img([
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "vmdk".as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        "-F".as_ref(),
        "vmdk".as_ref(),
        child.as_os_str(),
    ]);
    let out = env.ingest("q3", Some("s1"), &[&child]);
    assert_refused(&env, "q3", &out, &["child.vmdk", "backing file"]);
    // A qcow2 whose data lives in an external data file (outside the image's directory).
    let outside = env.path("private");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("data.bin");
    let data = dir.join("ext.qcow2");
    qemu_img([
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        format!("data_file={}", secret.display()).as_ref(),
        data.as_os_str(),
        "1M".as_ref(),
    ]);
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    let out = env.ingest("q4", Some("s1"), &[&data]);
    assert_refused(&env, "q4", &out, &["ext.qcow2", "data file"]);
}

#[test]
fn standalone_qcow2_and_vmdk_ingest_and_read_back_exactly() {
    let env = Env::new("images_legit");
    let dir = images_dir(&env);
    let raw = dir.join("disk.raw");
    raw_disk(&raw, 8);
    for (fmt, opts) in [
        ("qcow2", None),
        ("vmdk", None),
        ("vmdk", Some("subformat=monolithicFlat")),
    ] {
        let name = format!(
            "disk-{fmt}{}.img",
            if opts.is_some() { "-flat" } else { "" }
        );
        let img = dir.join(&name);
        let mut args: Vec<std::ffi::OsString> = vec![
            "convert".into(),
            "-q".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            fmt.into(),
        ];
        if let Some(o) = opts {
            args.extend(["-o".into(), o.into()]);
        }
        args.extend([raw.clone().into_os_string(), img.clone().into_os_string()]);
        qemu_img(args);
        let host = name.replace('.', "-");
        let out = env.ingest_ok(&host, "s1", &[&img]);
        let rb = env
            .read_back(
                env.store.to_str().unwrap(),
                &host,
                "s1",
                &env.path(&format!("rb-{host}")),
            )
            .unwrap();
        assert!(
            same_bytes(&raw, &rb[0]),
            "{name}: read back differs\n{}",
            out.describe()
        );
    }
}
