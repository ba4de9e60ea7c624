//! A virtio-blk device survives a snapshot: the test guest brings its disk up
//! and writes to it through `vhost-tap`'s block backend (in process), the VM
//! is paused and snapshotted, and a clone restored into a new VM, connected
//! to a new backend over a copy of the disk, reads through the same
//! (restored, never reset) virtqueue and sees the data.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{guest_elf, require_kvm, WAIT};
use vhost_tap::blk::disk::map_path;
use vhost_tap::blk::{BlockBackend, BlockConfig, Disk};
use vhost_tap::metrics::Metrics;
use vhost_tap::server::Server;
use vmr_vmm::devices::dirty_log::DirtyLog;
use vmr_vmm::devices::mmio::DeviceKind;
use vmr_vmm::devices::{self, VirtioSpec};
use vmr_vmm::guest_abi::TestPorts;
use vmr_vmm::snapshot::{MemoryKind, RestoreMemory};
use vmr_vmm::vm::{BootSource, RestoreOptions, Vm, VmConfig};

/// Commands of `guest/test-guest/workload.h`.
const CMD_BLK_SELFTEST: u32 = 0x12;
const CMD_BLK_READ: u32 = 0x13;
const MEM: u64 = 32 << 20;

fn serve(image: &Path, overlay: &Path, socket: &Path) -> (Server, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let backend = BlockBackend::new(
        BlockConfig::new("vda"),
        Disk::open(image, Some(overlay), false).expect("image opens"),
        None,
        None,
        metrics.clone(),
    )
    .expect("valid config");
    (
        Server::spawn("blk", backend, socket, true).expect("socket free"),
        metrics,
    )
}

fn elf_path() -> std::path::PathBuf {
    guest_elf()
}

fn symbol(elf: &Path, name: &str) -> u64 {
    let out = std::process::Command::new("nm")
        .arg(elf)
        .output()
        .expect("`nm` (binutils) is required");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, _, sym) = (f.next()?, f.next()?, f.next()?);
            (sym == name)
                .then(|| u64::from_str_radix(addr, 16).ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("{name} not in {}", elf.display()))
}

