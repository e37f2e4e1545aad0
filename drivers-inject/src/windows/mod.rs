//! The Windows half of the adaptation (issue 9): driver packages read from their INF files
//! ([`inf`]), the PnP identifiers Windows gives this machine's devices ([`hwid`]), a driver
//! repository that picks the best package for a device and a Windows version ([`repo`]), and
//! the offline edits of the restored Windows that make it boot on the new hardware:
//!
//! - [`hive`]: registry hives read byte-exact by our own regf reader and written with hivex's
//!   C shell `hivexsh -w` (no Perl: it runs in the boot image);
//! - [`offline`]: the mounted Windows volume: its hives (found case-insensitively), version,
//!   current control set, and the refusals of dirty hives and hibernated volumes;
//! - [`inject`]: the plan of every file copy and registry value (with the originals), its
//!   application (`dry_run` stops at the plan), the record, and the rollback from it.
//!
//! The restorer runs it after a restore and in `restorer adapt` with `--drivers`
//! (`restorer/src/windows.rs`).

pub mod choose;
pub mod hive;
pub mod hwid;
pub mod inf;
pub mod inject;
pub mod offline;
pub mod repo;
