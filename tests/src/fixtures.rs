//! The fixture builder: deterministic server disk images for tests, the demo and benchmarks.
//!
//! A fixture is described by a [`DiskSpec`] (partition table, partitions, and in each a
//! filesystem with a tree of generated files). Building never mounts anything: each filesystem
//! is made in its own file (`mkfs.ext4 -d`, `mkfs.fat` + `mmd`/`mcopy`, `mkntfs` + `ntfscp`,
//! `mkswap`), the partition table is written on the disk image with `sfdisk` (512-byte sectors) or
//! `fdisk -b 4096` loading the same script (4096-byte sectors, no loop device), and each
//! filesystem is copied into place with sparse positional writes.
//!
//! Images are cached as `<workspace>/target/fixtures/<name>-<recipe hash>.img` with a
//! `.json` description next to it ([`Fixture`]); `BMR_FIXTURES_DIR` overrides the directory.
//! The hash covers the recipe, the builder version and the bytes of copied host files, so a
//! changed recipe builds a new image. Builds go to a temporary directory and are renamed into
//! place (image first, description last) under a per-fixture `flock`, so concurrent tests and
//! processes are safe and a crashed build leaves no half image behind.
//!
//! Free space is not zeros: each filesystem's partition is filled with binary-like garbage
//! before `mkfs`, so the free blocks of every fixture hold old-looking data, as on a used disk
//! (and so do ext4's uninitialised bitmaps of `BLOCK_UNINIT` groups).
//!
//! Determinism: fixed UUIDs, labels, volume ids and hash seeds; `E2FSPROGS_FAKE_TIME` and
//! `SOURCE_DATE_EPOCH` for tool timestamps; file contents from a seeded generator. ext4 inode
//! generation numbers and NTFS timestamps still vary between builds: the file contents, layout and
//! identifiers do not.

use crate::oracle;
use crate::prng::Content;
use crate::util::{exec, exec_with_stdin, Output};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Bump when the builder's output changes for the same recipe: old cache entries are ignored.
pub const BUILDER_VERSION: u32 = 3;

/// The timestamp every fixture file and filesystem carries (2023-11-14T22:13:20Z).
pub const EPOCH: u64 = 1_700_000_000;

const MIB: u64 = 1 << 20;

/// How long one tool may run before the build fails (mkfs of a 4 GiB tree included).
const TOOL_TIMEOUT: Duration = Duration::from_secs(1800);

// ---------------------------------------------------------------------------------------------
// Recipes

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Fat12,
    Fat16,
    Fat32,
    Ntfs,
    Swap,
}

impl FsKind {
    pub fn is_ext(self) -> bool {
        matches!(self, FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4)
    }
    pub fn is_fat(self) -> bool {
        matches!(self, FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32)
    }
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Fat12 => "fat12",
            FsKind::Fat16 => "fat16",
            FsKind::Fat32 => "fat32",
            FsKind::Ntfs => "ntfs",
            FsKind::Swap => "swap",
        }
    }
}

/// A file of a generated tree, path relative to the filesystem root (`/` separated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub content: Content,
}

