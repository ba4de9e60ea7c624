//! The VM's life: create, load, start, pause, resume, the stop, and the
//! events reporting each step.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MP_STATE_UNINITIALIZED, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::Kvm;
use tracing::{debug, info, warn};
use vmr_proto::{Lifecycle, LifecycleKind};

use super::events::is_stop;
use super::{
    kvm_err, legacy, open_kvm, BootSource, Capabilities, EventHub, RunState, Vm, VmConfig, VmError,
};
use crate::boot::layout;
use crate::boot::linux::{AcpiSetup, LinuxBoot};
use crate::boot::loader::{self, ImageKind};
use crate::bus::Bus;
use crate::memory::{PageBitmap, VmMemory, PAGE_SIZE};
use crate::serial::SerialDevice;
use crate::timing;
use crate::vcpu::{ExitRequest, Vcpu, VcpuContext, VcpuFeatures, VcpuHandle, VcpuState, VmEvent};

/// The shape of a VM to build (from a [`VmConfig`] or a snapshot).
pub(super) struct BuildSpec<'a> {
    pub mem_size: u64,
    pub vcpus: u8,
    pub irqchip: bool,
    pub dirty_log: bool,
    /// Restoring: the saved vCPU states, one per vCPU. Their CPUID is set
    /// by [`Vcpu::restore_state`] and their MSR lists are what later
    /// snapshots save, so the host's supported CPUID is not read and the
    /// readable MSRs are not probed.
    pub restoring: Option<&'a [VcpuState]>,
}

impl Vm {
    /// The entries of `indices` that `vcpu` can read with `KVM_GET_MSRS`, in
    /// order. The list is read in batches: KVM reads entries until the
    /// first it cannot read and returns how many it read, so a batch that
    /// comes back short drops that entry and goes on after it. A batch the
    /// ioctl rejects is probed one MSR at a time.
    pub fn readable_msrs(vcpu: &kvm_ioctls::VcpuFd, indices: &[u32]) -> Vec<u32> {
        let mut readable = Vec::with_capacity(indices.len());
        // KVM refuses a KVM_GET_MSRS of KVM_MAX_MSR_ENTRIES (256) or more
        // entries with E2BIG, so a batch holds at most 255.
        for chunk in indices.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES - 1) {
            let mut rest = chunk;
            while !rest.is_empty() {
                match read_msrs(vcpu, rest) {
                    Some(n) if n <= rest.len() => {
                        readable.extend_from_slice(&rest[..n]);
                        // `rest[n]`, if any, is the entry KVM could not read.
                        rest = rest.get(n + 1..).unwrap_or(&[]);
                    }
                    _ => {
                        readable.extend(
                            rest.iter()
                                .copied()
                                .filter(|&i| read_msrs(vcpu, &[i]) == Some(1)),
                        );
                        rest = &[];
                    }
                }
            }
        }
        readable
    }
}

