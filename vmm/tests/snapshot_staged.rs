//! Staged snapshots: written while the VM is paused, made durable and put
//! in place after it resumed (`Vm::snapshot_staged`, then
//! `Vm::complete_snapshot`).

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use vmr_vmm::guest_abi::{dirty_pattern, TestPorts, ARENA_GPA, CMD_DIRTY, END_OF_LIST};
use vmr_vmm::memory::PAGE_SIZE;
use vmr_vmm::snapshot::{restore_memory, MemoryKind, RestoreMemory, STATE_FILE};
use vmr_vmm::vm::{RestoreOptions, Vm};

/// Pushes a dirty command (without waiting for it).
fn push_dirty(ports: &TestPorts, pages: &[u32]) {
    let mut cmd = vec![CMD_DIRTY];
    cmd.extend_from_slice(pages);
    cmd.push(END_OF_LIST);
    ports.push_commands(&cmd);
}

fn dirty(ports: &TestPorts, pages: &[u32], done_before: usize) {
    push_dirty(ports, pages);
    wait_done(ports, done_before + 1);
    assert_eq!(ports.with(|s| s.done[done_before]), pages.len() as u32);
}

fn gpa_pages(arena_pages: &[u32]) -> BTreeSet<u64> {
    arena_pages
        .iter()
        .map(|p| ARENA_GPA / PAGE_SIZE + u64::from(*p))
        .collect()
}

