//! QEMU's command line for an [`InstanceSpec`].
//!
//! The machine is a q35 with shared memfd guest memory (vhost-user backends
//! map it), vhost-user-blk and vhost-user-net devices at the PCI slots of a
//! [`MachineRecord`] (by list position at launch; at restore the slots the
//! snapshot recorded, by device name, so the devices line up with the
//! migration stream), an ISA pvpanic device, the serial console on a socket
//! chardev that also logs to the console file, QMP on a unix socket, and
//! optionally the gdbstub. QEMU starts with its vCPUs stopped (`-S`); the
//! driver resumes them over QMP once it listens for events, so no event is
//! missed. Every path on the command line is absolute (see [`absolutize`]),
//! since QEMU runs in the instance's work directory.

use std::path::{Path, PathBuf};

use super::persist::MachineRecord;
use crate::spec::{BootSpec, DebugListen, InstanceSpec};
use crate::DriverError;

/// Most disks an instance may have (each gets a fixed PCI slot).
pub const MAX_DISKS: usize = 8;
/// Most NICs an instance may have.
pub const MAX_NICS: usize = 8;
/// Most vCPUs.
pub const MAX_VCPUS: u8 = 64;

/// Control files of one QEMU process, all inside the instance's work
/// directory (absolute when the spec's paths are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// QMP socket.
    pub qmp: PathBuf,
    /// Serial console socket.
    pub serial: PathBuf,
    /// QEMU's stdout and stderr.
    pub stderr: PathBuf,
    /// Console file.
    pub console: PathBuf,
}

impl Layout {
    /// The files for `spec`.
    pub fn new(spec: &InstanceSpec) -> Self {
        Layout {
            qmp: spec.work_dir.join("qmp.sock"),
            serial: spec.work_dir.join("serial.sock"),
            stderr: spec.work_dir.join("qemu.stderr"),
            console: spec.console_file(),
        }
    }
}

/// How QEMU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Boot the spec's boot source.
    Boot,
    /// Wait for `migrate-incoming` (`-incoming defer`).
    Incoming,
}

/// Checks what the QEMU driver needs beyond [`InstanceSpec::validate`].
pub fn validate(spec: &InstanceSpec) -> Result<(), DriverError> {
    spec.validate()?;
    if spec.vcpus > MAX_VCPUS {
        return Err(DriverError::spec(
            "vcpus",
            format!("{} is more than the QEMU driver's {MAX_VCPUS}", spec.vcpus),
        ));
    }
    if spec.disks.len() > MAX_DISKS {
        return Err(DriverError::spec(
            "disks",
            format!(
                "{} disks; the QEMU driver takes at most {MAX_DISKS}",
                spec.disks.len()
            ),
        ));
    }
    if spec.nics.len() > MAX_NICS {
        return Err(DriverError::spec(
            "nics",
            format!(
                "{} NICs; the QEMU driver takes at most {MAX_NICS}",
                spec.nics.len()
            ),
        ));
    }
    for (field, name) in spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("disks[{i}].name"), &d.name))
        .chain(
            spec.nics
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("nics[{i}].name"), &n.name)),
        )
    {
        let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !name.starts_with("vmr-")
            && name.len() <= 64;
        if !ok {
            return Err(DriverError::spec(
                field,
                format!(
                    "{name:?} must start with a letter, hold only letters, digits, '-', '_' \
                     or '.', not start with \"vmr-\" and be at most 64 characters"
                ),
            ));
        }
    }
    for (i, d) in spec.qemu.devices.iter().enumerate() {
        if d.is_empty() || d.starts_with('-') {
            return Err(DriverError::spec(
                format!("qemu.devices[{i}]"),
                format!("{d:?} is not a -device argument"),
            ));
        }
    }
    if matches!(spec.boot, BootSpec::Disk) && spec.disks.is_empty() {
        return Err(DriverError::spec(
            "boot",
            "disk boot needs at least one disk",
        ));
    }
    Ok(())
}

/// A path as a QEMU option value (commas doubled).
pub fn opt_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// `p` made absolute: canonicalized when it exists, else joined to the
/// current directory (with `.` and `..` resolved against its canonical
/// parent where that exists).
pub fn absolutize(p: &Path) -> Result<PathBuf, DriverError> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Ok(c);
    }
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(DriverError::io("the current directory"))?
            .join(p)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => match std::fs::canonicalize(dir) {
            Ok(d) => Ok(d.join(name)),
            Err(_) => Ok(abs),
        },
        _ => Ok(abs),
    }
}

/// `spec` with every path absolute: work directory, kernel, initrd,
/// vhost-user sockets, console file and debugger socket.
pub fn absolute_spec(spec: &InstanceSpec) -> Result<InstanceSpec, DriverError> {
    let mut s = spec.clone();
    s.work_dir = absolutize(&spec.work_dir)?;
    if let BootSpec::Kernel { kernel, initrd, .. } = &mut s.boot {
        *kernel = absolutize(kernel)?;
        if let Some(i) = initrd {
            *i = absolutize(i)?;
        }
    }
    for d in &mut s.disks {
        d.socket = absolutize(&d.socket)?;
    }
    for n in &mut s.nics {
        n.socket = absolutize(&n.socket)?;
    }
    if let Some(f) = &mut s.console.file {
        *f = absolutize(f)?;
    }
    if let Some(DebugListen::Unix(p)) = &mut s.debug {
        *p = absolutize(p)?;
    }
    Ok(s)
}

