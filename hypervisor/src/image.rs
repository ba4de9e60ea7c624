//! Machine images: a directory with an `image.toml` manifest naming the
//! kernel, initrd, command line, machine shape, disks and NICs, and the
//! drivers that can run it.
//!
//! ```toml
//! format_version = 1
//! name = "demo-linux"
//! description = "Debian cloud kernel, busybox, a key-value service"
//! drivers = ["qemu"]
//! [boot]
//! kernel = "vmlinuz"
//! initrd = "initramfs.cpio.gz"
//! cmdline = "console=ttyS0 vmr.workload=service"
//! [machine]
//! memory_mib = 512
//! vcpus = 1
//! qemu_devices = ["pvpanic"]
//! [[disks]]
//! name = "vda"
//! size_mib = 64
//! [[nics]]
//! name = "net0"
//! mac = "52:54:00:12:34:56"
//! ip = "192.168.77.2/24"
//! peer = "192.168.77.1"
//! [service]
//! port = 7000
//! protocol = "vmr-kv-1"
//! ```
//!
//! Paths are relative to the image directory. Loading checks every field and
//! names the first bad one.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::spec::{BootSpec, DiskSpec, InstanceSpec, MacAddr, NicSpec, QemuSpec};
use crate::DriverError;

/// The manifest file in an image directory.
pub const IMAGE_FILE: &str = "image.toml";
/// The manifest version this build reads.
pub const IMAGE_FORMAT_VERSION: u32 = 1;
/// Drivers an image may name.
pub const KNOWN_DRIVERS: &[&str] = &["qemu", "microvm"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    format_version: u32,
    name: String,
    #[serde(default)]
    description: String,
    drivers: Vec<String>,
    boot: RawBoot,
    machine: RawMachine,
    #[serde(default)]
    disks: Vec<RawDisk>,
    #[serde(default)]
    nics: Vec<RawNic>,
    service: Option<ServiceInfo>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoot {
    kernel: String,
    initrd: Option<String>,
    #[serde(default)]
    cmdline: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    memory_mib: u32,
    vcpus: u8,
    #[serde(default)]
    qemu_devices: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    name: String,
    size_mib: Option<u64>,
    file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNic {
    name: String,
    mac: String,
    ip: Option<String>,
    peer: Option<String>,
}

/// The service an image runs, if it says so.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceInfo {
    /// TCP port.
    pub port: u16,
    /// Protocol name (for example `vmr-kv-1`).
    pub protocol: String,
}

/// Where a disk's initial contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A blank disk of this many bytes.
    Blank(u64),
    /// A copy of this file from the image.
    File(PathBuf),
}

/// One disk of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDisk {
    /// Device name (`vda`).
    pub name: String,
    /// Initial contents.
    pub source: DiskSource,
}

/// One NIC of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageNic {
    /// Device name (`net0`).
    pub name: String,
    /// Guest MAC.
    pub mac: MacAddr,
    /// Guest address with prefix length, if the image says.
    pub ip: Option<(Ipv4Addr, u8)>,
    /// The address the image expects on the host side.
    pub peer: Option<Ipv4Addr>,
}

/// A loaded, validated machine image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineImage {
    /// The image directory (absolute).
    pub dir: PathBuf,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Drivers that can run it.
    pub drivers: Vec<String>,
    /// Kernel (absolute path).
    pub kernel: PathBuf,
    /// Initrd (absolute path).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// Extra QEMU devices.
    pub qemu_devices: Vec<String>,
    /// Disks.
    pub disks: Vec<ImageDisk>,
    /// NICs.
    pub nics: Vec<ImageNic>,
    /// The service, if any.
    pub service: Option<ServiceInfo>,
}

fn bad(dir: &Path, field: impl Into<String>, reason: impl Into<String>) -> DriverError {
    DriverError::Image {
        image: dir.to_path_buf(),
        field: field.into(),
        reason: reason.into(),
    }
}

