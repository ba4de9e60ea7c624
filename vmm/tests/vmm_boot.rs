//! The test guest boots in 64-bit mode, prints to the serial port, runs a
//! workload and stops the VM through the debug-exit port.

mod common;

use std::time::Duration;

use common::*;
use vmr_proto::LifecycleKind;
use vmr_vmm::guest_abi::{CMD_COUNT, CMD_EXIT};

#[test]
// Heavy: needs /dev/kvm.
fn test_guest_boots_prints_and_exits() {
    let g = boot(32 << 20);
    g.ports.push_commands(&[CMD_COUNT | (32 << 8)]);
    wait_done(&g.ports, 1);
    g.ports.push_commands(&[CMD_EXIT | (7 << 8)]);
    let stop = g.vm.wait_for_stop(WAIT).expect("the guest stops the VM");
    assert_eq!(stop.kind, LifecycleKind::Shutdown);
    assert_eq!(stop.detail, "guest exit code 7");
    let regs = &stop.regs[0];
    assert_ne!(
        regs.efer & (1 << 10),
        0,
        "EFER.LMA: the guest runs in long mode"
    );
    assert_ne!(regs.cr0 & (1 << 31), 0, "CR0.PG");
    let out = String::from_utf8(g.serial.contents()).expect("ASCII console");
    assert!(out.starts_with("vmr test guest: 64-bit\n"), "{out}");
    assert!(
        out.contains("\ntick 16 ") && out.contains("\ntick 32 "),
        "{out}"
    );
    g.ports.with(|s| assert_eq!(s.values.len(), 32));
    std::thread::sleep(Duration::from_millis(10));
    assert!(g.vm.is_stopped());
}
