//! Offline registry hives. Reads are our own: a small regf reader that follows only the cells
//! of the keys asked for and returns every value byte-exact (types and bytes as stored).
//! Writes go through hivex's C shell `hivexsh -w` (Debian `libhivex-bin`; no Perl, so it fits
//! in the boot image): `cd`, `add`, `setval` with every value as `hex:<type>:<bytes>` (so what
//! is written is exactly our bytes; `setval` replaces all of a key's values, so the key's other
//! values are read first and written back unchanged), `del`, and `commit` last, which is the
//! only write: a script that fails at any line leaves the file untouched.
//!
//! The `.reg` text functions ([`parse_export`], [`reg_text`]) stay for tests and tools: the
//! tests check every edit with an independent reader, `hivexregedit --export`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const REG_NONE: u32 = 0;
pub const REG_SZ: u32 = 1;
pub const REG_EXPAND_SZ: u32 = 2;
pub const REG_BINARY: u32 = 3;
pub const REG_DWORD: u32 = 4;
pub const REG_MULTI_SZ: u32 = 7;

/// A registry value's data. Strings are only decoded when re-encoding gives the same bytes, so
/// `from_raw(raw())` is exact; anything else stays [`Data::Raw`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum Data {
    #[serde(rename = "REG_SZ")]
    Sz(String),
    #[serde(rename = "REG_EXPAND_SZ")]
    ExpandSz(String),
    #[serde(rename = "REG_MULTI_SZ")]
    MultiSz(Vec<String>),
    #[serde(rename = "REG_DWORD")]
    Dword(u32),
    #[serde(rename = "REG_BINARY")]
    Binary(Vec<u8>),
    /// Any other type, or string types whose bytes are not canonical UTF-16LE.
    #[serde(rename = "raw")]
    Raw { kind: u32, bytes: Vec<u8> },
}

fn utf16z(s: &str) -> Vec<u8> {
    let mut v: Vec<u8> = s.encode_utf16().flat_map(u16::to_le_bytes).collect();
    v.extend_from_slice(&[0, 0]);
    v
}

fn from_utf16(b: &[u8]) -> Option<String> {
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

impl Data {
    /// The type and the bytes as the hive stores them.
    pub fn raw(&self) -> (u32, Vec<u8>) {
        match self {
            Data::Sz(s) => (REG_SZ, utf16z(s)),
            Data::ExpandSz(s) => (REG_EXPAND_SZ, utf16z(s)),
            Data::MultiSz(list) => {
                let mut v = Vec::new();
                for s in list {
                    v.extend(utf16z(s));
                }
                v.extend_from_slice(&[0, 0]);
                (REG_MULTI_SZ, v)
            }
            Data::Dword(d) => (REG_DWORD, d.to_le_bytes().to_vec()),
            Data::Binary(b) => (REG_BINARY, b.clone()),
            Data::Raw { kind, bytes } => (*kind, bytes.clone()),
        }
    }

    pub fn from_raw(kind: u32, bytes: Vec<u8>) -> Data {
        let string = |b: &[u8]| {
            b.strip_suffix(&[0, 0])
                .and_then(from_utf16)
                .filter(|s| !s.contains('\0'))
        };
        let decoded = match kind {
            REG_SZ => string(&bytes).map(Data::Sz),
            REG_EXPAND_SZ => string(&bytes).map(Data::ExpandSz),
            REG_MULTI_SZ => {
                let list = bytes.strip_suffix(&[0, 0]).and_then(from_utf16).map(|s| {
                    if s.is_empty() {
                        Vec::new()
                    } else {
                        s.trim_end_matches('\0')
                            .split('\0')
                            .map(str::to_string)
                            .collect()
                    }
                });
                list.map(Data::MultiSz)
            }
            REG_DWORD if bytes.len() == 4 => Some(Data::Dword(u32::from_le_bytes([
                bytes[0], bytes[1], bytes[2], bytes[3],
            ]))),
            REG_BINARY => Some(Data::Binary(bytes.clone())),
            _ => None,
        };
        match decoded {
            Some(d) if d.raw().1 == bytes => d,
            _ => Data::Raw { kind, bytes },
        }
    }

    /// The right-hand side of a `.reg` value line, as `hivexregedit --export` writes it.
    pub fn reg_text(&self) -> String {
        match self {
            Data::Dword(d) => format!("dword:{d:08x}"),
            other => {
                let (kind, bytes) = other.raw();
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                format!("hex({kind:x}):{}", hex.join(","))
            }
        }
    }

    /// The string of a REG_SZ or REG_EXPAND_SZ value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Data::Sz(s) | Data::ExpandSz(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_dword(&self) -> Option<u32> {
        match self {
            Data::Dword(d) => Some(*d),
            _ => None,
        }
    }

    /// The strings of a REG_MULTI_SZ value (a REG_SZ counts as a list of one).
    pub fn as_list(&self) -> Option<Vec<String>> {
        match self {
            Data::MultiSz(l) => Some(l.clone()),
            Data::Sz(s) => Some(vec![s.clone()]),
            _ => None,
        }
    }
}