fn entry(path: impl Into<String>, content: Content) -> Entry {
    Entry {
        path: path.into(),
        content,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FsSpec {
    /// ext2/3/4 made with `mke2fs -d`. `deleted` is written, then removed with `debugfs rm`,
    /// which frees its blocks without zeroing them.
    Ext {
        kind: FsKind,
        block_size: u32,
        uuid: String,
        label: String,
        /// Extra `-O` features (e.g. `64bit`).
        features: Vec<String>,
        tree: Vec<Entry>,
        deleted: Option<Entry>,
    },
    /// FAT12/16/32 made with `mkfs.fat`, filled with `mmd`/`mcopy`.
    Fat {
        bits: u8,
        sector_size: u32,
        /// Sectors per cluster; 0 lets mkfs.fat choose.
        cluster_sectors: u32,
        label: String,
        volume_id: u32,
        tree: Vec<Entry>,
    },
    /// NTFS made with `mkntfs -Q`, filled with `ntfscp` (files in the root directory only).
    Ntfs {
        label: String,
        cluster_size: u32,
        tree: Vec<Entry>,
    },
    /// Linux swap whose pages after the header are non-zero garbage.
    Swap {
        uuid: String,
        label: String,
        garbage_seed: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartSpec {
    /// Linux partition number (MBR logicals from 5).
    pub number: u32,
    /// First sector and length, in logical sectors.
    pub start: u64,
    pub sectors: u64,
    /// GPT: partition type GUID, unique GUID, name, attributes as sfdisk spells them.
    pub gpt_type: Option<String>,
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub attrs: Option<String>,
    /// MBR: partition type byte and boot flag.
    pub mbr_type: Option<u8>,
    pub bootable: bool,
    pub fs: Option<FsSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TableSpec {
    Gpt { disk_guid: String },
    Mbr { signature: u32 },
}

/// A whole fixture disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub name: String,
    pub sector_size: u32,
    pub size: u64,
    pub table: TableSpec,
    pub parts: Vec<PartSpec>,
}

// ---------------------------------------------------------------------------------------------
// What a build returns

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Path relative to the filesystem root.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartInfo {
    pub number: u32,
    /// Byte offset and size on the disk.
    pub offset: u64,
    pub size: u64,
    /// An MBR extended container (no filesystem of its own).
    pub extended: bool,
    pub fs: Option<FsKind>,
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub block_size: u32,
    /// Bytes the filesystem's own allocation data marks used (independent oracle: dumpe2fs,
    /// the FAT, `$Bitmap`); the header page for swap.
    pub used_bytes: u64,
    /// Regular files written, with their SHA-256.
    pub files: Vec<FileInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedInfo {
    pub partition: u32,
    pub path: String,
    /// The file was this marker repeated: its free blocks still hold it in the image.
    pub marker: String,
    pub len: u64,
}

/// A built fixture: the image and everything tests need to check a copy of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fixture {
    pub name: String,
    pub image: PathBuf,
    pub sector_size: u32,
    pub size: u64,
    pub table: TableSpec,
    pub partitions: Vec<PartInfo>,
    pub deleted: Option<DeletedInfo>,
    pub recipe_hash: String,
    /// How long the build took when it was built (the cache makes later calls instant).
    pub build_seconds: f64,
}

impl Fixture {
    pub fn partition(&self, number: u32) -> &PartInfo {
        self.partitions
            .iter()
            .find(|p| p.number == number)
            .unwrap_or_else(|| panic!("fixture {} has no partition {number}", self.name))
    }

    /// Partitions holding a filesystem of `kind`.
    pub fn with_fs(&self, kind: FsKind) -> impl Iterator<Item = &PartInfo> {
        self.partitions.iter().filter(move |p| p.fs == Some(kind))
    }

    /// A private sparse copy of the image (tests that modify the disk must use one).
    pub fn copy_to(&self, dst: &Path) -> Result<()> {
        crate::util::sparse_copy(&self.image, dst)
    }
}

// ---------------------------------------------------------------------------------------------
// Recipe builders: short spellings of the entries and partitions the named fixtures are made of

/// A tree file of English-like text lines ([`Content::Text`]).
pub(crate) fn text(path: impl Into<String>, seed: u64, len: u64) -> Entry {
    entry(path, Content::Text { seed, len })
}

/// A tree file of binary-like data ([`Content::Binary`]).
pub(crate) fn binary(path: impl Into<String>, seed: u64, len: u64) -> Entry {
    entry(path, Content::Binary { seed, len })
}

/// A tree file of incompressible bytes ([`Content::Random`]).
pub(crate) fn random(path: impl Into<String>, seed: u64, len: u64) -> Entry {
    entry(path, Content::Random { seed, len })
}

/// A tree file holding `text` as it is ([`Content::Literal`]).
pub(crate) fn literal(path: impl Into<String>, text: impl Into<String>) -> Entry {
    entry(path, Content::Literal { text: text.into() })
}

impl PartSpec {
    /// A GPT partition with its type GUID, unique GUID and name; no attributes, no filesystem.
    pub fn gpt(
        number: u32,
        start: u64,
        sectors: u64,
        gpt_type: &str,
        uuid: impl Into<String>,
        name: &str,
    ) -> PartSpec {
        PartSpec {
            number,
            start,
            sectors,
            gpt_type: Some(gpt_type.into()),
            uuid: Some(uuid.into()),
            name: Some(name.into()),
            attrs: None,
            mbr_type: None,
            bootable: false,
            fs: None,
        }
    }

    /// A GPT EFI System Partition (type and name as installers make it) with no filesystem.
    pub fn esp(number: u32, start: u64, sectors: u64, uuid: impl Into<String>) -> PartSpec {
        PartSpec::gpt(
            number,
            start,
            sectors,
            GPT_ESP,
            uuid,
            "EFI System Partition",
        )
    }

    /// An MBR partition of type byte `mbr_type`, not bootable, with no filesystem.
    pub fn mbr(number: u32, start: u64, sectors: u64, mbr_type: u8) -> PartSpec {
        PartSpec {
            number,
            start,
            sectors,
            gpt_type: None,
            uuid: None,
            name: None,
            attrs: None,
            mbr_type: Some(mbr_type),
            bootable: false,
            fs: None,
        }
    }

    /// The same partition with GPT attributes `attrs` (as sfdisk spells them).
    pub fn with_attrs(self, attrs: &str) -> PartSpec {
        PartSpec {
            attrs: Some(attrs.into()),
            ..self
        }
    }

    /// The same partition with the MBR boot flag set.
    pub fn with_boot_flag(self) -> PartSpec {
        PartSpec {
            bootable: true,
            ..self
        }
    }

    /// The same partition holding the filesystem `fs`.
    pub fn with_fs(self, fs: FsSpec) -> PartSpec {
        PartSpec {
            fs: Some(fs),
            ..self
        }
    }
}

impl FsSpec {
    /// A FAT`bits` filesystem of `sector_size`-byte sectors (`cluster_sectors` 0: mkfs.fat's
    /// choice) holding `tree`.
    pub fn fat(
        bits: u8,
        sector_size: u32,
        cluster_sectors: u32,
        label: &str,
        volume_id: u32,
        tree: Vec<Entry>,
    ) -> FsSpec {
        FsSpec::Fat {
            bits,
            sector_size,
            cluster_sectors,
            label: label.into(),
            volume_id,
            tree,
        }
    }

    /// An ext2/3/4 filesystem holding `tree`, with mke2fs's default features and no deleted file.
    pub fn ext(kind: FsKind, block_size: u32, uuid: &str, label: &str, tree: Vec<Entry>) -> FsSpec {
        FsSpec::Ext {
            kind,
            block_size,
            uuid: uuid.into(),
            label: label.into(),
            features: vec![],
            tree,
            deleted: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The named fixtures

/// GPT partition type GUIDs of the fixtures (the sample servers of [`crate::boot`] use them too).
pub const GPT_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const GPT_LINUX_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const GPT_LINUX_FS: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const GPT_LINUX_SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";

/// Marker of the deleted file in `gpt_server`'s ext4.
pub const DELETED_MARKER: &str = "BMR-FIXTURE-DELETED-FILE-7f3a9c21-";

/// Names the `fixture` binary and `by_name` know.
pub const NAMES: &[&str] = &["gpt_server", "mbr_mixed", "gpt_4k", "big_mixed"];

/// Build (or fetch from the cache) the named fixture. `big_mixed` takes its defaults (4 GiB, 45%).
pub fn by_name(name: &str) -> Result<Fixture> {
    match name {
        "gpt_server" => gpt_server(),
        "mbr_mixed" => mbr_mixed(),
        "gpt_4k" => gpt_4k(),
        "big_mixed" => big_mixed(4 << 30, 0.45),
        other => bail!("unknown fixture {other:?} (known: {})", NAMES.join(", ")),
    }
}

fn host_binaries() -> Vec<Entry> {
    ["ls", "cp", "cat", "bash", "tar"]
        .iter()
        .filter(|b| Path::new(&format!("/usr/bin/{b}")).is_file())
        .map(|b| {
            entry(
                format!("usr/bin/{b}"),
                Content::Copy {
                    src: format!("/usr/bin/{b}"),
                },
            )
        })
        .collect()
}

/// The ext4 root of `gpt_server`: about 40% of 200 MiB with metadata.
fn server_root_tree() -> Vec<Entry> {
    let mut t = vec![
        literal("etc/hostname", "gpt-server\n"),
        literal(
            "etc/fstab",
            "UUID=0b4a3c1e-5a5a-4d22-8e33-000000000002 / ext4 errors=remount-ro 0 1\n\
             UUID=1A2B-3C4D /boot/efi vfat umask=0077 0 1\n\
             UUID=5b1f0c2d-5a5a-4e11-9d44-000000000003 none swap sw 0 0\n",
        ),
        literal("etc/motd", "BOOT-OK host=gpt-server\n"),
    ];
    t.extend(host_binaries());
    t.extend((0..40u64).map(|i| {
        let path = format!("etc/conf.d/service-{i:02}.conf");
        text(path, 100 + i, 2048 + i * 457)
    }));
    t.extend((0..20u64).map(|i| {
        let path = format!("usr/share/doc/package-{i:02}/README");
        text(path, 200 + i, 50_000 + i * 11_111)
    }));
    t.extend((0..5u64).map(|i| {
        let path = format!("usr/lib/x86_64-linux-gnu/libfixture-{i}.so.1");
        binary(path, 300 + i, MIB + i * 500_000)
    }));
    t.push(text("var/log/syslog", 400, 6 * MIB));
    t.push(text("var/log/syslog.1", 401, 2 * MIB + 12_345));
    t.extend((0..4u64).map(|i| {
        let path = format!("var/lib/data/random-{i:02}.bin");
        random(path, 500 + i, 4 * MIB)
    }));
    t.push(random("var/lib/data/odd-size.bin", 510, 1_500_001));
    t.push(random("var/lib/data/small.bin", 511, 777));
    t.push(entry(
        "var/lib/sparse.img",
        Content::Sparse {
            seed: 520,
            data: MIB,
            hole: 8 * MIB,
        },
    ));
    // duplicates of earlier files, byte for byte
    t.push(random("srv/dup/random-00.copy", 500, 4 * MIB));
    t.push(random("srv/dup/random-01.copy", 501, 4 * MIB));
    t.push(text("srv/dup/syslog.copy", 400, 6 * MIB));
    t.push(text("home/admin/notes.txt", 600, 100_000));
    t.push(literal("home/admin/empty", String::new()));
    t
}

fn esp_tree() -> Vec<Entry> {
    vec![
        binary("EFI/BOOT/BOOTX64.EFI", 10, 950_000),
        binary("EFI/debian/shimx64.efi", 10, 950_000),
        binary("EFI/debian/grubx64.efi", 11, 2 * MIB),
        literal(
            "EFI/debian/grub.cfg",
            "search.fs_uuid 0b4a3c1e-5a5a-4d22-8e33-000000000002 root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n",
        ),
        random("EFI/debian/fwupdx64.efi", 12, 3 * MIB),
        text("loader/entries/debian.conf", 13, 3_000),
    ]
}

/// GPT, 512-byte sectors, 320 MiB: FAT32 ESP (64 MiB), ext4 root (200 MiB, ~40% used, with a
/// deleted file whose blocks still hold [`DELETED_MARKER`]), swap (32 MiB of garbage after the
/// header), free space at the end.
pub fn gpt_server_spec() -> DiskSpec {
    let root = FsSpec::Ext {
        kind: FsKind::Ext4,
        block_size: 4096,
        uuid: "0b4a3c1e-5a5a-4d22-8e33-000000000002".into(),
        label: "root".into(),
        features: vec!["64bit".into()],
        tree: server_root_tree(),
        deleted: Some(entry(
            "var/tmp/deleted-secret.bin",
            Content::Pattern {
                marker: DELETED_MARKER.into(),
                len: 3 * MIB,
            },
        )),
    };
    let swap = FsSpec::Swap {
        uuid: "5b1f0c2d-5a5a-4e11-9d44-000000000003".into(),
        label: "swap".into(),
        garbage_seed: 700,
    };
    DiskSpec {
        name: "gpt_server".into(),
        sector_size: 512,
        size: 320 * MIB,
        table: TableSpec::Gpt {
            disk_guid: "B3E0C1A2-5F6D-4E7A-9C1B-2D3E4F506070".into(),
        },
        parts: vec![
            PartSpec::esp(
                1,
                2048,
                64 * MIB / 512,
                "B3E0C1A2-0001-4E7A-9C1B-2D3E4F506071",
            )
            .with_fs(FsSpec::fat(32, 512, 1, "ESP", 0x1A2B_3C4D, esp_tree())),
            PartSpec::gpt(
                2,
                2048 + 64 * MIB / 512,
                200 * MIB / 512,
                GPT_LINUX_ROOT_X86_64,
                "B3E0C1A2-0002-4E7A-9C1B-2D3E4F506072",
                "root",
            )
            .with_attrs("LegacyBIOSBootable")
            .with_fs(root),
            PartSpec::gpt(
                3,
                2048 + 264 * MIB / 512,
                32 * MIB / 512,
                GPT_LINUX_SWAP,
                "B3E0C1A2-0003-4E7A-9C1B-2D3E4F506073",
                "swap",
            )
            .with_attrs("GUID:63")
            .with_fs(swap),
        ],
    }
}

pub fn gpt_server() -> Result<Fixture> {
    build(&gpt_server_spec())
}

/// MBR (signature 0x12345678), 512-byte sectors, 256 MiB: primary FAT16 (48 MiB, bootable),
/// primary NTFS (96 MiB), extended container with one logical ext2 (64 MiB, 1 KiB blocks).
pub fn mbr_mixed_spec() -> DiskSpec {
    let fat_tree = vec![
        literal("AUTOEXEC.BAT", "@ECHO OFF\r\nPATH C:\\DOS\r\n"),
        binary("DOS/COMMAND.COM", 20, 93_000),
        text("DOS/Long File Name.txt", 21, 40_000),
        random("DATA/archive.bin", 22, 5 * MIB),
        text("DATA/sub/dir/report.txt", 23, 2 * MIB),
        binary("DATA/sub/tool.exe", 24, 1_234_567),
    ];
    let ntfs_tree = vec![
        text("readme.txt", 30, 20_000),
        random("data.bin", 31, 8 * MIB),
        random("data-copy.bin", 31, 8 * MIB),
        binary("report.doc", 32, 3 * MIB),
        text("log.txt", 33, 5 * MIB),
        literal("tiny.txt", "resident in the MFT record\n"),
    ];
    let mut ext_tree = vec![
        literal("etc/hostname", "mbr-mixed\n"),
        text("var/log/messages", 40, 6 * MIB),
        random("opt/app/blob.bin", 41, 6 * MIB + 333),
        binary("opt/app/lib.so", 42, 3 * MIB),
    ];
    ext_tree.extend((0..30u64).map(|i| {
        let path = format!("home/user{}/file-{i:02}.txt", i % 3);
        text(path, 50 + i, 1000 + i * 3_000)
    }));
    let fat = FsSpec::fat(16, 512, 0, "DOSDATA", 0x0DD5_F00D, fat_tree);
    let ntfs = FsSpec::Ntfs {
        label: "DATA".into(),
        cluster_size: 4096,
        tree: ntfs_tree,
    };
    let ext2_uuid = "6c2d1e0f-5a5a-4c33-8b55-000000000005";
    let ext2 = FsSpec::ext(FsKind::Ext2, 1024, ext2_uuid, "data2", ext_tree);
    DiskSpec {
        name: "mbr_mixed".into(),
        sector_size: 512,
        size: 256 * MIB,
        table: TableSpec::Mbr {
            signature: 0x1234_5678,
        },
        parts: vec![
            PartSpec::mbr(1, 2048, 48 * MIB / 512, 0x0e)
                .with_boot_flag()
                .with_fs(fat),
            PartSpec::mbr(2, 2048 + 48 * MIB / 512, 96 * MIB / 512, 0x07).with_fs(ntfs),
            PartSpec::mbr(3, 2048 + 144 * MIB / 512, 65 * MIB / 512, 0x05),
            PartSpec::mbr(5, 2048 + 145 * MIB / 512, 64 * MIB / 512, 0x83).with_fs(ext2),
        ],
    }
}

pub fn mbr_mixed() -> Result<Fixture> {
    build(&mbr_mixed_spec())
}

/// GPT for 4096-byte logical sectors, 384 MiB: FAT32 ESP with 4 KiB sectors (260 MiB, the
/// smallest FAT32 that has 65525 clusters of 4 KiB, as Windows makes on 4Kn disks) and ext4
/// (96 MiB, 4 KiB blocks).
pub fn gpt_4k_spec() -> DiskSpec {
    let mut ext_tree = vec![
        literal("etc/hostname", "gpt-4k\n"),
        text("var/log/syslog", 80, 5 * MIB),
        random("var/lib/blob.bin", 81, 10 * MIB + 4097),
        binary("usr/lib/libx.so", 82, 4 * MIB),
    ];
    ext_tree.extend(host_binaries());
    let esp = FsSpec::fat(32, 4096, 1, "ESP4K", 0x4096_4096, esp_tree());
    let ext4_uuid = "7d3e2f10-4096-4d44-9c66-000000000002";
    let ext4 = FsSpec::ext(FsKind::Ext4, 4096, ext4_uuid, "data4k", ext_tree);
    DiskSpec {
        name: "gpt_4k".into(),
        sector_size: 4096,
        size: 384 * MIB,
        table: TableSpec::Gpt {
            disk_guid: "C4C4C4C4-4096-4B4B-8A8A-000000004096".into(),
        },
        parts: vec![
            PartSpec::esp(
                1,
                256,
                260 * MIB / 4096,
                "C4C4C4C4-4096-4B4B-8A8A-000000000001",
            )
            .with_fs(esp),
            PartSpec::gpt(
                2,
                256 + 260 * MIB / 4096,
                96 * MIB / 4096,
                GPT_LINUX_FS,
                "C4C4C4C4-4096-4B4B-8A8A-000000000002",
                "data",
            )
            .with_fs(ext4),
        ],
    }
}

pub fn gpt_4k() -> Result<Fixture> {
    build(&gpt_4k_spec())
}

/// A realistic big disk for benchmarks: GPT, one ext4 partition over the disk, filled to about
/// `used_fraction` with text (logs, configs), binary-like files, random data and duplicates.
pub fn big_mixed_spec(size: u64, used_fraction: f64) -> DiskSpec {
    let size = size.max(64 * MIB) / MIB * MIB;
    let part_sectors = (size - 2 * MIB) / 512;
    // mke2fs metadata: inode tables (one 256-byte inode per 16 KiB) and the journal
    let part_bytes = part_sectors * 512;
    let metadata = part_bytes / 64 + (part_bytes / 64).min(128 * MIB).min(part_bytes / 32);
    let target =
        ((part_bytes as f64 * used_fraction.clamp(0.0, 0.95)) as u64).saturating_sub(metadata);
    let mut tree = Vec::new();
    let mut g = crate::prng::Prng::new(0xB16_0000 ^ size ^ (used_fraction * 1000.0) as u64);
    let mut filled = 0u64;
    let mut seed = 1_000_000u64;
    let mut dups: Vec<Content> = Vec::new();
    let mut by_kind = [0u64; 4];
    let mut n = 0u64;
    while filled < target {
        n += 1;
        seed += 1;
        let left = target - filled;
        let roll = g.below(4 * MIB);
        // the kind furthest below its share of the bytes so far: text 30%, binary 15%,
        // random 35%, duplicates 20%
        let shares = [0.30, 0.15, 0.35, 0.20];
        let kind = (0..4)
            .filter(|&k| k != 3 || !dups.is_empty())
            .max_by_key(|&k| {
                ((shares[k] * (filled + MIB) as f64 - by_kind[k] as f64) as i64)
                    .saturating_add(roll as i64)
            })
            .expect("a kind");
        // sizes: 75% small (0.5-32 KiB), 20% medium (32 KiB-2 MiB), 5% large (2-48 MiB)
        let size_roll = g.below(100);
        let len = if size_roll < 75 {
            512 + g.below(32 << 10)
        } else if size_roll < 95 {
            (32 << 10) + g.below(2 * MIB)
        } else {
            2 * MIB + g.below(46 * MIB)
        }
        .min(left.max(1));
        let (path, content) = match kind {
            0 => (
                format!("var/log/app{}/log-{n:06}.txt", n % 7),
                Content::Text { seed, len },
            ),
            1 => (
                format!("usr/lib/pkg{}/lib-{n:06}.so", n % 13),
                Content::Binary { seed, len },
            ),
            2 => (
                format!("var/lib/data{}/blob-{n:06}.bin", n % 5),
                Content::Random { seed, len },
            ),
            _ => (
                format!("srv/backup/copy-{n:06}.dup"),
                dups[g.below(dups.len() as u64) as usize].clone(),
            ),
        };
        if kind != 3 && content.len() >= 64 * 1024 && g.below(3) == 0 {
            dups.push(content.clone());
        }
        by_kind[kind] += content.len();
        filled += content.len().div_ceil(4096) * 4096;
        tree.push(entry(path, content));
    }
    tree.push(literal("etc/hostname", "big-mixed\n"));
    let ext4_uuid = "b16b16b1-0000-4b16-8b16-000000000003";
    let ext4 = FsSpec::ext(FsKind::Ext4, 4096, ext4_uuid, "bigdata", tree);
    let part_uuid = "B1B1B1B1-0000-4B1B-9B1B-000000000002";
    DiskSpec {
        name: format!(
            "big_mixed-{}M-{}",
            size / MIB,
            (used_fraction * 100.0).round() as u32
        ),
        sector_size: 512,
        size,
        table: TableSpec::Gpt {
            disk_guid: "B1B1B1B1-0000-4B1B-9B1B-000000000001".into(),
        },
        parts: vec![
            PartSpec::gpt(1, 2048, part_sectors, GPT_LINUX_FS, part_uuid, "data").with_fs(ext4),
        ],
    }
}

pub fn big_mixed(size: u64, used_fraction: f64) -> Result<Fixture> {
    build(&big_mixed_spec(size, used_fraction))
}

// ---------------------------------------------------------------------------------------------
// The builder

/// Where fixtures are cached: `$BMR_FIXTURES_DIR` or `<workspace>/target/fixtures`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("BMR_FIXTURES_DIR") {
        Some(d) => PathBuf::from(d),
        None => crate::util::Workspace::root()
            .join("target")
            .join("fixtures"),
    }
}

/// The recipe hash: the spec, the builder version and the bytes of every copied host file.
pub fn recipe_hash(spec: &DiskSpec) -> Result<String> {
    let mut h = sha2::Sha256::new();
    h.update(format!("bmr-fixture-builder-v{BUILDER_VERSION}\n"));
    h.update(serde_json::to_vec(spec).expect("spec serialises"));
    for p in &spec.parts {
        let tree: &[Entry] = match &p.fs {
            Some(FsSpec::Ext { tree, .. })
            | Some(FsSpec::Fat { tree, .. })
            | Some(FsSpec::Ntfs { tree, .. }) => tree,
            _ => &[],
        };
        for e in tree {
            if let Content::Copy { src } = &e.content {
                let bytes = fs::read(src).with_context(|| format!("reading {src}"))?;
                h.update(sha2::Sha256::digest(&bytes));
            }
        }
    }
    Ok(hex::encode(h.finalize())[..16].to_string())
}

/// Build `spec`, or return the cached build.
pub fn build(spec: &DiskSpec) -> Result<Fixture> {
    check_spec(spec)?;
    let hash = recipe_hash(spec)?;
    let dir = cache_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = format!("{}-{hash}", spec.name);
    let img = dir.join(format!("{stem}.img"));
    let json = dir.join(format!("{stem}.json"));
    if let Some(f) = load_cached(&img, &json) {
        return Ok(f);
    }
    let lock = File::create(dir.join(format!("{stem}.lock")))
        .with_context(|| format!("creating the lock file in {}", dir.display()))?;
    // SAFETY: flock on a file descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!("locking {stem}.lock: {}", std::io::Error::last_os_error());
    }
    if let Some(f) = load_cached(&img, &json) {
        return Ok(f);
    }
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let work = dir.join(format!(".build-{stem}-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let _cleanup = RemoveOnDrop(work.clone());
    let start = Instant::now();
    let mut fixture =
        build_in(spec, &work).with_context(|| format!("building fixture {}", spec.name))?;
    fixture.recipe_hash = hash;
    fixture.build_seconds = start.elapsed().as_secs_f64();
    fixture.image = img.clone();
    let tmp_json = work.join("fixture.json");
    fs::write(
        &tmp_json,
        serde_json::to_vec_pretty(&fixture).expect("fixture serialises"),
    )?;
    fs::rename(work.join("disk.img"), &img)
        .with_context(|| format!("renaming the image to {}", img.display()))?;
    fs::rename(&tmp_json, &json)
        .with_context(|| format!("renaming the description to {}", json.display()))?;
    Ok(fixture)
}

fn load_cached(img: &Path, json: &Path) -> Option<Fixture> {
    let bytes = fs::read(json).ok()?;
    let mut f: Fixture = serde_json::from_slice(&bytes).ok()?;
    let meta = fs::metadata(img).ok()?;
    if meta.len() != f.size {
        return None;
    }
    f.image = img.to_path_buf();
    // descriptions written before FAT cluster sizes were recorded
    for p in f.partitions.iter_mut() {
        if p.fs.is_some_and(FsKind::is_fat) && p.block_size == 0 {
            p.block_size = oracle::fat_geometry_at(img, p.offset).ok()?.cluster_bytes as u32;
        }
    }
    Some(f)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn check_spec(spec: &DiskSpec) -> Result<()> {
    if !matches!(spec.sector_size, 512 | 4096) {
        bail!(
            "{}: sector size {} (512 or 4096)",
            spec.name,
            spec.sector_size
        );
    }
    let ss = spec.sector_size as u64;
    for p in &spec.parts {
        if (p.start + p.sectors) * ss > spec.size {
            bail!("{}: partition {} ends past the disk", spec.name, p.number);
        }
        if let Some(FsSpec::Ntfs { tree, .. }) = &p.fs {
            if let Some(e) = tree.iter().find(|e| e.path.contains('/')) {
                bail!(
                    "{}: NTFS files go in the root directory only ({})",
                    spec.name,
                    e.path
                );
            }
        }
    }
    Ok(())
}

/// Run a tool of the build; a missing tool or a failure is an error naming it.
fn tool(cmd: &mut std::process::Command) -> Result<Output> {
    tool_stdin(cmd, None)
}

fn tool_stdin(cmd: &mut std::process::Command, stdin: Option<Vec<u8>>) -> Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.env("LC_ALL", "C")
        .env("TZ", "UTC")
        .env("E2FSPROGS_FAKE_TIME", EPOCH.to_string())
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .env("MTOOLS_SKIP_CHECK", "1");
    let out = exec_with_stdin(cmd, TOOL_TIMEOUT, stdin).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}: the fixture builder needs `{program}` (package {})",
            package_of(&program)
        )
    })?;
    if !out.success() {
        bail!("{program} failed\n{}", out.describe());
    }
    Ok(out)
}

fn package_of(program: &str) -> &'static str {
    match program {
        "mkfs.ext4" | "mke2fs" | "debugfs" | "dumpe2fs" | "e2fsck" => "e2fsprogs",
        "mkfs.fat" | "fsck.fat" => "dosfstools",
        "mmd" | "mcopy" | "mdir" => "mtools",
        "mkntfs" | "ntfscp" | "ntfscat" | "ntfsfix" => "ntfs-3g",
        "mkswap" | "sfdisk" | "fdisk" | "blkid" => "util-linux / fdisk",
        "sgdisk" => "gdisk",
        _ => "?",
    }
}

/// Write `tree` under `root`; returns each file's info. Files and directories get [`EPOCH`] as
/// their modification time.
fn materialize(root: &Path, tree: &[Entry]) -> Result<Vec<FileInfo>> {
    let mut infos = Vec::new();
    for e in tree {
        let p = root.join(&e.path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let f = File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        let (sha256, size) =
            write_content(&f, &e.content).with_context(|| format!("writing {}", p.display()))?;
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH))?;
        infos.push(FileInfo {
            path: e.path.clone(),
            size,
            sha256,
        });
    }
    set_dir_times(root)?;
    Ok(infos)
}

