//! `fixture`: build a named test disk image for scripts, the demo and benchmarks.
//!
//! ```text
//! fixture list
//! fixture build NAME [OUT.img] [--size BYTES|NG|NM] [--used FRACTION] [--json]
//! ```
//!
//! The image is built (or taken from the cache under `target/fixtures/`) and, with `OUT.img`,
//! copied there as a sparse file. The fixture's description (partitions, files with SHA-256,
//! the deleted file's pattern) is printed as JSON with `--json`, a summary otherwise.

use anyhow::{bail, Context, Result};
use bmr_tests::fixtures;
use std::path::PathBuf;

fn usage() -> ! {
    eprintln!(
        "usage: fixture list\n       fixture build NAME [OUT.img] [--size BYTES|NG|NM] [--used FRACTION] [--json]\n\nfixtures: {}",
        fixtures::NAMES.join(", ")
    );
    std::process::exit(2);
}

fn parse_size(s: &str) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1u64 << 30),
        Some('M' | 'm') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1),
    };
    Ok(num
        .parse::<u64>()
        .with_context(|| format!("bad size {s:?}"))?
        * mult)
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("list") => {
            for n in fixtures::NAMES {
                println!("{n}");
            }
            Ok(())
        }
        Some("build") => {
            let mut name = None;
            let mut out: Option<PathBuf> = None;
            let mut size = 4u64 << 30;
            let mut used = 0.45f64;
            let mut json = false;
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--json" => json = true,
                    "--size" => size = parse_size(it.next().map(String::as_str).unwrap_or(""))?,
                    "--used" => {
                        used = it
                            .next()
                            .and_then(|v| v.parse().ok())
                            .context("--used takes a fraction, e.g. 0.45")?
                    }
                    s if s.starts_with('-') => usage(),
                    s if name.is_none() => name = Some(s.to_string()),
                    s if out.is_none() => out = Some(PathBuf::from(s)),
                    _ => usage(),
                }
            }
            let Some(name) = name else { usage() };
            let mut fx = match name.as_str() {
                "big_mixed" => fixtures::big_mixed(size, used)?,
                n => fixtures::by_name(n)?,
            };
            if let Some(out) = out {
                fx.copy_to(&out)
                    .with_context(|| format!("copying the image to {}", out.display()))?;
                fx.image = out;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&fx)?);
            } else {
                println!(
                    "{}: {} ({} MiB, {}-byte sectors, built in {:.1} s)",
                    fx.name,
                    fx.image.display(),
                    fx.size >> 20,
                    fx.sector_size,
                    fx.build_seconds
                );
                for p in &fx.partitions {
                    println!(
                        "  part {:>2}  offset {:>12}  size {:>12}  {:<8} used {:>11}  {} files",
                        p.number,
                        p.offset,
                        p.size,
                        p.fs.map(|k| k.name())
                            .unwrap_or(if p.extended { "extended" } else { "-" }),
                        p.used_bytes,
                        p.files.len()
                    );
                }
                if let Some(d) = &fx.deleted {
                    println!(
                        "  deleted: partition {} /{} ({} bytes of {:?})",
                        d.partition, d.path, d.len, d.marker
                    );
                }
            }
            Ok(())
        }
        _ => {
            if args.is_empty() {
                usage()
            }
            bail!("unknown command {:?}", args[0])
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("fixture: error: {e:#}");
        std::process::exit(1);
    }
}