/// One key of an export: its path as written (no leading `\`, "" for the root) and its
/// values by lowercase name (registry names compare case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Key {
    pub path: String,
    pub values: BTreeMap<String, (String, Data)>,
}

impl Key {
    pub fn get(&self, name: &str) -> Option<&Data> {
        self.values.get(&name.to_lowercase()).map(|(_, d)| d)
    }
}

/// A parsed export: keys by lowercase path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub keys: BTreeMap<String, Key>,
}

/// What differs between two snapshots of a hive.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Difference {
    KeyAdded(String),
    KeyRemoved(String),
    /// Key path, value name, before (None: added), after (None: removed).
    Value(String, String, Option<Data>, Option<Data>),
}

impl Snapshot {
    pub fn key(&self, path: &str) -> Option<&Key> {
        self.keys.get(&norm(path).to_lowercase())
    }

    pub fn value(&self, path: &str, name: &str) -> Option<&Data> {
        self.key(path)?.get(name)
    }

    /// Every difference from `self` to `after`, sorted; value differences of added and removed
    /// keys are listed too.
    pub fn diff(&self, after: &Snapshot) -> Vec<Difference> {
        let mut out = Vec::new();
        let empty = Key::default();
        for (lk, k) in &self.keys {
            if !after.keys.contains_key(lk) {
                out.push(Difference::KeyRemoved(k.path.clone()));
            }
        }
        for (lk, k) in &after.keys {
            if !self.keys.contains_key(lk) {
                out.push(Difference::KeyAdded(k.path.clone()));
            }
        }
        let all: std::collections::BTreeSet<&String> =
            self.keys.keys().chain(after.keys.keys()).collect();
        for lk in all {
            let a = self.keys.get(lk).unwrap_or(&empty);
            let b = after.keys.get(lk).unwrap_or(&empty);
            let path = if b.path.is_empty() && a.path.is_empty() {
                String::new()
            } else if after.keys.contains_key(lk) {
                b.path.clone()
            } else {
                a.path.clone()
            };
            let names: std::collections::BTreeSet<&String> =
                a.values.keys().chain(b.values.keys()).collect();
            for n in names {
                let va = a.values.get(n);
                let vb = b.values.get(n);
                if va.map(|v| &v.1) != vb.map(|v| &v.1) {
                    let name = vb.or(va).map(|v| v.0.clone()).unwrap_or_default();
                    out.push(Difference::Value(
                        path.clone(),
                        name,
                        va.map(|v| v.1.clone()),
                        vb.map(|v| v.1.clone()),
                    ));
                }
            }
        }
        out.sort();
        out
    }
}

/// A key path without leading or trailing `\`.
pub fn norm(path: &str) -> String {
    path.trim_matches('\\').to_string()
}

fn parse_quoted(s: &str) -> Option<(String, &str)> {
    let rest = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &rest[i + 1..])),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    None
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let digits: String = s
        .chars()
        .filter(|c| *c != ',' && !c.is_whitespace())
        .collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(digits.get(i..i + 2)?, 16).ok())
        .collect()
}

fn parse_data(s: &str) -> Option<Data> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("dword:") {
        return u32::from_str_radix(h.trim(), 16).ok().map(Data::Dword);
    }
    if let Some(h) = s.strip_prefix("hex:") {
        return parse_hex(h).map(|b| Data::from_raw(REG_BINARY, b));
    }
    if let Some(rest) = s.strip_prefix("hex(") {
        let (kind, h) = rest.split_once("):")?;
        let kind = u32::from_str_radix(kind, 16).ok()?;
        return parse_hex(h).map(|b| Data::from_raw(kind, b));
    }
    if let Some(rest) = s.strip_prefix("str(") {
        let (kind, q) = rest.split_once("):")?;
        let kind = u32::from_str_radix(kind, 16).ok()?;
        let (text, _) = parse_quoted(q)?;
        return Some(Data::from_raw(kind, utf16z(&text)));
    }
    if s.starts_with('"') {
        let (text, _) = parse_quoted(s)?;
        return Some(Data::Sz(text));
    }
    None
}

