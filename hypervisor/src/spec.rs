//! Driver-neutral description of one instance.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::DriverError;

/// Everything a driver needs to launch (or restore) one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// The instance id (the Kafka key of its events).
    pub id: String,
    /// A directory the driver owns for this instance: control sockets,
    /// console file, logs, snapshot scratch. Must exist.
    pub work_dir: PathBuf,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// What to boot.
    pub boot: BootSpec,
    /// vhost-user block devices, in guest order (`vda`, `vdb`, ...).
    pub disks: Vec<DiskSpec>,
    /// vhost-user network devices.
    pub nics: Vec<NicSpec>,
    /// Where the console goes (besides console subscribers).
    pub console: ConsoleSpec,
    /// The debugger endpoint, if wanted.
    pub debug: Option<DebugListen>,
    /// QEMU-only settings (ignored by the microVM).
    pub qemu: QemuSpec,
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSpec {
    /// A kernel (bzImage or ELF), an optional initrd and a command line.
    Kernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// Firmware boot from the first disk (QEMU only).
    Disk,
}

/// One vhost-user block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Device name within the instance (`vda`).
    pub name: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
}

/// One vhost-user network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// Device name within the instance (`net0`).
    pub name: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// The guest's MAC address.
    pub mac: MacAddr,
}

/// Where console output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleSpec {
    /// Append everything the guest prints to this file (default:
    /// `<work_dir>/console.log`).
    pub file: Option<PathBuf>,
}

/// Where the debugger (gdb remote protocol) listens. Only loopback and unix
/// sockets are accepted, so a debugger is never reachable from the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DebugListen {
    /// A TCP address on a loopback interface (port 0 picks a free port).
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl DebugListen {
    /// Checks that the endpoint is local.
    pub fn validate(&self) -> Result<(), DriverError> {
        match self {
            DebugListen::Tcp(a) if !a.ip().is_loopback() => Err(DriverError::spec(
                "debug",
                format!("{a} is not a loopback address; the debugger listens on 127.0.0.1 or a unix socket only"),
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for DebugListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DebugListen::Tcp(a) => write!(f, "tcp:{a}"),
            DebugListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// QEMU acceleration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Accel {
    /// KVM.
    Kvm,
    /// Software emulation.
    Tcg,
    /// KVM where the microVM probe says this host runs guest kernel code at
    /// speed, TCG otherwise.
    #[default]
    Auto,
}

impl FromStr for Accel {
    type Err = DriverError;
    fn from_str(s: &str) -> Result<Self, DriverError> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            "auto" => Ok(Accel::Auto),
            other => Err(DriverError::spec(
                "qemu.accel",
                format!("{other:?} is not one of kvm, tcg, auto"),
            )),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto => "auto",
        })
    }
}

/// QEMU-only settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuSpec {
    /// Acceleration.
    pub accel: Accel,
    /// The QEMU binary (default: `$VMR_QEMU`, else `qemu-system-x86_64` on
    /// `PATH`).
    pub binary: Option<PathBuf>,
    /// Extra `-device` entries the image needs. The QEMU driver adds an ISA
    /// `pvpanic` itself unless one is listed.
    pub devices: Vec<String>,
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not six colon-separated hex bytes"));
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(format!("{s:?} is not six colon-separated hex bytes"));
            }
            *b = u8::from_str_radix(p, 16)
                .map_err(|_| format!("{s:?} is not six colon-separated hex bytes"))?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!("{s:?} is a multicast address"));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl InstanceSpec {
    /// A spec with no devices, 1 vCPU and 256 MiB.
    pub fn new(id: impl Into<String>, work_dir: impl Into<PathBuf>, boot: BootSpec) -> Self {
        InstanceSpec {
            id: id.into(),
            work_dir: work_dir.into(),
            vcpus: 1,
            memory_mib: 256,
            boot,
            disks: Vec::new(),
            nics: Vec::new(),
            console: ConsoleSpec::default(),
            debug: None,
            qemu: QemuSpec::default(),
        }
    }

    /// The console file.
    pub fn console_file(&self) -> PathBuf {
        self.console
            .file
            .clone()
            .unwrap_or_else(|| self.work_dir.join("console.log"))
    }

    /// Checks what every driver needs; drivers check their own limits on top.
    pub fn validate(&self) -> Result<(), DriverError> {
        if self.id.is_empty() {
            return Err(DriverError::spec("id", "must not be empty"));
        }
        if !self.work_dir.is_dir() {
            return Err(DriverError::spec(
                "work_dir",
                format!("{} is not a directory", self.work_dir.display()),
            ));
        }
        if self.vcpus == 0 {
            return Err(DriverError::spec("vcpus", "must be at least 1"));
        }
        if self.memory_mib < 16 {
            return Err(DriverError::spec("memory_mib", "must be at least 16"));
        }
        if let BootSpec::Kernel { kernel, initrd, .. } = &self.boot {
            if !kernel.is_file() {
                return Err(DriverError::spec(
                    "boot.kernel",
                    format!("{} does not exist", kernel.display()),
                ));
            }
            if let Some(i) = initrd {
                if !i.is_file() {
                    return Err(DriverError::spec(
                        "boot.initrd",
                        format!("{} does not exist", i.display()),
                    ));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, n) in self
            .disks
            .iter()
            .map(|d| &d.name)
            .chain(self.nics.iter().map(|n| &n.name))
            .enumerate()
        {
            if !names.insert(n) {
                return Err(DriverError::spec(
                    format!("devices[{i}].name"),
                    format!("{n:?} is used twice"),
                ));
            }
        }
        if let Some(d) = &self.debug {
            d.validate()?;
        }
        for (i, d) in self.qemu.devices.iter().enumerate() {
            if !crate::image::ALLOWED_QEMU_DEVICES.contains(&d.as_str()) {
                return Err(DriverError::spec(
                    format!("qemu.devices[{i}]"),
                    format!(
                        "{d:?} is not allowed (allowed: {})",
                        crate::image::ALLOWED_QEMU_DEVICES.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_rejects() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        assert!("52:54:00:12:34".parse::<MacAddr>().is_err());
        assert!("01:00:5e:00:00:01".parse::<MacAddr>().is_err());
        assert!("52:54:00:12:34:zz".parse::<MacAddr>().is_err());
    }

    #[test]
    fn debugger_must_be_local() {
        let bad = DebugListen::Tcp("0.0.0.0:1234".parse().unwrap());
        assert!(bad.validate().is_err());
        DebugListen::Tcp("127.0.0.1:0".parse().unwrap())
            .validate()
            .unwrap();
    }
}
