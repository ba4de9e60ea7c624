//! Shared pieces of the snapshot tests: the microVM driver with the
//! freestanding test guest, snapshot chains it writes, and store helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_hypervisor::{
    BootSpec, Instance, InstanceSpec, MemoryKind, SnapshotArtifacts, SnapshotOptions,
};
use vmr_vmm::guest_abi::{build_test_guest, ARENA_GPA, CMD_DIRTY, END_OF_LIST};

pub const WAIT: Duration = Duration::from_secs(60);

pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm (read-write), which is unavailable: {e}");
    }
}

pub fn guest_elf() -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest");
    build_test_guest(&out).unwrap_or_else(|e| panic!("{e}"))
}

pub fn driver() -> Box<dyn vmr_hypervisor::Driver> {
    vmr_hypervisor::driver("microvm").expect("the microvm driver exists")
}

pub fn microvm(inst: &dyn Instance) -> &MicrovmInstance {
    inst.as_any()
        .downcast_ref::<MicrovmInstance>()
        .expect("a microVM instance")
}

pub fn spec(dir: &Path, id: &str, elf: &Path, memory_mib: u32) -> InstanceSpec {
    let work = dir.join(id);
    std::fs::create_dir_all(&work).expect("temp dir is writable");
    let mut spec = InstanceSpec::new(
        id,
        &work,
        BootSpec::Kernel {
            kernel: elf.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    spec.memory_mib = memory_mib;
    spec
}

/// Launches the test guest with no devices and waits for its command loop.
pub fn boot(dir: &Path, id: &str, elf: &Path, memory_mib: u32) -> Box<dyn Instance> {
    let inst = driver()
        .launch(&spec(dir, id, elf, memory_mib))
        .expect("launch");
    let ports = microvm(inst.as_ref()).ports().clone();
    assert!(
        ports.wait(WAIT, |s| s.first_read_at.is_some()),
        "guest never polled its command port"
    );
    inst
}

pub fn read_u64(inst: &MicrovmInstance, gpa: u64) -> u64 {
    use vm_memory::{Bytes, GuestAddress};
    let vm = inst.vmm().expect("running");
    vm.memory()
        .guest_memory()
        .read_obj::<u64>(GuestAddress(gpa))
        .expect("address inside guest memory")
}

/// Has the guest write its dirty pattern into arena `pages`.
pub fn dirty(inst: &MicrovmInstance, pages: &[u32]) {
    let mut words = vec![CMD_DIRTY];
    words.extend_from_slice(pages);
    words.push(END_OF_LIST);
    let before = inst.ports().with(|s| s.done.len());
    inst.ports().push_commands(&words);
    assert!(
        inst.ports().wait(WAIT, |s| s.done.len() > before),
        "dirty command did not finish"
    );
}

pub fn arena(page: u32) -> u64 {
    ARENA_GPA + u64::from(page) * 4096
}

/// Takes a snapshot into `<parent>/<id>`.
pub fn snapshot(
    inst: &dyn Instance,
    parent: &Path,
    id: &str,
    memory: MemoryKind,
) -> (PathBuf, SnapshotArtifacts) {
    let d = parent.join(id);
    std::fs::create_dir_all(&d).expect("snapshot dir");
    let arts = inst
        .snapshot(&d, SnapshotOptions { memory })
        .expect("snapshot");
    (d, arts)
}

/// A chain of three snapshots (full, incremental, incremental) of a
/// running test guest under `<dir>/snaps/0001..0003`, and the arena values
/// the last one must restore: `(page, value)`.
pub struct Chain {
    pub dirs: Vec<PathBuf>,
    pub expect: Vec<(u32, u64)>,
}

pub fn chain_of_three(inst: &dyn Instance, dir: &Path) -> Chain {
    let m = microvm(inst);
    let snaps = dir.join("snaps");
    let mut dirs = Vec::new();
    let rounds: [&[u32]; 3] = [&[1, 2, 3], &[2, 7], &[3, 9, 11]];
    for (i, p) in rounds.iter().enumerate() {
        dirty(m, p);
        let kind = if i == 0 {
            MemoryKind::Full
        } else {
            MemoryKind::Incremental
        };
        let (d, arts) = snapshot(inst, &snaps, &format!("{:04}", i + 1), kind);
        assert_eq!(arts.memory, kind);
        dirs.push(d);
    }
    let expect = [1u32, 2, 3, 7, 9, 11]
        .iter()
        .map(|&p| (p, read_u64(m, arena(p))))
        .collect();
    Chain { dirs, expect }
}

/// Restores `snapshot_dir` through the driver and checks the arena values.
pub fn restore_and_check(elf: &Path, work: &Path, snapshot_dir: &Path, expect: &[(u32, u64)]) {
    let spec = spec(work, "restored", elf, 32);
    let clone = driver()
        .restore(&spec, snapshot_dir)
        .unwrap_or_else(|e| panic!("restore from {}: {e}", snapshot_dir.display()));
    let mc = microvm(clone.as_ref());
    for &(p, v) in expect {
        assert_eq!(
            read_u64(mc, arena(p)),
            v,
            "arena page {p} of the restored clone"
        );
    }
    clone.resume().expect("the clone runs");
    dirty(mc, &[5]);
    assert_ne!(read_u64(mc, arena(5)), 0, "the clone executes guest code");
    clone.stop(Duration::from_secs(5)).expect("stop the clone");
}

/// Copies a directory tree.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let t = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_tree(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).expect("copy");
        }
    }
}

/// The path of `key` of `instance` in a file:// store rooted at `root`.
pub fn object_path(root: &Path, instance: &str, key: &str) -> PathBuf {
    root.join(instance).join(key)
}

pub fn flip_byte(path: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut b).expect("read");
    b[0] ^= 0x5a;
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.write_all(&b).expect("write");
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
