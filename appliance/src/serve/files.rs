//! Static files: the store's files under `/store/` and boot files under `/boot/`. GET and HEAD,
//! one byte range, ETag and If-None-Match, streamed from the file (sendfile).

use super::http::{http_date, Body, Request, Response};
use snapshot::format::Digest;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Split the percent-encoded path below a mount point into safe components: none empty, none
/// starting with a dot (so no `.`/`..`, no hidden files), no backslash or NUL. `None` when the
/// path is not acceptable (answered as 404: nothing there is served).
pub fn components(rest: &str) -> Option<Vec<String>> {
    let decoded = String::from_utf8(percent_decode(rest)?).ok()?;
    let comps: Vec<String> = decoded.split('/').map(str::to_string).collect();
    let ok = !comps.is_empty()
        && comps.iter().all(|c| {
            !c.is_empty() && !c.starts_with('.') && !c.contains(['\\', '\0']) && c.len() <= 255
        });
    ok.then_some(comps)
}

pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Whether `comps` names a chunk blob (`chunks/<hex[0..4]>/<64 hex>`): its digest if so.
pub fn chunk_digest(comps: &[String]) -> Option<Digest> {
    match comps {
        [top, dir, name] if top == "chunks" && name.len() == 64 && name.get(..4) == Some(dir) => {
            Digest::parse(name)
        }
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    Store,
    Boot,
}

/// Open the file `comps` (safe components, see [`components`]) below `root` for reading without
/// following a symbolic link anywhere on the way: a link inside the served tree (a directory
/// `hosts/web1/x -> ../../private` or a file) is answered as not found, wherever it points.
/// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` does it in one call; on kernels without
/// it, every component is opened with `O_NOFOLLOW` from the previous one's descriptor. `root`
/// itself may be a link (the administrator chose it). `O_NONBLOCK`: a FIFO cannot block the
/// worker at open.
pub fn open_beneath(root: &Path, comps: &[String]) -> std::io::Result<File> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(root)?;
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW;
    match super::sys::openat2_beneath(&dir, &comps.join("/"), flags) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
            walk_nofollow(dir, comps, flags)
        }
        r => r,
    }
}

/// The fallback of [`open_beneath`]: one `openat(O_NOFOLLOW)` per component.
fn walk_nofollow(mut dir: File, comps: &[String], flags: i32) -> std::io::Result<File> {
    let Some((last, parents)) = comps.split_last() else {
        return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
    };
    for c in parents {
        dir = super::sys::openat_nofollow(&dir, c, libc::O_RDONLY | libc::O_DIRECTORY)?;
    }
    super::sys::openat_nofollow(&dir, last, flags)
}