/// The arguments after the binary name. `machine` says how the machine is
/// built (type, accelerator, CPU, device slots and extra devices; see
/// [`MachineRecord::check_spec`] for a restore); `debug` is the resolved
/// debugger endpoint (a real port, not 0).
pub fn args(
    spec: &InstanceSpec,
    layout: &Layout,
    machine: &MachineRecord,
    debug: Option<&DebugListen>,
    start: Start,
) -> Vec<String> {
    let accel = machine.accel.as_str();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let mem = format!("{}M", spec.memory_mib);
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", spec.id.replace(',', ",,")),
    ]);
    push(&["-accel", accel]);
    push(&["-machine", &machine.machine]);
    push(&["-cpu", &machine.cpu]);
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&["-m", &mem]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=vmr-mem,size={mem},share=on"),
    ]);
    push(&["-numa", "node,memdev=vmr-mem"]);
    push(&["-nodefaults", "-display", "none", "-no-user-config"]);
    push(&["-no-reboot", "-S", "-msg", "timestamp=on"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=vmr-qmp,path={},server=on,wait=off",
            opt_path(&layout.qmp)
        ),
    ]);
    push(&["-mon", "chardev=vmr-qmp,mode=control"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=vmr-serial,path={},server=on,wait=off,logfile={},logappend=on",
            opt_path(&layout.serial),
            opt_path(&layout.console)
        ),
    ]);
    push(&["-serial", "chardev:vmr-serial"]);
    match &spec.boot {
        BootSpec::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            push(&["-kernel", &kernel.to_string_lossy()]);
            if let Some(i) = initrd {
                push(&["-initrd", &i.to_string_lossy()]);
            }
            push(&["-append", cmdline]);
        }
        BootSpec::Disk => {}
    }
    for (i, d) in spec.disks.iter().enumerate() {
        let chr = format!("vmr-chr-{}", d.name);
        push(&[
            "-chardev",
            &format!("socket,id={chr},path={}", opt_path(&d.socket)),
        ]);
        let boot = if i == 0 && matches!(spec.boot, BootSpec::Disk) {
            ",bootindex=1"
        } else {
            ""
        };
        push(&[
            "-device",
            &format!(
                "vhost-user-blk-pci,id={},chardev={chr},num-queues=1,addr={:#x}{boot}",
                d.name,
                slot(machine, &d.name)
            ),
        ]);
    }
    for n in &spec.nics {
        let chr = format!("vmr-chr-{}", n.name);
        let netdev = format!("vmr-net-{}", n.name);
        push(&[
            "-chardev",
            &format!("socket,id={chr},path={}", opt_path(&n.socket)),
        ]);
        push(&["-netdev", &format!("vhost-user,id={netdev},chardev={chr}")]);
        // Under TCG, QEMU's vhost-user-net only works with MSI-X off.
        let vectors = if accel == "tcg" { ",vectors=0" } else { "" };
        push(&[
            "-device",
            &format!(
                "virtio-net-pci,id={},netdev={netdev},mac={},addr={:#x}{vectors}",
                n.name,
                n.mac,
                slot(machine, &n.name)
            ),
        ]);
    }
    for d in &machine.extra_devices {
        push(&["-device", d]);
    }
    match debug {
        Some(DebugListen::Tcp(addr)) => {
            push(&[
                "-chardev",
                &format!(
                    "socket,id=vmr-gdb,host={},port={},server=on,wait=off,nodelay=on",
                    addr.ip(),
                    addr.port()
                ),
            ]);
            push(&["-gdb", "chardev:vmr-gdb"]);
        }
        Some(DebugListen::Unix(path)) => {
            push(&[
                "-chardev",
                &format!(
                    "socket,id=vmr-gdb,path={},server=on,wait=off",
                    opt_path(path)
                ),
            ]);
            push(&["-gdb", "chardev:vmr-gdb"]);
        }
        None => {}
    }
    if start == Start::Incoming {
        push(&["-incoming", "defer"]);
    }
    a
}

