//! `qemu.json`: what a QEMU migration stream depends on besides itself.
//!
//! QEMU loads a migration stream only into a machine built the same way:
//! the same versioned machine type, accelerator and CPU model, the same
//! devices at the same PCI addresses with the same options. The driver
//! records these at snapshot time in `qemu.json` (an artifact of kind
//! `state`) and builds the restoring QEMU's command line from it, placing
//! each of the spec's devices by *name* at the slot it had, so a spec that
//! lists its devices in another order still gets them right. A spec that
//! lacks a recorded device, has one the snapshot lacks, or differs in MAC,
//! vCPUs, memory or extra devices is refused before QEMU starts.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::spec::{BootSpec, InstanceSpec};
use crate::DriverError;

/// The file (and artifact name) of the record.
pub const MACHINE_FILE: &str = "qemu.json";
/// Version of the record's layout.
pub const MACHINE_FORMAT: u32 = 1;
/// The PCI slot of the first disk at launch.
pub const FIRST_DISK_SLOT: u8 = 0x04;
/// The PCI slot of the first NIC at launch.
pub const FIRST_NIC_SLOT: u8 = FIRST_DISK_SLOT + super::cmdline::MAX_DISKS as u8;
/// The machine type alias used at launch; the record holds the concrete,
/// versioned type it stands for.
pub const MACHINE_ALIAS: &str = "q35";

/// What a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// vhost-user-blk-pci.
    Disk,
    /// virtio-net-pci on a vhost-user netdev.
    Nic,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Disk => "disk",
            DeviceKind::Nic => "NIC",
        })
    }
}

/// One vhost-user device of the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// Device name (the QEMU device id).
    pub name: String,
    /// Disk or NIC.
    pub kind: DeviceKind,
    /// PCI slot on the root bus.
    pub slot: u8,
    /// The NIC's MAC address.
    pub mac: Option<String>,
}

/// How one QEMU machine is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineRecord {
    /// Layout version ([`MACHINE_FORMAT`]).
    pub format: u32,
    /// The QEMU version that wrote the stream, where QMP said.
    pub qemu_version: Option<String>,
    /// The machine type (`pc-q35-7.2`; `q35` until QEMU resolved it).
    pub machine: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The `-cpu` model.
    pub cpu: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Disks and NICs, in command-line order.
    pub devices: Vec<DeviceRecord>,
    /// The other `-device` arguments, in order (the spec's `qemu.devices`
    /// plus the driver's own, such as `pvpanic`).
    pub extra_devices: Vec<String>,
}

/// The `-cpu` model the driver uses under `accel`.
pub fn cpu_for(accel: &str) -> &'static str {
    if accel == "kvm" {
        "host"
    } else {
        "max"
    }
}

/// The extra `-device` arguments for `spec`: its `qemu.devices`, plus an
/// ISA `pvpanic` (so any Linux guest's kernel panic reaches the driver)
/// unless the spec already has a pvpanic device. With disk boot, none
/// changes.
pub fn extra_devices(spec: &InstanceSpec) -> Vec<String> {
    let mut v = spec.qemu.devices.clone();
    if !v.iter().any(|d| d.starts_with("pvpanic")) {
        v.push("pvpanic".into());
    }
    v
}

