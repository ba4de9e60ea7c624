//! Host probe: KVM capabilities and how fast guest kernel-mode code runs.
//!
//! The speed check boots a few bytes of 64-bit code that time two loops
//! between writes to a marker port:
//!
//! 1. `dec ecx; jnz` — plain ring-0 code. On hardware-assisted KVM this runs
//!    at native speed (about 1 ns per iteration or less).
//! 2. `mov rax, cr3; mov cr3, rax; dec; jnz` — a privileged TLB flush, which
//!    Linux does constantly while booting (well under 1 µs natively).
//!
//! A Linux guest is judged bootable when plain code runs within 20x of the
//! expected native speed and the CR3 reload stays under 5 µs. Nested,
//! software-assisted KVM (where kernel-mode code is emulated) fails this by
//! orders of magnitude.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bus::MmioDevice;
use crate::vm::{BootSource, Capabilities, Vm, VmConfig, VmError};

/// Iterations of the plain loop.
pub const PLAIN_ITERS: u32 = 2_000_000;
/// Iterations of the CR3 loop.
pub const CR3_ITERS: u32 = 20_000;
/// Plain loop budget per iteration for "bootable" (20x of ~1 ns).
pub const PLAIN_LIMIT_NS: f64 = 20.0;
/// CR3 reload budget per iteration for "bootable".
pub const CR3_LIMIT_NS: f64 = 5_000.0;
const MARKER_PORT: u16 = 0x99;

/// What the probe found.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// KVM capabilities.
    pub capabilities: Capabilities,
    /// Nanoseconds per plain-loop iteration.
    pub plain_ns_per_iter: f64,
    /// Nanoseconds per CR3-reload iteration.
    pub cr3_ns_per_iter: f64,
    /// VMM start to the guest's first instruction.
    pub first_instruction_us: f64,
    /// Whether a Linux guest is expected to boot in reasonable time.
    pub linux_bootable: bool,
    /// Why.
    pub verdict: String,
}

#[derive(Default)]
struct Stamps(Vec<Instant>);

impl MmioDevice for Stamps {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.0.push(Instant::now());
    }
}

/// The probe guest's code.
pub fn probe_code(plain: u32, cr3: u32) -> Vec<u8> {
    let mut c = vec![0xe6, MARKER_PORT as u8, 0xb9];
    c.extend_from_slice(&plain.to_le_bytes());
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc, 0xe6, MARKER_PORT as u8, 0xb9]);
    c.extend_from_slice(&cr3.to_le_bytes());
    c.extend_from_slice(&[
        0x0f,
        0x20,
        0xd8, // mov rax, cr3
        0x0f,
        0x22,
        0xd8, // mov cr3, rax
        0xff,
        0xc9, // dec ecx
        0x75,
        0xf6, // jnz loop
        0xe6,
        MARKER_PORT as u8, // end marker
        0xe6,
        crate::vm::DEBUG_EXIT_PORT as u8, // stop the VM
        0xeb,
        0xfe, // jmp $
    ]);
    c
}

/// Runs the probe (needs /dev/kvm). `timeout` bounds the guest run.
pub fn run(timeout: Duration) -> Result<ProbeReport, VmError> {
    let t0 = Instant::now();
    let mut vm = Vm::new(VmConfig {
        mem_size: 4 << 20,
        dirty_log: false,
        ..Default::default()
    })?;
    let stamps = Arc::new(Mutex::new(Stamps::default()));
    vm.pio_bus()
        .insert(u64::from(MARKER_PORT), 1, stamps.clone())?;
    vm.load(&BootSource::FlatBytes(probe_code(PLAIN_ITERS, CR3_ITERS)))?;
    vm.start()?;
    let stop = vm.wait_for_stop(timeout);
    let s = stamps.lock().unwrap_or_else(|p| p.into_inner()).0.clone();
    let capabilities = vm.capabilities().clone();
    let first_instruction_us = s
        .first()
        .map(|t| (*t - t0).as_secs_f64() * 1e6)
        .unwrap_or(f64::NAN);
    let per = |a: usize, b: usize, n: u32| match (s.get(a), s.get(b)) {
        (Some(x), Some(y)) => (*y - *x).as_secs_f64() * 1e9 / f64::from(n),
        _ => f64::INFINITY,
    };
    let plain = per(0, 1, PLAIN_ITERS);
    let cr3 = per(1, 2, CR3_ITERS);
    let (linux_bootable, verdict) = if stop.is_none() || s.len() < 3 {
        (
            false,
            format!(
                "the probe guest did not finish within {timeout:?} ({} of 3 markers): guest code is far too slow",
                s.len()
            ),
        )
    } else if plain > PLAIN_LIMIT_NS {
        (
            false,
            format!("plain ring-0 code runs at {plain:.1} ns/iteration (limit {PLAIN_LIMIT_NS} ns): KVM is not hardware-assisted for this guest"),
        )
    } else if cr3 > CR3_LIMIT_NS {
        (
            false,
            format!("a CR3 reload costs {cr3:.0} ns (limit {CR3_LIMIT_NS} ns): privileged code is emulated"),
        )
    } else {
        (true, "guest kernel code runs at near-native speed".into())
    };
    Ok(ProbeReport {
        capabilities,
        plain_ns_per_iter: plain,
        cr3_ns_per_iter: cr3,
        first_instruction_us,
        linux_bootable,
        verdict,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_code_layout() {
        let c = probe_code(5, 6);
        assert_eq!(&c[..3], &[0xe6, 0x99, 0xb9]);
        assert_eq!(&c[3..7], &5u32.to_le_bytes());
        let cr3_imm = 7 + 4 + 3;
        assert_eq!(&c[cr3_imm..cr3_imm + 4], &6u32.to_le_bytes());
        assert_eq!(c.len(), cr3_imm + 4 + 16);
    }
}
