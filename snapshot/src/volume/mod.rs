//! Volume managers inside partitions: what an LVM2 physical volume holds, so that the logical
//! volumes' filesystems are mapped like partitions and the free extents are not stored.

pub mod lvm;
pub mod lvmtext;
