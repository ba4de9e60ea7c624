//! Pause, snapshot, restore into a new VM; incremental snapshots and
//! chains.

mod common;

use std::collections::BTreeSet;

use common::*;
use vmr_vmm::guest_abi::{
    dirty_pattern, dirty_span_command, TestPorts, ARENA_GPA, CMD_COUNT, CMD_DIRTY, END_OF_LIST,
    SPAN_FIRST_PAGE,
};
use vmr_vmm::memory::PAGE_SIZE;
use vmr_vmm::serial::SharedBuffer;
use vmr_vmm::snapshot::{restore_memory, MemoryKind, RestoreMemory, SnapshotData};
use vmr_vmm::vm::{RestoreOptions, Vm};

fn restore(dir: &std::path::Path, memory: RestoreMemory) -> (Vm, TestPorts, SharedBuffer) {
    let serial = SharedBuffer::default();
    let (vm, devices) = Vm::restore(
        dir,
        RestoreOptions {
            memory,
            serial_out: Some(Box::new(serial.clone())),
            dirty_log: true,
        },
    )
    .expect("restore");
    assert!(devices.is_empty());
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports free");
    (vm, ports, serial)
}

#[test]
// Heavy: needs /dev/kvm.
fn clone_continues_from_the_snapshot_point() {
    const AFTER: usize = 400;
    let dir = tempfile::tempdir().expect("tempdir");
    let g = boot(64 << 20);
    g.ports.push_commands(&[CMD_COUNT]); // forever
    wait_values(&g.ports, 200);
    g.vm.pause().expect("pause");
    let snap = dir.path().join("mid");
    g.vm.snapshot(&snap, MemoryKind::Full).expect("snapshot");
    let k = g.ports.with(|s| s.values.len());
    let s0 = g.serial.contents().len();
    g.vm.resume().expect("resume");
    wait_values(&g.ports, k + AFTER);
    g.vm.pause().expect("pause");
    let original: Vec<u32> = g.ports.with(|s| s.values[k..k + AFTER].to_vec());
    let original_serial = g.serial.contents()[s0..].to_vec();
    drop(g);

    let saved = SnapshotData::load(&snap).expect("state file");
    for mode in [RestoreMemory::PrivateLazy, RestoreMemory::SharedCopy] {
        let (clone, ports, serial) = restore(&snap, mode);
        // vCPU state round trip: save -> file -> restore -> save.
        let now = clone.vcpu_states().expect("state of the paused clone");
        assert_eq!(now.len(), saved.vcpus.len());
        assert_eq!(now[0].regs, saved.vcpus[0].regs);
        assert_eq!(now[0].sregs, saved.vcpus[0].sregs);
        assert_eq!(now[0].fpu, saved.vcpus[0].fpu);
        assert_eq!(
            now[0].xcrs.map(|x| x.xcrs),
            saved.vcpus[0].xcrs.map(|x| x.xcrs)
        );
        assert_eq!(
            now[0].lapic.map(|l| l.regs.to_vec()),
            saved.vcpus[0].lapic.map(|l| l.regs.to_vec())
        );
        clone.resume().expect("resume clone");
        wait_values(&ports, AFTER);
        clone.pause().expect("pause clone");
        let got: Vec<u32> = ports.with(|s| s.values[..AFTER].to_vec());
        assert_eq!(
            got, original,
            "{mode:?}: the clone's values differ from the original's"
        );
        let cs = serial.contents();
        let n = cs.len().min(original_serial.len());
        assert!(
            n > 400,
            "{mode:?}: too little console output to compare ({n} bytes)"
        );
        assert_eq!(
            String::from_utf8_lossy(&cs[..n]),
            String::from_utf8_lossy(&original_serial[..n]),
            "{mode:?}: console output differs"
        );
        assert!(
            ports.with(|s| s.boot_at.is_none()),
            "the clone must not reboot"
        );
    }
}

fn dirty(ports: &TestPorts, pages: &[u32], done_before: usize) {
    let mut cmd = vec![CMD_DIRTY];
    cmd.extend_from_slice(pages);
    cmd.push(END_OF_LIST);
    ports.push_commands(&cmd);
    wait_done(ports, done_before + 1);
    assert_eq!(ports.with(|s| s.done[done_before]), pages.len() as u32);
}

fn gpa_pages(arena_pages: &[u32]) -> BTreeSet<u64> {
    arena_pages
        .iter()
        .map(|p| ARENA_GPA / PAGE_SIZE + u64::from(*p))
        .collect()
}

