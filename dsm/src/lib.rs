//! dsm: distributed shared memory for Rust.
pub mod protocol;
pub mod types;
