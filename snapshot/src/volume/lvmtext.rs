//! The LVM2 metadata text format (`vg { key = value  section { } }`): a small recursive parser,
//! bounded in depth, size and element count, so hostile text costs little and never panics.
//!
//! Grammar (as lvm2's `config.c` writes it): a file is a list of items; an item is
//! `name = value` or `name { items }`; a value is an integer, a string in double quotes with
//! backslash escapes, or an array `[v, v, ...]` of those. `#` starts a comment to the end of line.

use anyhow::{bail, Result};

/// Nesting deeper than this is refused (lvm2 writes four levels).
const MAX_DEPTH: usize = 16;
/// More items or array elements than this in the whole text is refused.
const MAX_ELEMENTS: usize = 1_000_000;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Str(String),
    Array(Vec<Value>),
    Section(Section),
}

/// The items of a section, in text order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Section(pub Vec<(String, Value)>);

impl Section {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn section(&self, key: &str) -> Option<&Section> {
        match self.get(key) {
            Some(Value::Section(s)) => Some(s),
            _ => None,
        }
    }
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.get(key) {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        }
    }
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
    /// The subsections, in order.
    pub fn sections(&self) -> impl Iterator<Item = (&str, &Section)> {
        self.0.iter().filter_map(|(k, v)| match v {
            Value::Section(s) => Some((k.as_str(), s)),
            _ => None,
        })
    }
}

struct Parser<'a> {
    b: &'a [u8],
    at: usize,
    elements: usize,
}

/// Parse a whole metadata text. Errors name the byte offset.
pub fn parse(text: &[u8]) -> Result<Section> {
    let mut p = Parser {
        b: text,
        at: 0,
        elements: 0,
    };
    let s = p.items(0)?;
    p.skip_ws();
    if p.at < p.b.len() {
        bail!("metadata text: unexpected '}}' at byte {}", p.at);
    }
    Ok(s)
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if c == b'#' {
                while let Some(c) = self.peek() {
                    if c == b'\n' {
                        break;
                    }
                    self.at += 1;
                }
            } else if c.is_ascii_whitespace() || c == 0 {
                self.at += 1;
            } else {
                break;
            }
        }
    }

    fn count(&mut self) -> Result<()> {
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            bail!("metadata text: more than {MAX_ELEMENTS} elements");
        }
        Ok(())
    }

    /// Items until the end of text or a `}` (not consumed).
    fn items(&mut self, depth: usize) -> Result<Section> {
        if depth > MAX_DEPTH {
            bail!(
                "metadata text: sections nested deeper than {MAX_DEPTH} at byte {}",
                self.at
            );
        }
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                None | Some(b'}') => return Ok(Section(out)),
                _ => {}
            }
            self.count()?;
            let name = self.ident()?;
            self.skip_ws();
            match self.peek() {
                Some(b'=') => {
                    self.at += 1;
                    self.skip_ws();
                    let v = self.value(depth)?;
                    out.push((name, v));
                }
                Some(b'{') => {
                    self.at += 1;
                    let s = self.items(depth + 1)?;
                    if self.peek() != Some(b'}') {
                        bail!("metadata text: section {name:?} is not closed");
                    }
                    self.at += 1;
                    out.push((name, Value::Section(s)));
                }
                _ => bail!(
                    "metadata text: expected '=' or '{{' after {name:?} at byte {}",
                    self.at
                ),
            }
        }
    }

    fn ident(&mut self) -> Result<String> {
        let start = self.at;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || b"_-+.".contains(&c) {
                self.at += 1;
            } else {
                break;
            }
        }
        if self.at == start {
            bail!("metadata text: expected a name at byte {start}");
        }
        Ok(String::from_utf8_lossy(&self.b[start..self.at]).into_owned())
    }

    fn value(&mut self, depth: usize) -> Result<Value> {
        match self.peek() {
            Some(b'"') => self.string().map(Value::Str),
            Some(b'[') => {
                if depth >= MAX_DEPTH {
                    bail!("metadata text: arrays nested too deep at byte {}", self.at);
                }
                self.at += 1;
                let mut v = Vec::new();
                loop {
                    self.skip_ws();
                    if self.peek() == Some(b']') {
                        self.at += 1;
                        return Ok(Value::Array(v));
                    }
                    self.count()?;
                    v.push(self.value(depth + 1)?);
                    self.skip_ws();
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b']') => {}
                        _ => bail!(
                            "metadata text: expected ',' or ']' in an array at byte {}",
                            self.at
                        ),
                    }
                }
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.at;
                self.at += 1;
                while self.peek().is_some_and(|c| c.is_ascii_digit() || c == b'.') {
                    self.at += 1;
                }
                let t = std::str::from_utf8(&self.b[start..self.at]).unwrap_or("");
                // lvm2 writes floats only in settings we do not read; keep their integer part.
                let int = t.split('.').next().unwrap_or("");
                int.parse::<i64>()
                    .map(Value::Int)
                    .map_err(|_| anyhow::anyhow!("metadata text: bad number {t:?} at byte {start}"))
            }
            _ => bail!("metadata text: expected a value at byte {}", self.at),
        }
    }

    fn string(&mut self) -> Result<String> {
        let start = self.at;
        self.at += 1;
        let mut s = Vec::new();
        loop {
            match self.peek() {
                None => bail!("metadata text: string at byte {start} is not closed"),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(String::from_utf8_lossy(&s).into_owned());
                }
                Some(b'\\') => {
                    self.at += 1;
                    match self.peek() {
                        None => bail!("metadata text: string at byte {start} is not closed"),
                        Some(c) => s.push(c),
                    }
                    self.at += 1;
                }
                Some(c) => {
                    s.push(c);
                    self.at += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lvm2_text() {
        let t = br#"rhel {
id = "abc"
seqno = 7
status = ["RESIZEABLE", "READ"]   # comment
flags = []
logical_volumes {
root {
segment1 {
stripes = [
"pv0", 0
]
}
}
}
}
# trailing
contents = "Text \"Format\" \\ VG"
"#;
        let s = parse(t).unwrap();
        let vg = s.section("rhel").unwrap();
        assert_eq!(vg.int("seqno"), Some(7));
        assert_eq!(vg.str("id"), Some("abc"));
        assert_eq!(s.str("contents"), Some(r#"Text "Format" \ VG"#));
        let seg = vg
            .section("logical_volumes")
            .and_then(|l| l.section("root"))
            .and_then(|r| r.section("segment1"))
            .unwrap();
        assert_eq!(
            seg.get("stripes"),
            Some(&Value::Array(vec![Value::Str("pv0".into()), Value::Int(0)]))
        );
    }

    #[test]
    fn refuses_bad_text_without_panic() {
        for t in [
            &b"a {"[..],
            b"a = ",
            b"a = \"x",
            b"}",
            b"a = [1, 2",
            b"= 3",
            b"a = 99999999999999999999",
        ] {
            assert!(parse(t).is_err(), "{:?}", String::from_utf8_lossy(t));
        }
        let deep = "a {".repeat(100);
        assert!(parse(deep.as_bytes()).is_err());
        let deep = format!("a = {}", "[".repeat(100));
        assert!(parse(deep.as_bytes()).is_err());
    }
}
