//! Windows setup information files (`.inf`) as real driver packages write them: UTF-16 or 8-bit
//! text, `;` comments, `\` line continuations, sections that may repeat (merged, names compare
//! case-insensitively), `key = value, value` lines whose fields may be quoted (`""` is a quote),
//! and `%token%` substitution from `[Strings]` overlaid by a localized `[Strings.0409]` (`%%` is a
//! percent sign; a token with no string, such as a dirid `%12%`, is kept as written).

use anyhow::{bail, Result};
use std::collections::HashMap;

/// One line of a section, tokens substituted and quotes removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// What stands left of the first unquoted `=`, if anything does.
    pub key: Option<String>,
    pub values: Vec<String>,
    /// 1-based line number in the file (of the first physical line).
    pub at: usize,
}

impl Line {
    /// Value `i`, or "" when the line has fewer.
    pub fn value(&self, i: usize) -> &str {
        self.values.get(i).map_or("", String::as_str)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Inf {
    /// Section name (lowercase) -> its lines, in file order, repeated sections merged.
    sections: HashMap<String, Vec<Line>>,
    /// Section names as first written, in file order.
    order: Vec<String>,
}

/// Text of an INF file: UTF-16 LE/BE by BOM (or by the zero bytes of ASCII text written as
/// UTF-16 without one), UTF-8 with or without BOM, else Windows-1252 read as Latin-1.
pub fn decode(bytes: &[u8]) -> String {
    let utf16 = |le: bool, b: &[u8]| {
        let units: Vec<u16> = b
            .chunks_exact(2)
            .map(|c| {
                if le {
                    u16::from_le_bytes([c[0], c[1]])
                } else {
                    u16::from_be_bytes([c[0], c[1]])
                }
            })
            .collect();
        String::from_utf16_lossy(&units)
    };
    match bytes {
        [0xFF, 0xFE, rest @ ..] => utf16(true, rest),
        [0xFE, 0xFF, rest @ ..] => utf16(false, rest),
        [0xEF, 0xBB, 0xBF, rest @ ..] => String::from_utf8_lossy(rest).into_owned(),
        [a, 0, b, 0, ..] if *a != 0 && *b != 0 => utf16(true, bytes),
        [0, a, 0, b, ..] if *a != 0 && *b != 0 => utf16(false, bytes),
        _ => match std::str::from_utf8(bytes) {
            Ok(s) => s.to_string(),
            Err(_) => bytes.iter().map(|&b| b as char).collect(),
        },
    }
}

/// A raw field: its text with quoted parts marked, so that trimming spares them.
type RawField = Vec<(bool, String)>;

/// Splits a logical line into (key, fields) at the first unquoted `=` and at unquoted commas,
/// dropping a `;` comment. Quotes are removed (`""` inside them is one quote).
fn split(line: &str) -> (Option<RawField>, Vec<RawField>) {
    let mut fields: Vec<RawField> = vec![Vec::new()];
    let mut key = None;
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let push = |fields: &mut Vec<RawField>, quoted: bool, s: &mut String| {
        if !s.is_empty() || quoted {
            if let Some(f) = fields.last_mut() {
                f.push((quoted, std::mem::take(s)));
            }
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                push(&mut fields, false, &mut cur);
                let mut q = String::new();
                while let Some(c) = chars.next() {
                    if c == '"' {
                        if chars.peek() == Some(&'"') {
                            chars.next();
                            q.push('"');
                        } else {
                            break;
                        }
                    } else {
                        q.push(c);
                    }
                }
                push(&mut fields, true, &mut q);
            }
            ';' => break,
            '=' if key.is_none() => {
                push(&mut fields, false, &mut cur);
                key = fields.pop();
                fields.push(Vec::new());
            }
            ',' => {
                push(&mut fields, false, &mut cur);
                fields.push(Vec::new());
            }
            c => cur.push(c),
        }
    }
    push(&mut fields, false, &mut cur);
    (key, fields)
}

/// `%token%` substitution, inside quotes too (as setupapi does: Wine's own `wine.inf` writes
/// `"\Registry\Machine\%CurrentVersionNT%\Time Zones"`); then the field is trimmed (unquoted
/// ends only).
fn substitute(f: &RawField, strings: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let n = f.len();
    for (i, (quoted, text)) in f.iter().enumerate() {
        let mut t: &str = text;
        if !quoted && i == 0 {
            t = t.trim_start();
        }
        if !quoted && i + 1 == n {
            t = t.trim_end();
        }
        let mut rest = t;
        while let Some(a) = rest.find('%') {
            out.push_str(&rest[..a]);
            let after = &rest[a + 1..];
            match after.find('%') {
                Some(0) => {
                    out.push('%');
                    rest = &after[1..];
                }
                Some(b) => {
                    let tok = &after[..b];
                    match strings.get(&tok.to_ascii_lowercase()) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push('%');
                            out.push_str(tok);
                            out.push('%');
                        }
                    }
                    rest = &after[b + 1..];
                }
                None => {
                    out.push('%');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
    }
    out
}

/// Logical lines: continuations joined, comments and blank lines dropped, with line numbers.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let raw = raw.trim_end_matches('\r');
        let (at, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        acc.push_str(raw);
        // A `\` as the last character outside a comment continues the line.
        let body = strip_comment(&acc);
        if let Some(joined) = body.trim_end().strip_suffix('\\') {
            pending = Some((at, joined.to_string()));
            continue;
        }
        if !body.trim().is_empty() {
            out.push((at, acc));
        }
    }
    if let Some((at, acc)) = pending {
        if !acc.trim().is_empty() {
            out.push((at, acc));
        }
    }
    out
}

/// The line up to an unquoted `;`.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

impl Inf {
    /// Parses INF bytes (any encoding [`decode`] knows).
    pub fn parse(bytes: &[u8]) -> Result<Inf> {
        let text = decode(bytes);
        let mut raw: Vec<(String, usize, Option<RawField>, Vec<RawField>)> = Vec::new();
        let mut section: Option<String> = None;
        let mut inf = Inf::default();
        for (at, line) in logical_lines(&text) {
            let t = strip_comment(&line).trim();
            if let Some(rest) = t.strip_prefix('[') {
                let Some(end) = rest.find(']') else {
                    bail!("line {at}: section header without `]`: {t}");
                };
                let name = rest[..end].trim().to_string();
                // A section exists once named, even with no lines.
                if let std::collections::hash_map::Entry::Vacant(e) =
                    inf.sections.entry(name.to_ascii_lowercase())
                {
                    e.insert(Vec::new());
                    inf.order.push(name.clone());
                }
                section = Some(name);
                continue;
            }
            let Some(s) = &section else {
                bail!("line {at}: a line before the first section: {t}");
            };
            let (key, fields) = split(&line);
            raw.push((s.clone(), at, key, fields));
        }
        // Strings first (they may come last in the file): [Strings], then [Strings.0409].
        let mut strings = HashMap::new();
        for want in ["strings", "strings.0409"] {
            for (s, _, key, fields) in &raw {
                if s.eq_ignore_ascii_case(want) {
                    if let Some(k) = key {
                        let k = substitute(k, &HashMap::new()).to_ascii_lowercase();
                        let v = fields
                            .iter()
                            .map(|f| substitute(f, &HashMap::new()))
                            .collect::<Vec<_>>()
                            .join(",");
                        strings.insert(k, v);
                    }
                }
            }
        }
        for (s, at, key, fields) in raw {
            let lower = s.to_ascii_lowercase();
            let mut values: Vec<String> = fields.iter().map(|f| substitute(f, &strings)).collect();
            if values.len() == 1 && values[0].is_empty() {
                values.clear();
            }
            inf.sections.entry(lower).or_default().push(Line {
                key: key.map(|k| substitute(&k, &strings)),
                values,
                at,
            });
        }
        Ok(inf)
    }

