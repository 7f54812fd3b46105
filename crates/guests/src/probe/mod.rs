//! Bare-metal probe guests assembled in Rust.
