//! ACPI tables for booting Linux on the microVM: RSDP, XSDT, a
//! hardware-reduced FADT, a DSDT that describes each virtio-mmio slot as an
//! `LNRO0005` device, and a MADT with one local APIC per vCPU and the IOAPIC.
//!
//! [`AcpiTables::build`] lays the tables out from a base address (the RSDP
//! first, 16-byte aligned, then each table 8-byte aligned); the VMM writes
//! them into guest memory with [`AcpiTables::write_to`] and tells Linux where
//! the RSDP is (boot parameter `acpi_rsdp_addr`, or by placing it at
//! [`RSDP_ADDR`] in the BIOS area Linux scans).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

/// Where the RSDP goes by default: the start of the BIOS read-only area that
/// Linux scans for "RSD PTR ".
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// End (exclusive) of the area Linux scans for the RSDP.
pub const ACPI_AREA_END: u64 = 0x0010_0000;
/// Local APIC base address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

const OEM_ID: [u8; 6] = *b"VMRPLY";
const OEM_TABLE_ID: [u8; 8] = *b"VMRMICRO";
const OEM_REVISION: u32 = 1;

/// Errors building or placing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More vCPUs than a MADT local-APIC entry can name.
    #[error("{0} vCPUs do not fit in 8-bit APIC IDs")]
    TooManyVcpus(usize),
    /// A device window does not fit a 32-bit fixed memory descriptor.
    #[error("device window at {base:#x} (+{size:#x}) is above 4 GiB")]
    WindowTooHigh {
        /// Base of the window.
        base: u64,
        /// Size of the window.
        size: u64,
    },
    /// The tables do not fit below `limit`.
    #[error("ACPI tables need {need:#x} bytes but only {room:#x} fit")]
    NoRoom {
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        room: u64,
    },
    /// Writing guest memory failed.
    #[error("cannot write ACPI table {table} at {addr:#x}")]
    Write {
        /// Table signature.
        table: String,
        /// Guest physical address.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A virtio-mmio device as ACPI describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base of the register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// GSI of the device's interrupt (an IOAPIC pin).
    pub gsi: u32,
}

/// An interrupt source override: ISA IRQ `source` arrives on `gsi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceOverride {
    /// ISA IRQ.
    pub source: u8,
    /// Global system interrupt.
    pub gsi: u32,
    /// MPS INTI flags (polarity and trigger mode; 0 = bus default).
    pub flags: u16,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC IDs 0..n).
    pub vcpus: usize,
    /// virtio-mmio slots, in `_UID` order.
    pub mmio_slots: Vec<MmioSlot>,
    /// Interrupt source overrides. The default moves the PIT's IRQ 0 to GSI 2,
    /// as KVM's in-kernel IOAPIC wires it.
    pub overrides: Vec<SourceOverride>,
}

impl AcpiConfig {
    /// A configuration with the usual IRQ0 -> GSI2 override.
    pub fn new(vcpus: usize, mmio_slots: Vec<MmioSlot>) -> Self {
        Self {
            vcpus,
            mmio_slots,
            overrides: vec![SourceOverride {
                source: 0,
                gsi: 2,
                flags: 0,
            }],
        }
    }
}

/// One table placed at a guest physical address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTable {
    /// Signature ("RSD PTR " for the RSDP, else the 4-byte table signature).
    pub signature: String,
    /// Guest physical address.
    pub addr: u64,
    /// Table bytes, checksummed.
    pub bytes: Vec<u8>,
}