impl MachineRecord {
    /// The machine a fresh launch of `spec` gets under `accel`: devices at
    /// slots by list position.
    pub fn for_launch(spec: &InstanceSpec, accel: &str) -> Self {
        let mut devices = Vec::new();
        for (i, d) in spec.disks.iter().enumerate() {
            devices.push(DeviceRecord {
                name: d.name.clone(),
                kind: DeviceKind::Disk,
                slot: FIRST_DISK_SLOT + i as u8,
                mac: None,
            });
        }
        for (i, n) in spec.nics.iter().enumerate() {
            devices.push(DeviceRecord {
                name: n.name.clone(),
                kind: DeviceKind::Nic,
                slot: FIRST_NIC_SLOT + i as u8,
                mac: Some(n.mac.to_string()),
            });
        }
        MachineRecord {
            format: MACHINE_FORMAT,
            qemu_version: None,
            machine: MACHINE_ALIAS.into(),
            accel: accel.into(),
            cpu: cpu_for(accel).into(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            devices,
            extra_devices: extra_devices(spec),
        }
    }

    /// The slot of the device called `name`.
    pub fn slot(&self, name: &str) -> Option<u8> {
        self.devices.iter().find(|d| d.name == name).map(|d| d.slot)
    }

    /// Checks that `spec` has exactly the recorded devices (by name, kind
    /// and MAC), vCPUs, memory and extra devices. Errors name the device.
    pub fn check_spec(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        if spec.vcpus != self.vcpus {
            return Err(DriverError::spec(
                "vcpus",
                format!(
                    "{} but the snapshot's machine has {}",
                    spec.vcpus, self.vcpus
                ),
            ));
        }
        if spec.memory_mib != self.memory_mib {
            return Err(DriverError::spec(
                "memory_mib",
                format!(
                    "{} but the snapshot's machine has {} MiB",
                    spec.memory_mib, self.memory_mib
                ),
            ));
        }
        let wanted: Vec<(String, DeviceKind, Option<String>, String)> = spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                (
                    d.name.clone(),
                    DeviceKind::Disk,
                    None,
                    format!("disks[{i}]"),
                )
            })
            .chain(spec.nics.iter().enumerate().map(|(i, n)| {
                (
                    n.name.clone(),
                    DeviceKind::Nic,
                    Some(n.mac.to_string()),
                    format!("nics[{i}]"),
                )
            }))
            .collect();
        for (name, kind, mac, field) in &wanted {
            let Some(rec) = self.devices.iter().find(|d| &d.name == name) else {
                return Err(DriverError::spec(
                    field.clone(),
                    format!(
                        "the snapshot has no device {name:?} (it has {})",
                        self.device_names()
                    ),
                ));
            };
            if rec.kind != *kind {
                return Err(DriverError::spec(
                    field.clone(),
                    format!(
                        "{name:?} is a {kind} here but a {} in the snapshot",
                        rec.kind
                    ),
                ));
            }
            if *kind == DeviceKind::Nic && rec.mac != *mac {
                return Err(DriverError::spec(
                    format!("{field}.mac"),
                    format!(
                        "{name:?} has MAC {} but {} in the snapshot",
                        mac.as_deref().unwrap_or("none"),
                        rec.mac.as_deref().unwrap_or("none")
                    ),
                ));
            }
        }
        for rec in &self.devices {
            if !wanted.iter().any(|(n, ..)| n == &rec.name) {
                return Err(DriverError::spec(
                    if rec.kind == DeviceKind::Disk {
                        "disks"
                    } else {
                        "nics"
                    },
                    format!(
                        "the snapshot has the {} {:?}, which the spec lacks",
                        rec.kind, rec.name
                    ),
                ));
            }
        }
        let extra = extra_devices(spec);
        if extra != self.extra_devices {
            return Err(DriverError::spec(
                "qemu.devices",
                format!(
                    "{:?} but the snapshot's machine has {:?}",
                    extra, self.extra_devices
                ),
            ));
        }
        if matches!(spec.boot, BootSpec::Disk) && spec.disks.is_empty() {
            return Err(DriverError::spec(
                "boot",
                "disk boot needs at least one disk",
            ));
        }
        Ok(())
    }

    fn device_names(&self) -> String {
        if self.devices.is_empty() {
            return "none".into();
        }
        self.devices
            .iter()
            .map(|d| format!("{:?}", d.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Writes the record into `dir`; returns its size.
    pub fn store(&self, dir: &Path) -> Result<u64, DriverError> {
        let body = serde_json::to_vec_pretty(self).expect("a machine record always serializes");
        crate::artifacts::write_durable(&dir.join(MACHINE_FILE), &body)?;
        Ok(body.len() as u64)
    }

    /// Reads the record from `dir`.
    pub fn load(dir: &Path) -> Result<Self, DriverError> {
        let path = dir.join(MACHINE_FILE);
        let bad = |reason: String| DriverError::Artifact {
            artifact: MACHINE_FILE.into(),
            reason,
        };
        let body = std::fs::read(&path)
            .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        let r: MachineRecord =
            serde_json::from_slice(&body).map_err(|e| bad(format!("malformed: {e}")))?;
        if r.format != MACHINE_FORMAT {
            return Err(bad(format!(
                "format {} is not supported (this build reads {MACHINE_FORMAT})",
                r.format
            )));
        }
        if r.accel != "kvm" && r.accel != "tcg" {
            return Err(bad(format!("accel {:?} is not kvm or tcg", r.accel)));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NicSpec};

    fn spec(disks: &[&str]) -> InstanceSpec {
        let mut s = InstanceSpec::new("i", "/w", BootSpec::Disk);
        for d in disks {
            s.disks.push(DiskSpec {
                name: d.to_string(),
                socket: format!("/w/{d}.sock").into(),
            });
        }
        s.nics.push(NicSpec {
            name: "net0".into(),
            socket: "/w/net.sock".into(),
            mac: "52:54:00:12:34:56".parse().unwrap(),
        });
        s
    }

    #[test]
    fn slots_follow_names_and_mismatches_name_the_device() {
        let rec = MachineRecord::for_launch(&spec(&["vda", "vdb"]), "tcg");
        assert_eq!(rec.cpu, "max");
        assert_eq!(rec.extra_devices, vec!["pvpanic".to_string()]);
        assert_eq!((rec.slot("vda"), rec.slot("vdb")), (Some(4), Some(5)));
        assert_eq!(rec.slot("net0"), Some(FIRST_NIC_SLOT));

        // Reordered: accepted, slots still by name.
        rec.check_spec(&spec(&["vdb", "vda"])).unwrap();

        let e = rec.check_spec(&spec(&["vda"])).unwrap_err().to_string();
        assert!(e.contains("\"vdb\"") && e.contains("lacks"), "{e}");
        let e = rec
            .check_spec(&spec(&["vda", "vdb", "vdc"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"vdc\"") && e.contains("no device"), "{e}");
        let mut s = spec(&["vda", "vdb"]);
        s.nics[0].mac = "52:54:00:00:00:01".parse().unwrap();
        let e = rec.check_spec(&s).unwrap_err().to_string();
        assert!(e.contains("nics[0].mac") && e.contains("\"net0\""), "{e}");
        let mut s = spec(&["vda", "vdb"]);
        s.qemu.devices.push("virtio-rng-pci".into());
        let e = rec.check_spec(&s).unwrap_err().to_string();
        assert!(e.contains("qemu.devices"), "{e}");
        let mut s = spec(&["vda", "vdb"]);
        s.memory_mib = 512;
        assert!(rec
            .check_spec(&s)
            .unwrap_err()
            .to_string()
            .contains("memory_mib"));

        // A spec that names its own pvpanic gets no second one.
        let mut s = spec(&[]);
        s.qemu.devices.push("pvpanic-pci".into());
        assert_eq!(extra_devices(&s), vec!["pvpanic-pci".to_string()]);
    }

    #[test]
    fn record_round_trips_and_bad_records_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut rec = MachineRecord::for_launch(&spec(&["vda"]), "kvm");
        rec.machine = "pc-q35-7.2".into();
        assert_eq!(rec.cpu, "host");
        rec.store(d.path()).unwrap();
        assert_eq!(MachineRecord::load(d.path()).unwrap(), rec);
        std::fs::write(d.path().join(MACHINE_FILE), b"{}").unwrap();
        let e = MachineRecord::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("qemu.json") && e.contains("malformed"), "{e}");
    }
}
