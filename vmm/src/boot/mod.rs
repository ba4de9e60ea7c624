//! Booting: the guest physical memory layout, 64-bit long-mode state
//! (identity page tables, GDT, segment and control registers) and the
//! kernel loaders ([`loader`] for ELF and flat binaries, [`linux`] for
//! bzImage).
//!
//! Page-table entries and GDT descriptors are written with their accessed
//! (and, for leaf entries, dirty) bits already set, so the CPU never writes
//! them back. The boot structures therefore stay clean in the dirty-page log
//! and incremental snapshots only contain pages the guest itself wrote.

pub mod linux;
pub mod loader;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Fixed guest physical addresses.
pub mod layout {
    /// GDT.
    pub const GDT_ADDR: u64 = 0x500;
    /// IDT (empty: any exception triple-faults until the guest installs one).
    pub const IDT_ADDR: u64 = 0x520;
    /// Linux zero page (`boot_params`).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Initial stack pointer for Linux.
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// PML4.
    pub const PML4: u64 = 0x9000;
    /// PDPT.
    pub const PDPT: u64 = 0xa000;
    /// First of four page directories (identity map of 4 GiB in 2 MiB pages).
    pub const PD: u64 = 0xb000;
    /// Kernel command line.
    pub const CMDLINE: u64 = 0x20000;
    /// Maximum command line length including the NUL.
    pub const CMDLINE_MAX: usize = 4096;
    /// Start of the EBDA-ish area that e820 reports reserved.
    pub const EBDA_START: u64 = 0x9fc00;
    /// Kernels and flat images load here (1 MiB).
    pub const HIMEM_START: u64 = 0x10_0000;
    /// Start of the 32-bit MMIO hole; guest RAM ends below it.
    pub const MMIO_HOLE_START: u64 = 0xd000_0000;
    /// First virtio-mmio device window.
    pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
    /// Size of one virtio-mmio device window.
    pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
    /// IOAPIC.
    pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
    /// Local APIC.
    pub const LAPIC_ADDR: u64 = 0xfee0_0000;
    /// Where KVM's TSS lives (three pages, must not overlap RAM in use).
    pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
    /// First GSI handed to devices (0-4 are legacy: timer, keyboard, cascade, COM2, COM1).
    pub const FIRST_DEVICE_GSI: u32 = 5;
    /// GSI of the COM1 serial port.
    pub const SERIAL_GSI: u32 = 4;
}

/// Errors writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Guest memory too small for the boot structures.
    #[error("cannot write {what} into guest memory")]
    Write {
        /// The structure.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Selectors in the boot GDT.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// Task state segment selector.
pub const TSS_SELECTOR: u16 = 0x18;

/// Builds a GDT descriptor from flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT: null, 64-bit code, data, TSS. Access bytes include the
/// accessed bit so loading a selector never writes the descriptor.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // code: G, L, present, DPL0, exec/read, accessed
    gdt_entry(0xc093, 0, 0xfffff), // data: G, D/B, present, DPL0, read/write, accessed
    gdt_entry(0x808b, 0, 0xfffff), // TSS: G, present, busy 64-bit TSS
];

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            if (entry >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    val: T,
    addr: u64,
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| BootError::Write { what, source })
}

/// Writes the GDT, an empty IDT and identity page tables covering 4 GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        write(mem, *e, layout::GDT_ADDR + i as u64 * 8, "GDT")?;
    }
    write(mem, 0u64, layout::IDT_ADDR, "IDT")?;
    // Present, writable, accessed.
    const TABLE: u64 = 0x1 | 0x2 | 0x20;
    // Present, writable, accessed, dirty, 2 MiB page.
    const LEAF_2M: u64 = 0x1 | 0x2 | 0x20 | 0x40 | 0x80;
    write(mem, layout::PDPT | TABLE, layout::PML4, "PML4")?;
    for dir in 0..4u64 {
        write(
            mem,
            (layout::PD + dir * 0x1000) | TABLE,
            layout::PDPT + dir * 8,
            "PDPT",
        )?;
        for i in 0..512u64 {
            let addr = ((dir * 512 + i) << 21) | LEAF_2M;
            write(
                mem,
                addr,
                layout::PD + dir * 0x1000 + i * 8,
                "page directory",
            )?;
        }
    }
    Ok(())
}

/// CR0 bits.
const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
const CR4_PAE: u64 = 1 << 5;
/// EFER.LME | EFER.LMA.
const EFER_LME_LMA: u64 = (1 << 8) | (1 << 10);

/// Long-mode special registers on top of `base` (as read from a new vCPU).
pub fn long_mode_sregs(base: &kvm_sregs) -> kvm_sregs {
    let mut s = *base;
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    s.gdt.base = layout::GDT_ADDR;
    s.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    s.idt.base = layout::IDT_ADDR;
    s.idt.limit = 7;
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = tss;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    s.cr3 = layout::PML4;
    s.cr4 = CR4_PAE;
    s.efer |= EFER_LME_LMA;
    s
}

/// Long-mode special registers for a minimal guest that has no GDT in
/// memory: flat 64-bit code (selector 8) and data (selector 16) segments held
/// in the hidden segment state, paging from the tables at `cr3`.
pub fn flat_long_mode_sregs(base: &kvm_sregs, cr3: u64) -> kvm_sregs {
    let mut s = *base;
    s.cr3 = cr3;
    s.cr4 |= CR4_PAE;
    s.efer |= EFER_LME_LMA;
    s.cr0 |= CR0_PG | CR0_PE;
    s.cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 8,
        type_: 11,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 16,
        type_: 3,
        l: 0,
        db: 1,
        ..s.cs
    };
    (s.ds, s.es, s.ss, s.fs, s.gs) = (data, data, data, data, data);
    s
}

/// General registers for entering at `entry` with stack `rsp` and the
/// Linux zero page (or 0) in `rsi`.
pub fn long_mode_regs(entry: u64, rsp: u64, rsi: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp,
        rbp: rsp,
        rsi,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VmMemory;

    #[test]
    fn gdt_decodes_to_flat_long_mode_segments() {
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.present, cs.type_, cs.s),
            (1, 0, 1, 1, 0xb, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!(
            (ds.l, ds.db, ds.type_, ds.selector),
            (0, 1, 0x3, DATA_SELECTOR)
        );
        let tr = segment_from_gdt(GDT[3], 3);
        assert_eq!((tr.type_, tr.s, tr.selector), (0xb, 0, TSS_SELECTOR));
    }

    #[test]
    fn page_tables_identity_map_with_ad_bits() {
        let m = VmMemory::new_shared(1 << 20).expect("memory");
        write_boot_tables(m.guest_memory()).expect("fits");
        let mem = m.guest_memory();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4)).expect("in range");
        assert_eq!(pml4, layout::PDPT | 0x23);
        let pde: u64 = mem
            .read_obj(GuestAddress(layout::PD + 8 * 3))
            .expect("in range");
        assert_eq!(pde, (3 << 21) | 0xe3);
        let last: u64 = mem
            .read_obj(GuestAddress(layout::PD + 3 * 0x1000 + 511 * 8))
            .expect("in range");
        assert_eq!(last >> 21, 2047);
    }
}
