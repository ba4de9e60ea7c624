//! Helpers shared by the VMM's KVM tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use vmr_vmm::guest_abi::{build_test_guest, TestPorts};
use vmr_vmm::serial::SharedBuffer;
use vmr_vmm::vm::{BootSource, Vm, VmConfig};

/// Fails the test with a clear message when KVM is unavailable.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm (read-write), which is unavailable: {e}");
    }
}

/// Builds (if needed) and returns the freestanding test guest.
pub fn guest_elf() -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest");
    build_test_guest(&out).unwrap_or_else(|e| panic!("{e}"))
}

/// A started VM running the test guest, with its ports and console.
pub struct Guest {
    pub vm: Vm,
    pub ports: TestPorts,
    pub serial: SharedBuffer,
}

pub const WAIT: Duration = Duration::from_secs(60);

/// Boots the test guest and waits until it polls for commands.
pub fn boot(mem_size: u64) -> Guest {
    require_kvm();
    let elf = guest_elf();
    let serial = SharedBuffer::default();
    let mut vm = Vm::new(VmConfig {
        mem_size,
        serial_out: Some(Box::new(serial.clone())),
        ..Default::default()
    })
    .expect("VM creation");
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports free");
    vm.load(&BootSource::Elf(elf)).expect("guest loads");
    vm.start().expect("vCPUs start");
    assert!(
        ports.wait(WAIT, |s| s.boot_at.is_some()),
        "guest never wrote its boot marker"
    );
    Guest { vm, ports, serial }
}

/// Waits until the guest has written at least `n` values.
pub fn wait_values(ports: &TestPorts, n: usize) {
    assert!(
        ports.wait(WAIT, |s| s.values.len() >= n),
        "guest wrote only {} of {n} values",
        ports.with(|s| s.values.len())
    );
}

/// Waits for `n` done reports.
pub fn wait_done(ports: &TestPorts, n: usize) {
    assert!(
        ports.wait(WAIT, |s| s.done.len() >= n),
        "guest finished only {} of {n} commands",
        ports.with(|s| s.done.len())
    );
}
