//! Shared harness of the appliance's integration tests: a store made by the real binary, every
//! command with a timeout, read-back of snapshots through the `snapshot` reader (local or HTTP).

#![allow(dead_code)]

pub mod http;

use bmr_tests::util::{with_timeout, Cmd, Output};
use snapshot::format::index::Slot;
use snapshot::sign::PublicKey;
use snapshot::store::{http::Options, open, open_snapshot, LocalStore};
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_appliance");

/// How long one appliance command may take before the test kills it and fails.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(300);

/// A test's working area: a scratch directory (removed at the end), a store in it, and a log
/// directory under `target/e2e/<test>/` that is kept for post-mortems.
pub struct Env {
    pub name: String,
    pub scratch: tempfile::TempDir,
    pub store: PathBuf,
    pub logs: bmr_tests::Artifacts,
}

impl Env {
    /// A fresh environment with `appliance init` run on its store.
    pub fn new(name: &str) -> Env {
        let env = Env::bare(name);
        env.appliance(["init"]).ok();
        env
    }

    /// A fresh environment without a store.
    pub fn bare(name: &str) -> Env {
        let base = bmr_tests::Workspace::root().join("target").join("tmp");
        std::fs::create_dir_all(&base).expect("creating target/tmp");
        let scratch = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(base)
            .expect("scratch dir");
        let store = scratch.path().join("store");
        let logs = bmr_tests::Workspace::artifacts(name);
        Env {
            name: name.to_string(),
            scratch,
            store,
            logs,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.scratch.path().join(rel)
    }

    /// `appliance SUB --store STORE ARGS...`, not yet run.
    pub fn appliance<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut it = args.into_iter();
        let sub = it.next().expect("a subcommand");
        Cmd::new(BIN)
            .arg(sub)
            .arg("--store")
            .arg(&self.store)
            .args(it)
            .timeout(CMD_TIMEOUT)
    }

    /// Ingest `sources` for `host`; the output is checked for panics and logged, not for success.
    pub fn ingest(&self, host: &str, snapshot: Option<&str>, sources: &[&Path]) -> Output {
        let mut args: Vec<std::ffi::OsString> = vec!["ingest".into(), "--host".into(), host.into()];
        if let Some(s) = snapshot {
            args.push("--snapshot".into());
            args.push(s.into());
        }
        for s in sources {
            args.push(s.as_os_str().to_owned());
        }
        let out = self.appliance(args).run();
        self.log(
            &format!("ingest-{host}-{}", snapshot.unwrap_or("auto")),
            &out,
        );
        out.no_panic()
    }

    /// Ingest and require success.
    #[track_caller]
    pub fn ingest_ok(&self, host: &str, snapshot: &str, sources: &[&Path]) -> Output {
        self.ingest(host, Some(snapshot), sources).ok()
    }

    pub fn verify(&self, extra: &[&str]) -> Output {
        let mut args = vec!["verify"];
        args.extend_from_slice(extra);
        let out = self.appliance(args).run();
        self.log("verify", &out);
        out.no_panic()
    }

    pub fn gc(&self, dry_run: bool) -> Output {
        let mut args = vec!["gc"];
        if dry_run {
            args.push("--dry-run");
        }
        let out = self.appliance(args).run();
        self.log(if dry_run { "gc-dry-run" } else { "gc" }, &out);
        out.no_panic()
    }