/// Write `content` to the new file `f` (holes stay holes); returns its SHA-256 and size.
fn write_content(f: &File, content: &Content) -> std::io::Result<(String, u64)> {
    use std::os::unix::fs::FileExt;
    struct State {
        h: sha2::Sha256,
        pos: u64,
    }
    let st = std::cell::RefCell::new(State {
        h: sha2::Sha256::new(),
        pos: 0,
    });
    content.generate(
        &mut |b| {
            let mut s = st.borrow_mut();
            f.write_all_at(b, s.pos)?;
            s.h.update(b);
            s.pos += b.len() as u64;
            Ok(())
        },
        &mut |n| {
            let mut s = st.borrow_mut();
            let zeros = [0u8; 4096];
            let mut left = n;
            while left > 0 {
                let k = left.min(4096) as usize;
                s.h.update(&zeros[..k]);
                left -= k as u64;
            }
            s.pos += n;
            Ok(())
        },
    )?;
    let s = st.into_inner();
    f.set_len(s.pos)?;
    Ok((hex::encode(s.h.finalize()), s.pos))
}

fn set_dir_times(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            set_dir_times(&e.path())?;
        }
    }
    File::open(dir)?.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH))?;
    Ok(())
}

/// Seed of the garbage in filesystems' free space (plus the partition number).
pub const FREE_GARBAGE_SEED: u64 = 0xF2EE_0000;