#[test]
// Heavy: needs /dev/kvm.
fn incremental_snapshots_hold_exactly_the_dirtied_pages_and_chain_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, inc1, inc2, full2) = (
        dir.path().join("base"),
        dir.path().join("inc1"),
        dir.path().join("inc2"),
        dir.path().join("full2"),
    );
    let g = boot(64 << 20);
    // The guest idles polling the command port (registers only).
    g.vm.pause().expect("pause");
    g.vm.snapshot(&base, MemoryKind::Full).expect("base");
    g.vm.resume().expect("resume");

    let p1: Vec<u32> = vec![0, 1, 2, 100, 513, 1023];
    dirty(&g.ports, &p1, 0);
    g.vm.pause().expect("pause");
    let i1 = g.vm.snapshot(&inc1, MemoryKind::Incremental).expect("inc1");
    assert_eq!(
        i1.dirty_pages.iter().copied().collect::<BTreeSet<_>>(),
        gpa_pages(&p1),
        "increment 1 must hold exactly the dirtied pages"
    );
    assert_eq!(i1.pages, p1.len() as u64);
    g.vm.resume().expect("resume");

    let p2: Vec<u32> = (200..264).chain([1, 1023]).collect();
    dirty(&g.ports, &p2, 1);
    g.vm.pause().expect("pause");
    let i2 = g.vm.snapshot(&inc2, MemoryKind::Incremental).expect("inc2");
    assert_eq!(
        i2.dirty_pages.iter().copied().collect::<BTreeSet<_>>(),
        gpa_pages(&p2)
    );
    // A full snapshot at the same point, for comparison.
    g.vm.snapshot(&full2, MemoryKind::Full).expect("full2");
    // SAFETY: the VM is paused; nothing writes guest memory.
    let live = unsafe { g.vm.memory().as_slice() }.to_vec();
    drop(g);

    let chained = restore_memory(&inc2, RestoreMemory::SharedCopy).expect("chain");
    let full = restore_memory(&full2, RestoreMemory::SharedCopy).expect("full");
    // SAFETY: these memories belong to no VM.
    let (chained, full) = unsafe { (chained.as_slice().to_vec(), full.as_slice().to_vec()) };
    assert!(
        chained == full,
        "base + increments differs from the full snapshot"
    );
    assert!(
        chained == live,
        "the restored image differs from the VM's memory"
    );
    let word = |img: &[u8], page: u32| {
        let o = (ARENA_GPA + u64::from(page) * PAGE_SIZE) as usize;
        u64::from_le_bytes(img[o..o + 8].try_into().expect("8 bytes"))
    };
    assert_eq!(word(&chained, 0), dirty_pattern(0, 1));
    assert_eq!(word(&chained, 1), dirty_pattern(1, 2));
    assert_eq!(word(&chained, 300), 0);

    // The restored chain runs: a third round lands where expected.
    let (clone, ports, _serial) = restore(&inc2, RestoreMemory::PrivateLazy);
    clone.resume().expect("resume");
    dirty(&ports, &[5, 6], 0);
    clone.pause().expect("pause");
    // SAFETY: paused.
    let img = unsafe { clone.memory().as_slice() }.to_vec();
    assert_eq!(word(&img, 5), dirty_pattern(5, 3));
    assert_eq!(word(&img, 1), dirty_pattern(1, 2));
    // Writing into a directory of its own chain is refused.
    let e = clone
        .snapshot(&base, MemoryKind::Full)
        .expect_err("base is in the chain");
    assert!(e.to_string().contains("depends on"), "{e}");
    // And its own increment holds just those two pages.
    let i3 = clone
        .snapshot(&dir.path().join("inc3"), MemoryKind::Incremental)
        .expect("inc3");
    assert_eq!(
        i3.dirty_pages.iter().copied().collect::<BTreeSet<_>>(),
        gpa_pages(&[5, 6])
    );
    // A full snapshot of the clone (whose memory the private restore of a
    // chain fills lazily) holds every page as the clone sees it.
    let full3 = dir.path().join("full3");
    clone.snapshot(&full3, MemoryKind::Full).expect("full3");
    let written =
        std::fs::read(full3.join(vmr_vmm::snapshot::FULL_MEMORY_FILE)).expect("memory.bin");
    assert!(
        written == img,
        "the full snapshot differs from the clone's memory"
    );
}

