//! Linux direct boot of a bzImage: the kernel at 1 MiB, the initrd at the
//! top of RAM, the command line, and the zero page with an e820 map. ACPI
//! tables come from an [`AcpiSetup`] hook; virtio-mmio devices are announced
//! on the command line (`virtio_mmio.device=4K@0x...:gsi`).

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout;
use super::loader::LoaderError;
use crate::bus::DeviceInfo;
use crate::memory::GuestMemoryMmap;

/// e820 RAM.
const E820_RAM: u32 = 1;
/// e820 reserved.
const E820_RESERVED: u32 = 2;
/// `type_of_loader`: undefined loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// `loadflags` bit: loaded high.
const LOADED_HIGH: u8 = 0x01;
/// Highest address the initrd may end at (also the RAM end, whichever is lower).
const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// Places ACPI tables (RSDP, XSDT, MADT, DSDT ...) in guest memory for the
/// devices in `devices`; returns the RSDP's guest address.
///
/// Implemented by the ACPI module and handed to [`load_linux`]; the VMM
/// calls it once, after the kernel, initrd and command line are placed.
pub trait AcpiSetup: Send + Sync {
    /// Writes the tables; returns the RSDP address.
    fn setup(
        &self,
        mem: &GuestMemoryMmap,
        vcpus: u8,
        devices: &[DeviceInfo],
    ) -> Result<GuestAddress, String>;
}

/// What [`load_linux`] needs.
pub struct LinuxBoot<'a> {
    /// The bzImage.
    pub kernel: &'a Path,
    /// Optional initrd.
    pub initrd: Option<&'a Path>,
    /// Kernel command line (device entries are appended).
    pub cmdline: &'a str,
    /// Devices to announce.
    pub devices: &'a [DeviceInfo],
    /// Number of vCPUs (for ACPI's MADT).
    pub vcpus: u8,
    /// The ACPI hook, if any.
    pub acpi: Option<&'a dyn AcpiSetup>,
}

/// Result of loading Linux.
#[derive(Debug, Clone, Copy)]
pub struct LinuxEntry {
    /// 64-bit entry point (startup_64: load address + 0x200).
    pub entry: GuestAddress,
    /// The zero page (goes in `rsi`).
    pub zero_page: GuestAddress,
}

/// The full kernel command line for `base` and `devices`.
pub fn full_cmdline(base: &str, devices: &[DeviceInfo]) -> Result<Cmdline, LoaderError> {
    let mut c =
        Cmdline::new(layout::CMDLINE_MAX).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    if !base.trim().is_empty() {
        c.insert_str(base.trim())
            .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    }
    for d in devices {
        c.insert_str(format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            d.mmio_len / 1024,
            d.mmio_base,
            d.gsi
        ))
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    }
    Ok(c)
}

/// Loads a bzImage, initrd and command line and writes the zero page.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    boot: &LinuxBoot<'_>,
) -> Result<LinuxEntry, LoaderError> {
    let kpath = boot.kernel.display().to_string();
    let mut f = File::open(boot.kernel).map_err(|source| LoaderError::Read {
        path: kpath.clone(),
        source,
    })?;
    let res = BzImage::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM_START))).map_err(
        |source| LoaderError::Load {
            path: kpath.clone(),
            source,
        },
    )?;
    let mut params = boot_params::default();
    if let Some(hdr) = res.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.kernel_alignment = 0x0100_0000;

    let cmdline = full_cmdline(boot.cmdline, boot.devices)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE), &cmdline).map_err(|source| {
        LoaderError::Load {
            path: "command line".into(),
            source,
        }
    })?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;

    if let Some(initrd) = boot.initrd {
        let ipath = initrd.display().to_string();
        let data = std::fs::read(initrd).map_err(|source| LoaderError::Read {
            path: ipath.clone(),
            source,
        })?;
        let len = data.len() as u64;
        let top = mem_size.min(INITRD_ADDR_MAX + 1);
        let addr = top
            .checked_sub(len)
            .map(|a| a & !0xfff)
            .filter(|a| *a > res.kernel_end)
            .ok_or(LoaderError::InitrdTooBig {
                path: ipath.clone(),
                len,
            })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|_| LoaderError::InitrdTooBig { path: ipath, len })?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = len as u32;
    }

    let e820 = [
        (0, layout::EBDA_START, E820_RAM),
        (
            layout::EBDA_START,
            0x10_0000 - layout::EBDA_START,
            E820_RESERVED,
        ),
        (
            layout::HIMEM_START,
            mem_size - layout::HIMEM_START,
            E820_RAM,
        ),
    ];
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty,
        };
    }
    params.e820_entries = e820.len() as u8;

    if let Some(acpi) = boot.acpi {
        let rsdp = acpi
            .setup(mem, boot.vcpus, boot.devices)
            .map_err(LoaderError::Acpi)?;
        params.acpi_rsdp_addr = rsdp.raw_value();
    }

    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(|source| super::BootError::Write {
            what: "zero page",
            source,
        })?;
    Ok(LinuxEntry {
        entry: res.kernel_load.unchecked_add(0x200),
        zero_page: GuestAddress(layout::ZERO_PAGE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_announces_devices() {
        let d = DeviceInfo {
            name: "blk0".into(),
            mmio_base: 0xd000_0000,
            mmio_len: 0x1000,
            gsi: 5,
        };
        let c = full_cmdline("console=ttyS0", &[d]).expect("valid");
        let s = c.as_cstring().expect("no NUL").into_string().expect("utf8");
        assert_eq!(s, "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5");
    }

    #[test]
    fn non_bzimage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = dir.path().join("k");
        std::fs::write(&k, vec![0u8; 8192]).expect("write");
        let m = crate::memory::VmMemory::new_shared(32 << 20).expect("memory");
        let boot = LinuxBoot {
            kernel: &k,
            initrd: None,
            cmdline: "",
            devices: &[],
            vcpus: 1,
            acpi: None,
        };
        assert!(matches!(
            load_linux(m.guest_memory(), 32 << 20, &boot),
            Err(LoaderError::Load { .. })
        ));
    }
}
