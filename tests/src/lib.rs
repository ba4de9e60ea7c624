//! Harnesses for tests over real processes (broker, registry, QEMU) and the end-to-end scenarios