/// Text of a `.reg` file: UTF-16LE (with a BOM, as regedit writes it) or UTF-8.
pub fn decode_reg(bytes: &[u8]) -> String {
    match bytes {
        [0xFF, 0xFE, rest @ ..] => {
            let units: Vec<u16> = rest
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        [0xEF, 0xBB, 0xBF, rest @ ..] => String::from_utf8_lossy(rest).into_owned(),
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Parses `.reg` export text (`hivexregedit --export`, or regedit's own: CRLF, `\` line
/// continuations of long hex values, `@=` default values, plain `"..."` strings). Key paths
/// have `prefix` (`HKEY_LOCAL_MACHINE\SYSTEM`) stripped case-insensitively when they start
/// with it. Deletions (`[-key]`, `=-`) are not part of an export and are refused.
pub fn parse_export(text: &str, prefix: &str) -> Result<Snapshot> {
    let mut snap = Snapshot::default();
    let mut current: Option<String> = None;
    let mut lines = text.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let mut line = line.trim_end_matches('\r').to_string();
        while line.trim_end().ends_with('\\') && !line.starts_with('[') {
            let t = line.trim_end();
            line = t[..t.len() - 1].to_string();
            match lines.next() {
                Some((_, more)) => line.push_str(more.trim_end_matches('\r').trim_start()),
                None => break,
            }
        }
        let t = line.trim();
        if t.is_empty()
            || t.starts_with(';')
            || t.starts_with("Windows Registry Editor Version")
            || t.starts_with("REGEDIT")
        {
            continue;
        }
        let at = || format!("line {}: {t}", n + 1);
        if let Some(inner) = t.strip_prefix('[') {
            let Some(path) = inner.strip_suffix(']') else {
                bail!("export {}: unterminated key", at());
            };
            if path.starts_with('-') {
                bail!("export {}: a key deletion is not an export", at());
            }
            let p = strip_prefix_ci(path, prefix);
            let p = norm(p);
            snap.keys.entry(p.to_lowercase()).or_insert_with(|| Key {
                path: p.clone(),
                values: BTreeMap::new(),
            });
            current = Some(p.to_lowercase());
            continue;
        }
        let Some(key) = current.as_ref().and_then(|k| snap.keys.get_mut(k)) else {
            bail!("export {}: a value outside any key", at());
        };
        let (name, rest) = if let Some(r) = t.strip_prefix('@') {
            (String::new(), r)
        } else {
            parse_quoted(t).with_context(|| format!("export {}: bad value name", at()))?
        };
        let Some(rhs) = rest.trim_start().strip_prefix('=') else {
            bail!("export {}: no '=' after the value name", at());
        };
        if rhs.trim() == "-" {
            bail!("export {}: a value deletion is not an export", at());
        }
        let data = parse_data(rhs).with_context(|| format!("export {}: bad data", at()))?;
        key.values.insert(name.to_lowercase(), (name, data));
    }
    Ok(snap)
}

fn strip_prefix_ci<'a>(path: &'a str, prefix: &str) -> &'a str {
    if !prefix.is_empty()
        && path.len() >= prefix.len()
        && path.is_char_boundary(prefix.len())
        && path[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        &path[prefix.len()..]
    } else {
        path
    }
}

/// One change to a hive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Edit {
    /// Create the key (and its ancestors) if missing.
    Key {
        key: String,
    },
    Set {
        key: String,
        name: String,
        data: Data,
    },
    Delete {
        key: String,
        name: String,
    },
    /// Delete the key and everything below it.
    DeleteKey {
        key: String,
    },
}

impl Edit {
    pub fn key(&self) -> &str {
        match self {
            Edit::Key { key }
            | Edit::Set { key, .. }
            | Edit::Delete { key, .. }
            | Edit::DeleteKey { key } => key,
        }
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The `.reg` text `hivexregedit --merge --prefix <prefix>` applies for `edits`, in order.
pub fn reg_text(prefix: &str, edits: &[Edit]) -> String {
    let mut out = String::from("Windows Registry Editor Version 5.00\n\n");
    let full = |k: &str| {
        let k = norm(k);
        if k.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}\\{k}")
        }
    };
    let mut i = 0;
    while i < edits.len() {
        let key = norm(edits[i].key());
        if let Edit::DeleteKey { .. } = edits[i] {
            out.push_str(&format!("[-{}]\n\n", full(&key)));
            i += 1;
            continue;
        }
        // Every ancestor first: hivexregedit only creates a key whose parent exists.
        let parts: Vec<&str> = key.split('\\').filter(|p| !p.is_empty()).collect();
        for n in 1..parts.len() {
            out.push_str(&format!("[{}]\n\n", full(&parts[..n].join("\\"))));
        }
        out.push_str(&format!("[{}]\n", full(&key)));
        while i < edits.len()
            && norm(edits[i].key()).eq_ignore_ascii_case(&key)
            && !matches!(edits[i], Edit::DeleteKey { .. })
        {
            match &edits[i] {
                Edit::Set { name, data, .. } => {
                    let n = if name.is_empty() {
                        "@".to_string()
                    } else {
                        quote(name)
                    };
                    out.push_str(&format!("{n}={}\n", data.reg_text()));
                }
                Edit::Delete { name, .. } => {
                    let n = if name.is_empty() {
                        "@".to_string()
                    } else {
                        quote(name)
                    };
                    out.push_str(&format!("{n}=-\n"));
                }
                Edit::Key { .. } | Edit::DeleteKey { .. } => {}
            }
            i += 1;
        }
        out.push('\n');
    }
    out
}

