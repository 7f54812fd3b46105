//! The software x86-64 CPU backend.
