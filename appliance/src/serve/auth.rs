//! Bearer tokens from `STORE/private/tokens.json` (format in `docs/api.md`).
//!
//! The file is read at start and again whenever it changes (checked per request by its size,
//! mtime and inode), so tokens can be added or revoked without a restart. Failure modes are
//! closed: a token file that becomes malformed keeps the previous tokens; one that disappears
//! after having existed refuses every request until it is back. Without a token file at start
//! the server runs open (anyone who reaches it may read and upload), and says so loudly.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Upload,
    Admin,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenDef {
    #[serde(default)]
    name: Option<String>,
    token: String,
    access: Access,
    #[serde(default)]
    hosts: Option<Vec<String>>,
}

struct Entry {
    hash: [u8; 32],
    label: String,
    access: Access,
    hosts: Option<Vec<String>>,
}

/// Who is asking: anyone (open mode) or the holder of one token.
#[derive(Debug, Clone)]
pub enum Who {
    Open,
    Token {
        label: String,
        access: Access,
        /// `None`: every host.
        hosts: Option<Vec<String>>,
    },
}

impl Who {
    /// For the access log: the token's name or number, never the token.
    pub fn label(&self) -> String {
        match self {
            Who::Open => "open".into(),
            Who::Token { label, .. } => format!("token={label}"),
        }
    }

    /// May read this host's snapshots (store files under `hosts/<host>/` and the read API).
    pub fn may_read(&self, host: &str) -> bool {
        match self {
            Who::Open => true,
            Who::Token { access, hosts, .. } => {
                *access == Access::Admin
                    || match hosts {
                        None => true,
                        Some(h) => h.iter().any(|x| x == host),
                    }
            }
        }
    }

    /// May read every host (open access, admin, or a token without a host list).
    pub fn may_read_all(&self) -> bool {
        match self {
            Who::Open => true,
            Who::Token { access, hosts, .. } => *access == Access::Admin || hosts.is_none(),
        }
    }

    /// May open upload sessions for this host.
    pub fn may_upload(&self, host: &str) -> bool {
        match self {
            Who::Open => true,
            Who::Token { access, .. } => *access >= Access::Upload && self.may_read(host),
        }
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    ino: u64,
}

enum Mode {
    Open,
    Tokens(Vec<Entry>),
    /// The token file went away or never parsed: refuse everything until it is fixed.
    Broken(String),
}

struct State {
    stamp: Option<Stamp>,
    mode: Mode,
}

pub struct Auth {
    path: PathBuf,
    state: Mutex<State>,
}

/// Why a request is refused before it reaches a handler.
pub struct Refusal {
    pub status: u16,
    pub msg: String,
}

impl Auth {
    /// Read the token file if there is one; a malformed file is an error (the server must not
    /// start with an access policy it did not understand).
    pub fn load(path: &Path) -> Result<Auth> {
        let (stamp, mode) = match std::fs::metadata(path) {
            Ok(m) => (Some(stamp_of(&m)), Mode::Tokens(parse_file(path)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, Mode::Open),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Auth {
            path: path.to_owned(),
            state: Mutex::new(State { stamp, mode }),
        })
    }

    /// One line for the start banner.
    pub fn describe(&self) -> String {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &st.mode {
            Mode::Open => "none (open access)".into(),
            Mode::Broken(why) => format!("refusing every request: {why}"),
            Mode::Tokens(v) => {
                let count = |a| v.iter().filter(|e| e.access == a).count();
                format!(
                    "{} from {} ({} read, {} upload, {} admin)",
                    v.len(),
                    self.path.display(),
                    count(Access::Read),
                    count(Access::Upload),
                    count(Access::Admin)
                )
            }
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(
            self.state.lock().unwrap_or_else(|e| e.into_inner()).mode,
            Mode::Open
        )
    }

    /// Identify the bearer of the `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Who, Refusal> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut st);
        let entries = match &st.mode {
            Mode::Open => return Ok(Who::Open),
            Mode::Broken(why) => {
                return Err(Refusal {
                    status: 503,
                    msg: format!("access control unavailable: {why}"),
                })
            }
            Mode::Tokens(v) => v,
        };
        let refuse = |msg: &str| Refusal {
            status: 401,
            msg: msg.to_string(),
        };
        let Some(value) = authorization else {
            return Err(refuse(
                "a bearer token is required (Authorization: Bearer <token>)",
            ));
        };
        let token = match value.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
            _ => return Err(refuse("expected Authorization: Bearer <token>")),
        };
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare with every entry, each in constant time (hashes have one length), and do not
        // stop at the first match.
        let mut found = None;
        for (i, e) in entries.iter().enumerate() {
            let diff = e
                .hash
                .iter()
                .zip(hash.iter())
                .fold(0u8, |a, (x, y)| a | (x ^ y));
            if diff == 0 {
                found = Some(i);
            }
        }
        match found {
            Some(i) => {
                let e = &entries[i];
                Ok(Who::Token {
                    label: e.label.clone(),
                    access: e.access,
                    hosts: e.hosts.clone(),
                })
            }
            None => Err(refuse("unknown token")),
        }
    }

