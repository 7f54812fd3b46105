//! The default guest: stock Debian cloud kernel + busybox initramfs, built into a cache.
