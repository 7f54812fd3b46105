//! Devices: the port-I/O and MMIO bus, legacy PC devices and userspace interrupt controllers.