#[test]
// Heavy: needs /dev/kvm.
fn restored_clone_reads_through_the_saved_virtqueue() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let image = dir.join("disk.raw");
    let mut content = vec![0u8; 256 << 10];
    content[..4].copy_from_slice(&0xfeed_f00du32.to_le_bytes());
    std::fs::write(&image, &content).expect("temp dir is writable");

    let (server_a, _) = serve(&image, &dir.join("a.overlay"), &dir.join("a.sock"));
    let mut vm = Vm::new(VmConfig {
        mem_size: MEM,
        ..Default::default()
    })
    .expect("VM creation");
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports free");
    let log = Arc::new(DirtyLog::new(MEM).expect("memfd"));
    devices::attach(
        &vm,
        VirtioSpec {
            kind: DeviceKind::Block,
            socket: dir.join("a.sock"),
            local_config: DeviceKind::Block.local_config(0, [0; 6]),
        },
        Some(log),
    )
    .expect("backend reachable");
    vm.load(&BootSource::Elf(elf)).expect("guest loads");
    vm.start().expect("vCPUs start");
    ports.push_commands(&[CMD_BLK_SELFTEST]);
    assert!(
        ports.wait(WAIT, |s| !s.done.is_empty()),
        "self-test did not finish"
    );
    ports.with(|s| assert_eq!(s.done, vec![0], "self-test result"));

    vm.pause().expect("pause stops the device's rings");
    let snap = dir.join("snap");
    let info = vm
        .snapshot(&snap, MemoryKind::Full)
        .expect("snapshot with a vhost-user device");
    assert!(info.pages > 0);
    // The disk state at the cut: the overlay and its allocation map.
    std::fs::copy(dir.join("a.overlay"), dir.join("b.overlay")).expect("overlay copy");
    std::fs::copy(
        map_path(&dir.join("a.overlay")),
        map_path(&dir.join("b.overlay")),
    )
    .expect("map copy");
    drop(vm);
    let _ = server_a.stop();

    let (server_b, metrics_b) = serve(&image, &dir.join("b.overlay"), &dir.join("b.sock"));
    let (clone, states) = Vm::restore(
        &snap,
        RestoreOptions {
            memory: RestoreMemory::SharedCopy,
            ..Default::default()
        },
    )
    .expect("restore");
    assert!(states.iter().any(|s| s.id == "virtio-blk0"), "{states:?}");
    let ports_b = TestPorts::new();
    ports_b.attach(&clone.pio_bus()).expect("ports free");
    let log_b = Arc::new(DirtyLog::new(MEM).expect("memfd"));
    let restored = devices::restore(&clone, &states, |_, _| dir.join("b.sock"), Some(log_b))
        .expect("device reconnects");
    assert_eq!(restored.len(), 1);
    clone.resume().expect("clone runs");
    ports_b.push_commands(&[CMD_BLK_READ | (1 << 8), CMD_BLK_READ]);
    assert!(
        ports_b.wait(WAIT, |s| s.done.len() >= 2),
        "clone reads did not finish"
    );
    ports_b.with(|s| {
        assert_eq!(s.done, vec![0, 0], "clone read results");
        assert_eq!(
            s.values,
            vec![u32::from_le_bytes(*b"BLKT"), 0xfeed_f00d],
            "sector 1 as written before the snapshot, sector 0 from the image"
        );
    });
    assert_eq!(
        metrics_b
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the new backend served exactly the clone's two reads (nothing replayed)"
    );

    // An incremental snapshot of the clone includes the page of the guest's
    // block buffer, which only the backend writes (on reads) and KVM's own
    // dirty log therefore cannot see.
    clone.pause().expect("pause the clone");
    let inc = clone
        .snapshot(&dir.join("snap2"), MemoryKind::Incremental)
        .expect("incremental snapshot with a logging device");
    let buf_page = symbol(&elf_path(), "blk_data") / 4096;
    assert!(
        inc.dirty_pages.contains(&buf_page),
        "page {buf_page:#x} of the read buffer is in {:?}",
        inc.dirty_pages
    );
    drop(clone);
    let _ = server_b.stop();
}

/// Whether the page at host address `addr` is in memory (for shared memory:
/// in the memfd's page cache).
fn resident(addr: u64) -> bool {
    let mut v = [0u8; 1];
    // SAFETY: mincore only reads the page tables for one page of a live
    // mapping and writes one byte into `v`.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, 4096, v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    v[0] & 1 != 0
}