/// A hive file and the registry prefix its keys live under (`HKEY_LOCAL_MACHINE\SYSTEM`).
#[derive(Debug, Clone)]
pub struct Hive {
    pub path: PathBuf,
    pub prefix: String,
}

/// The writer: hivex's C shell (Debian `libhivex-bin`), small enough for the boot image.
const WRITER: &str = "hivexsh";

fn writer_missing(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "{WRITER} not found: install hivex's tools (Debian: libhivex-bin; scripts/setup does, \
             the boot image carries it)"
        )
    } else {
        anyhow::Error::new(e).context(format!("running {WRITER}"))
    }
}

/// Where the hive bins start: cell offsets are relative to it.
const BINS: u64 = 0x1000;
/// The data of one big-data (`db`) segment.
const SEGMENT: usize = 16344;
/// The registry's own limit on key depth.
const MAX_DEPTH: usize = 512;
/// The smallest key cell (size field and the fixed part of an `nk`): a hive of `len` bytes
/// holds at most `len / NK_MIN` keys, so no subkey list is longer.
const NK_MIN: u64 = 80;

fn le16(b: &[u8], at: usize) -> Result<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .context("truncated hive cell")
}

fn le32(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .context("truncated hive cell")
}

/// A key or value name: Latin-1 when the cell says so (`compressed`), else UTF-16LE.
fn cell_name(raw: &[u8], compressed: bool) -> String {
    if compressed {
        raw.iter().map(|&b| b as char).collect()
    } else {
        let units: Vec<u16> = raw
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16_lossy(&units)
    }
}

fn same_name(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b) || a.to_lowercase() == b.to_lowercase()
}

/// A key cell (`nk`): its name and where its subkeys and values are.
struct Nk {
    name: String,
    subkeys: u32,
    subkey_list: u32,
    values: u32,
    value_list: u32,
}

/// A read-only view of a regf file, reading only the cells it follows. The reader is ours, not
/// hivex's: `hivexsh lsval` prints strings decoded (a missing terminator, an odd length or
/// non-UTF-16 bytes are lost), and `setval` replaces every value of a key, so rewriting a key
/// needs its other values byte-exact.
struct Regf {
    file: std::fs::File,
    len: u64,
    root: u32,
    path: PathBuf,
    /// Bytes of value names and data read so far: each lives in its own cells, so more than
    /// the file's size means cells listed twice (forged lists that would multiply memory).
    value_bytes: Cell<u64>,
}

impl Regf {
    fn open(path: &Path) -> Result<Regf> {
        use std::os::unix::fs::FileExt;
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let mut base = [0u8; 0x30];
        file.read_exact_at(&mut base, 0)
            .with_context(|| format!("{}: shorter than a hive's base block", path.display()))?;
        if &base[0..4] != b"regf" {
            bail!(
                "{}: not a registry hive (no regf signature)",
                path.display()
            );
        }
        Ok(Regf {
            file,
            len,
            root: le32(&base, 0x24)?,
            path: path.to_path_buf(),
            value_bytes: Cell::new(0),
        })
    }

