//! Every file the adaptation writes, creates or removes in the restored system, with the
//! original kept for rollback: under `/var/lib/bmr/pre-restore/<path>` of the restored system
//! (never beside config files, where NetworkManager or ifcfg readers would load a copy as a
//! second config), except initramfs images, kept beside themselves as `<image>.pre-restore`
//! so that a boot loader entry can be pointed at them by hand.

use anyhow::{Context, Result};
use serde::Serialize;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const BACKUP_DIR: &str = "var/lib/bmr/pre-restore";

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Changed,
    Created,
    Removed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// Path in the restored system (`/etc/fstab`).
    pub path: String,
    pub action: Action,
    /// Where the original is kept (a path in the restored system), if there was one.
    pub original: Option<String>,
    pub why: String,
}

pub struct Changes {
    root: PathBuf,
    dry_run: bool,
    pub list: Vec<Change>,
}

fn abs(rel: &str) -> String {
    format!("/{}", rel.trim_start_matches('/'))
}

impl Changes {
    pub fn new(root: &Path, dry_run: bool) -> Changes {
        Changes {
            root: root.to_path_buf(),
            dry_run,
            list: Vec::new(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// Reads a file of the restored system, `None` if it does not exist.
    pub fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }

    /// Keeps the original of `rel` under the backup tree (once: a second run keeps the first
    /// original), returning its path in the restored system.
    fn backup(&self, rel: &str) -> Result<String> {
        let rel = rel.trim_start_matches('/');
        let dst_rel = format!("{BACKUP_DIR}/{rel}");
        let dst = self.path(&dst_rel);
        if !dst.exists() {
            if let Some(p) = dst.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::copy(self.path(rel), &dst)
                .with_context(|| format!("keeping the original of /{rel}"))?;
        }
        Ok(abs(&dst_rel))
    }

    /// Writes `content` to `rel` (atomically, keeping the original's mode), recording why.
    /// Nothing happens when the content is already there.
    pub fn write(&mut self, rel: &str, content: &str, why: &str) -> Result<()> {
        let p = self.path(rel);
        let old = std::fs::read_to_string(&p).ok();
        if old.as_deref() == Some(content) {
            return Ok(());
        }
        let (action, original) = if old.is_some() {
            let original = if self.dry_run {
                None
            } else {
                Some(self.backup(rel)?)
            };
            (Action::Changed, original)
        } else {
            (Action::Created, None)
        };
        if !self.dry_run {
            let mode = std::fs::metadata(&p)
                .map(|m| m.permissions().mode())
                .unwrap_or(0o644);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            let tmp = p.with_extension("bmr-tmp");
            std::fs::write(&tmp, content).with_context(|| format!("writing {}", abs(rel)))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&tmp, &p).with_context(|| format!("replacing {}", abs(rel)))?;
        }
        self.list.push(Change {
            path: abs(rel),
            action,
            original,
            why: why.into(),
        });
        Ok(())
    }

    /// Removes `rel` (a stale cache), keeping it in the backup tree.
    pub fn remove(&mut self, rel: &str, why: &str) -> Result<()> {
        if !self.path(rel).exists() {
            return Ok(());
        }
        let original = if self.dry_run {
            None
        } else {
            let o = self.backup(rel)?;
            std::fs::remove_file(self.path(rel))
                .with_context(|| format!("removing {}", abs(rel)))?;
            Some(o)
        };
        self.list.push(Change {
            path: abs(rel),
            action: Action::Removed,
            original,
            why: why.into(),
        });
        Ok(())
    }

    /// Copies `from` to `rel` (a boot loader binary), creating it.
    pub fn copy(&mut self, from: &str, rel: &str, why: &str) -> Result<()> {
        if !self.dry_run {
            let dst = self.path(rel);
            if let Some(d) = dst.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::copy(self.path(from), &dst)
                .with_context(|| format!("copying {} to {}", abs(from), abs(rel)))?;
        }
        self.list.push(Change {
            path: abs(rel),
            action: Action::Created,
            original: None,
            why: why.into(),
        });
        Ok(())
    }

    /// Keeps `rel` (an initramfs image about to be regenerated) as `<rel>.pre-restore` and
    /// records that a tool rewrote it.
    pub fn regenerated(&mut self, rel: &str, why: &str) -> Result<Option<String>> {
        let keep = format!("{}.pre-restore", rel.trim_start_matches('/'));
        let existed = self.path(rel).exists();
        if !self.dry_run && existed && !self.path(&keep).exists() {
            std::fs::copy(self.path(rel), self.path(&keep))
                .with_context(|| format!("keeping {} as {}", abs(rel), abs(&keep)))?;
        }
        let original = existed.then(|| abs(&keep));
        if let Some(c) = self.list.iter_mut().find(|c| c.path == abs(rel)) {
            c.why = why.into();
            return Ok(original);
        }
        self.list.push(Change {
            path: abs(rel),
            action: if existed {
                Action::Changed
            } else {
                Action::Created
            },
            original: original.clone(),
            why: why.into(),
        });
        Ok(original)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn originals_are_kept_once_and_outside_config_dirs() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/fstab"), "old\n").unwrap();
        std::fs::set_permissions(
            root.join("etc/fstab"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let mut c = Changes::new(root, false);
        c.write("/etc/fstab", "new\n", "test").unwrap();
        c.write("etc/fstab", "newer\n", "test").unwrap();
        c.write("etc/fstab", "newer\n", "unchanged: not recorded")
            .unwrap();
        assert_eq!(c.list.len(), 2);
        assert_eq!(
            std::fs::read_to_string(root.join(BACKUP_DIR).join("etc/fstab")).unwrap(),
            "old\n"
        );
        let mode = std::fs::metadata(root.join("etc/fstab"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        c.write("etc/new.conf", "x", "test").unwrap();
        assert_eq!(c.list[2].action, Action::Created);
        let mut dry = Changes::new(root, true);
        dry.write("etc/fstab", "dry\n", "test").unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/fstab")).unwrap(),
            "newer\n"
        );
    }
}
