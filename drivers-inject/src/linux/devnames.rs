//! Kernel device names (`/dev/sda2`, `/dev/vda1`, `/dev/nvme0n1p3`, `/dev/xvda1`,
//! `/dev/cciss/c0d0p1`) that the restored system names in fstab, crypttab, `resume=` and the
//! kernel command line: on other hardware they point elsewhere or nowhere. Each is read as
//! (disk number, partition number) of the source (disks are numbered in the order the kernel
//! named them, which is the snapshot's disk order), and rewritten to the `UUID=` (or
//! `PARTUUID=`) of the partition restored there, unless the same name still points to it.

use crate::volumes::Volume;

/// `(disk, partition)` that a kernel name meant on the source; partition 0 is the whole disk.
pub fn kernel_name(dev: &str) -> Option<(usize, u32)> {
    let n = dev.strip_prefix("/dev/")?;
    let letters = |s: &str| -> Option<usize> {
        // sda..sdz, sdaa.. as the kernel counts them.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_lowercase()) {
            return None;
        }
        let mut i = 0usize;
        for b in s.bytes() {
            i = i * 26 + (b - b'a' + 1) as usize;
        }
        Some(i - 1)
    };
    let split_digits = |s: &str| -> (String, String) {
        let cut = s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        (s[..cut].to_string(), s[cut..].to_string())
    };
    let part = |p: &str| -> Option<u32> {
        if p.is_empty() {
            Some(0)
        } else {
            p.parse().ok().filter(|&n| n > 0)
        }
    };
    for prefix in ["sd", "vd", "xvd", "hd"] {
        if let Some(rest) = n.strip_prefix(prefix) {
            let (l, p) = split_digits(rest);
            return Some((letters(&l)?, part(&p)?));
        }
    }
    // nvme<ctrl>n<ns>[p<part>], mmcblk<n>[p<part>], cciss/c<ctrl>d<disk>[p<part>]
    let numbered = |rest: &str, sep: char| -> Option<(usize, u32)> {
        let (d, p) = match rest.split_once(sep) {
            Some((d, p)) => (d, part(p)?),
            None => (rest, 0),
        };
        Some((d.parse().ok()?, p))
    };
    if let Some(rest) = n.strip_prefix("nvme") {
        let (ctrl, rest) = rest.split_once('n')?;
        let (_ns, p) = numbered(rest, 'p')?;
        return Some((ctrl.parse().ok()?, p));
    }
    if let Some(rest) = n.strip_prefix("mmcblk") {
        return numbered(rest, 'p');
    }
    if let Some(rest) = n.strip_prefix("cciss/c") {
        let (_c, rest) = rest.split_once('d')?;
        return numbered(rest, 'p');
    }
    None
}

/// What `dev` should become on the target: `Some(UUID=...)` when it names a source partition
/// that is now elsewhere, `None` when it is fine as it is (or is not a kernel name).
pub enum Rewrite {
    Keep,
    To(String),
    /// A kernel name with no restored partition behind it.
    Unknown,
}

pub fn rewrite(dev: &str, volumes: &[Volume]) -> Rewrite {
    let Some((disk, part)) = kernel_name(dev) else {
        return Rewrite::Keep;
    };
    let Some(v) = volumes.iter().find(|v| v.is_partition(disk, part)) else {
        return Rewrite::Unknown;
    };
    if v.device == dev {
        return Rewrite::Keep;
    }
    match (&v.uuid, &v.partuuid) {
        (Some(u), _) => Rewrite::To(format!("UUID={u}")),
        (None, Some(p)) => Rewrite::To(format!("PARTUUID={p}")),
        _ => Rewrite::Unknown,
    }
}

/// Rewrites field `field` (0-based) of every non-comment line of a whitespace-separated table
/// (fstab: 0, crypttab: 1), keeping the rest of each line byte for byte. Returns the new text,
/// what changed, and names that could not be resolved.
pub fn table(text: &str, field: usize, volumes: &[Volume]) -> (String, Vec<String>, Vec<String>) {
    let mut out = String::with_capacity(text.len());
    let (mut changed, mut unknown) = (Vec::new(), Vec::new());
    for line in text.split_inclusive('\n') {
        let body = line.trim_start();
        if body.starts_with('#') || body.trim().is_empty() {
            out.push_str(line);
            continue;
        }
        // Find the byte range of the field.
        let mut idx = 0;
        let mut range = None;
        let mut in_word = false;
        let mut start = 0;
        for (i, c) in line.char_indices() {
            if c.is_whitespace() {
                if in_word {
                    if idx == field {
                        range = Some((start, i));
                        break;
                    }
                    idx += 1;
                    in_word = false;
                }
            } else if !in_word {
                in_word = true;
                start = i;
            }
        }
        let Some((a, b)) = range else {
            out.push_str(line);
            continue;
        };
        match rewrite(&line[a..b], volumes) {
            Rewrite::To(new) => {
                changed.push(format!("{} -> {new}", &line[a..b]));
                out.push_str(&line[..a]);
                out.push_str(&new);
                out.push_str(&line[b..]);
            }
            Rewrite::Unknown => {
                unknown.push(line[a..b].to_string());
                out.push_str(line);
            }
            Rewrite::Keep => out.push_str(line),
        }
    }
    (out, changed, unknown)
}

