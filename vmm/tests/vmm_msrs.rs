//! The batched MSR probe a VM uses to choose the MSRs its snapshots save
//! gives the same list as probing each MSR with its own `KVM_GET_MSRS`.
//! Heavy: needs /dev/kvm.

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmr_vmm::vm::Vm;

/// A fresh vCPU (as the VM probes it: right after `KVM_CREATE_VCPU`).
fn vcpu() -> (Kvm, VmFd, VcpuFd) {
    let kvm = Kvm::new().unwrap_or_else(|e| panic!("this test needs /dev/kvm: {e}"));
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    (kvm, vm, vcpu)
}

/// One `KVM_GET_MSRS` per MSR: the entries KVM reads alone.
fn one_by_one(vcpu: &VcpuFd, indices: &[u32]) -> Vec<u32> {
    indices
        .iter()
        .copied()
        .filter(|&index| {
            let e = [kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            }];
            let mut m = kvm_bindings::Msrs::from_entries(&e).expect("one entry");
            vcpu.get_msrs(&mut m).ok() == Some(1)
        })
        .collect()
}

#[test]
fn batched_probe_matches_one_by_one_on_kvms_list() {
    let (kvm, _vm, vcpu) = vcpu();
    let list = kvm.get_msr_index_list().expect("KVM_GET_MSR_INDEX_LIST");
    let list = list.as_slice();
    assert!(!list.is_empty(), "KVM lists no MSRs");
    let expected = one_by_one(&vcpu, list);
    assert!(!expected.is_empty(), "no MSR of KVM's list is readable");
    assert_eq!(Vm::readable_msrs(&vcpu, list), expected);
}

#[test]
fn batched_probe_skips_unreadable_entries_anywhere() {
    let (kvm, _vm, vcpu) = vcpu();
    let list = kvm.get_msr_index_list().expect("KVM_GET_MSR_INDEX_LIST");
    let readable = one_by_one(&vcpu, list.as_slice());
    // Indices outside every MSR range KVM knows.
    let bogus: Vec<u32> = (0..8).map(|i| 0xdead_0000 + i).collect();
    assert!(
        one_by_one(&vcpu, &bogus).is_empty(),
        "KVM reads unknown MSRs (kvm.ignore_msrs is set?)"
    );
    // Unreadable entries first, between, in a row and last, over more
    // entries than one KVM_GET_MSRS call takes.
    let mut indices = vec![bogus[0]];
    let mut want = Vec::new();
    let mut b = bogus.iter().cycle().skip(1);
    while indices.len() <= kvm_bindings::KVM_MAX_MSR_ENTRIES + 8 {
        for &i in &readable {
            indices.push(i);
            want.push(i);
            if i % 7 == 0 {
                indices.push(*b.next().expect("cycles"));
            }
        }
        indices.extend(b.by_ref().take(2));
    }
    indices.push(bogus[7]);
    assert_eq!(one_by_one(&vcpu, &indices), want);
    assert_eq!(Vm::readable_msrs(&vcpu, &indices), want);
    assert_eq!(Vm::readable_msrs(&vcpu, &[]), Vec::<u32>::new());
    assert_eq!(Vm::readable_msrs(&vcpu, &bogus), Vec::<u32>::new());
}