/// The slot `machine` gives the device `name` (every spec device is in it:
/// [`MachineRecord::for_launch`] builds it from the spec and
/// [`MachineRecord::check_spec`] refuses a restore spec that differs).
fn slot(machine: &MachineRecord, name: &str) -> u8 {
    machine
        .slot(name)
        .expect("the machine record lists every device of the spec")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NicSpec};

    fn spec() -> InstanceSpec {
        let mut s = InstanceSpec::new(
            "i-1",
            "/w",
            BootSpec::Kernel {
                kernel: "/k".into(),
                initrd: Some("/i".into()),
                cmdline: "console=ttyS0".into(),
            },
        );
        s.memory_mib = 512;
        s.disks.push(DiskSpec {
            name: "vda".into(),
            socket: "/w/blk,0.sock".into(),
        });
        s.nics.push(NicSpec {
            name: "net0".into(),
            socket: "/w/net.sock".into(),
            mac: "52:54:00:12:34:56".parse().unwrap(),
        });
        s.qemu.devices.push("pvpanic".into());
        s
    }

    #[test]
    fn command_line_has_memory_devices_console_and_debugger() {
        let s = spec();
        let layout = Layout::new(&s);
        let dbg = DebugListen::Tcp("127.0.0.1:4321".parse().unwrap());
        let tcg = MachineRecord::for_launch(&s, "tcg");
        let a = args(&s, &layout, &tcg, Some(&dbg), Start::Incoming).join(" ");
        for want in [
            "-accel tcg",
            "memory-backend-memfd,id=vmr-mem,size=512M,share=on",
            "-numa node,memdev=vmr-mem",
            "-m 512M",
            "socket,id=vmr-chr-vda,path=/w/blk,,0.sock",
            "vhost-user-blk-pci,id=vda,chardev=vmr-chr-vda,num-queues=1,addr=0x4",
            "-netdev vhost-user,id=vmr-net-net0,chardev=vmr-chr-net0",
            "virtio-net-pci,id=net0,netdev=vmr-net-net0,mac=52:54:00:12:34:56,addr=0xc,vectors=0",
            "-device pvpanic",
            "logfile=/w/console.log,logappend=on",
            "-serial chardev:vmr-serial",
            "-mon chardev=vmr-qmp,mode=control",
            "host=127.0.0.1,port=4321,server=on,wait=off",
            "-gdb chardev:vmr-gdb",
            "-incoming defer",
            "-append console=ttyS0",
            " -S ",
        ] {
            assert!(a.contains(want), "{want:?} missing from {a}");
        }
        assert_eq!(a.matches("pvpanic").count(), 1, "{a}");
        let kvm = MachineRecord::for_launch(&s, "kvm");
        let a = args(&s, &layout, &kvm, None, Start::Boot).join(" ");
        assert!(!a.contains("vectors=0") && !a.contains("-gdb") && !a.contains("-incoming"));
        assert!(a.contains("-cpu host") && a.contains("-machine q35"));

        // Restored: the recorded machine type and slots by name, whatever
        // the spec's order.
        let mut two = s.clone();
        two.disks.push(DiskSpec {
            name: "vdb".into(),
            socket: "/w/b.sock".into(),
        });
        let mut rec = MachineRecord::for_launch(&two, "tcg");
        rec.machine = "pc-q35-7.2".into();
        two.disks.reverse();
        rec.check_spec(&two).unwrap();
        let a = args(&two, &layout, &rec, None, Start::Incoming).join(" ");
        assert!(a.contains("-machine pc-q35-7.2"), "{a}");
        assert!(
            a.contains("id=vda,chardev=vmr-chr-vda,num-queues=1,addr=0x4"),
            "{a}"
        );
        assert!(
            a.contains("id=vdb,chardev=vmr-chr-vdb,num-queues=1,addr=0x5"),
            "{a}"
        );

        // Without pvpanic in the spec, the driver adds it.
        let mut bare = s.clone();
        bare.qemu.devices.clear();
        let a = args(
            &bare,
            &layout,
            &MachineRecord::for_launch(&bare, "tcg"),
            None,
            Start::Boot,
        )
        .join(" ");
        assert!(a.contains("-device pvpanic"), "{a}");
    }

    #[test]
    fn relative_paths_become_absolute() {
        let d = tempfile::tempdir().unwrap();
        let cwd = std::env::current_dir().unwrap();
        let rel: PathBuf = cwd
            .components()
            .skip(1)
            .map(|_| "..")
            .collect::<PathBuf>()
            .join(d.path().strip_prefix("/").unwrap());
        assert!(rel.is_relative());
        let canon = std::fs::canonicalize(d.path()).unwrap();
        assert_eq!(absolutize(&rel).unwrap(), canon);
        assert_eq!(
            absolutize(&rel.join("new.sock")).unwrap(),
            canon.join("new.sock")
        );
        let mut s = spec();
        s.work_dir = rel.clone();
        s.console.file = Some(rel.join("c.log"));
        let a = absolute_spec(&s).unwrap();
        assert_eq!(a.work_dir, canon);
        assert_eq!(a.console_file(), canon.join("c.log"));
        assert!(Layout::new(&a).qmp.is_absolute());
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = spec();
        s.work_dir = std::env::temp_dir();
        s.boot = BootSpec::Disk;
        validate(&s).unwrap();
        s.disks[0].name = "vmr-mem".into();
        assert!(validate(&s)
            .unwrap_err()
            .to_string()
            .contains("disks[0].name"));
        s.disks[0].name = "vda".into();
        s.qemu.devices.push("-monitor".into());
        assert!(validate(&s)
            .unwrap_err()
            .to_string()
            .contains("qemu.devices[1]"));
        s.qemu.devices.pop();
        s.disks.clear();
        assert!(validate(&s).unwrap_err().to_string().contains("disk boot"));
    }
}