/// The full set of tables, laid out in guest physical memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// RSDP first, then XSDT, FADT, DSDT, MADT.
    pub tables: Vec<PlacedTable>,
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Builds the DSDT: `\_SB.VRxx` devices, one per virtio-mmio slot.
fn dsdt(slots: &[MmioSlot]) -> Result<Sdt, AcpiError> {
    let mut body = Vec::new();
    let mut devices = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        let base = u32::try_from(s.base).ok();
        let size = u32::try_from(s.size).ok();
        let (Some(base), Some(size)) = (base, size) else {
            return Err(AcpiError::WindowTooHigh {
                base: s.base,
                size: s.size,
            });
        };
        if u64::from(base) + u64::from(size) > 1 << 32 {
            return Err(AcpiError::WindowTooHigh {
                base: s.base,
                size: s.size,
            });
        }
        devices.push((format!("VR{i:02X}"), i as u32, base, size, s.gsi));
    }
    let mut sb_children: Vec<Vec<u8>> = Vec::new();
    for (name, uid, base, size, gsi) in &devices {
        let mem = aml::Memory32Fixed::new(true, *base, *size);
        // Edge-triggered, active high, exclusive: the VMM pulses the line
        // through an irqfd.
        let irq = aml::Interrupt::new(true, true, false, false, *gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_name = aml::Name::new("_UID".into(), uid);
        let crs_name = aml::Name::new("_CRS".into(), &crs);
        let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid_name, &crs_name]);
        sb_children.push(to_bytes(&dev));
    }
    let raw: Vec<u8> = sb_children.concat();
    body.extend(aml::Scope::raw("_SB_".into(), raw));
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&body);
    Ok(t)
}

/// Builds the MADT.
fn madt(cfg: &AcpiConfig) -> Result<Sdt, AcpiError> {
    if cfg.vcpus == 0 || cfg.vcpus > 254 {
        return Err(AcpiError::TooManyVcpus(cfg.vcpus));
    }
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, LAPIC_ADDR);
    t.write_u32(40, 1); // PCAT_COMPAT: dual 8259s are present (KVM's irqchip).
    for id in 0..cfg.vcpus as u8 {
        t.append_slice(&to_bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    // The IOAPIC takes the first ID after the CPUs'.
    t.append_slice(&to_bytes(&IoApic::new(cfg.vcpus as u8, IOAPIC_ADDR, 0)));
    for o in &cfg.overrides {
        // Type 2, length 10: bus 0 (ISA), source, GSI, flags.
        let mut iso = vec![2u8, 10, 0, o.source];
        iso.extend_from_slice(&o.gsi.to_le_bytes());
        iso.extend_from_slice(&o.flags.to_le_bytes());
        t.append_slice(&iso);
    }
    // Local APIC NMI (type 4) on LINT1 of every processor (UID 0xff).
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    Ok(t)
}

impl AcpiTables {
    /// Builds and lays out the tables from `base` (16-byte aligned), which
    /// must leave them below `limit`.
    pub fn build(cfg: &AcpiConfig, base: u64, limit: u64) -> Result<Self, AcpiError> {
        let base = align(base, 16);
        let dsdt = dsdt(&cfg.mmio_slots)?.as_slice().to_vec();
        let madt = madt(cfg)?.as_slice().to_vec();

        let rsdp_addr = base;
        let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64, 8);
        let xsdt_len = 36 + 8 * 2;
        let fadt_addr = align(xsdt_addr + xsdt_len, 8);
        let dsdt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64, 8);
        let madt_addr = align(dsdt_addr + dsdt.len() as u64, 8);
        let end = madt_addr + madt.len() as u64;
        if end > limit {
            return Err(AcpiError::NoRoom {
                need: end - base,
                room: limit.saturating_sub(base),
            });
        }

        let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
            .dsdt_64(dsdt_addr)
            .flag(Flags::HwReducedAcpi)
            .flag(Flags::PwrButton)
            .flag(Flags::SlpButton)
            .finalize();
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        xsdt.add_entry(fadt_addr);
        xsdt.add_entry(madt_addr);
        let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

        let placed = |sig: &str, addr, bytes| PlacedTable {
            signature: sig.to_string(),
            addr,
            bytes,
        };
        Ok(Self {
            tables: vec![
                placed("RSD PTR ", rsdp_addr, to_bytes(&rsdp)),
                placed("XSDT", xsdt_addr, to_bytes(&xsdt)),
                placed("FACP", fadt_addr, to_bytes(&fadt)),
                placed("DSDT", dsdt_addr, dsdt),
                placed("APIC", madt_addr, madt),
            ],
        })
    }

    /// Builds the tables at [`RSDP_ADDR`] in the BIOS area.
    pub fn build_default(cfg: &AcpiConfig) -> Result<Self, AcpiError> {
        Self::build(cfg, RSDP_ADDR, ACPI_AREA_END)
    }

    /// Guest physical address of the RSDP.
    pub fn rsdp_addr(&self) -> u64 {
        self.tables[0].addr
    }

    /// The table with this signature.
    pub fn table(&self, signature: &str) -> Option<&PlacedTable> {
        self.tables.iter().find(|t| t.signature == signature)
    }

    /// Writes every table into guest memory.
    pub fn write_to<M: Bytes<GuestAddress, E = vm_memory::GuestMemoryError>>(
        &self,
        mem: &M,
    ) -> Result<(), AcpiError> {
        for t in &self.tables {
            mem.write_slice(&t.bytes, GuestAddress(t.addr))
                .map_err(|source| AcpiError::Write {
                    table: t.signature.clone(),
                    addr: t.addr,
                    source,
                })?;
        }
        Ok(())
    }
}

