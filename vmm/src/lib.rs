//! vmreplay's built-in KVM microVM.
//!
//! The crate is a library with a thin `vmm` binary over it. Its parts:
//!
//! - [`memory`]: guest memory on a shared memfd (so vhost-user backends can map
//!   it), the dirty-page log and the page bitmaps incremental snapshots use.
//! - [`vm`]: the VM (KVM VM fd, in-kernel irqchip and PIT, the MMIO and PIO
//!   buses, irqfd/ioeventfd helpers), its vCPU threads, pause/resume,
//!   snapshot/restore and lifecycle events (one queue per subscriber).
//! - [`supervise`]: the loop that runs a VM until it stops, reporting its
//!   events and taking numbered snapshots on request (the `vmm` binary uses
//!   it).
//! - [`vcpu`]: one vCPU: CPUID, MSRs, 64-bit boot state, the run loop with
//!   PIO/MMIO dispatch, state save/restore, guest debug for the gdb stub.
//! - [`boot`]: long-mode page tables and GDT, and the ELF, flat and bzImage
//!   loaders.
//! - [`serial`]: the 16550 UART on 0x3f8.
//! - [`snapshot`]: the snapshot file format (versioned, checksummed,
//!   size-capped), the memory file (full or incremental) and lazy restore of
//!   shared memory over [`uffd`] (userfaultfd).
//! - [`devices`], [`acpi`], [`gdb`]: virtio-mmio devices, ACPI tables and the
//!   gdb stub.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod gdb;
pub mod guest_abi;
pub mod memory;
pub mod probe;
pub mod serial;
pub mod snapshot;
pub mod supervise;
pub mod timing;
pub mod uffd;
pub mod vcpu;
pub mod vm;
