//! A test's working directory under `target/e2e/`: removed when the test passes, kept when it
//! fails.
//!
//! The end-to-end tests write disk images, stores and restored copies of several GiB each; kept
//! after every run they add up to tens of GiB and fill the disk of the machine that runs CI
//! (which is shared, and whose free space varies). A passing test leaves nothing; a failing one
//! (the guard dropped while its thread panics) keeps everything for reading, as does
//! `BMR_KEEP_ARTIFACTS=1`.

use std::ffi::OsStr;
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// The directory; derefs to [`Path`].
#[derive(Debug)]
pub struct Artifacts(Option<PathBuf>);

impl Artifacts {
    /// `dir`, emptied and created again.
    pub fn fresh(dir: PathBuf) -> Artifacts {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the artifacts dir");
        Artifacts(Some(dir))
    }

    /// Keep the directory whatever happens (for output the user reads, as the demo's).
    pub fn keep(mut self) -> PathBuf {
        self.0.take().expect("an artifacts dir")
    }
}

impl Deref for Artifacts {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.as_deref().expect("an artifacts dir")
    }
}

impl AsRef<Path> for Artifacts {
    fn as_ref(&self) -> &Path {
        self
    }
}

impl AsRef<OsStr> for Artifacts {
    fn as_ref(&self) -> &OsStr {
        self.as_os_str()
    }
}

impl Drop for Artifacts {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        if std::thread::panicking() || std::env::var_os("BMR_KEEP_ARTIFACTS").is_some() {
            return;
        }
        // Never descend into a filesystem still mounted below the directory (a test that left
        // a mount has a bug that its artifacts help to find).
        if mounted_below(&dir) {
            eprintln!("keeping {}: something is mounted below it", dir.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("could not remove {}: {e}", dir.display());
        }
    }
}

/// Whether a mount point lies at or below `dir` (`/proc/self/mountinfo`, field 5).
fn mounted_below(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&unescape(m)).starts_with(&dir))
}

/// mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_when_passing_kept_when_failing() {
        let base = std::env::temp_dir().join(format!("bmr-artifacts-{}", std::process::id()));
        let pass = base.join("pass");
        let a = Artifacts::fresh(pass.clone());
        std::fs::write(a.join("f"), b"x").unwrap();
        drop(a);
        assert!(!pass.exists());

        let fail = base.join("fail");
        let f2 = fail.clone();
        let r = std::thread::spawn(move || {
            let a = Artifacts::fresh(f2);
            std::fs::write(a.join("f"), b"x").unwrap();
            panic!("test failure");
        })
        .join();
        assert!(r.is_err());
        assert!(fail.join("f").exists());

        let kept = Artifacts::fresh(base.join("kept")).keep();
        assert!(kept.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert!(mounted_below(Path::new("/")));
    }
}