/// The boot hook the VMM calls for Linux guests: builds the tables for the
/// VM's vCPUs and virtio-mmio devices at [`RSDP_ADDR`] and writes them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Acpi;

impl crate::boot::linux::AcpiSetup for Acpi {
    fn setup(
        &self,
        mem: &crate::memory::GuestMemoryMmap,
        vcpus: u8,
        devices: &[crate::bus::DeviceInfo],
    ) -> Result<GuestAddress, String> {
        let slots = devices
            .iter()
            .map(|d| MmioSlot {
                base: d.mmio_base,
                size: d.mmio_len,
                gsi: d.gsi,
            })
            .collect();
        let tables = AcpiTables::build_default(&AcpiConfig::new(usize::from(vcpus), slots))
            .map_err(|e| e.to_string())?;
        tables.write_to(mem).map_err(|e| e.to_string())?;
        Ok(GuestAddress(tables.rsdp_addr()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn cfg() -> AcpiConfig {
        AcpiConfig::new(
            2,
            vec![
                MmioSlot {
                    base: 0xd000_0000,
                    size: 0x1000,
                    gsi: 5,
                },
                MmioSlot {
                    base: 0xd000_1000,
                    size: 0x1000,
                    gsi: 6,
                },
            ],
        )
    }

    #[test]
    fn tables_are_checksummed_and_linked() {
        let t = AcpiTables::build_default(&cfg()).expect("two vCPUs and low windows fit");
        let rsdp = &t.tables[0].bytes;
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().expect("8 bytes"));
        assert_eq!(xsdt_addr, t.table("XSDT").expect("built").addr);
        for p in &t.tables[1..] {
            assert_eq!(sum(&p.bytes), 0, "{} checksum", p.signature);
            assert_eq!(&p.bytes[..4], p.signature.as_bytes());
            let len = u32::from_le_bytes(p.bytes[4..8].try_into().expect("4 bytes"));
            assert_eq!(len as usize, p.bytes.len(), "{} length", p.signature);
            assert!(p.addr % 8 == 0 && p.addr + p.bytes.len() as u64 <= ACPI_AREA_END);
        }
        let fadt = &t.table("FACP").expect("built").bytes;
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().expect("8 bytes"));
        assert_eq!(x_dsdt, t.table("DSDT").expect("built").addr);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().expect("4 bytes"));
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced flag");
    }

    #[test]
    fn boot_hook_writes_tables_into_guest_memory() {
        use crate::boot::linux::AcpiSetup;
        use vm_memory::GuestMemoryMmap;
        let mem: crate::memory::GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)])
                .expect("2 MiB anonymous memory");
        let dev = crate::bus::DeviceInfo {
            name: "vda".into(),
            mmio_base: 0xd000_0000,
            mmio_len: 0x1000,
            gsi: 5,
        };
        let rsdp = Acpi.setup(&mem, 1, &[dev]).expect("tables fit");
        assert_eq!(rsdp, GuestAddress(RSDP_ADDR));
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).expect("RSDP is in RAM");
        assert_eq!(&sig, b"RSD PTR ");
    }

    #[test]
    fn bad_configs_are_errors() {
        let mut c = cfg();
        c.vcpus = 0;
        assert!(matches!(
            AcpiTables::build_default(&c),
            Err(AcpiError::TooManyVcpus(0))
        ));
        let mut c = cfg();
        c.mmio_slots[0].base = 0x1_0000_0000;
        assert!(matches!(
            AcpiTables::build_default(&c),
            Err(AcpiError::WindowTooHigh { .. })
        ));
        assert!(matches!(
            AcpiTables::build(&cfg(), RSDP_ADDR, RSDP_ADDR + 64),
            Err(AcpiError::NoRoom { .. })
        ));
    }
}
