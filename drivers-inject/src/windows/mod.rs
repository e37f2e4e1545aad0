//! The Windows half of the adaptation (issue 9), built bottom-up: driver packages read from
//! their INF files ([`inf`]), the PnP identifiers Windows gives this machine's devices
//! ([`hwid`]), and a driver repository that picks the best package for a device and a Windows
//! version ([`repo`]). The offline registry edits come next.

pub mod hwid;
pub mod inf;
pub mod repo;
