//! (Implementation in progress.)

use super::Probe;
use crate::source::ReadAt;

/// `None` when the signature is absent.
pub fn probe(_dev: &dyn ReadAt, _offset: u64, _len: u64) -> Option<anyhow::Result<Probe>> {
    None
}
