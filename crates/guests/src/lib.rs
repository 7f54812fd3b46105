//! Guests vireo boots in its default mode and in its tests.