fn arena_word(img: &[u8], page: u32) -> u64 {
    let o = (ARENA_GPA + u64::from(page) * PAGE_SIZE) as usize;
    u64::from_le_bytes(img[o..o + 8].try_into().expect("8 bytes"))
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("readable")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// What a crash at this point would leave: nothing that restores.
fn assert_not_a_snapshot(dir: &Path) {
    assert!(
        !dir.join(STATE_FILE).exists(),
        "{} has a state file before the snapshot completed",
        dir.display()
    );
    for n in names(dir) {
        assert!(
            n.ends_with(".tmp"),
            "{n} in {} is not a staging file",
            dir.display()
        );
    }
    let e = restore_memory(dir, RestoreMemory::SharedCopy).expect_err("not a snapshot");
    assert!(e.to_string().contains(STATE_FILE), "{e}");
    let e = Vm::restore(dir, RestoreOptions::default()).expect_err("not a snapshot");
    assert!(e.to_string().contains(STATE_FILE), "{e}");
}

#[test]
// Heavy: needs /dev/kvm.
fn a_staged_snapshot_holds_the_cut_and_pages_dirtied_before_it_completes_are_in_the_next() {
    let root = tempfile::tempdir().expect("tempdir");
    let (base, inc1, inc2) = (
        root.path().join("base"),
        root.path().join("inc1"),
        root.path().join("inc2"),
    );
    let g = boot(64 << 20);
    g.vm.pause().expect("pause");
    g.vm.snapshot(&base, MemoryKind::Full).expect("base");
    g.vm.resume().expect("resume");

    let p1: Vec<u32> = vec![0, 1, 2, 100, 513, 1023];
    dirty(&g.ports, &p1, 0);
    g.vm.pause().expect("pause");
    let staged =
        g.vm.snapshot_staged(&inc1, MemoryKind::Incremental)
            .expect("staged");
    assert_eq!(
        staged
            .info()
            .dirty_pages
            .iter()
            .copied()
            .collect::<BTreeSet<_>>(),
        gpa_pages(&p1)
    );
    // A second snapshot cannot start: its parent is not known yet.
    let e =
        g.vm.snapshot_staged(&root.path().join("other"), MemoryKind::Incremental)
            .expect_err("one staged snapshot at a time");
    assert!(e.to_string().contains("not completed"), "{e}");
    g.vm.resume().expect("resume");
    assert_not_a_snapshot(&inc1);

    // The guest runs on before the snapshot is durable: it rewrites pages
    // of the cut (1, 1023) and new ones, some before the completion starts
    // and some while it syncs.
    let p2: Vec<u32> = vec![1, 7, 300];
    dirty(&g.ports, &p2, 1);
    let p3: Vec<u32> = vec![1023, 8, 900];
    let info = std::thread::scope(|s| {
        let done = s.spawn(|| g.vm.complete_snapshot(staged));
        push_dirty(&g.ports, &p3);
        done.join().expect("completion thread")
    })
    .expect("completes");
    wait_done(&g.ports, 3);
    assert_eq!(info.dir, inc1.canonicalize().expect("exists"));
    assert!(inc1.join(STATE_FILE).exists());
    assert!(
        names(&inc1).iter().all(|n| !n.ends_with(".tmp")),
        "{:?}",
        names(&inc1)
    );

    // The increment holds the memory at the cut, not what came after.
    let img1 = restore_memory(&inc1, RestoreMemory::SharedCopy).expect("inc1 restores");
    // SAFETY: this memory belongs to no VM.
    let img1 = unsafe { img1.as_slice() }.to_vec();
    for p in &p1 {
        assert_eq!(arena_word(&img1, *p), dirty_pattern(*p, 1), "page {p}");
    }
    assert_eq!(arena_word(&img1, 7), 0);

    // The next increment holds exactly the pages dirtied after the cut.
    g.vm.pause().expect("pause");
    let i2 = g.vm.snapshot(&inc2, MemoryKind::Incremental).expect("inc2");
    let after: Vec<u32> = p2.iter().chain(&p3).copied().collect();
    assert_eq!(
        i2.dirty_pages.iter().copied().collect::<BTreeSet<_>>(),
        gpa_pages(&after)
    );
    // SAFETY: the VM is paused; nothing writes guest memory.
    let live = unsafe { g.vm.memory().as_slice() }.to_vec();
    drop(g);
    let img2 = restore_memory(&inc2, RestoreMemory::SharedCopy).expect("chain restores");
    // SAFETY: this memory belongs to no VM.
    let img2 = unsafe { img2.as_slice() };
    assert!(
        img2 == &live[..],
        "base + inc1 + inc2 differs from the VM's memory"
    );
    assert_eq!(arena_word(&live, 1), dirty_pattern(1, 2));
    assert_eq!(arena_word(&live, 1023), dirty_pattern(1023, 3));
}

#[test]
// Heavy: needs /dev/kvm.
fn a_dropped_staged_snapshot_leaves_nothing_restorable_and_its_pages_go_to_the_next() {
    let root = tempfile::tempdir().expect("tempdir");
    let (base, lost, inc) = (
        root.path().join("base"),
        root.path().join("lost"),
        root.path().join("inc"),
    );
    let g = boot(64 << 20);
    g.vm.pause().expect("pause");
    g.vm.snapshot(&base, MemoryKind::Full).expect("base");
    g.vm.resume().expect("resume");

    let p1: Vec<u32> = vec![3, 4, 600];
    dirty(&g.ports, &p1, 0);
    g.vm.pause().expect("pause");
    let staged =
        g.vm.snapshot_staged(&lost, MemoryKind::Incremental)
            .expect("staged");
    g.vm.resume().expect("resume");
    // What a kill before the sync leaves on disk: staging files only.
    assert_not_a_snapshot(&lost);
    assert!(!names(&lost).is_empty(), "the staged files are written");
    let p2: Vec<u32> = vec![4, 5];
    dirty(&g.ports, &p2, 1);
    drop(staged);
    assert!(names(&lost).is_empty(), "{:?}", names(&lost));

    // The next increment names the base as its parent and holds the pages
    // of the dropped one too.
    g.vm.pause().expect("pause");
    let i = g.vm.snapshot(&inc, MemoryKind::Incremental).expect("inc");
    let all: Vec<u32> = p1.iter().chain(&p2).copied().collect();
    assert_eq!(
        i.dirty_pages.iter().copied().collect::<BTreeSet<_>>(),
        gpa_pages(&all)
    );
    // SAFETY: the VM is paused; nothing writes guest memory.
    let live = unsafe { g.vm.memory().as_slice() }.to_vec();
    drop(g);
    let img = restore_memory(&inc, RestoreMemory::SharedCopy).expect("restores");
    // SAFETY: this memory belongs to no VM.
    let img = unsafe { img.as_slice() };
    assert!(img == &live[..], "base + inc differs from the VM's memory");
    assert_eq!(arena_word(&live, 3), dirty_pattern(3, 1));
    assert_eq!(arena_word(&live, 4), dirty_pattern(4, 2));
}