    /// The content of the cell at `off` (after its size field).
    fn cell(&self, off: u32) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let at = BINS + u64::from(off);
        let mut size = [0u8; 4];
        self.file
            .read_exact_at(&mut size, at)
            .with_context(|| format!("{}: cell at {off:#x} past the end", self.path.display()))?;
        let n = u64::from(i32::from_le_bytes(size).unsigned_abs());
        if n < 4 || at + n > self.len {
            bail!("{}: cell at {off:#x} has a bad size", self.path.display());
        }
        let mut buf = vec![0u8; (n - 4) as usize];
        self.file
            .read_exact_at(&mut buf, at + 4)
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(buf)
    }

    fn nk(&self, off: u32) -> Result<Nk> {
        let c = self.cell(off)?;
        if c.get(0..2) != Some(b"nk") {
            bail!("{}: no key cell at {off:#x}", self.path.display());
        }
        let flags = le16(&c, 2)?;
        let n = usize::from(le16(&c, 72)?);
        let raw = c
            .get(76..76 + n)
            .with_context(|| format!("{}: key name at {off:#x} truncated", self.path.display()))?;
        Ok(Nk {
            name: cell_name(raw, flags & 0x20 != 0),
            subkeys: le32(&c, 20)?,
            subkey_list: le32(&c, 28)?,
            values: le32(&c, 36)?,
            value_list: le32(&c, 40)?,
        })
    }

    fn subkeys(&self, nk: &Nk) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        if nk.subkeys != 0 && nk.subkey_list != u32::MAX {
            self.list(nk.subkey_list, &mut out, 0)?;
        }
        Ok(out)
    }

    fn list(&self, off: u32, out: &mut Vec<u32>, depth: u32) -> Result<()> {
        let c = self.cell(off)?;
        let count = usize::from(le16(&c, 2)?);
        if (out.len() + count) as u64 > self.len / NK_MIN {
            bail!(
                "{}: subkey list at {off:#x} longer than the hive can hold",
                self.path.display()
            );
        }
        match c.get(0..2) {
            Some(b"lf") | Some(b"lh") => {
                for i in 0..count {
                    out.push(le32(&c, 4 + 8 * i)?);
                }
            }
            Some(b"li") => {
                for i in 0..count {
                    out.push(le32(&c, 4 + 4 * i)?);
                }
            }
            Some(b"ri") if depth == 0 => {
                for i in 0..count {
                    self.list(le32(&c, 4 + 4 * i)?, out, 1)?;
                }
            }
            _ => bail!("{}: no subkey list at {off:#x}", self.path.display()),
        }
        Ok(())
    }

    /// The values of a key, in the order the hive lists them.
    fn values(&self, nk: &Nk) -> Result<Vec<(String, Data)>> {
        let mut out = Vec::new();
        if nk.values == 0 || nk.value_list == u32::MAX {
            return Ok(out);
        }
        let list = self.cell(nk.value_list)?;
        for i in 0..nk.values as usize {
            let off = le32(&list, 4 * i)?;
            out.push(
                self.vk(off).with_context(|| {
                    format!("{}: value of key {}", self.path.display(), nk.name)
                })?,
            );
        }
        Ok(out)
    }

    fn vk(&self, off: u32) -> Result<(String, Data)> {
        let c = self.cell(off)?;
        if c.get(0..2) != Some(b"vk") {
            bail!("no value cell at {off:#x}");
        }
        let n = usize::from(le16(&c, 2)?);
        let size = le32(&c, 4)?;
        let data_off = le32(&c, 8)?;
        let kind = le32(&c, 12)?;
        let flags = le16(&c, 16)?;
        let raw = c.get(20..20 + n).context("value name truncated")?;
        let name = cell_name(raw, flags & 1 != 0);
        let bytes = if size & 0x8000_0000 != 0 {
            // Up to 4 bytes kept in the data offset field itself.
            let n = (size & 0x7fff_ffff) as usize;
            c.get(8..8 + n)
                .context("inline value data too long")?
                .to_vec()
        } else if size == 0 {
            Vec::new()
        } else {
            let n = size as usize;
            let d = self.cell(data_off)?;
            if n > SEGMENT && d.get(0..2) == Some(b"db") {
                if size as u64 > self.len {
                    bail!("value {name:?}: {n} bytes of big data, more than the hive holds");
                }
                let segments = usize::from(le16(&d, 2)?);
                let list = self.cell(le32(&d, 4)?)?;
                let mut out = Vec::with_capacity(n);
                for i in 0..segments {
                    if out.len() >= n {
                        break;
                    }
                    let s = self.cell(le32(&list, 4 * i)?)?;
                    out.extend_from_slice(&s[..s.len().min(SEGMENT)]);
                }
                if out.len() < n {
                    bail!("value {name:?}: big data shorter than its size");
                }
                out.truncate(n);
                out
            } else {
                d.get(..n)
                    .with_context(|| format!("value {name:?}: data cell shorter than its size"))?
                    .to_vec()
            }
        };
        let used = self.value_bytes.get() + (raw.len() + bytes.len()) as u64;
        if used > self.len {
            bail!("value {name:?} at {off:#x}: value data adds up to more than the hive holds");
        }
        self.value_bytes.set(used);
        Ok((name, Data::from_raw(kind, bytes)))
    }

    /// The key at `path` (components matched case-insensitively): its cell and its path with
    /// the names as stored.
    fn find(&self, path: &str) -> Result<Option<(u32, String)>> {
        let mut at = self.root;
        let mut names: Vec<String> = Vec::new();
        for part in norm(path).split('\\').filter(|p| !p.is_empty()) {
            let nk = self.nk(at)?;
            let mut found = None;
            for sk in self.subkeys(&nk)? {
                let k = self.nk(sk)?;
                if same_name(&k.name, part) {
                    found = Some((sk, k.name));
                    break;
                }
            }
            match found {
                Some((off, name)) => {
                    at = off;
                    names.push(name);
                }
                None => return Ok(None),
            }
        }
        Ok(Some((at, names.join("\\"))))
    }

    fn walk(
        &self,
        off: u32,
        path: String,
        depth: Option<u32>,
        level: usize,
        seen: &mut HashSet<u32>,
        snap: &mut Snapshot,
    ) -> Result<()> {
        if level > MAX_DEPTH {
            bail!(
                "{}: keys nested deeper than {MAX_DEPTH}",
                self.path.display()
            );
        }
        // A key cell reached twice: a loop back to an ancestor, or a list shared by two keys.
        if !seen.insert(off) {
            bail!(
                "{}: key cell at {off:#x} listed twice (a loop in the key tree)",
                self.path.display()
            );
        }
        let nk = self.nk(off)?;
        let mut key = Key {
            path: path.clone(),
            values: BTreeMap::new(),
        };
        for (name, data) in self.values(&nk)? {
            key.values.insert(name.to_lowercase(), (name, data));
        }
        snap.keys.insert(path.to_lowercase(), key);
        if depth == Some(1) {
            return Ok(());
        }
        for sk in self.subkeys(&nk)? {
            let name = self.nk(sk)?.name;
            let child = if path.is_empty() {
                name
            } else {
                format!("{path}\\{name}")
            };
            self.walk(sk, child, depth.map(|d| d - 1), level + 1, seen, snap)?;
        }
        Ok(())
    }
}

