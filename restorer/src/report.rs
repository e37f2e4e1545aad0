//! What the operator sees: sizes in words, the progress bar (only on a terminal), and the
//! per-disk summary printed at the end of every command.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::time::Duration;

/// `1536` -> `1.5 KiB`; exact byte counts stay in the JSON output.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v >= 100.0 || v.fract() < 0.05 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The most memory this process has held (`VmHWM`), in bytes; 0 where /proc does not say.
pub fn peak_memory() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// `bytes / seconds` in words.
pub fn rate(n: u64, d: Duration) -> String {
    let s = d.as_secs_f64();
    if s <= 0.0 {
        return "-".into();
    }
    format!("{}/s", bytes((n as f64 / s) as u64))
}

/// A progress bar over `total` bytes, drawn on stderr when it is a terminal and hidden otherwise
/// (logs, pipes, `--json` runs stay clean).
pub fn progress(total: u64, what: &str, quiet: bool) -> ProgressBar {
    let pb = ProgressBar::new(total);
    if quiet || !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
        return pb;
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// What restoring one disk did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskSummary {
    pub disk: u32,
    pub target: String,
    /// Chunk blob bytes received from the store, and how many chunks.
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
    /// Bytes written to the target (data, zeros and the partition table).
    pub written_bytes: u64,
    /// Of those, zero slots (written or discarded, never fetched).
    pub zero_bytes: u64,
    /// Unused slots left as they are.
    pub skipped_bytes: u64,
    /// Bytes written from a chunk already fetched for another slot.
    pub deduped_bytes: u64,
    /// Slots found already correct on the target (resume) and not fetched again.
    pub verified_in_place_bytes: u64,
    pub verified_in_place_slots: u64,
    /// Bytes read back from the target to check them (resume).
    pub hashed_bytes: u64,
    pub seconds: f64,
    /// Where the data phase's time went.
    pub busy: Busy,
    /// Filesystems grown or recreated after the data was written.
    pub resized: Vec<String>,
    /// The UEFI boot entry written for it (`--efi-boot-entry`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_entry: Option<String>,
    pub warnings: Vec<String>,
}

/// The data phase's workers: their busy time summed over all of them (so up to `workers` times
/// the wall time), per stage. A stage near `workers` x wall is the bottleneck (`fetch`: the
/// network or the store; `verify`: the CPU, zstd and SHA-256; `write`: the target); all of them
/// low means the workers waited on each other.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Busy {
    pub workers: usize,
    pub fetch_seconds: f64,
    pub verify_seconds: f64,
    pub write_seconds: f64,
}

impl DiskSummary {
    pub fn print(&self) {
        let d = Duration::from_secs_f64(self.seconds);
        println!(
            "disk {} -> {}: wrote {} ({} zeros) in {:.1?} ({}); fetched {} in {} chunks; skipped {} unused; deduped {}",
            self.disk,
            self.target,
            bytes(self.written_bytes),
            bytes(self.zero_bytes),
            d,
            rate(self.written_bytes, d),
            bytes(self.fetched_bytes),
            self.fetched_chunks,
            bytes(self.skipped_bytes),
            bytes(self.deduped_bytes),
        );
        let b = &self.busy;
        if b.workers > 0 {
            println!(
                "  {} workers busy: fetching {:.1}s, decoding and verifying {:.1}s, writing {:.1}s",
                b.workers, b.fetch_seconds, b.verify_seconds, b.write_seconds
            );
        }
        if self.hashed_bytes > 0 {
            println!(
                "  resumed: read back {}, {} already correct ({} slots), not fetched again",
                bytes(self.hashed_bytes),
                bytes(self.verified_in_place_bytes),
                self.verified_in_place_slots
            );
        }
        for r in self.resized.iter().chain(&self.boot_entry) {
            println!("  {r}");
        }
        for w in &self.warnings {
            println!("  warning: {w}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_words() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(4 << 20), "4 MiB");
        assert_eq!(bytes(10 << 30), "10 GiB");
        assert_eq!(bytes(300 << 30), "300 GiB");
    }
}