#[test]
// Heavy: needs /dev/kvm and userfaultfd.
fn a_backend_write_into_an_untouched_page_keeps_the_rest_of_it() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; 256 << 10]).expect("temp dir is writable");

    let (server_a, _) = serve(&image, &dir.join("a.overlay"), &dir.join("a.sock"));
    let mut vm = Vm::new(VmConfig {
        mem_size: MEM,
        ..Default::default()
    })
    .expect("VM creation");
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports free");
    devices::attach(
        &vm,
        VirtioSpec {
            kind: DeviceKind::Block,
            socket: dir.join("a.sock"),
            local_config: DeviceKind::Block.local_config(0, [0; 6]),
        },
        Some(Arc::new(DirtyLog::new(MEM).expect("memfd"))),
    )
    .expect("backend reachable");
    vm.load(&BootSource::Elf(elf.clone())).expect("guest loads");
    vm.start().expect("vCPUs start");
    // The self-test writes "BLKT..." to sector 1.
    ports.push_commands(&[CMD_BLK_SELFTEST]);
    assert!(
        ports.wait(WAIT, |s| !s.done.is_empty()),
        "self-test did not finish"
    );
    vm.pause().expect("pause");
    // The guest's 4 KiB block buffer (page aligned): a sector read fills
    // its first 512 bytes. Give the other 3584 a pattern the snapshot holds.
    let buf = symbol(&elf, "blk_data");
    assert_eq!(buf % 4096, 0, "blk_data is page aligned");
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    {
        use vm_memory::{Bytes, GuestAddress};
        vm.memory()
            .guest_memory()
            .write_slice(&pattern[512..], GuestAddress(buf + 512))
            .expect("in RAM");
    }
    let snap = dir.join("snap");
    vm.snapshot(&snap, MemoryKind::Full).expect("snapshot");
    std::fs::copy(dir.join("a.overlay"), dir.join("b.overlay")).expect("overlay copy");
    std::fs::copy(
        map_path(&dir.join("a.overlay")),
        map_path(&dir.join("b.overlay")),
    )
    .expect("map copy");
    drop(vm);
    let _ = server_a.stop();

    // On demand: no background prefetch, so only accesses bring pages in.
    let (server_b, _) = serve(&image, &dir.join("b.overlay"), &dir.join("b.sock"));
    let (clone, states) = Vm::restore(
        &snap,
        RestoreOptions {
            memory: RestoreMemory::SharedOnDemand,
            ..Default::default()
        },
    )
    .expect("restore");
    let ports_b = TestPorts::new();
    ports_b.attach(&clone.pio_bus()).expect("ports free");
    devices::restore(
        &clone,
        &states,
        |_, _| dir.join("b.sock"),
        Some(Arc::new(DirtyLog::new(MEM).expect("memfd"))),
    )
    .expect("device reconnects (and joins postcopy)");
    let mem = clone.memory();
    let lazy = mem.lazy().cloned().expect("restored lazily");
    let host = mem.host_base() as u64 + buf;
    assert!(!resident(host), "nothing touched the buffer page yet");
    clone.resume().expect("clone runs");
    ports_b.push_commands(&[CMD_BLK_READ | (1 << 8)]);
    assert!(
        ports_b.wait(WAIT, |s| !s.done.is_empty()),
        "clone read did not finish"
    );
    ports_b.with(|s| {
        assert_eq!(s.done, vec![0], "read result");
        assert_eq!(s.values, vec![u32::from_le_bytes(*b"BLKT")]);
    });
    clone.pause().expect("pause the clone");
    let stats = lazy.stats();
    assert!(
        stats.backend_faults > 0,
        "the backend's accesses were served: {stats:?}"
    );
    assert!(stats.error.is_none(), "{stats:?}");
    let mut page = vec![0u8; 4096];
    {
        use vm_memory::{Bytes, GuestAddress};
        mem.guest_memory()
            .read_slice(&mut page, GuestAddress(buf))
            .expect("in RAM");
    }
    assert_eq!(&page[..4], b"BLKT", "the backend's 512 bytes are there");
    assert!(
        page[512..] == pattern[512..],
        "the rest of the page keeps the snapshot's contents"
    );
    // An incremental snapshot of the lazy clone holds the page the backend
    // wrote (its dirty log), and the chain restores it whole.
    let inc = clone
        .snapshot(&dir.join("snap2"), MemoryKind::Incremental)
        .expect("incremental snapshot of a lazy clone");
    assert!(
        inc.dirty_pages.contains(&(buf / 4096)),
        "page {:#x} is in {:?}",
        buf / 4096,
        inc.dirty_pages
    );
    drop(clone);
    let _ = server_b.stop();
    let (again, _) = Vm::restore(
        &dir.join("snap2"),
        RestoreOptions {
            memory: RestoreMemory::SharedOnDemand,
            ..Default::default()
        },
    )
    .expect("restore the chain lazily");
    let mut back = vec![0u8; 4096];
    {
        use vm_memory::{Bytes, GuestAddress};
        again
            .memory()
            .guest_memory()
            .read_slice(&mut back, GuestAddress(buf))
            .expect("in RAM");
    }
    assert!(
        back == page,
        "the chain restores the page as the clone had it"
    );
}
