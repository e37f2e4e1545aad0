//! Fixture builder and end-to-end helpers, shared by every crate's integration tests, the demo
//! and the benchmarks.
//!
//! - [`bigdisk`]: sparse multi-TiB disks with a little data at the start, middle and end.
//! - [`fixtures`]: deterministic, cached server disk images built without mounting anything.
//! - [`oracle`]: independent checks of a copy of a fixture (used blocks, fsck, file hashes).
//! - [`util`]: child processes with timeouts, HTTP servers, workspace binaries, sparse copies.
//! - [`corrupt`]: controlled damage to images (GPT entries with valid CRCs, MBR entries).
//! - [`prng`]: the seeded generator and the content kinds fixtures are filled with.
//! - [`guest`]: a throwaway QEMU guest with host tools, for what needs drivers this host lacks.
//! - [`realsys`]: real Debian 12 servers (debootstrap, prepared on their source hardware).

pub mod artifacts;
pub mod bigdisk;
pub mod boot;
pub mod corrupt;
pub mod fixtures;
pub mod guest;
pub mod oracle;
pub mod prng;
pub mod qemu;
pub mod realsys;
pub mod util;

pub use artifacts::Artifacts;
pub use fixtures::{Fixture, FsKind};
pub use util::{Cmd, Output, Workspace};
