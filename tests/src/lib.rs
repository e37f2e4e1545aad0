//! Fixture builder and end-to-end helpers.