#[test]
// Heavy: needs /dev/kvm.
fn two_vcpus_pause_snapshot_and_restore() {
    use vmr_vmm::vm::{BootSource, VmConfig};
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vm = Vm::new(VmConfig {
        mem_size: 32 << 20,
        vcpus: 2,
        ..Default::default()
    })
    .expect("VM with two vCPUs");
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports");
    vm.load(&BootSource::Elf(guest_elf())).expect("load");
    vm.start().expect("start");
    ports.push_commands(&[CMD_COUNT]);
    wait_values(&ports, 50);
    // vCPU 1 waits for INIT/SIPI inside KVM_RUN; the kick must reach it too.
    vm.pause().expect("pause both");
    let snap = dir.path().join("s");
    vm.snapshot(&snap, MemoryKind::Full).expect("snapshot");
    let k = ports.with(|s| s.values.len());
    vm.resume().expect("resume");
    wait_values(&ports, k + 100);
    vm.pause().expect("pause");
    let original: Vec<u32> = ports.with(|s| s.values[k..k + 100].to_vec());
    drop(vm);

    let data = SnapshotData::load(&snap).expect("state");
    assert_eq!(data.vcpus.len(), 2);
    assert_eq!(
        data.vcpus[1].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED
    );
    let (clone, ports, _) = restore(&snap, RestoreMemory::PrivateLazy);
    assert_eq!(clone.vcpus().len(), 2);
    clone.resume().expect("resume");
    wait_values(&ports, 100);
    clone.pause().expect("pause");
    assert_eq!(ports.with(|s| s.values[..100].to_vec()), original);
}

fn arena_word(img: &[u8], page: u32) -> u64 {
    let o = (ARENA_GPA + u64::from(page) * PAGE_SIZE) as usize;
    u64::from_le_bytes(img[o..o + 8].try_into().expect("8 bytes"))
}

#[test]
// Heavy: needs /dev/kvm.
fn a_failed_incremental_snapshot_keeps_its_dirty_pages_for_the_next_one() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().expect("tempdir");
    let g = boot(64 << 20);
    let dev = FaultDevice::new("fault");
    g.vm.add_snapshot_device(dev.clone());
    g.vm.pause().expect("pause");
    let base = dir.path().join("base");
    g.vm.snapshot(&base, MemoryKind::Full).expect("base");
    g.vm.resume().expect("resume");

    // Pages the guest writes (KVM's log) and one a "backend" writes
    // behind KVM's back (the device's report).
    let guest_pages = [3u32, 7, 900];
    dirty(&g.ports, &guest_pages, 0);
    g.vm.pause().expect("pause");
    let backend_page = 500u32;
    let backend_gpa = ARENA_GPA + u64::from(backend_page) * PAGE_SIZE;
    dev.write_behind_kvm(&g.vm, backend_gpa, b"written by a backend");

    // 1: the memory file cannot be created (a directory is in its way),
    // after KVM's log and the device's pages were drained.
    let blocked = dir.path().join("blocked");
    std::fs::create_dir_all(blocked.join("memory.diff")).expect("mkdir");
    let e =
        g.vm.snapshot(&blocked, MemoryKind::Incremental)
            .expect_err("memory.diff is a directory");
    assert!(e.to_string().contains("memory.diff"), "{e}");
    assert!(!blocked.join("vmstate.bin").exists());
    // 2: a device cannot save its state.
    dev.fail_save.store(true, SeqCst);
    let e =
        g.vm.snapshot(&dir.path().join("refused"), MemoryKind::Incremental)
            .expect_err("the device fails");
    assert!(e.to_string().contains("injected save failure"), "{e}");
    dev.fail_save.store(false, SeqCst);

    // The next incremental snapshot still has every page since the base.
    let good = dir.path().join("good");
    let info =
        g.vm.snapshot(&good, MemoryKind::Incremental)
            .expect("incremental");
    let mut want = gpa_pages(&guest_pages);
    want.insert(backend_gpa / PAGE_SIZE);
    assert_eq!(
        info.dirty_pages.iter().copied().collect::<BTreeSet<_>>(),
        want,
        "the pages drained by the failed snapshots are in the next one"
    );
    // Its parent is the last snapshot that succeeded.
    let meta = SnapshotData::load(&good).expect("state").meta;
    assert_eq!(
        meta.memory.parent.as_deref(),
        Some(std::path::Path::new("../base"))
    );
    // SAFETY: paused; nothing writes guest memory.
    let live = unsafe { g.vm.memory().as_slice() }.to_vec();
    drop(g);

    let chained = restore_memory(&good, RestoreMemory::SharedCopy).expect("chain");
    // SAFETY: this memory belongs to no VM.
    let chained = unsafe { chained.as_slice() }.to_vec();
    assert!(
        chained == live,
        "base + increment differs from the VM's memory"
    );
    for p in guest_pages {
        assert_eq!(arena_word(&chained, p), dirty_pattern(p, 1));
    }
    let o = backend_gpa as usize;
    assert_eq!(&chained[o..o + 20], b"written by a backend");
}