/// Answer GET/HEAD for the file `comps` below `root`. The caller has checked access.
pub fn serve(req: &Request, root: &Path, comps: &[String], tree: Tree) -> Response {
    let rel = comps.join("/");
    let file = match open_beneath(root, comps) {
        Ok(f) => f,
        Err(e) => return open_error(&rel, &e),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return open_error(&rel, &e),
    };
    if !meta.is_file() {
        return Response::error(404, &format!("{rel}: not found"));
    }
    let size = meta.len();
    let chunk = if tree == Tree::Store {
        chunk_digest(comps)
    } else {
        None
    };
    let etag = match chunk {
        Some(d) => format!("\"{}\"", d.hex()),
        None => {
            let ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
            format!("\"{size:x}-{ns:x}\"")
        }
    };
    let cache = if chunk.is_some() {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut common = vec![
        ("ETag".to_string(), etag.clone()),
        ("Cache-Control".to_string(), cache.to_string()),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
    ];
    if let Ok(m) = meta.modified() {
        common.push(("Last-Modified".to_string(), http_date(m)));
    }
    if let Some(inm) = req.header("If-None-Match") {
        if etag_matches(inm, &etag) {
            let mut r = Response::new(304);
            r.headers = common;
            return r;
        }
    }
    let range = match req.header("Range") {
        Some(v) if req.header("If-Range").is_none_or_eq(&etag) => parse_range(v, size),
        _ => Range::Whole,
    };
    let (status, offset, len) = match range {
        Range::Whole => (200, 0, size),
        Range::Part(start, len) => (206, start, len),
        Range::Unsatisfiable => {
            let mut r =
                Response::error(416, &format!("{rel}: range not satisfiable ({size} bytes)"));
            r.headers
                .push(("Content-Range".into(), format!("bytes */{size}")));
            r.headers.extend(common);
            return r;
        }
    };
    let mut r = Response::new(status);
    r.headers = common;
    r.headers
        .push(("Content-Type".into(), content_type(comps, tree).into()));
    if status == 206 {
        r.headers.push((
            "Content-Range".into(),
            format!("bytes {offset}-{}/{size}", offset + len - 1),
        ));
    }
    r.body = Body::File { file, offset, len };
    r
}

trait IfRange {
    fn is_none_or_eq(&self, etag: &str) -> bool;
}

impl IfRange for Option<&str> {
    /// `If-Range` absent, or naming the current entity tag (strong comparison). A date in
    /// If-Range is treated as "changed": the whole file is sent, which is always correct.
    fn is_none_or_eq(&self, etag: &str) -> bool {
        match self {
            None => true,
            Some(v) => v.trim() == etag,
        }
    }
}

fn etag_matches(header: &str, etag: &str) -> bool {
    header.split(',').map(str::trim).any(|t| {
        t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag.strip_prefix("W/").unwrap_or(etag)
    })
}

fn open_error(rel: &str, e: &std::io::Error) -> Response {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP) | Some(libc::EISDIR)
        | Some(libc::EXDEV) => Response::error(404, &format!("{rel}: not found")),
        _ => {
            eprintln!("appliance serve: error: opening {rel}: {e}");
            Response::error(500, &format!("{rel}: cannot be read ({e})"))
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Range {
    /// No usable Range header (absent, malformed, or several ranges): send everything.
    Whole,
    /// Offset and length.
    Part(u64, u64),
    Unsatisfiable,
}

/// Parse a `Range` header for a file of `size` bytes: `bytes=a-b`, `bytes=a-`, `bytes=-n`.
pub fn parse_range(v: &str, size: u64) -> Range {
    let v = v.trim();
    let Some(spec) = v
        .get(..6)
        .filter(|u| u.eq_ignore_ascii_case("bytes="))
        .map(|_| &v[6..])
    else {
        return Range::Whole;
    };
    if spec.contains(',') {
        return Range::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Whole;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse().ok())?
    };
    if a.is_empty() {
        let Some(n) = num(b) else {
            return Range::Whole;
        };
        if n == 0 || size == 0 {
            return Range::Unsatisfiable;
        }
        let n = n.min(size);
        return Range::Part(size - n, n);
    }
    let Some(start) = num(a) else {
        return Range::Whole;
    };
    let end = if b.is_empty() {
        None
    } else {
        match num(b) {
            Some(e) if e >= start => Some(e),
            // Last before first, or not a number: invalid, ignored (RFC 9110 14.1.1).
            _ if b.bytes().all(|c| c.is_ascii_digit()) && b.len() > 19 => Some(u64::MAX),
            _ => return Range::Whole,
        }
    };
    if start >= size {
        return Range::Unsatisfiable;
    }
    let last = end.map_or(size - 1, |e| e.min(size - 1));
    Range::Part(start, last - start + 1)
}

fn content_type(comps: &[String], tree: Tree) -> &'static str {
    let name = comps.last().map(String::as_str).unwrap_or("");
    let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match (tree, name, ext) {
        (_, _, "json") => "application/json",
        (Tree::Store, "latest" | "pubkey", _) | (_, _, "sig" | "txt" | "ipxe" | "cfg" | "sh") => {
            "text/plain; charset=utf-8"
        }
        (Tree::Boot, _, "iso") => "application/x-iso9660-image",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Range::Part(0, 10));
        assert_eq!(parse_range("bytes=90-", 100), Range::Part(90, 10));
        assert_eq!(parse_range("bytes=90-200", 100), Range::Part(90, 10));
        assert_eq!(parse_range("bytes=-5", 100), Range::Part(95, 5));
        assert_eq!(parse_range("bytes=-500", 100), Range::Part(0, 100));
        assert_eq!(parse_range("BYTES=1-1", 100), Range::Part(1, 1));
        assert_eq!(parse_range("bytes=100-", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), Range::Whole);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Range::Whole);
        assert_eq!(parse_range("items=0-1", 100), Range::Whole);
        assert_eq!(parse_range("bytes=x-1", 100), Range::Whole);
        assert_eq!(parse_range("bytes=", 100), Range::Whole);
        assert_eq!(
            parse_range("bytes=3-99999999999999999999999", 100),
            Range::Part(3, 97)
        );
    }

    #[test]
    fn paths() {
        let c = |s: &str| components(s);
        assert_eq!(c("hosts/web1/latest").unwrap(), ["hosts", "web1", "latest"]);
        assert_eq!(c("a%20b").unwrap(), ["a b"]);
        for bad in [
            "", "a//b", "../x", "a/../b", "%2e%2e/x", ".hidden", "a/.", "a/", "%zz", "a%00b",
            "a%5cb", "%ff",
        ] {
            assert!(c(bad).is_none(), "{bad}");
        }
        let d = "ab".repeat(32);
        let ok: Vec<String> = vec!["chunks".into(), d[..4].into(), d.clone()];
        assert!(chunk_digest(&ok).is_some());
        let bad: Vec<String> = vec!["chunks".into(), "0000".into(), d];
        assert!(chunk_digest(&bad).is_none());
    }

    #[test]
    fn links_are_not_followed_by_either_way_of_opening() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("hosts/web1")).unwrap();
        std::fs::create_dir_all(dir.path().join("private")).unwrap();
        std::fs::write(dir.path().join("private/signing.key"), "k").unwrap();
        std::fs::write(root.join("hosts/web1/latest"), "id").unwrap();
        std::os::unix::fs::symlink("../../../private", root.join("hosts/web1/x")).unwrap();
        std::os::unix::fs::symlink("latest", root.join("hosts/web1/l")).unwrap();
        let comps = |s: &str| components(s).unwrap();
        let open_dir = || File::open(&root).unwrap();
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW;
        assert!(open_beneath(&root, &comps("hosts/web1/latest")).is_ok());
        assert!(walk_nofollow(open_dir(), &comps("hosts/web1/latest"), flags).is_ok());
        for bad in ["hosts/web1/x/signing.key", "hosts/web1/l"] {
            assert!(open_beneath(&root, &comps(bad)).is_err(), "{bad}");
            assert!(
                walk_nofollow(open_dir(), &comps(bad), flags).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn etags() {
        assert!(etag_matches("\"a\"", "\"a\""));
        assert!(etag_matches("W/\"a\", \"b\"", "\"a\""));
        assert!(etag_matches("*", "\"a\""));
        assert!(!etag_matches("\"b\"", "\"a\""));
    }
}
