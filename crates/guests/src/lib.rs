//! Guests vireo boots in its default mode and in its tests.

pub mod default_guest;
pub mod probe;