fn image_file(dir: &Path, field: &str, rel: &str) -> Result<PathBuf, DriverError> {
    let p = Path::new(rel);
    if rel.is_empty() || p.is_absolute() || rel.split('/').any(|c| c == "..") {
        return Err(bad(
            dir,
            field,
            format!("{rel:?} must be a relative path inside the image directory"),
        ));
    }
    let full = dir.join(p);
    if !full.is_file() {
        return Err(bad(
            dir,
            field,
            format!("{} does not exist", full.display()),
        ));
    }
    Ok(full)
}

/// The dotted name of the key whose value starts at byte `at` of `text`
/// (`machine.memory_mib`, `nics[0].mac`), found from the line and the table
/// headers above it; the line number where no key is found.
fn field_at(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_no = text[..at].matches('\n').count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let Some((key, _)) = line.split_once('=') else {
        return format!("{IMAGE_FILE} line {line_no}");
    };
    let key = key.trim();
    let mut table = String::new();
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let n = counts.entry(name.to_string()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = name.to_string();
        }
    }
    if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    }
}

/// Extra QEMU devices an image may ask for. Images come from object stores
/// and image directories, so they may not add arbitrary hardware (host
/// device pass-through, shared memory) to an instance.
pub const ALLOWED_QEMU_DEVICES: &[&str] = &["pvpanic", "pvpanic-pci", "virtio-rng-pci"];

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/')?;
    let p: u8 = p.parse().ok()?;
    (p <= 32).then_some(())?;
    Some((a.parse().ok()?, p))
}

impl MachineImage {
    /// Loads and validates `<dir>/image.toml`.
    pub fn load(dir: &Path) -> Result<Self, DriverError> {
        let dir = dir.canonicalize().map_err(|e| {
            bad(
                dir,
                "image",
                format!("cannot open the image directory: {e}"),
            )
        })?;
        let path = dir.join(IMAGE_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| bad(&dir, IMAGE_FILE, format!("cannot read it: {e}")))?;
        Self::parse(&dir, &text)
    }