/// One `KVM_GET_MSRS` of `indices` (fewer than `KVM_MAX_MSR_ENTRIES`): how many
/// entries KVM read, `None` if the call failed.
fn read_msrs(vcpu: &kvm_ioctls::VcpuFd, indices: &[u32]) -> Option<usize> {
    let entries: Vec<_> = indices
        .iter()
        .map(|&index| kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = kvm_bindings::Msrs::from_entries(&entries).ok()?;
    vcpu.get_msrs(&mut msrs).ok()
}

/// The MSRs of KVM's index list that `vcpu` can read (empty if KVM gives
/// no list).
fn readable_msrs(kvm: &Kvm, vcpu: &kvm_ioctls::VcpuFd) -> Vec<u32> {
    match kvm.get_msr_index_list() {
        Ok(l) => Vm::readable_msrs(vcpu, l.as_slice()),
        Err(_) => Vec::new(),
    }
}

impl Vm {
    pub(super) fn build(
        spec: BuildSpec,
        memory: VmMemory,
        serial: SerialDevice,
    ) -> Result<Self, VmError> {
        let BuildSpec {
            mem_size,
            vcpus,
            irqchip: want_irqchip,
            dirty_log,
            restoring,
        } = spec;
        if vcpus == 0 {
            return Err(VmError::Config("at least one vCPU is needed".into()));
        }
        let kvm = open_kvm()?;
        let caps = Capabilities::probe(&kvm);
        timing::stamp("kvm opened");
        if caps.api_version != 12 {
            return Err(VmError::Config(format!(
                "KVM API version {} (need 12)",
                caps.api_version
            )));
        }
        if !caps.immediate_exit {
            return Err(VmError::MissingCap("KVM_CAP_IMMEDIATE_EXIT"));
        }
        let irqchip = want_irqchip && caps.irqchip;
        let pit = irqchip && caps.pit2;
        if vcpus > 1 && !irqchip {
            return Err(VmError::Config(
                "more than one vCPU needs the in-kernel irqchip".into(),
            ));
        }
        if usize::from(vcpus) > caps.max_vcpus {
            return Err(VmError::Config(format!(
                "{vcpus} vCPUs exceed KVM's {}",
                caps.max_vcpus
            )));
        }
        if let Some(states) = restoring {
            if states.len() != usize::from(vcpus) {
                return Err(VmError::Config(format!(
                    "{} vCPU states for {vcpus} vCPUs",
                    states.len()
                )));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        timing::stamp("KVM_CREATE_VM");
        fd.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        // Guest memory before the irqchip and the PIT: adding a memory slot
        // waits for an SRCU grace period of the VM, and creating those
        // devices starts one that the kernel advances only on timer ticks,
        // so a slot added after them can wait milliseconds for nothing.
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: mem_size,
            userspace_addr: memory.host_base() as u64,
        };
        // SAFETY: the region maps `mem_size` bytes that `memory` owns; the Vm
        // keeps `memory` alive for as long as the VM fd exists.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        timing::stamp("KVM_SET_USER_MEMORY_REGION");
        if irqchip {
            fd.create_irq_chip()
                .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            timing::stamp("KVM_CREATE_IRQCHIP");
        }
        if pit {
            let cfg = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(cfg).map_err(kvm_err("KVM_CREATE_PIT2"))?;
            timing::stamp("KVM_CREATE_PIT2");
        }

        // A restore sets each vCPU's saved CPUID; a new VM gets the host's.
        let supported = match restoring {
            Some(_) => None,
            None => Some(
                kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?,
            ),
        };
        let features = VcpuFeatures {
            xsave: caps.xsave,
            xcrs: caps.xcrs,
            debugregs: caps.debugregs,
            vcpu_events: caps.vcpu_events,
            irqchip,
        };
        let mut pending = Vec::with_capacity(vcpus as usize);
        let mut msr_indices = None;
        for id in 0..u32::from(vcpus) {
            let vfd = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let msrs = match restoring {
                // The MSRs the snapshot holds: restore sets every one (and
                // fails if KVM refuses one), so they are readable.
                Some(states) => {
                    Arc::new(states[id as usize].msrs.iter().map(|e| e.index).collect())
                }
                None => msr_indices
                    .get_or_insert_with(|| Arc::new(readable_msrs(&kvm, &vfd)))
                    .clone(),
            };
            let v = Vcpu {
                id,
                fd: vfd,
                features,
                msr_indices: msrs,
            };
            if let Some(supported) = &supported {
                v.set_cpuid(supported)?;
            }
            pending.push(v);
        }
        timing::stamp("vCPUs created");

        let fd = Arc::new(fd);
        let mmio = Arc::new(Bus::new("mmio"));
        let pio = Arc::new(Bus::new("pio"));
        let events = Arc::new(EventHub::default());
        let exit = Arc::new(ExitRequest::default());
        let ctx = Arc::new(VcpuContext::new(
            Arc::clone(&mmio),
            Arc::clone(&pio),
            Arc::clone(&events),
            Arc::clone(&exit),
        ));
        let serial = legacy::attach(&fd, irqchip, &pio, serial, &exit)?;
        info!(mem_size, vcpus, irqchip, pit, dirty_log, "VM created");
        Ok(Vm {
            fd,
            memory: Arc::new(memory),
            caps,
            irqchip,
            pit,
            dirty_log,
            sync_snapshots: AtomicBool::new(true),
            mmio,
            pio,
            ctx,
            pending,
            vcpus: Vec::new(),
            serial,
            events,
            extra_dirty: Arc::new(Mutex::new(PageBitmap::new(mem_size / PAGE_SIZE))),
            snapshot_staged: Arc::new(AtomicBool::new(false)),
            last_snapshot: Mutex::new(None),
            last_chain: Mutex::new(Vec::new()),
            devices: Mutex::new(Vec::new()),
            device_infos: Mutex::new(Vec::new()),
            state: Mutex::new(RunState::Created),
            vcpu_count: vcpus,
        })
    }

    /// Creates a VM with zeroed memory on a shared memfd.
    pub fn new(cfg: VmConfig) -> Result<Self, VmError> {
        let memory = VmMemory::new_shared(cfg.mem_size)?;
        let serial =
            SerialDevice::new(cfg.serial_out.unwrap_or_else(|| Box::new(std::io::sink())))?;
        Self::build(
            BuildSpec {
                mem_size: cfg.mem_size,
                vcpus: cfg.vcpus,
                irqchip: cfg.irqchip,
                dirty_log: cfg.dirty_log,
                restoring: None,
            },
            memory,
            serial,
        )
    }

    /// Loads a guest and sets up vCPU 0 to enter it in 64-bit mode. With
    /// more vCPUs, the others wait for INIT/SIPI.
    pub fn load(&self, src: &BootSource) -> Result<(), VmError> {
        let v0 = self
            .pending
            .first()
            .ok_or_else(|| VmError::Config("the VM is already started".into()))?;
        let mem = self.memory.guest_memory();
        crate::boot::write_boot_tables(mem)?;
        let (entry, rsi, rsp) = match src {
            BootSource::Elf(p) => (loader::load_elf(mem, p)?.0, 0, 0),
            BootSource::FlatBytes(code) => (
                loader::load_flat_bytes(mem, code)
                    .map_err(|_| VmError::Config("flat image does not fit in memory".into()))?
                    .0,
                0,
                0,
            ),
            BootSource::Auto {
                kernel,
                initrd,
                cmdline,
            } => match loader::detect(kernel)? {
                ImageKind::Elf => (loader::load_elf(mem, kernel)?.0, 0, 0),
                ImageKind::Flat => (loader::load_flat(mem, kernel)?.0, 0, 0),
                ImageKind::BzImage => {
                    self.load_linux(kernel, initrd.as_deref(), cmdline, Some(&crate::acpi::Acpi))?
                }
            },
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
                acpi,
            } => self.load_linux(kernel, initrd.as_deref(), cmdline, acpi.as_deref())?,
        };
        let regs = crate::boot::long_mode_regs(entry, rsp, rsi);
        v0.setup_long_mode(&regs)?;
        for ap in &self.pending[1..] {
            let mp = kvm_bindings::kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            };
            ap.fd
                .set_mp_state(mp)
                .map_err(kvm_err("KVM_SET_MP_STATE"))?;
            ap.setup_long_mode(&crate::boot::long_mode_regs(entry, rsp, rsi))?;
        }
        debug!(entry, "guest loaded");
        Ok(())
    }

    fn load_linux(
        &self,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
        acpi: Option<&dyn AcpiSetup>,
    ) -> Result<(u64, u64, u64), VmError> {
        let devices = self
            .device_infos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let e = crate::boot::linux::load_linux(
            self.memory.guest_memory(),
            self.memory.size(),
            &LinuxBoot {
                kernel,
                initrd,
                cmdline,
                devices: &devices,
                vcpus: self.vcpu_count,
                acpi,
            },
        )?;
        Ok((e.entry.0, e.zero_page.0, layout::BOOT_STACK))
    }

    pub(super) fn spawn_vcpus(&mut self, paused: bool) -> Result<(), VmError> {
        for v in self.pending.drain(..) {
            self.vcpus
                .push(VcpuHandle::spawn(v, Arc::clone(&self.ctx), paused)?);
        }
        Ok(())
    }

    pub(super) fn emit(&self, kind: LifecycleKind, detail: String, snapshot_id: Option<String>) {
        self.events.emit(VmEvent::Lifecycle(Lifecycle {
            kind,
            detail,
            regs: Vec::new(),
            gap: None,
            snapshot_id,
        }));
    }

    pub(super) fn run_state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set_state(&self, s: RunState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmError> {
        self.start_vcpus(false)
    }

    /// Starts the vCPU threads paused, so a debugger can set breakpoints or
    /// single-stepping before the first guest instruction; [`Vm::resume`]
    /// (or the gdb stub) runs them.
    pub fn start_paused(&mut self) -> Result<(), VmError> {
        self.start_vcpus(true)
    }

    fn start_vcpus(&mut self, paused: bool) -> Result<(), VmError> {
        let st = self.run_state();
        if st != RunState::Created || self.pending.is_empty() {
            return Err(VmError::State {
                state: st,
                op: "start",
                need: "created and loaded",
            });
        }
        // Boot goes out first so it precedes anything the vCPUs report.
        self.emit(LifecycleKind::Boot, String::new(), None);
        self.spawn_vcpus(paused)?;
        self.set_state(if paused {
            RunState::Paused
        } else {
            RunState::Running
        });
        Ok(())
    }

    /// Pauses every vCPU (each completes its pending I/O first), then the
    /// snapshot devices in registration order.
    ///
    /// If a vCPU or a device fails to pause, what was already paused is
    /// resumed (devices in reverse order, then the vCPUs), the VM stays
    /// `Running` and the error is returned.
    pub fn pause(&self) -> Result<(), VmError> {
        let st = self.run_state();
        if st != RunState::Running {
            return Err(VmError::State {
                state: st,
                op: "pause",
                need: "running",
            });
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if let Err(e) = v.pause() {
                // A vCPU that timed out may still pause later: its resume
                // request queues behind the pause.
                self.resume_vcpus(&self.vcpus[..=i]);
                return Err(e.into());
            }
        }
        let devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        for (i, d) in devices.iter().enumerate() {
            if let Err(reason) = d.pause() {
                // The failing device may have stopped some of its queues
                // before it failed, so it is resumed too.
                for done in devices[..=i].iter().rev() {
                    if let Err(error) = done.resume() {
                        warn!(device = %done.id(), %error, "cannot resume a device after a failed pause");
                    }
                }
                self.resume_vcpus(&self.vcpus);
                warn!(device = %d.id(), %reason, "pause failed; the VM keeps running");
                return Err(VmError::Device { id: d.id(), reason });
            }
        }
        drop(devices);
        self.set_state(RunState::Paused);
        self.emit(LifecycleKind::Pause, String::new(), None);
        Ok(())
    }

    fn resume_vcpus(&self, vcpus: &[VcpuHandle]) {
        for v in vcpus {
            if let Err(error) = v.resume() {
                warn!(vcpu = v.id(), %error, "cannot resume a vCPU after a failed pause");
            }
        }
    }

    /// Resumes devices, then vCPUs.
    pub fn resume(&self) -> Result<(), VmError> {
        let st = self.run_state();
        if st != RunState::Paused {
            return Err(VmError::State {
                state: st,
                op: "resume",
                need: "paused",
            });
        }
        // Best effort across every device and vCPU: one that fails must not
        // leave the others paused. The first failure is returned.
        let mut first: Option<VmError> = None;
        for d in self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if let Err(reason) = d.resume() {
                warn!(device = %d.id(), %reason, "device resume failed");
                first.get_or_insert(VmError::Device { id: d.id(), reason });
            }
        }
        let mut vcpus_ok = true;
        for v in &self.vcpus {
            if let Err(e) = v.resume() {
                warn!(vcpu = v.id(), error = %e, "vCPU resume failed");
                vcpus_ok = false;
                first.get_or_insert(e.into());
            }
        }
        if !vcpus_ok {
            if let Some(e) = first {
                return Err(e);
            }
        }
        // The guest runs again even if a device failed to resume; the
        // device's error is still returned.
        self.set_state(RunState::Running);
        if self.memory.prefetch_at_run() {
            // A lazily restored memory fills in from here on (a no-op once
            // the prefetch runs).
            self.memory.start_prefetch();
        }
        self.emit(LifecycleKind::Resume, String::new(), None);
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        self.run_state()
    }

    /// A new receiver of every event the VM emits from now on (lifecycle:
    /// Boot, Pause, Resume, Snapshot with its id, the stop events, and
    /// `VmEvent::Debug` stops). Each subscriber gets its own queue, so
    /// subscribers never take events from each other; see
    /// [`super::events`] for the bound and the gap event a subscriber that
    /// falls far behind receives. Dropping the receiver unsubscribes.
    pub fn subscribe(&self) -> Receiver<VmEvent> {
        self.events.subscribe()
    }

    /// Like [`Vm::subscribe`], but the receiver first gets the last
    /// [`super::events::HISTORY_LEN`] events already emitted (so a
    /// subscriber that comes after [`Vm::start`] still sees `Boot`), after
    /// a gap event if earlier ones have left the history.
    pub fn events(&self) -> Receiver<VmEvent> {
        self.events.subscribe_with_history()
    }

    /// The event that stopped the VM (the first shutdown, triple fault,
    /// internal error or crash a vCPU reported), if it has stopped.
    pub fn stop_event(&self) -> Option<Lifecycle> {
        self.events.stop_event()
    }

    /// Whether a vCPU reported a shutdown, triple fault or error.
    pub fn is_stopped(&self) -> bool {
        self.ctx.exit_request.peek().is_some()
    }

    /// Waits up to `timeout` for the VM to stop (shutdown, triple fault,
    /// internal error, crash) and returns that event; returns it at once if
    /// the VM has already stopped. Uses its own subscription, so other
    /// subscribers still see every event.
    pub fn wait_for_stop(&self, timeout: Duration) -> Option<Lifecycle> {
        let events = self.subscribe();
        if let Some(l) = self.stop_event() {
            return Some(l);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match events.recv_timeout(left) {
                Ok(VmEvent::Lifecycle(l)) if is_stop(l.kind) => return Some(l),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return None,
                // The hub lives as long as `self`.
                Err(RecvTimeoutError::Disconnected) => return self.stop_event(),
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Handles join their threads on drop; paused or running, each
        // thread gets the exit request and a kick.
        self.vcpus.clear();
    }
}