/// Fill the whole file with binary-like garbage (compresses about 2x, like old file data).
fn write_garbage(path: &Path, seed: u64) -> Result<()> {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut pos = 0u64;
    Content::Binary { seed, len }
        .generate(
            &mut |b| {
                use std::os::unix::fs::FileExt;
                f.write_all_at(b, pos)?;
                pos += b.len() as u64;
                Ok(())
            },
            &mut |_| Ok(()),
        )
        .with_context(|| format!("filling {}", path.display()))?;
    Ok(())
}

fn new_sparse(path: &Path, len: u64) -> Result<()> {
    File::create(path)
        .and_then(|f| f.set_len(len))
        .with_context(|| format!("creating {}", path.display()))
}

fn build_in(spec: &DiskSpec, work: &Path) -> Result<Fixture> {
    let ss = spec.sector_size as u64;
    let disk = work.join("disk.img");
    new_sparse(&disk, spec.size)?;
    write_table(spec, &disk, work)?;
    let mut partitions = Vec::new();
    let mut deleted = None;
    for p in &spec.parts {
        let offset = p.start * ss;
        let size = p.sectors * ss;
        let mut info = PartInfo {
            number: p.number,
            offset,
            size,
            extended: matches!(p.mbr_type, Some(0x05 | 0x0f | 0x85)),
            fs: None,
            uuid: None,
            label: None,
            block_size: 0,
            used_bytes: 0,
            files: Vec::new(),
        };
        if let Some(fsspec) = &p.fs {
            let fsimg = work.join(format!("part{}.img", p.number));
            new_sparse(&fsimg, size)?;
            build_fs(spec, p, fsspec, &fsimg, work, &mut info, &mut deleted)?;
            let src = File::open(&fsimg)?;
            let dst = fs::OpenOptions::new().write(true).open(&disk)?;
            crate::util::copy_range_sparse(&src, 0, &dst, offset, size)
                .with_context(|| format!("copying partition {} into the disk", p.number))?;
            dst.sync_all()?;
            fs::remove_file(&fsimg)?;
        }
        partitions.push(info);
    }
    Ok(Fixture {
        name: spec.name.clone(),
        image: disk,
        sector_size: spec.sector_size,
        size: spec.size,
        table: spec.table.clone(),
        partitions,
        deleted,
        recipe_hash: String::new(),
        build_seconds: 0.0,
    })
}

