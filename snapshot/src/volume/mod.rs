//! Volume managers inside partitions: what an LVM2 physical volume or an MD RAID member holds, so
//! that the filesystems inside are mapped like partitions and free space is not stored.

pub mod lvm;
pub mod lvmtext;
pub mod md;
