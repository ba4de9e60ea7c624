//! Every way a guest stops the VM is reported as a lifecycle event with the
//! registers at that moment; the probe measures the guest.

mod common;

use std::time::Duration;

use common::require_kvm;
use vmr_proto::{Lifecycle, LifecycleKind};
use vmr_vmm::boot::layout::HIMEM_START;
use vmr_vmm::vcpu::VmEvent;
use vmr_vmm::vm::{BootSource, Vm, VmConfig};

fn run_flat(code: &[u8], irqchip: bool) -> (Lifecycle, Vec<VmEvent>) {
    require_kvm();
    let mut vm = Vm::new(VmConfig {
        mem_size: 4 << 20,
        irqchip,
        ..Default::default()
    })
    .expect("VM creation");
    vm.load(&BootSource::FlatBytes(code.to_vec()))
        .expect("loads");
    let events = vm.events();
    vm.start().expect("starts");
    let stop = vm
        .wait_for_stop(Duration::from_secs(30))
        .expect("the VM stops");
    (stop, events.try_iter().collect())
}

#[test]
// Heavy: needs /dev/kvm.
fn triple_fault_is_reported_with_registers() {
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault.
    let (stop, _) = run_flat(&[0x90, 0x0f, 0x0b], true);
    assert_eq!(stop.kind, LifecycleKind::TripleFault, "{stop:?}");
    assert_eq!(stop.regs.len(), 1);
    assert_eq!(stop.regs[0].rip, HIMEM_START + 1, "rip at the faulting ud2");
}

#[test]
// Heavy: needs /dev/kvm.
fn executing_from_unbacked_memory_is_an_internal_error() {
    // mov rax, 0xd0000000; jmp rax: fetch from the MMIO hole.
    let code = [0x48, 0xb8, 0, 0, 0, 0xd0, 0, 0, 0, 0, 0xff, 0xe0];
    let (stop, _) = run_flat(&code, true);
    assert_eq!(stop.kind, LifecycleKind::InternalError, "{stop:?}");
    assert!(stop.detail.contains("INTERNAL_ERROR"), "{}", stop.detail);
    assert_eq!(stop.regs[0].rip, 0xd000_0000);
}

#[test]
// Heavy: needs /dev/kvm.
fn i8042_reset_and_debug_exit_are_shutdowns() {
    // mov al, 0xfe; out 0x64, al; jmp $
    let (stop, events) = run_flat(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe], true);
    assert_eq!(
        (stop.kind, stop.detail.as_str()),
        (LifecycleKind::Shutdown, "i8042 reset")
    );
    assert_eq!(
        stop.regs[0].rip,
        HIMEM_START + 4,
        "the out instruction completed"
    );
    assert_eq!(
        events,
        vec![
            VmEvent::Lifecycle(Lifecycle {
                kind: LifecycleKind::Boot,
                detail: String::new(),
                regs: Vec::new(),
                gap: None,
                snapshot_id: None,
            }),
            VmEvent::Lifecycle(stop.clone())
        ],
        "Boot precedes the stop, nothing follows it"
    );
    // mov al, 42; out 0xf4, al
    let (stop, _) = run_flat(&[0xb0, 42, 0xe6, 0xf4, 0xeb, 0xfe], false);
    assert_eq!(
        (stop.kind, stop.detail.as_str()),
        (LifecycleKind::Shutdown, "guest exit code 42")
    );
}

#[test]
// Heavy: needs /dev/kvm.
fn hlt_without_irqchip_stops_the_vm() {
    let (stop, _) = run_flat(&[0xf4], false);
    assert_eq!(stop.kind, LifecycleKind::Shutdown);
    assert!(stop.detail.contains("halted"), "{}", stop.detail);
}

#[test]
// Heavy: needs /dev/kvm.
fn probe_measures_the_guest() {
    require_kvm();
    let r = vmr_vmm::probe::run(Duration::from_secs(60)).expect("probe runs");
    assert_eq!(r.capabilities.api_version, 12);
    assert!(
        r.plain_ns_per_iter.is_finite() && r.plain_ns_per_iter > 0.0,
        "{r:?}"
    );
    assert!(
        r.cr3_ns_per_iter.is_finite() && r.cr3_ns_per_iter > 0.0,
        "{r:?}"
    );
    assert!(r.first_instruction_us > 0.0, "{r:?}");
    assert_eq!(
        r.linux_bootable,
        r.plain_ns_per_iter <= vmr_vmm::probe::PLAIN_LIMIT_NS
            && r.cr3_ns_per_iter <= vmr_vmm::probe::CR3_LIMIT_NS
    );
    println!("probe: {r:?}");
}