/// The sfdisk script of the table (also loaded by `fdisk -b 4096` with its `I` command).
pub fn sfdisk_script(spec: &DiskSpec) -> String {
    let mut s = String::new();
    match &spec.table {
        TableSpec::Gpt { disk_guid } => {
            s.push_str(&format!(
                "label: gpt\nlabel-id: {disk_guid}\nunit: sectors\n\n"
            ));
        }
        TableSpec::Mbr { signature } => {
            s.push_str(&format!(
                "label: dos\nlabel-id: 0x{signature:08x}\nunit: sectors\n\n"
            ));
        }
    }
    for p in &spec.parts {
        let mut fields = vec![format!("start={}", p.start), format!("size={}", p.sectors)];
        if let Some(t) = &p.gpt_type {
            fields.push(format!("type={t}"));
        }
        if let Some(t) = p.mbr_type {
            fields.push(format!("type={t:x}"));
        }
        if let Some(u) = &p.uuid {
            fields.push(format!("uuid={u}"));
        }
        if let Some(n) = &p.name {
            fields.push(format!("name=\"{n}\""));
        }
        if let Some(a) = &p.attrs {
            fields.push(format!("attrs=\"{a}\""));
        }
        if p.bootable {
            fields.push("bootable".into());
        }
        s.push_str(&fields.join(", "));
        s.push('\n');
    }
    s
}