    /// The lines of section `name` (case-insensitive), if it exists.
    pub fn section(&self, name: &str) -> Option<&[Line]> {
        self.sections
            .get(&name.to_ascii_lowercase())
            .map(Vec::as_slice)
    }

    pub fn has(&self, name: &str) -> bool {
        self.sections.contains_key(&name.to_ascii_lowercase())
    }

    /// Section names in file order.
    pub fn section_names(&self) -> &[String] {
        &self.order
    }

    /// Values of every `key = ...` line in `section` (case-insensitive key), in order.
    pub fn values<'a, 'k>(
        &'a self,
        section: &str,
        key: &'k str,
    ) -> impl Iterator<Item = &'a Line> + use<'a, 'k> {
        self.section(section)
            .unwrap_or(&[])
            .iter()
            .filter(move |l| {
                l.key
                    .as_deref()
                    .is_some_and(|k| k.eq_ignore_ascii_case(key))
            })
    }

    /// The first value of `key` in `section`.
    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.values(section, key).next().map(|l| l.value(0))
    }

    /// Every value of every `key` line of `section`, flattened (for `CopyFiles = a, b` repeated).
    pub fn list(&self, section: &str, key: &str) -> Vec<String> {
        self.values(section, key)
            .flat_map(|l| l.values.iter().cloned())
            .filter(|v| !v.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16le(s: &str) -> Vec<u8> {
        let mut v = vec![0xFF, 0xFE];
        for u in s.encode_utf16() {
            v.extend_from_slice(&u.to_le_bytes());
        }
        v
    }

    const SAMPLE: &str = "; a comment line\r\n\
[Version]\r\n\
Signature = \"$WINDOWS NT$\"   ; trailing comment\r\n\
Class = SCSIAdapter\r\n\
Provider = %VENDOR%\r\n\
\r\n\
[Manufacturer]\r\n\
%VENDOR% = Models, NTamd64.10.0...14393, \\\r\n\
    NTamd64.6.3\r\n\
[Models.NTamd64.10.0...14393]\r\n\
%Desc% = inst, PCI\\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00, PCI\\VEN_1AF4&DEV_1001\r\n\
[Empty]\r\n\
[inst]\r\n\
CopyFiles = a\r\n\
CopyFiles = b, c\r\n\
[version]\r\n\
DriverVer = 01/02/2024,100.95.104.26000\r\n\
[Strings]\r\n\
VENDOR = \"Red Hat, Inc.\"\r\n\
Desc = \"Disk \"\"quoted\"\" 100%%\"\r\n\
[Strings.0409]\r\n\
Desc = \"Red Hat VirtIO SCSI controller; 100%%\"\r\n";

    fn check(inf: &Inf) {
        assert_eq!(inf.get("VERSION", "signature"), Some("$WINDOWS NT$"));
        assert_eq!(inf.get("Version", "Provider"), Some("Red Hat, Inc."));
        // Repeated sections merge.
        assert_eq!(
            inf.get("Version", "DriverVer"),
            Some("01/02/2024"),
            "{inf:?}"
        );
        let m = inf.section("manufacturer").unwrap();
        assert_eq!(m[0].key.as_deref(), Some("Red Hat, Inc."));
        assert_eq!(
            m[0].values,
            ["Models", "NTamd64.10.0...14393", "NTamd64.6.3"],
            "continuation joined"
        );
        let l = &inf.section("models.ntamd64.10.0...14393").unwrap()[0];
        // The localized string wins; quotes protect `;`; `%%` is a percent sign.
        assert_eq!(
            l.key.as_deref(),
            Some("Red Hat VirtIO SCSI controller; 100%")
        );
        assert_eq!(l.value(1), "PCI\\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00");
        assert!(inf.has("empty") && inf.section("empty").unwrap().is_empty());
        assert_eq!(inf.list("inst", "copyfiles"), ["a", "b", "c"]);
    }

    #[test]
    fn parses_real_inf_syntax_in_every_encoding() {
        check(&Inf::parse(SAMPLE.as_bytes()).unwrap());
        check(&Inf::parse(&utf16le(SAMPLE)).unwrap());
        let no_bom = utf16le(SAMPLE)[2..].to_vec();
        check(&Inf::parse(&no_bom).unwrap());
        let mut bom8 = vec![0xEF, 0xBB, 0xBF];
        bom8.extend_from_slice(SAMPLE.as_bytes());
        check(&Inf::parse(&bom8).unwrap());
    }

    #[test]
    fn tokens_and_errors() {
        let inf =
            Inf::parse(b"[S]\nImage = %12%\\viostor.sys\nPct = 50%%\nU = %nope%\n[Strings]\nX=1\n")
                .unwrap();
        assert_eq!(inf.get("s", "image"), Some("%12%\\viostor.sys"));
        assert_eq!(inf.get("s", "pct"), Some("50%"));
        assert_eq!(inf.get("s", "u"), Some("%nope%"));
        let e = Inf::parse(b"key = 1\n[S]\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = Inf::parse(b"[S\n").unwrap_err().to_string();
        assert!(e.contains("without `]`"), "{e}");
        // Latin-1 text that is not UTF-8.
        let inf = Inf::parse(b"[Strings]\nN = \"Gr\xfc\xdfe\"\n[A]\nk = %n%\n").unwrap();
        assert_eq!(inf.get("a", "k"), Some("Grüße"));
    }
}