    /// Validates manifest text for an image in `dir`.
    pub fn parse(dir: &Path, text: &str) -> Result<Self, DriverError> {
        let raw: RawImage = toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|s| field_at(text, s.start))
                .unwrap_or_else(|| IMAGE_FILE.to_string());
            bad(dir, field, e.message().to_string())
        })?;
        if raw.format_version != IMAGE_FORMAT_VERSION {
            return Err(bad(
                dir,
                "format_version",
                format!(
                    "{} is not supported (this build reads version {IMAGE_FORMAT_VERSION})",
                    raw.format_version
                ),
            ));
        }
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(
                dir,
                "name",
                format!(
                    "{:?} must be non-empty letters, digits, '-', '_' or '.'",
                    raw.name
                ),
            ));
        }
        if raw.drivers.is_empty() {
            return Err(bad(dir, "drivers", "names no driver"));
        }
        for (i, d) in raw.drivers.iter().enumerate() {
            if !KNOWN_DRIVERS.contains(&d.as_str()) {
                return Err(bad(
                    dir,
                    format!("drivers[{i}]"),
                    format!("unknown driver {d:?} (known: {})", KNOWN_DRIVERS.join(", ")),
                ));
            }
        }
        let kernel = image_file(dir, "boot.kernel", &raw.boot.kernel)?;
        let initrd = raw
            .boot
            .initrd
            .as_deref()
            .map(|i| image_file(dir, "boot.initrd", i))
            .transpose()?;
        if raw.machine.memory_mib < 16 || raw.machine.memory_mib > 3 * 1024 {
            return Err(bad(
                dir,
                "machine.memory_mib",
                format!("{} is outside 16..=3072", raw.machine.memory_mib),
            ));
        }
        if raw.machine.vcpus == 0 || raw.machine.vcpus > 64 {
            return Err(bad(
                dir,
                "machine.vcpus",
                format!("{} is outside 1..=64", raw.machine.vcpus),
            ));
        }
        for (i, d) in raw.machine.qemu_devices.iter().enumerate() {
            if !ALLOWED_QEMU_DEVICES.contains(&d.as_str()) {
                return Err(bad(
                    dir,
                    format!("machine.qemu_devices[{i}]"),
                    format!(
                        "{d:?} is not allowed (allowed: {})",
                        ALLOWED_QEMU_DEVICES.join(", ")
                    ),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut disks = Vec::new();
        for (i, d) in raw.disks.iter().enumerate() {
            let field = format!("disks[{i}]");
            if d.name.is_empty() || !names.insert(d.name.clone()) {
                return Err(bad(
                    dir,
                    format!("{field}.name"),
                    format!("{:?} is empty or used twice", d.name),
                ));
            }
            let source = match (d.size_mib, &d.file) {
                (Some(0), None) => {
                    return Err(bad(dir, format!("{field}.size_mib"), "must be positive"))
                }
                (Some(s), None) if s <= 1 << 24 => DiskSource::Blank(s << 20),
                (Some(s), None) => {
                    return Err(bad(
                        dir,
                        format!("{field}.size_mib"),
                        format!("{s} MiB is more than 16 TiB"),
                    ))
                }
                (None, Some(f)) => DiskSource::File(image_file(dir, &format!("{field}.file"), f)?),
                _ => {
                    return Err(bad(
                        dir,
                        field,
                        "give exactly one of size_mib (a blank disk) or file (a disk image)",
                    ))
                }
            };
            disks.push(ImageDisk {
                name: d.name.clone(),
                source,
            });
        }
        let mut nics = Vec::new();
        for (i, n) in raw.nics.iter().enumerate() {
            let field = format!("nics[{i}]");
            if n.name.is_empty() || !names.insert(n.name.clone()) {
                return Err(bad(
                    dir,
                    format!("{field}.name"),
                    format!("{:?} is empty or used twice", n.name),
                ));
            }
            let mac = n
                .mac
                .parse()
                .map_err(|e: String| bad(dir, format!("{field}.mac"), e))?;
            let ip =
                n.ip.as_deref()
                    .map(|s| {
                        parse_cidr(s).ok_or_else(|| {
                            bad(
                                dir,
                                format!("{field}.ip"),
                                format!("{s:?} is not an IPv4 address/prefix"),
                            )
                        })
                    })
                    .transpose()?;
            let peer = n
                .peer
                .as_deref()
                .map(|s| {
                    s.parse().map_err(|_| {
                        bad(
                            dir,
                            format!("{field}.peer"),
                            format!("{s:?} is not an IPv4 address"),
                        )
                    })
                })
                .transpose()?;
            nics.push(ImageNic {
                name: n.name.clone(),
                mac,
                ip,
                peer,
            });
        }
        if let Some(s) = &raw.service {
            if s.port == 0 {
                return Err(bad(dir, "service.port", "must not be 0"));
            }
        }
        Ok(MachineImage {
            dir: dir.to_path_buf(),
            name: raw.name,
            description: raw.description,
            drivers: raw.drivers,
            kernel,
            initrd,
            cmdline: raw.boot.cmdline,
            memory_mib: raw.machine.memory_mib,
            vcpus: raw.machine.vcpus,
            qemu_devices: raw.machine.qemu_devices,
            disks,
            nics,
            service: raw.service,
        })
    }

    /// Whether `driver` can run this image.
    pub fn supports(&self, driver: &str) -> bool {
        self.drivers.iter().any(|d| d == driver)
    }

    /// An instance spec for this image under `driver`: its boot source and
    /// machine shape, and one device per image disk and NIC, attached to the
    /// vhost-user socket `socket_for(device name)`.
    pub fn instance_spec(
        &self,
        driver: &str,
        id: &str,
        work_dir: &Path,
        socket_for: impl Fn(&str) -> PathBuf,
    ) -> Result<InstanceSpec, DriverError> {
        if !self.supports(driver) {
            return Err(bad(
                &self.dir,
                "drivers",
                format!(
                    "the image runs under {}, not {driver}",
                    self.drivers.join(", ")
                ),
            ));
        }
        let mut spec = InstanceSpec::new(
            id,
            work_dir,
            BootSpec::Kernel {
                kernel: self.kernel.clone(),
                initrd: self.initrd.clone(),
                cmdline: self.cmdline.clone(),
            },
        );
        spec.vcpus = self.vcpus;
        spec.memory_mib = self.memory_mib;
        spec.disks = self
            .disks
            .iter()
            .map(|d| DiskSpec {
                name: d.name.clone(),
                socket: socket_for(&d.name),
            })
            .collect();
        spec.nics = self
            .nics
            .iter()
            .map(|n| NicSpec {
                name: n.name.clone(),
                socket: socket_for(&n.name),
                mac: n.mac,
            })
            .collect();
        spec.qemu = QemuSpec {
            devices: self.qemu_devices.clone(),
            ..QemuSpec::default()
        };
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
format_version = 1
name = "demo-linux"
drivers = ["qemu"]
[boot]
kernel = "vmlinuz"
initrd = "initrd"
cmdline = "console=ttyS0"
[machine]
memory_mib = 512
vcpus = 1
qemu_devices = ["pvpanic"]
[[disks]]
name = "vda"
size_mib = 64
[[nics]]
name = "net0"
mac = "52:54:00:12:34:56"
ip = "192.168.77.2/24"
peer = "192.168.77.1"
[service]
port = 7000
protocol = "vmr-kv-1"
"#;

    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinuz"), b"k").unwrap();
        std::fs::write(d.path().join("initrd"), b"i").unwrap();
        d
    }

    fn err(d: &Path, text: &str) -> String {
        MachineImage::parse(d, text).unwrap_err().to_string()
    }

    #[test]
    fn loads_a_good_image_and_builds_a_spec() {
        let d = dir();
        std::fs::write(d.path().join(IMAGE_FILE), GOOD).unwrap();
        let img = MachineImage::load(d.path()).unwrap();
        assert_eq!(img.disks[0].source, DiskSource::Blank(64 << 20));
        assert_eq!(img.nics[0].ip, Some((Ipv4Addr::new(192, 168, 77, 2), 24)));
        assert_eq!(img.service.as_ref().unwrap().port, 7000);
        let spec = img
            .instance_spec("qemu", "i-1", d.path(), |n| {
                d.path().join(format!("{n}.sock"))
            })
            .unwrap();
        assert_eq!(spec.memory_mib, 512);
        assert_eq!(spec.nics[0].mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(spec.qemu.devices, vec!["pvpanic".to_string()]);
        let e = img
            .instance_spec("microvm", "i-1", d.path(), |n| d.path().join(n))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not microvm"), "{e}");
    }

    #[test]
    fn names_the_bad_field() {
        let d = dir();
        let p = d.path();
        assert!(err(p, "").contains("missing field"));
        assert!(
            err(p, &GOOD.replace("format_version = 1", "format_version = 9"))
                .contains("format_version")
        );
        assert!(err(p, &GOOD.replace("\"vmlinuz\"", "\"nope\"")).contains("boot.kernel"));
        assert!(err(p, &GOOD.replace("\"vmlinuz\"", "\"../vmlinuz\"")).contains("relative path"));
        assert!(err(p, &GOOD.replace("52:54:00:12:34:56", "52:54")).contains("nics[0].mac"));
        assert!(err(p, &GOOD.replace("/24", "/40")).contains("nics[0].ip"));
        assert!(err(p, &GOOD.replace("[\"qemu\"]", "[\"xen\"]")).contains("drivers[0]"));
        assert!(err(p, &GOOD.replace("memory_mib = 512", "memory_mib = 1"))
            .contains("machine.memory_mib"));
        assert!(err(
            p,
            &GOOD.replace("size_mib = 64", "size_mib = 64\nfile = \"initrd\"")
        )
        .contains("disks[0]"));
        assert!(
            err(p, &GOOD.replace("vcpus = 1", "vcpus = 1\nbogus = 2")).contains("unknown field")
        );
        assert!(err(p, &GOOD.replace("name = \"net0\"", "name = \"vda\"")).contains("nics[0].name"));
        let e = MachineImage::load(&p.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot open the image directory"), "{e}");
    }
}