/// The `hivexsh` line of a value's data: `hex:<type>:<bytes>`, so that every byte is ours.
fn setval_data(data: &Data) -> String {
    let (kind, bytes) = data.raw();
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("hex:{kind}:{}", hex.join(","))
}

fn check_line(what: &str, s: &str) -> Result<()> {
    if s.contains(['\n', '\r']) || s.trim() != s {
        bail!("{what} {s:?}: a line break or surrounding blanks cannot be written with {WRITER}");
    }
    Ok(())
}

/// A key as the script leaves it: its path as stored or created, and all its values.
type Pending = (String, Vec<(String, Data)>);

/// Builds the `hivexsh -w` script of a list of edits, reading what `setval` needs (it replaces
/// every value of a key) from the hive as it is.
struct Script<'r> {
    hive: &'r Regf,
    /// Keys the script has touched, by lowercase path; None: deleted.
    keys: BTreeMap<String, Option<Pending>>,
    out: String,
}

impl Script<'_> {
    fn cd(&mut self, path: &str) {
        if path.is_empty() {
            // "cd \" alone would continue onto the next line.
            self.out.push_str("cd \\ \n");
        } else {
            self.out.push_str(&format!("cd \\{path}\n"));
        }
    }

    /// The key's path and values, None when it does not exist (as the script leaves it).
    fn get(&mut self, key: &str) -> Result<Option<Pending>> {
        let k = norm(key);
        let lk = k.to_lowercase();
        if let Some(v) = self.keys.get(&lk) {
            return Ok(v.clone());
        }
        // Below a key the script deleted.
        let parts: Vec<&str> = lk.split('\\').collect();
        for n in 1..parts.len() {
            if let Some(None) = self.keys.get(&parts[..n].join("\\")) {
                return Ok(None);
            }
        }
        let Some((off, path)) = self.hive.find(&k)? else {
            return Ok(None);
        };
        let values = self.hive.values(&self.hive.nk(off)?)?;
        let v = Some((path, values));
        self.keys.insert(lk, v.clone());
        Ok(v)
    }

    /// Creates `key` and its missing ancestors; the key's path and values.
    fn ensure(&mut self, key: &str) -> Result<Pending> {
        let k = norm(key);
        let parts: Vec<&str> = k.split('\\').filter(|p| !p.is_empty()).collect();
        let mut parent = self.get("")?.context("the hive has no root key")?;
        for n in 1..=parts.len() {
            let p = parts[..n].join("\\");
            parent = match self.get(&p)? {
                Some(found) => found,
                None => {
                    let name = parts[n - 1];
                    check_line("key", name)?;
                    let path = if parent.0.is_empty() {
                        name.to_string()
                    } else {
                        format!("{}\\{name}", parent.0)
                    };
                    let parent_path = parent.0.clone();
                    self.cd(&parent_path);
                    self.out.push_str(&format!("add {name}\n"));
                    let created = (path, Vec::new());
                    self.keys.insert(p.to_lowercase(), Some(created.clone()));
                    created
                }
            };
        }
        Ok(parent)
    }

    /// Writes all of a key's values with one `setval`.
    fn setval(&mut self, key: &str, path: &str, values: Vec<(String, Data)>) -> Result<()> {
        self.cd(path);
        self.out.push_str(&format!("setval {}\n", values.len()));
        for (name, data) in &values {
            if name == "@" {
                bail!("a value named \"@\" cannot be written with {WRITER} (it means the default value)");
            }
            check_line("value", name)?;
            let n = if name.is_empty() { "@" } else { name };
            self.out.push_str(&format!("{n}\n{}\n", setval_data(data)));
        }
        self.keys
            .insert(norm(key).to_lowercase(), Some((path.to_string(), values)));
        Ok(())
    }

    fn edit(&mut self, e: &Edit) -> Result<()> {
        match e {
            Edit::Key { key } => {
                self.ensure(key)?;
            }
            Edit::Set { key, name, data } => {
                let (path, mut values) = self.ensure(key)?;
                match values.iter_mut().find(|(n, _)| same_name(n, name)) {
                    Some(v) => v.1 = data.clone(),
                    None => values.push((name.clone(), data.clone())),
                }
                self.setval(key, &path, values)?;
            }
            Edit::Delete { key, name } => {
                if let Some((path, mut values)) = self.get(key)? {
                    let before = values.len();
                    values.retain(|(n, _)| !same_name(n, name));
                    if values.len() != before {
                        self.setval(key, &path, values)?;
                    }
                }
            }
            Edit::DeleteKey { key } => {
                if norm(key).is_empty() {
                    bail!("the root key cannot be deleted");
                }
                if let Some((path, _)) = self.get(key)? {
                    self.cd(&path);
                    self.out.push_str("del\n");
                    let lk = norm(key).to_lowercase();
                    let below = format!("{lk}\\");
                    self.keys.retain(|k, _| !k.starts_with(&below));
                    self.keys.insert(lk, None);
                }
            }
        }
        Ok(())
    }
}