fn write_table(spec: &DiskSpec, disk: &Path, work: &Path) -> Result<()> {
    let script = sfdisk_script(spec);
    if spec.sector_size == 512 {
        tool_stdin(
            std::process::Command::new("sfdisk")
                .args(["--no-reread", "--no-tell-kernel", "-q", "--wipe", "never"])
                .arg(disk),
            Some(script.into_bytes()),
        )?;
    } else {
        // sfdisk of util-linux 2.38 cannot be told the sector size of an image file; fdisk can,
        // and loads the same script with its `I` command.
        let path = work.join("table.sfdisk");
        fs::write(&path, &script)?;
        let out = tool_stdin(
            std::process::Command::new("fdisk")
                .arg("-b")
                .arg(spec.sector_size.to_string())
                .args(["--wipe", "never"])
                .arg(disk),
            Some(format!("I\n{}\nw\n", path.display()).into_bytes()),
        )?;
        if !out.stdout.contains("Script successfully applied") {
            bail!("fdisk did not apply the table script\n{}", out.describe());
        }
    }
    // Read the table back with the same sector size and check every partition landed as asked.
    if spec.sector_size == 512 {
        let out = tool(std::process::Command::new("sfdisk").arg("--json").arg(disk))?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("parsing sfdisk --json\n{}", out.describe()))?;
        let parts = v["partitiontable"]["partitions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for p in &spec.parts {
            let found = parts.iter().any(|q| {
                q["start"].as_u64() == Some(p.start) && q["size"].as_u64() == Some(p.sectors)
            });
            if !found {
                bail!(
                    "partition {} not found at {}+{} after sfdisk: {}",
                    p.number,
                    p.start,
                    p.sectors,
                    out.stdout
                );
            }
        }
    } else {
        let out = tool(
            std::process::Command::new("fdisk")
                .arg("-b")
                .arg(spec.sector_size.to_string())
                .arg("-l")
                .arg(disk),
        )?;
        for p in &spec.parts {
            let want = format!("{} {}", p.start, p.start + p.sectors - 1);
            let found = out.stdout.lines().any(|l| {
                l.split_whitespace()
                    .skip(1)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
                    == want
            });
            if !found {
                bail!(
                    "partition {} not found at {} after fdisk -b {}:\n{}",
                    p.number,
                    want,
                    spec.sector_size,
                    out.stdout
                );
            }
        }
    }
    Ok(())
}

