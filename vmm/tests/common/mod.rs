//! Helpers shared by the VMM's KVM tests.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use vmr_vmm::devices::mmio::VirtioMmioDevice;
use vmr_vmm::devices::vhost_user::SharedRegion;
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

/// A new VM with the test ports attached and its console captured; nothing
/// is loaded yet.
pub fn new_guest(mem_size: u64) -> Guest {
    require_kvm();
    let serial = SharedBuffer::default();
    let vm = Vm::new(VmConfig {
        mem_size,
        serial_out: Some(Box::new(serial.clone())),
        ..Default::default()
    })
    .expect("VM creation");
    let ports = TestPorts::new();
    ports.attach(&vm.pio_bus()).expect("ports free");
    Guest { vm, ports, serial }
}

/// Boots the test guest and waits until it polls for commands.
pub fn boot(mem_size: u64) -> Guest {
    let Guest {
        mut vm,
        ports,
        serial,
    } = new_guest(mem_size);
    vm.load(&BootSource::Elf(guest_elf())).expect("guest loads");
    vm.start().expect("vCPUs start");
    assert!(
        ports.wait(WAIT, |s| s.boot_at.is_some()),
        "guest never wrote its boot marker"
    );
    // The boot marker comes before the guest's start-up code has finished
    // writing memory (its banner, its stack); only once it reads the command
    // port does it sit in the loop that touches registers alone.
    assert!(
        ports.wait(WAIT, |s| s.first_read_at.is_some()),
        "guest never polled its command port"
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

/// Size of [`Memory`].
pub const MEM_SIZE: usize = 1 << 20;

/// Guest memory for the transport tests that need no KVM: a memfd of
/// [`MEM_SIZE`] bytes mapped shared, handed to backends as one region.
pub struct Memory {
    fd: OwnedFd,
    ptr: *mut u8,
}

impl Default for Memory {
    fn default() -> Self {
        Self::new()
    }
}

impl Memory {
    pub fn new() -> Self {
        // SAFETY: memfd_create with a static name; result checked.
        let raw = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sizing our own memfd.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), MEM_SIZE as i64) };
        assert_eq!(r, 0);
        // SAFETY: new shared mapping of the memfd, address chosen by the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Self {
            fd,
            ptr: ptr.cast(),
        }
    }
    pub fn region(&self) -> SharedRegion {
        SharedRegion {
            guest_phys_addr: 0,
            size: MEM_SIZE as u64,
            host_addr: self.ptr as u64,
            fd: self.fd.as_raw_fd(),
            fd_offset: 0,
        }
    }
    pub fn write(&self, gpa: u64, data: &[u8]) {
        assert!(gpa as usize + data.len() <= MEM_SIZE);
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(gpa as usize), data.len())
        };
    }
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= MEM_SIZE);
        let mut v = vec![0; len];
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }
    pub fn read_u16(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
}

pub fn rd(dev: &mut VirtioMmioDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.mmio_read(off, &mut b);
    u32::from_le_bytes(b)
}

pub fn wr(dev: &mut VirtioMmioDevice, off: u64, v: u32) {
    dev.mmio_write(off, &v.to_le_bytes());
}

/// A snapshot restored into a new, still paused VM.
pub struct Restored {
    pub vm: Vm,
    /// The clone's console.
    pub serial: SharedBuffer,
    /// The virtio devices, reconnected to the clone's backends.
    pub devices: Vec<std::sync::Arc<vmr_vmm::devices::VirtioSnapshotDevice>>,
}

/// Restores the snapshot in `snap` with its memory shared as `memory` says
/// (so vhost-user backends can map it), attaches the test ports, and
/// reconnects the block and net devices to the backends on `blk` and `net`.
pub fn restore_clone(
    snap: &std::path::Path,
    blk: &std::path::Path,
    net: &std::path::Path,
    dirty_log: Option<std::sync::Arc<vmr_vmm::devices::dirty_log::DirtyLog>>,
    memory: vmr_vmm::snapshot::RestoreMemory,
) -> Restored {
    use vmr_vmm::devices::mmio::DeviceKind;
    let serial = SharedBuffer::default();
    let (vm, states) = Vm::restore(
        snap,
        vmr_vmm::vm::RestoreOptions {
            memory,
            serial_out: Some(Box::new(serial.clone())),
            dirty_log: true,
        },
    )
    .expect("restore");
    TestPorts::new().attach(&vm.pio_bus()).expect("ports free");
    let devices = vmr_vmm::devices::restore(
        &vm,
        &states,
        |_, kind| match kind {
            DeviceKind::Block => blk.to_owned(),
            DeviceKind::Net => net.to_owned(),
        },
        dirty_log,
    )
    .expect("devices reconnect to the new backends");
    Restored {
        vm,
        serial,
        devices,
    }
}

/// A snapshot device for fault injection around a real VM: its pause or
/// its save can be made to fail, it counts its calls, and it reports the
/// pages a test wrote behind KVM's back (as a vhost-user backend's log
/// would).
pub struct FaultDevice {
    id: String,
    pub fail_pause: std::sync::atomic::AtomicBool,
    pub fail_save: std::sync::atomic::AtomicBool,
    pub pauses: std::sync::atomic::AtomicUsize,
    pub resumes: std::sync::atomic::AtomicUsize,
    paused: std::sync::atomic::AtomicBool,
    dirty: std::sync::Mutex<Vec<u64>>,
}

impl FaultDevice {
    pub fn new(id: &str) -> std::sync::Arc<Self> {
        std::sync::Arc::new(FaultDevice {
            id: id.into(),
            fail_pause: Default::default(),
            fail_save: Default::default(),
            pauses: Default::default(),
            resumes: Default::default(),
            paused: Default::default(),
            dirty: Default::default(),
        })
    }

    /// Whether the device is paused (a successful pause not yet resumed).
    pub fn is_paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes `bytes` at `gpa` in `vm`'s memory, as a backend would, and
    /// reports the page at the next `take_dirty`. The VM must be paused.
    pub fn write_behind_kvm(&self, vm: &Vm, gpa: u64, bytes: &[u8]) {
        let mem = vm.memory();
        // SAFETY: the VM is paused; nothing else touches this range.
        let m = unsafe { mem.as_mut_slice() };
        m[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
        self.dirty
            .lock()
            .expect("not poisoned")
            .push(gpa / vmr_vmm::memory::PAGE_SIZE);
    }
}

impl vmr_vmm::vm::SnapshotDevice for FaultDevice {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn pause(&self) -> Result<(), String> {
        use std::sync::atomic::Ordering::SeqCst;
        self.pauses.fetch_add(1, SeqCst);
        if self.fail_pause.load(SeqCst) {
            return Err("injected pause failure".into());
        }
        self.paused.store(true, SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        use std::sync::atomic::Ordering::SeqCst;
        self.resumes.fetch_add(1, SeqCst);
        self.paused.store(false, SeqCst);
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, String> {
        if self.fail_save.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("injected save failure".into());
        }
        Ok(b"fault-device".to_vec())
    }
    fn take_dirty(&self) -> Option<Vec<u64>> {
        let pages = std::mem::take(&mut *self.dirty.lock().expect("not poisoned"));
        let mut words = Vec::new();
        for p in pages {
            let w = (p / 64) as usize;
            if words.len() <= w {
                words.resize(w + 1, 0u64);
            }
            words[w] |= 1 << (p % 64);
        }
        Some(words)
    }
}
