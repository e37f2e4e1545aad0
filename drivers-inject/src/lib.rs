//! Adapt a restored OS to the target hardware: find the OS on the written disks, work out what
//! this machine needs that the OS lacks (boot-path drivers in its initramfs, device names,
//! NIC bindings, a loader the firmware finds), and change the OS the way its own tools would,
//! listing every change with the original kept.
//!
//! The Linux half lives in [`linux`]; the restorer calls [`linux::adapt`] after the data is
//! written (restore) or on already-restored disks (`restorer adapt`). The Windows half
//! ([`windows`]) reads driver packages, chooses them for this machine's devices
//! ([`windows::choose`]) and injects them offline into a mounted Windows volume
//! ([`windows::inject`]); the restorer mounts the volumes and reports.

pub mod changes;
pub mod initramfs;
pub mod inventory;
pub mod linux;
pub mod volumes;
pub mod windows;

pub use inventory::Inventory;
pub use volumes::Volume;