#[test]
// Heavy: needs /dev/kvm.
fn a_chain_of_three_moved_elsewhere_restores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chain = dir.path().join("chain");
    let g = boot(64 << 20);
    g.vm.pause().expect("pause");
    g.vm.snapshot(&chain.join("0000"), MemoryKind::Full)
        .expect("0000");
    g.vm.resume().expect("resume");
    dirty(&g.ports, &[1, 2, 3], 0);
    g.vm.pause().expect("pause");
    g.vm.snapshot(&chain.join("0001"), MemoryKind::Incremental)
        .expect("0001");
    g.vm.resume().expect("resume");
    dirty(&g.ports, &[2, 50], 1);
    g.vm.pause().expect("pause");
    g.vm.snapshot(&chain.join("0002"), MemoryKind::Incremental)
        .expect("0002");
    // SAFETY: paused; nothing writes guest memory.
    let live = unsafe { g.vm.memory().as_slice() }.to_vec();
    drop(g);
    for (child, parent) in [("0001", "../0000"), ("0002", "../0001")] {
        let meta = SnapshotData::load(&chain.join(child)).expect("state").meta;
        assert_eq!(
            meta.memory.parent.as_deref(),
            Some(std::path::Path::new(parent)),
            "{child} names its parent relative to itself"
        );
    }

    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let moved = elsewhere.join("moved");
    std::fs::rename(&chain, &moved).expect("move the chain");
    assert!(!chain.exists());

    let img = restore_memory(&moved.join("0002"), RestoreMemory::SharedCopy).expect("chain");
    // SAFETY: this memory belongs to no VM.
    let img = unsafe { img.as_slice() }.to_vec();
    assert!(img == live, "the moved chain differs from the VM's memory");
    assert_eq!(arena_word(&img, 1), dirty_pattern(1, 1));
    assert_eq!(arena_word(&img, 2), dirty_pattern(2, 2));
    assert_eq!(arena_word(&img, 50), dirty_pattern(50, 2));

    // A clone from the moved chain runs, and its own increment chains on.
    let (clone, ports, _serial) = restore(&moved.join("0002"), RestoreMemory::PrivateLazy);
    clone.resume().expect("resume");
    dirty(&ports, &[5], 0);
    clone.pause().expect("pause");
    let i3 = clone
        .snapshot(&moved.join("0003"), MemoryKind::Incremental)
        .expect("0003");
    assert_eq!(
        i3.dirty_pages.iter().copied().collect::<BTreeSet<_>>(),
        gpa_pages(&[5])
    );
    // SAFETY: paused.
    let live = unsafe { clone.memory().as_slice() }.to_vec();
    drop(clone);
    let img = restore_memory(&moved.join("0003"), RestoreMemory::SharedCopy).expect("chain");
    // SAFETY: this memory belongs to no VM.
    let img = unsafe { img.as_slice() }.to_vec();
    assert!(img == live);
    assert_eq!(arena_word(&img, 5), dirty_pattern(5, 3));
}

#[test]
// Heavy: needs /dev/kvm.
fn a_dirty_span_of_five_percent_of_a_512_mib_guest_is_one_increment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = boot(512 << 20);
    g.vm.pause().expect("pause");
    g.vm.snapshot(&dir.path().join("base"), MemoryKind::Full)
        .expect("base");
    g.vm.resume().expect("resume");
    // 5 % of 131072 pages, every 19th page from 8 MiB on.
    let (first, count, stride) = (SPAN_FIRST_PAGE as u32, 6554u32, 19u32);
    // Pages below SPAN_FIRST_PAGE are skipped, not written.
    g.ports.push_commands(&dirty_span_command(0, 4, 1));
    wait_done(&g.ports, 1);
    assert_eq!(g.ports.with(|s| s.done[0]), 0);
    g.ports
        .push_commands(&dirty_span_command(first, count, stride));
    wait_done(&g.ports, 2);
    assert_eq!(g.ports.with(|s| s.done[1]), count);
    g.vm.pause().expect("pause");
    let inc = dir.path().join("inc");
    let i = g.vm.snapshot(&inc, MemoryKind::Incremental).expect("inc");
    let want: BTreeSet<u64> = (0..u64::from(count))
        .map(|k| u64::from(first) + k * u64::from(stride))
        .collect();
    let got: BTreeSet<u64> = i.dirty_pages.iter().copied().collect();
    assert!(
        want.is_subset(&got),
        "{} of the {count} span pages are missing from the increment",
        want.difference(&got).count()
    );
    // Besides the span: at most the guest's stack and data pages.
    assert!(
        got.len() <= want.len() + 8,
        "{} pages beyond the span",
        got.len() - want.len()
    );
    drop(g);
    let mem = restore_memory(&inc, RestoreMemory::SharedCopy).expect("chain");
    // SAFETY: this memory belongs to no VM.
    let img = unsafe { mem.as_slice() };
    for p in [
        first as u64,
        u64::from(first) + u64::from(stride) * u64::from(count - 1),
    ] {
        let o = (p * PAGE_SIZE) as usize;
        let w = u64::from_le_bytes(img[o..o + 8].try_into().expect("8 bytes"));
        // The span's own round counter: its second command.
        assert_eq!(w, dirty_pattern(p as u32, 2), "page {p:#x}");
    }
}
