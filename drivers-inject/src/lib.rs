//! Adapt a restored OS to the target hardware.