    pub fn list_json(&self) -> serde_json::Value {
        let out = self.appliance(["list", "--json"]).ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("list --json is not JSON: {e}\n{}", out.describe()))
    }

    /// The public key as `appliance pubkey` prints it.
    pub fn pubkey(&self) -> PublicKey {
        let out = self.appliance(["pubkey"]).ok();
        PublicKey::parse(out.stdout.trim())
            .unwrap_or_else(|e| panic!("pubkey printed no key: {e:#}\n{}", out.describe()))
    }

    /// Append a command's output to the test's log directory.
    pub fn log(&self, what: &str, out: &Output) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join("commands.log"))
        {
            let _ = writeln!(f, "=== {what}\n{}\n", out.describe());
        }
    }

    /// Every chunk file name (digest hex) in the store.
    pub fn chunk_files(&self) -> BTreeSet<String> {
        let mut set = BTreeSet::new();
        let dir = self.store.join("chunks");
        let Ok(subs) = std::fs::read_dir(&dir) else {
            return set;
        };
        for sub in subs.flatten() {
            if let Ok(files) = std::fs::read_dir(sub.path()) {
                for f in files.flatten() {
                    set.insert(f.file_name().to_string_lossy().into_owned());
                }
            }
        }
        set
    }

    /// Total bytes of the chunk files.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_files()
            .iter()
            .map(|d| {
                std::fs::metadata(self.chunk_path(d))
                    .map(|m| m.len())
                    .unwrap_or(0)
            })
            .sum()
    }

    pub fn chunk_path(&self, digest_hex: &str) -> PathBuf {
        self.store
            .join("chunks")
            .join(&digest_hex[..4])
            .join(digest_hex)
    }

    /// Digests (hex) referenced by the committed snapshots, read with the public key.
    pub fn referenced(&self, only_host: Option<&str>) -> BTreeSet<String> {
        let store = LocalStore::open(&self.store).expect("opening the store");
        let key = self.pubkey();
        let mut set = BTreeSet::new();
        for host in store.hosts().expect("hosts") {
            if only_host.is_some_and(|h| h != host) {
                continue;
            }
            for id in store.snapshots(&host).expect("snapshots") {
                let snap = open_snapshot(&store, &host, Some(&id), Some(&key))
                    .unwrap_or_else(|e| panic!("opening {host}/{id}: {e:#}"));
                for idx in &snap.indexes {
                    for (_, slot) in idx.slots() {
                        if let Slot::Data(d) = slot {
                            set.insert(d.hex());
                        }
                    }
                }
            }
        }
        set
    }

    /// The manifest of `host`/`snapshot`, checked against the public key.
    pub fn manifest(&self, host: &str, snapshot: &str) -> snapshot::Manifest {
        let store = LocalStore::open(&self.store).expect("opening the store");
        open_snapshot(&store, host, Some(snapshot), Some(&self.pubkey()))
            .unwrap_or_else(|e| panic!("opening {host}/{snapshot}: {e:#}"))
            .manifest
    }

    /// Read every disk of `host`/`snapshot` from `location` (the store directory or an HTTP base
    /// URL) into new sparse files `<out_dir>/disk<N>.img`, checking the signature.
    pub fn read_back(
        &self,
        location: &str,
        host: &str,
        snapshot: &str,
        out_dir: &Path,
    ) -> anyhow::Result<Vec<PathBuf>> {
        read_back(location, &self.pubkey(), host, snapshot, out_dir)
    }
}

/// See [`Env::read_back`]. Bounded: HTTP retries stop after 5 s, the whole read after 5 minutes.
pub fn read_back(
    location: &str,
    key: &PublicKey,
    host: &str,
    snapshot: &str,
    out_dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let (location, key, host, snapshot, out_dir) = (
        location.to_string(),
        *key,
        host.to_string(),
        snapshot.to_string(),
        out_dir.to_path_buf(),
    );
    let what = format!("reading {host}/{snapshot} from {location}");
    with_timeout(&what, Duration::from_secs(300), move || {
        let opts = Options {
            retry_for: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            ..Options::default()
        };
        std::fs::create_dir_all(&out_dir)?;
        let store = open(&location, &opts)?;
        let snap = open_snapshot(store.as_ref(), &host, Some(&snapshot), Some(&key))?;
        let mut paths = Vec::new();
        for (n, idx) in snap.indexes.iter().enumerate() {
            let p = out_dir.join(format!("disk{n}.img"));
            let f = File::create(&p)?;
            f.set_len(idx.disk_size)?;
            snapshot::reader::read_disk(store.as_ref(), idx, &f, 8)?;
            f.sync_all()?;
            paths.push(p);
        }
        Ok(paths)
    })
}

/// Whether two files have the same bytes.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    bmr_tests::Cmd::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .run()
        .success()
}
