//! Guest debug for the gdb stub: single-stepping and hardware breakpoints
//! stop the vCPU with a debug event; registers can be read and written
//! while it is stopped.

mod common;

use std::time::Duration;

use common::require_kvm;
use crossbeam_channel::Receiver;
use vmr_proto::LifecycleKind;
use vmr_vmm::boot::layout::HIMEM_START;
use vmr_vmm::vcpu::{guest_debug, DebugEvent, VmEvent};
use vmr_vmm::vm::{BootSource, Vm, VmConfig};

fn next_debug(events: &Receiver<VmEvent>) -> DebugEvent {
    loop {
        match events
            .recv_timeout(Duration::from_secs(30))
            .expect("an event")
        {
            VmEvent::Debug(d) => return d,
            VmEvent::Lifecycle(l)
                if matches!(l.kind, LifecycleKind::Boot | LifecycleKind::Resume) => {}
            other => panic!("expected a debug stop, got {other:?}"),
        }
    }
}

#[test]
// Heavy: needs /dev/kvm.
fn single_step_and_hw_breakpoint_stop_the_vcpu() {
    require_kvm();
    // nop; nop; mov al, 5; nop; out 0xf4, al; jmp $
    let code = [0x90, 0x90, 0xb0, 0x05, 0x90, 0xe6, 0xf4, 0xeb, 0xfe];
    let mut vm = Vm::new(VmConfig {
        mem_size: 4 << 20,
        ..Default::default()
    })
    .expect("VM");
    vm.load(&BootSource::FlatBytes(code.to_vec()))
        .expect("loads");
    let events = vm.subscribe();
    vm.start_paused().expect("starts paused");
    let v = &vm.vcpus()[0];
    assert_eq!(v.get_regs().expect("regs").rip, HIMEM_START);

    v.set_guest_debug(guest_debug(true, &[], false))
        .expect("single step");
    vm.resume().expect("resume");
    let d = next_debug(&events);
    assert_eq!(
        (d.vcpu, d.exception, d.pc),
        (0, 1, HIMEM_START + 1),
        "{d:?}"
    );
    v.resume().expect("step again");
    let d = next_debug(&events);
    assert_eq!(d.pc, HIMEM_START + 2);

    // A hardware breakpoint on the last nop; no single-stepping.
    v.set_guest_debug(guest_debug(false, &[HIMEM_START + 4], false))
        .expect("breakpoint");
    v.resume().expect("run to the breakpoint");
    let d = next_debug(&events);
    assert_eq!(d.pc, HIMEM_START + 4, "{d:?}");
    let mut regs = v.get_regs().expect("regs");
    assert_eq!(regs.rax & 0xff, 5);
    regs.rax = 9;
    v.set_regs(regs).expect("set regs");
    v.set_guest_debug(guest_debug(false, &[], false))
        .expect("off");
    v.resume().expect("continue");
    let stop = vm.wait_for_stop(Duration::from_secs(30)).expect("stops");
    assert_eq!(
        stop.detail, "guest exit code 9",
        "the written register reached the guest"
    );
}