/// Rewrites `root=`, `resume=` (and `RESUME=`) values that are kernel names, anywhere in `text`
/// (kernel command lines in /etc/default/grub, grub.cfg, BLS entries, /etc/kernel/cmdline,
/// initramfs-tools' resume file).
pub fn cmdline(text: &str, volumes: &[Volume]) -> (String, Vec<String>) {
    let mut out = String::with_capacity(text.len());
    let mut changed = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let hit = ["root=", "resume=", "RESUME="]
            .iter()
            .filter_map(|k| rest.find(k).map(|i| (i, k.len())))
            .filter(|(i, _)| {
                *i == 0
                    || !rest.as_bytes()[i - 1].is_ascii_alphanumeric()
                        && rest.as_bytes()[i - 1] != b'_'
            })
            .min();
        let Some((i, klen)) = hit else {
            out.push_str(rest);
            break;
        };
        let vstart = i + klen;
        let vend = rest[vstart..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .map_or(rest.len(), |e| vstart + e);
        out.push_str(&rest[..vstart]);
        match rewrite(&rest[vstart..vend], volumes) {
            Rewrite::To(new) => {
                changed.push(format!(
                    "{}{} -> {new}",
                    &rest[i..vstart],
                    &rest[vstart..vend]
                ));
                out.push_str(&new);
            }
            _ => out.push_str(&rest[vstart..vend]),
        }
        rest = &rest[vend..];
    }
    (out, changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vols() -> Vec<Volume> {
        let v = |disk, partition, device: &str, uuid: &str| Volume {
            disk,
            partition,
            device: device.into(),
            uuid: Some(uuid.into()),
            ..Default::default()
        };
        vec![
            v(0, 1, "/dev/nvme0n1p1", "ABCD-1234"),
            v(0, 2, "/dev/nvme0n1p2", "1111-root"),
            v(0, 3, "/dev/nvme0n1p3", "2222-swap"),
            v(1, 1, "/dev/sdb1", "3333-data"),
        ]
    }

    #[test]
    fn kernel_names() {
        assert_eq!(kernel_name("/dev/sda2"), Some((0, 2)));
        assert_eq!(kernel_name("/dev/vdb"), Some((1, 0)));
        assert_eq!(kernel_name("/dev/sdaa1"), Some((26, 1)));
        assert_eq!(kernel_name("/dev/xvda1"), Some((0, 1)));
        assert_eq!(kernel_name("/dev/nvme1n1p3"), Some((1, 3)));
        assert_eq!(kernel_name("/dev/nvme0n1"), Some((0, 0)));
        assert_eq!(kernel_name("/dev/mmcblk0p2"), Some((0, 2)));
        assert_eq!(kernel_name("/dev/cciss/c0d1p1"), Some((1, 1)));
        assert_eq!(kernel_name("/dev/mapper/vg-root"), None);
        assert_eq!(kernel_name("UUID=1234"), None);
        assert_eq!(kernel_name("/dev/sda0"), None);
    }

    #[test]
    fn fstab_keeps_everything_but_moved_names() {
        let fstab = "# /etc/fstab: static file system information.\n\
                     #/dev/vda9 /old ext4 defaults 0 0\n\
                     /dev/vda2\t/\text4\terrors=remount-ro 0 1\n\
                     /dev/vda1  /boot/efi vfat umask=0077 0 1\n\
                     UUID=2222-swap none swap sw 0 0\n\
                     /dev/sdb1 /data ext4 defaults,nofail 0 2\n\
                     /dev/vdc1 /gone ext4 defaults 0 2\n\
                     tmpfs /tmp tmpfs defaults 0 0\n";
        let (out, changed, unknown) = table(fstab, 0, &vols());
        assert_eq!(
            out,
            "# /etc/fstab: static file system information.\n\
             #/dev/vda9 /old ext4 defaults 0 0\n\
             UUID=1111-root\t/\text4\terrors=remount-ro 0 1\n\
             UUID=ABCD-1234  /boot/efi vfat umask=0077 0 1\n\
             UUID=2222-swap none swap sw 0 0\n\
             /dev/sdb1 /data ext4 defaults,nofail 0 2\n\
             /dev/vdc1 /gone ext4 defaults 0 2\n\
             tmpfs /tmp tmpfs defaults 0 0\n"
        );
        assert_eq!(changed.len(), 2);
        assert_eq!(unknown, ["/dev/vdc1"]);
        let crypttab = "cryptdata /dev/vda3 none luks\n";
        let (out, _, _) = table(crypttab, 1, &vols());
        assert_eq!(out, "cryptdata UUID=2222-swap none luks\n");
    }

    #[test]
    fn command_lines() {
        let grub = "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet resume=/dev/sda3\"\n\
                    GRUB_CMDLINE_LINUX=\"root=/dev/sda2 console=ttyS0 myroot=/dev/sda1\"\n";
        let (out, changed) = cmdline(grub, &vols());
        assert_eq!(
            out,
            "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet resume=UUID=2222-swap\"\n\
             GRUB_CMDLINE_LINUX=\"root=UUID=1111-root console=ttyS0 myroot=/dev/sda1\"\n"
        );
        assert_eq!(changed.len(), 2);
        let (out, _) = cmdline("RESUME=/dev/vda3\n", &vols());
        assert_eq!(out, "RESUME=UUID=2222-swap\n");
        let same = "linux /vmlinuz root=UUID=1111-root ro\n";
        assert_eq!(cmdline(same, &vols()).0, same);
    }
}