impl Hive {
    pub fn new(path: &Path, prefix: &str) -> Hive {
        Hive {
            path: path.to_path_buf(),
            prefix: prefix.to_string(),
        }
    }

    /// `key` and (to `depth` levels, all when None; 1 is the key alone) its subkeys, with every
    /// value byte-exact; None when the key does not exist. Key paths use the names as stored.
    pub fn export(&self, key: &str, depth: Option<u32>) -> Result<Option<Snapshot>> {
        if depth == Some(0) {
            bail!("an export of depth 0 holds nothing");
        }
        let r = Regf::open(&self.path)?;
        let Some((off, path)) = r.find(key)? else {
            return Ok(None);
        };
        let mut snap = Snapshot::default();
        r.walk(off, path, depth, 0, &mut HashSet::new(), &mut snap)
            .with_context(|| {
                format!(
                    "reading {}\\{} from {}",
                    self.prefix,
                    norm(key),
                    self.path.display()
                )
            })?;
        Ok(Some(snap))
    }

    /// The whole hive.
    pub fn export_all(&self) -> Result<Snapshot> {
        self.export("", None)?
            .with_context(|| format!("{}: no root key", self.path.display()))
    }

    /// One key with its values (no subkeys), None when it does not exist.
    pub fn key(&self, key: &str) -> Result<Option<Key>> {
        Ok(self.export(key, Some(1))?.and_then(|s| s.key(key).cloned()))
    }

    pub fn value(&self, key: &str, name: &str) -> Result<Option<Data>> {
        Ok(self.key(key)?.and_then(|k| k.get(name).cloned()))
    }

    /// The `hivexsh -w` commands that apply `edits` to this hive as it is now (ending with
    /// `commit`).
    pub fn script(&self, edits: &[Edit]) -> Result<String> {
        let r = Regf::open(&self.path)?;
        let mut s = Script {
            hive: &r,
            keys: BTreeMap::new(),
            out: String::new(),
        };
        for e in edits {
            s.edit(e).with_context(|| {
                format!("planning the write of {}\\{}", self.prefix, norm(e.key()))
            })?;
        }
        s.out.push_str("commit\n");
        Ok(s.out)
    }

