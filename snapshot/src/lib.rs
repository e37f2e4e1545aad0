//! Snapshot store: the on-disk format, the chunk codec, local and HTTP stores, partition tables and
//! the used-block maps of filesystems. Every other crate of the toolkit reads snapshots through it.
//!
//! # Design note: what a crash leaves behind
//!
//! A store is a directory that any static HTTP server can serve (layout in `docs/formats.md`).
//! Writers follow one rule: *write to a temporary name, fsync, rename*; nothing visible is ever
//! rewritten in place.
//!
//! - A chunk is written to `tmp/`, fsynced and renamed to `chunks/xxxx/<digest>`. An existing chunk
//!   is rewritten only when it is damaged (ingest compares it with the source's bytes, uploads and
//!   `verify --repair` replace it), the same way: a reader sees the old file or the new one. A
//!   crash leaves at most a stray file in `tmp/`, never a half chunk.
//! - A snapshot id is reserved when its writer starts (an ingest, an upload session): an exclusive
//!   `flock` on `tmp/reserved/<host>/<id>`, so parallel writers of one host take distinct ids and
//!   a writer that dies frees its id. Explicit ids (`--snapshot`) may not be reserved words
//!   (`latest`).
//! - A snapshot directory (manifest, signature, indexes) is assembled in `tmp/`, fsynced and renamed
//!   into `hosts/<host>/snapshots/<id>` only after every chunk it references is durable. `latest`
//!   moves last. A crash before the rename leaves no listed snapshot.
//! - Locking: every writer (ingest, upload session) holds a shared `flock` on `private/gc.lock` for
//!   its whole life; `gc` takes it exclusively, so it can never delete a chunk that a writer has
//!   checked for existence but not yet referenced from a committed snapshot. The rename of a
//!   snapshot into place and the update of `latest` happen under one exclusive per-host lock, so
//!   `latest` always names the snapshot committed last, whatever its id.
//! - `private/` (signing key, tokens) and `tmp/` are never served.

pub mod api;
pub mod browse;
pub mod chunker;
pub mod client;
pub mod extents;
pub mod format;
pub mod fs;
pub mod layout;
pub mod manifest;
pub mod ptable;
pub mod reader;
pub mod round;
pub mod sign;
pub mod source;
pub mod stdout;
pub mod store;
pub mod sys;
pub mod threads;
pub mod view;
pub mod volume;

pub use extents::Extents;
pub use format::blob::{decode_chunk, decode_chunk_into, encode_chunk};
pub use format::index::{ChunkIndex, Slot};
pub use format::{Digest, CHUNK_SIZE};
pub use manifest::Manifest;
pub use source::{DiskSource, ReadAt};
