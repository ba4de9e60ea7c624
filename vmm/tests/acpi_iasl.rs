//! The generated ACPI tables, disassembled by ACPICA's `iasl -d` (Debian
//! package `acpica-tools`): the DSDT must name an `LNRO0005` device per
//! virtio-mmio slot with its MMIO window and interrupt, and the MADT must
//! list a local APIC per vCPU and the IOAPIC.

use std::path::Path;
use std::process::Command;

use vmr_vmm::acpi::{AcpiConfig, AcpiTables, MmioSlot, IOAPIC_ADDR};

fn iasl_disassemble(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let bin = dir.join(format!("{name}.dat"));
    std::fs::write(&bin, bytes).expect("temp dir is writable");
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&bin)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("`iasl` is required (Debian package acpica-tools; scripts/setup.sh installs it): {e}")
        });
    assert!(
        out.status.success(),
        "iasl -d {name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.join(format!("{name}.dsl")))
        .expect("iasl -d writes a .dsl beside its input")
}

#[test]
fn iasl_disassembles_dsdt_and_madt() {
    let slots = vec![
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
    ];
    let tables = AcpiTables::build_default(&AcpiConfig::new(2, slots)).expect("config fits");
    let dir = tempfile::tempdir().expect("temp dir");

    let dsdt = iasl_disassemble(
        dir.path(),
        "dsdt",
        &tables.table("DSDT").expect("built").bytes,
    );
    assert_eq!(dsdt.matches("\"LNRO0005\"").count(), 2, "{dsdt}");
    for (name, uid, base, irq) in [
        ("VR00", "Zero", "0xD0000000", "0x00000005"),
        ("VR01", "One", "0xD0001000", "0x00000006"),
    ] {
        let dev = dsdt
            .split("Device (")
            .find(|d| d.starts_with(name))
            .unwrap_or_else(|| panic!("device {name} missing:\n{dsdt}"));
        assert!(
            dev.contains(&format!("Name (_UID, {uid})")),
            "{name} _UID:\n{dev}"
        );
        assert!(dev.contains("Memory32Fixed (ReadWrite,"), "{name}:\n{dev}");
        assert!(dev.contains(base), "{name} base {base}:\n{dev}");
        assert!(
            dev.contains("0x00001000,         // Address Length"),
            "{name} length:\n{dev}"
        );
        assert!(
            dev.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )"),
            "{name} irq:\n{dev}"
        );
        assert!(dev.contains(irq), "{name} irq {irq}:\n{dev}");
    }

    let madt = iasl_disassemble(
        dir.path(),
        "apic",
        &tables.table("APIC").expect("built").bytes,
    );
    assert_eq!(
        madt.matches("Subtable Type : 00 [Processor Local APIC]")
            .count(),
        2,
        "{madt}"
    );
    assert!(
        madt.contains("Local Apic ID : 00") && madt.contains("Local Apic ID : 01"),
        "{madt}"
    );
    assert!(madt.contains("Subtable Type : 01 [I/O APIC]"), "{madt}");
    assert!(
        madt.contains(&format!("Address : {IOAPIC_ADDR:08X}")),
        "{madt}"
    );
    assert!(
        madt.contains("Subtable Type : 02 [Interrupt Source Override]"),
        "{madt}"
    );
    assert!(!madt.to_lowercase().contains("invalid checksum"), "{madt}");

    let fadt = iasl_disassemble(
        dir.path(),
        "facp",
        &tables.table("FACP").expect("built").bytes,
    );
    assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    let xsdt = iasl_disassemble(
        dir.path(),
        "xsdt",
        &tables.table("XSDT").expect("built").bytes,
    );
    assert!(xsdt.contains("ACPI Table Address   0"), "{xsdt}");
}