    /// Applies `edits` with `hivexsh -w`. hivexsh stops at the first command that fails and
    /// writes only at `commit`, the last line: nothing is written when any edit is refused.
    pub fn merge(&self, edits: &[Edit]) -> Result<()> {
        if edits.is_empty() {
            return Ok(());
        }
        let script = self.script(edits)?;
        let mut child = Command::new(WRITER)
            .arg("-w")
            .arg(&self.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(writer_missing)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .with_context(|| format!("feeding {WRITER}"))?;
        }
        let out = child
            .wait_with_output()
            .with_context(|| format!("running {WRITER}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "{WRITER} -w {}: {}",
                self.path.display(),
                err.lines()
                    .filter(|l| !l.trim().is_empty())
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_round_trips_and_odd_bytes_stay_raw() {
        for d in [
            Data::Sz("System32\\drivers\\viostor.sys".into()),
            Data::ExpandSz("%SystemRoot%\\inf".into()),
            Data::MultiSz(vec!["a".into(), "bé".into()]),
            Data::MultiSz(vec![]),
            Data::Dword(0xdeadbeef),
            Data::Binary(vec![1, 0xff, 0, 0]),
        ] {
            let (k, b) = d.raw();
            assert_eq!(Data::from_raw(k, b), d);
            assert_eq!(parse_data(&d.reg_text()), Some(d.clone()));
        }
        // A REG_SZ without its terminator, an ASCII "string", a short dword: kept as bytes.
        assert_eq!(
            Data::from_raw(REG_SZ, vec![0x41, 0]),
            Data::Raw {
                kind: 1,
                bytes: vec![0x41, 0]
            }
        );
        assert!(matches!(
            Data::from_raw(REG_SZ, b"abc\0".to_vec()),
            Data::Raw { .. }
        ));
        assert!(matches!(
            Data::from_raw(REG_DWORD, vec![1, 2]),
            Data::Raw { .. }
        ));
        assert_eq!(Data::MultiSz(vec![]).raw().1, vec![0, 0]);
    }

    #[test]
    fn parses_regedit_and_hivex_exports() {
        // regedit's own shape: UTF-16LE with a BOM, CRLF, a continued hex line, @=, escapes.
        let text = "Windows Registry Editor Version 5.00\r\n\r\n\
            [HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet001\\Services\\viostor]\r\n\
            @=\"default\"\r\n\
            \"Start\"=dword:00000000\r\n\
            \"ImagePath\"=hex(2):53,00,79,00,73,00,\\\r\n  74,00,00,00\r\n\
            \"Quo\\\"te\\\\d\"=\"a \\\"b\\\" c\"\r\n\
            \"Bin\"=hex:01,ff,00,00\r\n\
            \"Printable\"=str(2):\"%SystemRoot%\"\r\n\
            ; a comment\r\n\r\n\
            [HKEY_LOCAL_MACHINE\\SYSTEM\\Select]\r\n\
            \"Current\"=dword:00000002\r\n";
        let mut bytes = vec![0xFF, 0xFE];
        bytes.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
        let s = parse_export(&decode_reg(&bytes), "HKEY_LOCAL_MACHINE\\SYSTEM").unwrap();
        let k = s.key("controlset001\\services\\VIOSTOR").unwrap();
        assert_eq!(k.path, "ControlSet001\\Services\\viostor");
        assert_eq!(k.get(""), Some(&Data::Sz("default".into())));
        assert_eq!(k.get("start"), Some(&Data::Dword(0)));
        assert_eq!(k.get("ImagePath"), Some(&Data::ExpandSz("Syst".into())));
        assert_eq!(k.get("Quo\"te\\d"), Some(&Data::Sz("a \"b\" c".into())));
        assert_eq!(k.get("Bin"), Some(&Data::Binary(vec![1, 0xff, 0, 0])));
        assert_eq!(
            k.get("Printable"),
            Some(&Data::ExpandSz("%SystemRoot%".into()))
        );
        assert_eq!(s.value("Select", "Current"), Some(&Data::Dword(2)));
        // Bad input is an error naming the line, never a panic.
        for bad in [
            "[\\A\n\"x\"=dword:1\n",
            "\"x\"=dword:00000001\n",
            "[\\A]\n\"x\"=hex:0\n",
            "[\\A]\n\"x=dword:00000001\n",
            "[-\\A]\n",
            "[\\A]\n\"x\"=-\n",
            "[\\A]\n\"x\"=hex(zz):00\n",
        ] {
            assert!(parse_export(bad, "").is_err(), "{bad}");
        }
    }

    #[test]
    fn merge_text_creates_ancestors_and_ends_sections() {
        let t = reg_text(
            "HKEY_LOCAL_MACHINE\\SYSTEM",
            &[
                Edit::Set {
                    key: "A\\B".into(),
                    name: "x\"y".into(),
                    data: Data::Dword(1),
                },
                Edit::Delete {
                    key: "A\\B".into(),
                    name: String::new(),
                },
                Edit::DeleteKey { key: "C".into() },
            ],
        );
        assert_eq!(
            t,
            "Windows Registry Editor Version 5.00\n\n\
             [HKEY_LOCAL_MACHINE\\SYSTEM\\A]\n\n\
             [HKEY_LOCAL_MACHINE\\SYSTEM\\A\\B]\n\"x\\\"y\"=dword:00000001\n@=-\n\n\
             [-HKEY_LOCAL_MACHINE\\SYSTEM\\C]\n\n"
        );
    }

    #[test]
    fn diff_lists_keys_and_values() {
        let a = parse_export("[\\]\n\n[\\A]\n\"x\"=dword:00000001\n", "").unwrap();
        let b = parse_export(
            "[\\]\n\n[\\A]\n\"X\"=dword:00000002\n\n[\\A\\B]\n\"y\"=hex:01\n",
            "",
        )
        .unwrap();
        assert_eq!(
            a.diff(&b),
            [
                Difference::KeyAdded("A\\B".into()),
                Difference::Value(
                    "A".into(),
                    "X".into(),
                    Some(Data::Dword(1)),
                    Some(Data::Dword(2))
                ),
                Difference::Value("A\\B".into(), "y".into(), None, Some(Data::Binary(vec![1]))),
            ]
        );
    }
}
