//! Set-up shared by the microVM benchmarks.

use vmr_vmm::vm::Vm;

/// Exits with a message naming `/dev/kvm` when it cannot be opened.
pub fn require_kvm(bench: &str) {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("{bench} bench needs /dev/kvm: {e}");
        std::process::exit(1);
    }
}

/// Makes every page of `vm`'s memory non-zero, as in a guest that has used
/// its memory. Call before the guest starts.
pub fn fill_pages(vm: &Vm) {
    let memory = vm.memory();
    // SAFETY: the guest has not started; nothing else uses the memory.
    let m = unsafe { memory.as_mut_slice() };
    for (i, page) in m.chunks_mut(4096).enumerate() {
        page[8..16].copy_from_slice(&(i as u64 | 1).to_le_bytes());
    }
}