fn build_fs(
    spec: &DiskSpec,
    p: &PartSpec,
    fsspec: &FsSpec,
    fsimg: &Path,
    work: &Path,
    info: &mut PartInfo,
    deleted: &mut Option<DeletedInfo>,
) -> Result<()> {
    use std::process::Command;
    if !matches!(fsspec, FsSpec::Swap { .. }) {
        // A used disk's free space holds old data, not zeros: fill the partition with garbage
        // before making the filesystem (mkfs does not clear data blocks), so a snapshot that
        // stores free space, or a used-block map read wrong (uninitialised ext4 bitmaps of
        // BLOCK_UNINIT groups hold this garbage too), shows.
        write_garbage(fsimg, FREE_GARBAGE_SEED + p.number as u64)?;
    }
    match fsspec {
        FsSpec::Ext {
            kind,
            block_size,
            uuid,
            label,
            features,
            tree,
            deleted: del,
        } => {
            let root = work.join(format!("tree{}", p.number));
            fs::create_dir_all(&root)?;
            let mut all = tree.clone();
            if let Some(d) = del {
                all.push(d.clone());
            }
            let mut files = materialize(&root, &all)?;
            let mut cmd = Command::new("mke2fs");
            cmd.args(["-q", "-F", "-t", kind.name(), "-b"])
                .arg(block_size.to_string())
                .arg("-U")
                .arg(uuid)
                .arg("-L")
                .arg(label)
                .arg("-E")
                .arg(format!(
                    "hash_seed={uuid},root_owner=0:0,nodiscard,lazy_itable_init=0"
                ))
                .arg("-d")
                .arg(&root);
            if !features.is_empty() {
                cmd.arg("-O").arg(features.join(","));
            }
            tool(cmd.arg(fsimg))?;
            fs::remove_dir_all(&root)?;
            if let Some(d) = del {
                let out = tool(
                    Command::new("debugfs")
                        .arg("-w")
                        .arg("-R")
                        .arg(format!("rm /{}", d.path))
                        .arg(fsimg),
                )?;
                let errors: Vec<&str> = out
                    .stderr
                    .lines()
                    .filter(|l| !l.starts_with("debugfs "))
                    .collect();
                if !errors.is_empty() {
                    bail!("debugfs rm /{} failed: {}", d.path, errors.join("; "));
                }
                let Content::Pattern { marker, len } = &d.content else {
                    bail!("the deleted file must be a Pattern content");
                };
                if crate::util::find_in_file(fsimg, marker.as_bytes())?.is_none() {
                    bail!("the deleted file's blocks no longer hold its pattern");
                }
                files.retain(|f| f.path != d.path);
                *deleted = Some(DeletedInfo {
                    partition: p.number,
                    path: d.path.clone(),
                    marker: marker.clone(),
                    len: *len,
                });
            }
            let fsck = exec(
                Command::new("e2fsck").args(["-fn"]).arg(fsimg),
                TOOL_TIMEOUT,
            )?;
            if !fsck.success() {
                bail!("the new {} is not clean\n{}", kind.name(), fsck.describe());
            }
            info.fs = Some(*kind);
            info.uuid = Some(uuid.clone());
            info.label = Some(label.clone());
            info.block_size = *block_size;
            info.files = files;
        }
        FsSpec::Fat {
            bits,
            sector_size,
            cluster_sectors,
            label,
            volume_id,
            tree,
        } => {
            let mut cmd = Command::new("mkfs.fat");
            // --invariant first: it also sets the volume id, which a later -i overrides
            cmd.arg("--invariant")
                .arg("-F")
                .arg(bits.to_string())
                .arg("-S")
                .arg(sector_size.to_string())
                .arg("-n")
                .arg(label)
                .arg("-i")
                .arg(format!("{volume_id:08X}"))
                .arg("-h")
                .arg((p.start * spec.sector_size as u64 / *sector_size as u64).to_string());
            if *cluster_sectors > 0 {
                cmd.arg("-s").arg(cluster_sectors.to_string());
            }
            tool(cmd.arg(fsimg))?;
            let root = work.join(format!("tree{}", p.number));
            fs::create_dir_all(&root)?;
            let files = materialize(&root, tree)?;
            let mut dirs: Vec<String> = Vec::new();
            for e in tree {
                let parts: Vec<&str> = e.path.split('/').collect();
                for k in 1..parts.len() {
                    let d = parts[..k].join("/");
                    if !dirs.contains(&d) {
                        dirs.push(d);
                    }
                }
            }
            if !dirs.is_empty() {
                let mut cmd = Command::new("mmd");
                cmd.arg("-i").arg(fsimg);
                for d in &dirs {
                    cmd.arg(format!("::/{d}"));
                }
                tool(&mut cmd)?;
            }
            for e in tree {
                tool(
                    Command::new("mcopy")
                        .arg("-i")
                        .arg(fsimg)
                        .arg("-m")
                        .arg(root.join(&e.path))
                        .arg(format!("::/{}", e.path)),
                )?;
            }
            fs::remove_dir_all(&root)?;
            let fsck = exec(Command::new("fsck.fat").arg("-n").arg(fsimg), TOOL_TIMEOUT)?;
            if !fsck.success() {
                bail!("the new FAT{bits} is not clean\n{}", fsck.describe());
            }
            info.fs = Some(match bits {
                12 => FsKind::Fat12,
                16 => FsKind::Fat16,
                _ => FsKind::Fat32,
            });
            info.uuid = Some(format!(
                "{:04X}-{:04X}",
                volume_id >> 16,
                volume_id & 0xffff
            ));
            info.label = Some(label.clone());
            info.block_size = oracle::fat_geometry(fsimg)?.cluster_bytes as u32;
            info.files = files;
        }
        FsSpec::Ntfs {
            label,
            cluster_size,
            tree,
        } => {
            tool(
                Command::new("mkntfs")
                    .args(["-F", "-Q", "-q", "-T", "-H", "255", "-S", "63"])
                    .arg("-L")
                    .arg(label)
                    .arg("-p")
                    .arg(p.start.to_string())
                    .arg("-s")
                    .arg(spec.sector_size.to_string())
                    .arg("-c")
                    .arg(cluster_size.to_string())
                    .arg(fsimg),
            )?;
            let root = work.join(format!("tree{}", p.number));
            fs::create_dir_all(&root)?;
            let files = materialize(&root, tree)?;
            for e in tree {
                tool(
                    Command::new("ntfscp")
                        .args(["-f", "-q"])
                        .arg(fsimg)
                        .arg(root.join(&e.path))
                        .arg(format!("/{}", e.path)),
                )?;
            }
            fs::remove_dir_all(&root)?;
            let fsck = exec(Command::new("ntfsfix").arg("-n").arg(fsimg), TOOL_TIMEOUT)?;
            if !fsck.success() {
                bail!("the new NTFS is not clean\n{}", fsck.describe());
            }
            info.fs = Some(FsKind::Ntfs);
            info.label = Some(label.clone());
            info.block_size = *cluster_size;
            info.files = files;
        }
        FsSpec::Swap {
            uuid,
            label,
            garbage_seed,
        } => {
            {
                let mut f = fs::OpenOptions::new().write(true).open(fsimg)?;
                let size = p.sectors * spec.sector_size as u64;
                Content::Random {
                    seed: *garbage_seed,
                    len: size,
                }
                .generate(&mut |b| f.write_all(b), &mut |_| Ok(()))?;
                f.sync_all()?;
            }
            tool(
                Command::new("mkswap")
                    .arg("-U")
                    .arg(uuid)
                    .arg("-L")
                    .arg(label)
                    .arg(fsimg),
            )?;
            info.fs = Some(FsKind::Swap);
            info.uuid = Some(uuid.clone());
            info.label = Some(label.clone());
            info.block_size = 4096;
        }
    }
    if let Some(kind) = info.fs {
        info.used_bytes = oracle::used_bytes(kind, fsimg)?;
        // what blkid reads is what the recipe asked for
        let out = tool(
            Command::new("blkid")
                .args(["-p", "-o", "value", "-s", "UUID"])
                .arg(fsimg),
        )?;
        let found = out.stdout.trim().to_string();
        match &info.uuid {
            Some(u) if !u.eq_ignore_ascii_case(&found) => {
                bail!(
                    "partition {}: blkid reads UUID {found}, the recipe says {u}",
                    p.number
                )
            }
            Some(_) => {}
            None => info.uuid = Some(found),
        }
    }
    Ok(())
}