    /// Re-read the token file when it changed.
    fn refresh(&self, st: &mut State) {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if st.stamp.take().is_some() {
                    let why = format!(
                        "{} was removed; restore it (or restart the server to run without tokens)",
                        self.path.display()
                    );
                    eprintln!("appliance serve: error: {why}");
                    st.mode = Mode::Broken(why);
                }
                return;
            }
            Err(_) => return,
        };
        let stamp = stamp_of(&meta);
        if st.stamp == Some(stamp) {
            return;
        }
        st.stamp = Some(stamp);
        match parse_file(&self.path) {
            Ok(v) => {
                eprintln!(
                    "appliance serve: {} changed: {} tokens loaded",
                    self.path.display(),
                    v.len()
                );
                st.mode = Mode::Tokens(v);
            }
            Err(e) => match st.mode {
                Mode::Tokens(_) => {
                    eprintln!("appliance serve: error: {e:#}; keeping the previous tokens")
                }
                _ => {
                    eprintln!("appliance serve: error: {e:#}; refusing every request");
                    st.mode = Mode::Broken(format!("{e:#}"));
                }
            },
        }
    }
}

fn stamp_of(m: &std::fs::Metadata) -> Stamp {
    Stamp {
        mtime: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    }
}

fn parse_file(path: &Path) -> Result<Vec<Entry>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{}", path.display()))
}

fn parse(bytes: &[u8]) -> Result<Vec<Entry>> {
    let f: TokenFile = serde_json::from_slice(bytes).context("malformed token file")?;
    let mut out: Vec<Entry> = Vec::new();
    for (i, d) in f.tokens.into_iter().enumerate() {
        let label = d.name.clone().unwrap_or_else(|| format!("#{i}"));
        let what = format!("token {label}");
        if d.token.len() < 16 {
            bail!("{what}: shorter than 16 characters (use e.g. `openssl rand -hex 32`)");
        }
        if !d.token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("{what}: only printable ASCII without spaces is allowed");
        }
        if let Some(name) = &d.name {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                bail!("{what}: the name must be printable ASCII without spaces");
            }
        }
        if let Some(hosts) = &d.hosts {
            if d.access == Access::Admin {
                bail!("{what}: an admin token covers every host; remove \"hosts\"");
            }
            for h in hosts {
                snapshot::store::check_name(h, "host").with_context(|| what.clone())?;
            }
        }
        let hash: [u8; 32] = Sha256::digest(d.token.as_bytes()).into();
        if out.iter().any(|e| e.hash == hash) {
            bail!("{what}: the same token is listed twice");
        }
        out.push(Entry {
            hash,
            label,
            access: d.access,
            hosts: d.hosts,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_scope() {
        let v = parse(
            br#"{"tokens": [
                {"name": "r", "token": "rrrrrrrrrrrrrrrr", "access": "read", "hosts": ["web1"]},
                {"token": "uuuuuuuuuuuuuuuu", "access": "upload", "hosts": ["web1"]},
                {"token": "aaaaaaaaaaaaaaaa", "access": "admin"}]}"#,
        )
        .unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].label, "#1");
        let read = Who::Token {
            label: "r".into(),
            access: Access::Read,
            hosts: Some(vec!["web1".into()]),
        };
        assert!(read.may_read("web1") && !read.may_read("web2") && !read.may_upload("web1"));
        let up = Who::Token {
            label: "u".into(),
            access: Access::Upload,
            hosts: Some(vec!["web1".into()]),
        };
        assert!(up.may_upload("web1") && !up.may_upload("web2"));
        let admin = Who::Token {
            label: "a".into(),
            access: Access::Admin,
            hosts: None,
        };
        assert!(admin.may_upload("anything"));
    }

    #[test]
    fn refuses_doubtful_files() {
        for bad in [
            &br#"{"tokens": [{"token": "short", "access": "read"}]}"#[..],
            br#"{"tokens": [{"token": "aaaaaaaaaaaaaaaa", "access": "root"}]}"#,
            br#"{"tokens": [{"token": "aaaaaaaaaaaaaaaa", "access": "read", "host": ["x"]}]}"#,
            br#"{"tokens": [{"token": "aaaaaaaaaaaaaaaa", "access": "admin", "hosts": ["x"]}]}"#,
            br#"{"tokens": [{"token": "aaaaaaaaaaaaaaaa", "access": "read", "hosts": ["../x"]}]}"#,
            br#"{"tokens": [{"token": "aaaaaaaaaaaaaaaa", "access": "read"},
                            {"token": "aaaaaaaaaaaaaaaa", "access": "admin"}]}"#,
            b"not json",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
