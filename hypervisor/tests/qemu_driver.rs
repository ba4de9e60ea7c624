//! The QEMU driver against real QEMU (TCG) and real vhost-tap backends.
//!
//! Heavy: needs qemu-system-x86_64, root (network namespaces, TAP devices, a
//! small tmpfs mount for the full-disk snapshot),
//! gdb, the Linux guest image (guest/linux/build.sh; the service tests need
//! its `image.toml` for `demo-linux`) and the vhost-tap binaries
//! (`cargo build -p vhost-tap --bins`). Run one at a time:
//! `cargo test -p vmr-hypervisor --test qemu_driver -- --test-threads=1`.
//! A missing prerequisite fails the test with its name.

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmr_hypervisor::image::{DiskSource, MachineImage};
use vmr_hypervisor::qemu::persist::{DeviceKind, MachineRecord};
use vmr_hypervisor::qemu::{QemuDriver, QemuInstance};
use vmr_hypervisor::{
    Accel, BootSpec, DebugListen, DiskSpec, Driver, DriverError, DriverEvent, EndReason, Instance,
    InstanceSpec, RunState, SnapshotArtifacts, SnapshotOptions,
};
use vmr_proto::domain::LifecycleKind;
use vmr_testkit::qemu::NetNs;
use vmr_testkit::{workspace_bin, ChildGuard};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const TAP_NAME: &str = "vmrtap0";
/// The same MAC on every namespace's TAP, so a restored guest's neighbour
/// entry for its peer stays valid in the clone's namespace.
const PEER_MAC: &str = "02:00:00:77:00:01";
const PEER_CIDR: &str = "192.168.77.1/24";

type TestResult = Result<(), Box<dyn std::error::Error>>;
type BoxError = Box<dyn std::error::Error>;

fn qemu_binary() -> PathBuf {
    let p = std::env::var_os("VMR_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"));
    assert!(
        p.is_file(),
        "QEMU not found at {}: install qemu-system-x86 (scripts/setup.sh) or set $VMR_QEMU",
        p.display()
    );
    p
}

fn image_dir() -> PathBuf {
    std::env::var_os("VMR_GUEST_LINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| vmr_testkit::cache_dir().join("guest-linux"))
}

/// The `demo-linux` machine image (with the key-value service).
fn demo_image() -> MachineImage {
    qemu_binary();
    let dir = image_dir();
    assert!(
        dir.join("image.toml").is_file(),
        "the demo-linux machine image ({}/image.toml) is missing: build it with guest/linux/build.sh",
        dir.display()
    );
    MachineImage::load(&dir).unwrap_or_else(|e| panic!("{e}"))
}

/// A kernel-only spec (no devices) on the guest image's kernel and initrd.
fn plain_spec(id: &str, work: &Path) -> InstanceSpec {
    qemu_binary();
    let dir = image_dir();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    assert!(
        kernel.is_file() && initrd.is_file(),
        "the Linux guest image is missing in {}: build it with guest/linux/build.sh",
        dir.display()
    );
    let mut spec = InstanceSpec::new(
        id,
        work,
        BootSpec::Kernel {
            kernel,
            initrd: Some(initrd),
            cmdline: "console=ttyS0 panic=-1 loglevel=4 vmr.steps=wait vmr.halt=0".into(),
        },
    );
    spec.memory_mib = 256;
    spec.qemu.accel = Accel::Tcg;
    spec
}

/// Waits for a console line containing `marker` (read from the console
/// file); fails early when the instance exits.
fn wait_console(inst: &dyn Instance, marker: &str, timeout: Duration) -> Result<String, BoxError> {
    let file = inst.query()?.console_file;
    let start = Instant::now();
    loop {
        let text = std::fs::read(&file)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find_map(|l| l.find(marker).map(|i| l[i..].trim_end().to_string()))
        {
            return Ok(line);
        }
        let info = inst.query()?;
        if info.state == RunState::Exited || start.elapsed() > timeout {
            let tail: String = text
                .chars()
                .rev()
                .take(3000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(format!(
                "no console line {marker:?} after {:?} (state {}, exit {:?}); console tail:\n{tail}",
                start.elapsed(),
                info.state,
                info.exit
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn next_event(
    sub: &vmr_hypervisor::Subscription<DriverEvent>,
    kind: LifecycleKind,
    timeout: Duration,
) -> Result<DriverEvent, BoxError> {
    sub.wait_for(timeout, |e| e.kind() == kind).map_err(|gone| {
        format!("no {kind:?} event within {timeout:?} (source gone: {gone})").into()
    })
}

fn pid_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; a reaped process has none.
    Path::new(&format!("/proc/{pid}")).exists()
}

fn wait_for_path(path: &Path, guard: &mut ChildGuard) -> TestResult {
    let start = Instant::now();
    while !path.exists() {
        if let Some(s) = guard.try_wait() {
            return Err(format!("{} exited ({s}) before listening", guard.name()).into());
        }
        if start.elapsed() > Duration::from_secs(15) {
            return Err(format!("{} did not create {}", guard.name(), path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One instance's devices: a disk image served by vhost-tap-blk and a TAP in
/// its own network namespace served by vhost-tap-net, both recording into
/// capture files. Fields drop in order: backends, then the namespace.
struct Rig {
    _blk: ChildGuard,
    _net: ChildGuard,
    ns: NetNs,
    dir: PathBuf,
    disk: PathBuf,
}

impl Rig {
    /// Starts the backends in `dir` over `disk`.
    fn start(dir: &Path, disk: &Path, id: &str) -> Result<Rig, BoxError> {
        std::fs::create_dir_all(dir)?;
        let ns = NetNs::create()?;
        let blk = start_tap(
            dir,
            "vhost-tap-blk",
            id,
            &[
                "--image".as_ref(),
                disk.as_os_str(),
                "--device".as_ref(),
                "vda".as_ref(),
            ],
        )?;
        let net = start_tap(
            dir,
            "vhost-tap-net",
            id,
            &["--tap", TAP_NAME, "--netns", ns.name(), "--device", "net0"].map(OsStr::new),
        )?;
        Ok(Rig {
            _blk: blk,
            _net: net,
            ns,
            dir: dir.to_path_buf(),
            disk: disk.to_path_buf(),
        })
    }

    fn socket(&self, device: &str) -> PathBuf {
        match device {
            "vda" => self.dir.join("vhost-tap-blk.sock"),
            _ => self.dir.join("vhost-tap-net.sock"),
        }
    }

    /// The namespace's end of the TAP, once the guest's NIC is up.
    fn configure_peer(&self) -> TestResult {
        self.ns.wait_for_link(TAP_NAME, Duration::from_secs(60))?;
        self.ns
            .ip(&["link", "set", "dev", TAP_NAME, "address", PEER_MAC])?;
        self.ns.configure(TAP_NAME, PEER_CIDR)?;
        Ok(())
    }

    fn capture_len(&self, name: &str) -> u64 {
        std::fs::metadata(self.dir.join(format!("{name}.events")))
            .map(|m| m.len())
            .unwrap_or(0)
    }
}

fn start_tap(dir: &Path, name: &str, id: &str, args: &[&OsStr]) -> Result<ChildGuard, BoxError> {
    let bin = workspace_bin(name)
        .map_err(|e| format!("{e} (build it with `cargo build -p vhost-tap --bins`)"))?;
    let socket = dir.join(format!("{name}.sock"));
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--socket")
        .arg(&socket)
        .args(args)
        .args(["--instance-id", id])
        .arg("--capture")
        .arg(dir.join(format!("{name}.events")))
        .arg("--seq-file")
        .arg(dir.join("instance.seq"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut guard = ChildGuard::spawn(name, &mut cmd)?;
    wait_for_path(&socket, &mut guard)?;
    Ok(guard)
}

/// A fresh disk for `image` at `path`.
fn make_disk(image: &MachineImage, path: &Path) -> TestResult {
    let disk = image
        .disks
        .iter()
        .find(|d| d.name == "vda")
        .ok_or("the image has no vda disk")?;
    match &disk.source {
        DiskSource::Blank(bytes) => std::fs::File::create(path)?.set_len(*bytes)?,
        DiskSource::File(f) => {
            std::fs::copy(f, path)?;
        }
    }
    Ok(())
}

/// The image's spec on `rig`'s sockets.
fn service_spec(
    image: &MachineImage,
    id: &str,
    work: &Path,
    rig: &Rig,
) -> Result<InstanceSpec, BoxError> {
    std::fs::create_dir_all(work)?;
    let mut spec = image.instance_spec("qemu", id, work, |d| rig.socket(d))?;
    spec.qemu.binary = Some(qemu_binary());
    Ok(spec)
}

fn service_addr(image: &MachineImage) -> SocketAddr {
    let ip = image
        .nics
        .first()
        .and_then(|n| n.ip)
        .map(|(ip, _)| ip)
        .unwrap_or_else(|| "192.168.77.2".parse().expect("a valid address"));
    let port = image.service.as_ref().map_or(7000, |s| s.port);
    SocketAddr::from((ip, port))
}

/// Sends one request line to the guest's service from inside `ns` and
/// returns the reply line (empty if the connection closed without one).
fn request(ns: &NetNs, addr: SocketAddr, line: &str) -> Result<String, BoxError> {
    request_within(ns, addr, line, Duration::from_secs(60))
}

/// [`request`] waiting at most `read_timeout` for the reply.
fn request_within(
    ns: &NetNs,
    addr: SocketAddr,
    line: &str,
    read_timeout: Duration,
) -> Result<String, BoxError> {
    let path = ns.path();
    let line = line.to_string();
    let h = std::thread::spawn(move || -> Result<String, String> {
        enter_netns(&path)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("connect {addr}: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        stream
            .set_read_timeout(Some(read_timeout))
            .map_err(|e| e.to_string())?;
        (&stream)
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut reply = String::new();
        let _ = BufReader::new(&stream).read_line(&mut reply);
        Ok(reply.trim_end().to_string())
    });
    Ok(h.join().map_err(|_| "request thread panicked")??)
}

fn enter_netns(path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: setns(2) on a valid namespace fd held open by `f`; it changes
    // only this (test-owned) thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn err_text(r: Result<Box<dyn Instance>, DriverError>) -> (DriverError, String) {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let t = e.to_string();
            (e, t)
        }
    }
}

#[test]
// Heavy: needs qemu-system-x86_64, root, the demo-linux image and the vhost-tap binaries.
fn lifecycle_scenario_with_recorded_disk_and_nic() -> TestResult {
    let image = demo_image();
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    make_disk(&image, &disk)?;
    let rig = Rig::start(&tmp.path().join("rig"), &disk, "drv-scenario")?;
    let spec = service_spec(&image, "drv-scenario", &tmp.path().join("work"), &rig)?;
    let addr = service_addr(&image);
    let crash = common::lifecycle(
        &QemuDriver,
        &spec,
        common::Guest {
            ready: &|inst| {
                wait_console(inst, "VMR-SERVICE-READY", BOOT_TIMEOUT)
                    .unwrap_or_else(|e| panic!("{e}"));
                rig.configure_peer().unwrap_or_else(|e| panic!("{e}"));
                let reply =
                    request(&rig.ns, addr, "PUT scenario ok").unwrap_or_else(|e| panic!("{e}"));
                assert!(reply.starts_with("OK "), "{reply:?}");
            },
            crash: &|_| {
                let _ = request_within(
                    &rig.ns,
                    addr,
                    &format!("PUT {} boom", "k".repeat(201)),
                    Duration::from_secs(5),
                );
            },
            crash_kind: LifecycleKind::Crash,
        },
    );
    assert!(
        crash.lifecycle.detail.contains("GUEST_PANICKED"),
        "{}",
        crash.lifecycle.detail
    );
    assert!(rig.capture_len("vhost-tap-blk") > 0 && rig.capture_len("vhost-tap-net") > 0);
    Ok(())
}

#[test]
// Heavy: needs QEMU (TCG), root (netns, TAP), vhost-tap binaries, demo-linux image.
fn launch_with_recorded_devices_pause_resume_stop_and_events() -> TestResult {
    let image = demo_image();
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    make_disk(&image, &disk)?;
    let rig = Rig::start(&tmp.path().join("rig"), &disk, "drv-life")?;
    let mut spec = service_spec(&image, "drv-life", &tmp.path().join("work"), &rig)?;
    spec.qemu.accel = Accel::Auto;
    let driver = vmr_hypervisor::driver("qemu")?;
    assert_eq!(driver.name(), "qemu");
    let inst = driver.launch(&spec)?;
    let events = inst.subscribe();
    let console = inst.console();
    let boot = next_event(&events, LifecycleKind::Boot, Duration::from_secs(5))?;
    assert!(boot.wall_time_ns > 0 && boot.mono_time_ns > 0);

    let info = inst.query()?;
    assert_eq!(info.driver, "qemu");
    assert_eq!(info.state, RunState::Running);
    let (accel, reason) = info.accel.clone().ok_or("no accel reported")?;
    assert!(reason.starts_with("auto:"), "{reason}");
    if !vmr_hypervisor::qemu::accel::host_verdict()?.linux_bootable {
        assert_eq!(accel, "tcg", "auto must pick TCG here: {reason}");
    }
    let pid = info.pid.ok_or("no pid")?;

    let ready = wait_console(inst.as_ref(), "VMR-SERVICE-READY", BOOT_TIMEOUT)?;
    assert!(ready.contains("port="), "{ready}");
    // Console subscribers saw the same output.
    let mut seen = Vec::new();
    while let Some(chunk) = console.try_recv() {
        seen.extend(chunk);
    }
    assert!(
        String::from_utf8_lossy(&seen).contains("VMR-SERVICE-READY"),
        "console subscriber missed the ready line"
    );

    rig.configure_peer()?;
    let addr = service_addr(&image);
    let reply = request(&rig.ns, addr, "PUT k1 v1")?;
    assert!(reply.starts_with("OK "), "{reply:?}");

    inst.pause()?;
    let p = next_event(&events, LifecycleKind::Pause, Duration::from_secs(10))?;
    assert!(p.mono_time_ns >= boot.mono_time_ns);
    assert_eq!(inst.query()?.state, RunState::Paused);
    inst.resume()?;
    next_event(&events, LifecycleKind::Resume, Duration::from_secs(10))?;
    assert_eq!(inst.query()?.state, RunState::Running);
    let n: u32 = reply
        .split_whitespace()
        .nth(1)
        .ok_or("no slot in the reply")?
        .parse()?;
    let reply = request(&rig.ns, addr, &format!("GET {n}"))?;
    assert_eq!(reply, format!("VAL {n} k1 v1"));
    assert!(rig.capture_len("vhost-tap-blk") > 0, "no block capture");
    assert!(rig.capture_len("vhost-tap-net") > 0, "no net capture");

    let e = inst.wait(Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    let exit = inst.stop(Duration::from_secs(3))?;
    assert!(exit.detail.contains("stopped by the driver"), "{exit:?}");
    next_event(&events, LifecycleKind::Shutdown, Duration::from_secs(5))?;
    assert_eq!(inst.wait(Duration::from_secs(1))?, exit);
    assert_eq!(inst.query()?.state, RunState::Exited);
    assert!(!pid_alive(pid), "QEMU {pid} still exists after stop");
    assert!(matches!(inst.pause(), Err(DriverError::Gone(_))));
    Ok(())
}

#[test]
// Heavy: needs QEMU (TCG), root (netns, TAP), vhost-tap binaries, demo-linux image.
fn packet_of_death_panics_the_guest_and_arrives_as_a_crash_event() -> TestResult {
    let image = demo_image();
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    make_disk(&image, &disk)?;
    let rig = Rig::start(&tmp.path().join("rig"), &disk, "drv-pod")?;
    let spec = service_spec(&image, "drv-pod", &tmp.path().join("work"), &rig)?;
    assert!(
        spec.qemu.devices.iter().any(|d| d.starts_with("pvpanic")),
        "demo-linux must ask for a pvpanic device: {:?}",
        spec.qemu.devices
    );
    let inst = QemuDriver.launch(&spec)?;
    let events = inst.subscribe();
    wait_console(inst.as_ref(), "VMR-SERVICE-READY", BOOT_TIMEOUT)?;
    rig.configure_peer()?;
    let addr = service_addr(&image);

    // 200 bytes is the longest key the service takes.
    let reply = request(&rig.ns, addr, &format!("PUT {} ok", "k".repeat(200)))?;
    assert!(reply.starts_with("OK "), "200-byte key: {reply:?}");
    wait_console(inst.as_ref(), "keylen=200", Duration::from_secs(30))?;
    assert_eq!(inst.query()?.state, RunState::Running);
    assert!(
        !inst
            .subscribe()
            .receiver()
            .try_iter()
            .any(|e| e.kind() == LifecycleKind::Crash),
        "a 200-byte key crashed the guest"
    );

    // 201 bytes panics the kernel.
    let sent = vmr_hypervisor::events::now_ns();
    let _ = request_within(
        &rig.ns,
        addr,
        &format!("PUT {} boom", "k".repeat(201)),
        Duration::from_secs(5),
    );
    let crash = next_event(&events, LifecycleKind::Crash, Duration::from_secs(60))?;
    assert!(
        crash.lifecycle.detail.contains("GUEST_PANICKED"),
        "{}",
        crash.lifecycle.detail
    );
    assert!(
        crash.wall_time_ns >= sent.0 - 1_000_000_000
            && crash.mono_time_ns >= sent.1 - 1_000_000_000,
        "crash time {} / {} is before the request {:?}",
        crash.wall_time_ns,
        crash.mono_time_ns,
        sent
    );
    wait_console(
        inst.as_ref(),
        "VMR-OVERFLOW keylen=201",
        Duration::from_secs(5),
    )?;
    let info = inst.query()?;
    assert_eq!(info.state, RunState::Crashed, "the guest must be held");
    let status = inst
        .as_any()
        .downcast_ref::<vmr_hypervisor::qemu::QemuInstance>()
        .ok_or("not a QEMU instance")?
        .qmp_execute("query-status", serde_json::json!({}))?;
    assert_eq!(status["status"], "guest-panicked");
    assert!(matches!(inst.resume(), Err(DriverError::State { .. })));
    // The held guest can still be snapshotted for inspection, and stays held.
    let snap = tmp.path().join("crashed");
    std::fs::create_dir(&snap)?;
    let arts = inst.snapshot(&snap, SnapshotOptions::default())?;
    assert_eq!(arts.pause, None);
    assert!(arts.total_bytes() > 0);
    assert_eq!(inst.query()?.state, RunState::Crashed);
    // wait() returns for a crashed guest that QEMU holds.
    let end = inst.wait(Duration::from_secs(5))?;
    assert_eq!(end.reason, EndReason::Crash, "{end:?}");
    assert!(end.detail.contains("GUEST_PANICKED"), "{end:?}");
    assert!(
        end.detail.contains("Kernel panic") && !end.detail.contains("VMR-"),
        "the crash detail quotes the panic line: {end:?}"
    );
    assert_eq!(inst.query()?.state, RunState::Crashed);
    inst.stop(Duration::from_secs(2))?;

    // The snapshot of the held guest restores as a crashed clone.
    let copy = tmp.path().join("clone.raw");
    std::fs::copy(&disk, &copy)?;
    let crig = Rig::start(&tmp.path().join("crig"), &copy, "drv-pod-clone")?;
    let cspec = service_spec(&image, "drv-pod-clone", &tmp.path().join("cwork"), &crig)?;
    let clone = QemuDriver.restore(&cspec, &snap)?;
    assert_eq!(clone.query()?.state, RunState::Crashed);
    let end = clone.wait(Duration::from_secs(5))?;
    assert_eq!(end.reason, EndReason::Crash, "{end:?}");
    assert!(matches!(clone.resume(), Err(DriverError::State { .. })));
    let status = clone
        .as_any()
        .downcast_ref::<QemuInstance>()
        .ok_or("not a QEMU instance")?
        .qmp_execute("query-status", serde_json::json!({}))?;
    assert_eq!(status["status"], "guest-panicked");
    let exit = clone.stop(Duration::from_secs(2))?;
    assert_eq!(exit.reason, EndReason::Stopped, "{exit:?}");
    Ok(())
}

#[test]
// Heavy: needs QEMU (TCG), root (netns, TAP), vhost-tap binaries, demo-linux image.
fn snapshot_restores_twice_while_the_original_keeps_running() -> TestResult {
    let image = demo_image();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let disk = root.join("orig.raw");
    make_disk(&image, &disk)?;
    let rig = Rig::start(&root.join("orig"), &disk, "drv-orig")?;
    let spec = service_spec(&image, "drv-orig", &root.join("orig-work"), &rig)?;
    let orig = QemuDriver.launch(&spec)?;
    let orig_events = orig.subscribe();
    wait_console(orig.as_ref(), "VMR-SERVICE-READY", BOOT_TIMEOUT)?;
    rig.configure_peer()?;
    let addr = service_addr(&image);
    let r0 = request(&rig.ns, addr, "PUT before-snap v0")?;
    assert!(r0.starts_with("OK "), "{r0:?}");
    let n0: u32 = r0.split_whitespace().nth(1).ok_or("no slot")?.parse()?;

    // A snapshot of the running guest: paused for the cut, resumed after.
    let live = root.join("snap-live");
    std::fs::create_dir(&live)?;
    let arts = orig.snapshot(&live, SnapshotOptions::default())?;
    let pause = arts
        .pause
        .ok_or("a running guest's snapshot reports its pause")?;
    assert_eq!(arts.driver, "qemu");
    assert_eq!(arts.artifacts.len(), 2);
    assert_eq!(SnapshotArtifacts::load(&live, "qemu")?, arts);
    // qemu.json pins what the stream depends on.
    let rec = MachineRecord::load(&live)?;
    let (accel, _) = orig.query()?.accel.ok_or("no accel")?;
    assert!(rec.machine.starts_with("pc-q35-"), "{rec:?}");
    assert_eq!(rec.accel, accel);
    assert_eq!(rec.cpu, if accel == "kvm" { "host" } else { "max" });
    assert!(
        rec.qemu_version.as_deref().is_some_and(|v| v.contains('.')),
        "{rec:?}"
    );
    assert_eq!(rec.devices.len(), 2, "{rec:?}");
    assert_eq!(
        (
            rec.devices[0].name.as_str(),
            rec.devices[0].kind,
            rec.devices[0].slot
        ),
        ("vda", DeviceKind::Disk, 4)
    );
    assert_eq!(rec.devices[1].kind, DeviceKind::Nic);
    assert_eq!(rec.devices[1].mac, Some(spec.nics[0].mac.to_string()));
    assert_eq!(rec.extra_devices, spec.qemu.devices);
    assert_eq!(orig.query()?.state, RunState::Running);
    next_event(
        &orig_events,
        LifecycleKind::Snapshot,
        Duration::from_secs(5),
    )?;
    eprintln!(
        "live snapshot: pause {pause:?}, {} bytes",
        arts.total_bytes()
    );

    // The snapshot the clones use: paused first, so the disk can be copied
    // at the same cut; a paused instance stays paused.
    orig.pause()?;
    let snap = root.join("snap");
    std::fs::create_dir(&snap)?;
    let arts = orig.snapshot(&snap, SnapshotOptions::default())?;
    assert_eq!(arts.pause, None);
    assert_eq!(orig.query()?.state, RunState::Paused);
    let copies = [root.join("clone1.raw"), root.join("clone2.raw")];
    for c in &copies {
        std::fs::copy(&rig.disk, c)?;
    }
    orig.resume()?;
    // The original keeps running after both snapshots.
    let r1 = request(&rig.ns, addr, "PUT after-snap v1")?;
    assert!(
        r1.starts_with("OK "),
        "original after the snapshots: {r1:?}"
    );

    // A spec whose devices differ from the snapshot's is refused, naming
    // the device, before any QEMU starts.
    {
        let mut lacks = spec.clone();
        lacks.work_dir = root.join("mismatch");
        std::fs::create_dir_all(&lacks.work_dir)?;
        lacks.nics.clear();
        let (e, t) = err_text(QemuDriver.restore(&lacks, &snap));
        assert!(
            matches!(e, DriverError::Spec { .. }) && t.contains("\"net0\""),
            "{t}"
        );
        let mut extra = lacks.clone();
        extra.nics = spec.nics.clone();
        extra.disks.push(DiskSpec {
            name: "vdb".into(),
            socket: rig.socket("vda"),
        });
        let (e, t) = err_text(QemuDriver.restore(&extra, &snap));
        assert!(
            matches!(e, DriverError::Spec { .. }) && t.contains("\"vdb\""),
            "{t}"
        );
        let mut other_mac = lacks.clone();
        other_mac.nics = spec.nics.clone();
        other_mac.nics[0].mac = "52:54:00:00:00:99".parse()?;
        let (_, t) = err_text(QemuDriver.restore(&other_mac, &snap));
        assert!(t.contains("nics[0].mac"), "{t}");
        assert!(!qemu_running_in(&lacks.work_dir));
    }

    let mut clones = Vec::new();
    for (i, copy) in copies.iter().enumerate() {
        let id = format!("drv-clone{}", i + 1);
        let crig = Rig::start(&root.join(&id), copy, &id)?;
        let cspec = service_spec(&image, &id, &root.join(format!("{id}-work")), &crig)?;
        let t0 = Instant::now();
        let clone = QemuDriver.restore(&cspec, &snap)?;
        assert_eq!(clone.query()?.state, RunState::Paused, "restored paused");
        clone.resume()?;
        eprintln!("{id}: restore to running {:?}", t0.elapsed());
        assert_eq!(clone.query()?.state, RunState::Running);
        let ev = next_event(
            &clone.subscribe(),
            LifecycleKind::Resume,
            Duration::from_secs(5),
        )?;
        assert!(
            ev.lifecycle.detail.contains("restored"),
            "{}",
            ev.lifecycle.detail
        );
        crig.configure_peer()?;
        clones.push((clone, crig));
    }
    for (clone, crig) in &clones {
        let got = request(&crig.ns, addr, &format!("GET {n0}"))?;
        assert_eq!(got, format!("VAL {n0} before-snap v0"), "{}", clone.id());
        let put = request(&crig.ns, addr, &format!("PUT from-{} x", clone.id()))?;
        assert!(put.starts_with("OK "), "{}: {put:?}", clone.id());
        assert_eq!(clone.query()?.state, RunState::Running);
    }
    assert_eq!(orig.query()?.state, RunState::Running);
    let r2 = request(&rig.ns, addr, "GET 0")?;
    assert!(r2.starts_with("VAL "), "original: {r2:?}");
    for (clone, _) in &clones {
        clone.stop(Duration::from_secs(2))?;
    }
    orig.stop(Duration::from_secs(2))?;
    Ok(())
}

#[test]
// Heavy: needs QEMU (TCG), gdb, the guest image.
fn gdb_reads_registers_of_a_paused_instance() -> TestResult {
    let gdb = Path::new("/usr/bin/gdb");
    assert!(
        gdb.is_file(),
        "gdb not found at {}: apt-get install gdb",
        gdb.display()
    );
    let tmp = tempfile::tempdir()?;
    for debug in [
        DebugListen::Tcp("127.0.0.1:0".parse()?),
        DebugListen::Unix(tmp.path().join("gdb.sock")),
    ] {
        let work = tmp
            .path()
            .join(format!("w-{}", matches!(debug, DebugListen::Unix(_))));
        std::fs::create_dir_all(&work)?;
        let mut spec = plain_spec("drv-gdb", &work);
        spec.debug = Some(debug.clone());
        let inst = QemuDriver.launch(&spec)?;
        wait_console(inst.as_ref(), "VMR-WAIT", BOOT_TIMEOUT)?;
        // A console subscriber that joins late gets the recent output first.
        let late = inst.console();
        let mut seen = Vec::new();
        while let Some(c) = late.try_recv() {
            seen.extend(c);
        }
        assert!(
            String::from_utf8_lossy(&seen).contains("VMR-WAIT"),
            "a late console subscriber missed the recent output"
        );
        inst.pause()?;
        let events = inst.subscribe();
        let endpoint = inst.debugger().ok_or("no debugger endpoint")?;
        let target = match &endpoint {
            DebugListen::Tcp(a) => {
                assert!(a.ip().is_loopback() && a.port() != 0, "{a}");
                a.to_string()
            }
            DebugListen::Unix(p) => p.display().to_string(),
        };
        assert_eq!(inst.query()?.debugger, Some(endpoint.clone()));
        let out = Command::new("timeout")
            .arg("60")
            .arg(gdb)
            .args(["-nx", "-batch", "-ex", "set architecture i386:x86-64"])
            .args(["-ex", &format!("target remote {target}")])
            .args(["-ex", "info registers rip"])
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("rip"))
            .ok_or_else(|| {
                format!(
                    "gdb printed no rip over {endpoint}: {stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let value = line.split_whitespace().nth(1).ok_or("no rip value")?;
        let rip = u64::from_str_radix(value.trim_start_matches("0x"), 16)?;
        // The paused guest runs kernel code (the upper half).
        assert!(rip >= 0xffff_8000_0000_0000, "rip {rip:#x} over {endpoint}");
        // gdb detached, and QEMU's gdbstub resumed the guest; the driver
        // paused it again.
        let repaused = events.wait_for(Duration::from_secs(10), |e| {
            e.kind() == LifecycleKind::Pause && e.lifecycle.detail.contains("paused again")
        });
        assert!(
            repaused.is_ok(),
            "no re-pause after gdb detached over {endpoint}"
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(inst.query()?.state, RunState::Paused, "over {endpoint}");
        let status = inst
            .as_any()
            .downcast_ref::<QemuInstance>()
            .ok_or("not a QEMU instance")?
            .qmp_execute("query-status", serde_json::json!({}))?;
        assert_eq!(status["status"], "paused", "over {endpoint}");
        inst.stop(Duration::from_secs(2))?;
    }
    // A taken debugger port: QEMU's bind failure (the error a port-0 launch
    // retries on) names the cause.
    let busy = std::net::TcpListener::bind("127.0.0.1:0")?;
    let work = tmp.path().join("w-busy");
    std::fs::create_dir_all(&work)?;
    let mut spec = plain_spec("drv-gdb", &work);
    spec.debug = Some(DebugListen::Tcp(busy.local_addr()?));
    let (e, t) = err_text(QemuDriver.launch(&spec));
    assert!(vmr_hypervisor::qemu::is_bind_failure(&e), "{t}");
    let mut spec = plain_spec("drv-gdb", tmp.path());
    spec.debug = Some(DebugListen::Tcp("0.0.0.0:1234".parse()?));
    let (_, t) = err_text(QemuDriver.launch(&spec));
    assert!(t.contains("debug") && t.contains("loopback"), "{t}");
    Ok(())
}

#[test]
// Heavy: needs QEMU (TCG), the guest image.
fn qemu_killed_from_outside_is_an_internal_error() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let inst = QemuDriver.launch(&plain_spec("drv-kill", tmp.path()))?;
    let events = inst.subscribe();
    let pid = inst.query()?.pid.ok_or("no pid")?;
    // SAFETY: kill(2) on the QEMU this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let ev = next_event(
        &events,
        LifecycleKind::InternalError,
        Duration::from_secs(10),
    )?;
    assert!(
        ev.lifecycle.detail.contains("unexpectedly"),
        "{}",
        ev.lifecycle.detail
    );
    assert!(ev.lifecycle.detail.contains("SIGKILL") || ev.lifecycle.detail.contains("signal: 9"));
    let exit = inst.wait(Duration::from_secs(5))?;
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(matches!(inst.pause(), Err(DriverError::Gone(_))));
    assert!(!pid_alive(pid));
    Ok(())
}

#[test]
// Heavy: needs QEMU (TCG), the guest image.
fn guest_poweroff_is_a_shutdown_event_and_a_clean_exit() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut spec = plain_spec("drv-off", tmp.path());
    if let BootSpec::Kernel { cmdline, .. } = &mut spec.boot {
        // No steps, then the guest powers itself off.
        *cmdline = "console=ttyS0 panic=-1 loglevel=4 vmr.steps=none vmr.halt=1".into();
    }
    let inst = QemuDriver.launch(&spec)?;
    let events = inst.subscribe();
    let exit = inst.wait(BOOT_TIMEOUT)?;
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(exit.detail.contains("guest-shutdown"), "{exit:?}");
    let ev = next_event(&events, LifecycleKind::Shutdown, Duration::from_secs(5))?;
    assert!(
        ev.lifecycle.detail.contains("the guest shut down"),
        "{}",
        ev.lifecycle.detail
    );
    assert!(
        !inst
            .subscribe()
            .receiver()
            .try_iter()
            .any(|e| e.kind() == LifecycleKind::InternalError),
        "a guest poweroff is no internal error"
    );
    assert_eq!(inst.query()?.state, RunState::Exited);
    assert_eq!(inst.stop(Duration::from_secs(1))?, exit);
    Ok(())
}

#[test]
// Heavy: needs QEMU (TCG), the guest image.
fn bad_input_is_a_named_error_and_nothing_is_left_running() -> TestResult {
    let tmp = tempfile::tempdir()?;

    // A malformed image manifest.
    let img = tmp.path().join("img");
    std::fs::create_dir(&img)?;
    std::fs::write(img.join("image.toml"), "format_version = 1\nname = \n")?;
    let e = MachineImage::load(&img).unwrap_err().to_string();
    assert!(
        e.contains(": name: invalid string"),
        "the bad field is named: {e}"
    );

    // A missing kernel.
    let mut spec = plain_spec("drv-bad", tmp.path());
    spec.boot = BootSpec::Kernel {
        kernel: tmp.path().join("no-such-vmlinuz"),
        initrd: None,
        cmdline: String::new(),
    };
    let (e, t) = err_text(QemuDriver.launch(&spec));
    assert!(
        matches!(e, DriverError::Spec { .. }) && t.contains("boot.kernel"),
        "{t}"
    );

    // An absent QEMU binary.
    let mut spec = plain_spec("drv-bad", tmp.path());
    spec.qemu.binary = Some(tmp.path().join("qemu-nope"));
    let (e, t) = err_text(QemuDriver.launch(&spec));
    assert!(
        matches!(e, DriverError::MissingProgram { .. }) && t.contains("qemu-nope"),
        "{t}"
    );

    // A "QEMU" that exits at once.
    let start = Instant::now();
    spec.qemu.binary = Some("/bin/false".into());
    let (e, t) = err_text(QemuDriver.launch(&spec));
    assert!(
        matches!(&e, DriverError::Exited { status, .. } if status == "exit status 1"),
        "{t}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );

    // A "QEMU" that speaks QMP, then closes the socket mid-command and
    // lingers: a protocol error, and the driver kills it.
    let fake = tmp.path().join("fake-qemu");
    let pidfile = tmp.path().join("fake.pid");
    std::fs::write(
        &fake,
        FAKE_QEMU.replace("@PIDFILE@", &pidfile.display().to_string()),
    )?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    spec.qemu.binary = Some(fake);
    let start = Instant::now();
    let (e, t) = err_text(QemuDriver.launch(&spec));
    assert!(matches!(e, DriverError::Protocol(_)), "{t}");
    assert!(
        t.contains("closed the QMP socket") && t.contains("set-action"),
        "{t}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    assert!(!pid_alive(pid), "the fake QEMU {pid} was left running");

    // A truncated snapshot artifact, then one whose listed size was changed
    // to match: the first is caught by the artifact check, the second by
    // QEMU, and both name the cause.
    let work = tmp.path().join("snapwork");
    std::fs::create_dir(&work)?;
    let mut spec = plain_spec("drv-trunc", &work);
    spec.memory_mib = 128;
    let inst = QemuDriver.launch(&spec)?;
    wait_console(inst.as_ref(), "VMR-WAIT", BOOT_TIMEOUT)?;
    let snap = tmp.path().join("snap");
    std::fs::create_dir(&snap)?;
    let arts = inst.snapshot(&snap, SnapshotOptions::default())?;
    let first_pid = inst.query()?.pid.ok_or("no pid")?;
    inst.stop(Duration::from_secs(1))?;
    assert!(!pid_alive(first_pid));
    let vmstate = snap.join(&arts.artifacts[0].file);
    let half = arts.artifacts[0].size / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vmstate)?
        .set_len(half)?;
    let rwork = tmp.path().join("restorework");
    std::fs::create_dir(&rwork)?;
    let rspec = {
        let mut s = spec.clone();
        s.work_dir = rwork.clone();
        s
    };
    let (e, t) = err_text(QemuDriver.restore(&rspec, &snap));
    assert!(
        matches!(e, DriverError::Artifact { .. })
            && t.contains("vmstate")
            && t.contains("truncated"),
        "{t}"
    );
    let mut tampered = arts.clone();
    tampered.artifacts[0].size = half;
    tampered.store(&snap)?;
    let start = Instant::now();
    let (e, t) = err_text(QemuDriver.restore(&rspec, &snap));
    assert!(matches!(e, DriverError::Exited { .. }), "{t}");
    assert!(t.contains("loading the snapshot"), "{t}");
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        !qemu_running_in(&rwork),
        "a QEMU for {} is still running",
        rwork.display()
    );

    // Missing artifacts.json.
    std::fs::remove_file(snap.join("artifacts.json"))?;
    let (e, t) = err_text(QemuDriver.restore(&rspec, &snap));
    assert!(
        matches!(e, DriverError::Artifact { .. }) && t.contains("artifacts.json"),
        "{t}"
    );
    Ok(())
}

/// `p` (absolute) as a path relative to the current directory.
fn relative(p: &Path) -> PathBuf {
    let cwd = std::env::current_dir().expect("a current directory");
    let up: PathBuf = cwd.components().skip(1).map(|_| "..").collect();
    up.join(p.strip_prefix("/").expect("an absolute path"))
}

#[test]
// Heavy: needs QEMU (TCG), the guest image.
fn relative_paths_launch_snapshot_and_restore() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let work = tmp.path().join("work");
    std::fs::create_dir(&work)?;
    let mut spec = plain_spec("drv-rel", &relative(&work));
    spec.memory_mib = 128;
    assert!(spec.work_dir.is_relative() && spec.qemu.devices.is_empty());
    let inst = QemuDriver.launch(&spec)?;
    // The driver adds pvpanic although the spec does not ask for it.
    let ready = wait_console(inst.as_ref(), "VMR-READY", BOOT_TIMEOUT)?;
    assert!(ready.contains("pvpanic=1"), "{ready}");
    wait_console(inst.as_ref(), "VMR-WAIT", BOOT_TIMEOUT)?;
    assert!(inst.query()?.console_file.is_absolute());
    let snap = tmp.path().join("snap");
    std::fs::create_dir(&snap)?;
    let arts = inst.snapshot(&relative(&snap), SnapshotOptions::default())?;
    assert!(snap.join("vmstate").is_file() && snap.join("qemu.json").is_file());
    assert_eq!(arts.total_bytes(), {
        let a = std::fs::metadata(snap.join("vmstate"))?.len();
        a + std::fs::metadata(snap.join("qemu.json"))?.len()
    });
    assert_eq!(MachineRecord::load(&snap)?.extra_devices, vec!["pvpanic"]);
    inst.stop(Duration::from_secs(1))?;

    let rwork = tmp.path().join("rwork");
    std::fs::create_dir(&rwork)?;
    let mut rspec = spec.clone();
    rspec.id = "drv-rel-clone".into();
    rspec.work_dir = relative(&rwork);
    let clone = QemuDriver.restore(&rspec, &relative(&snap))?;
    assert_eq!(clone.query()?.state, RunState::Paused);
    clone.resume()?;
    assert_eq!(clone.query()?.state, RunState::Running);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(clone.query()?.state, RunState::Running);
    clone.stop(Duration::from_secs(1))?;

    // The snapshot restores under its own accelerator only, and a KVM
    // snapshot only on a host with the CPU model it was taken on.
    let mut kvm_spec = rspec.clone();
    kvm_spec.qemu.accel = Accel::Kvm;
    let (e, t) = err_text(QemuDriver.restore(&kvm_spec, &snap));
    assert!(
        matches!(e, DriverError::Spec { .. }) && t.contains("qemu.accel"),
        "{t}"
    );
    let mut arts = SnapshotArtifacts::load(&snap, "qemu")?;
    let mut rec = MachineRecord::load(&snap)?;
    rec.accel = "kvm".into();
    rec.cpu = "host".into();
    rec.store(&snap)?;
    arts.host.cpu_model = "Some Other CPU @ 1.00GHz".into();
    let qemu_json = arts
        .artifacts
        .iter_mut()
        .find(|a| a.file == "qemu.json")
        .ok_or("no qemu.json artifact")?;
    qemu_json.size = std::fs::metadata(snap.join("qemu.json"))?.len();
    arts.store(&snap)?;
    let (e, t) = err_text(QemuDriver.restore(&rspec, &snap));
    assert!(
        matches!(e, DriverError::Unsupported { .. })
            && t.contains("Some Other CPU")
            && t.contains("same CPU model"),
        "{t}"
    );
    Ok(())
}

#[test]
// Heavy: needs QEMU (TCG), the guest image.
fn guest_reset_is_a_crash() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut spec = plain_spec("drv-reset", tmp.path());
    if let BootSpec::Kernel { cmdline, .. } = &mut spec.boot {
        // init is `reboot -f`; reboot=t resets by a triple fault.
        *cmdline = "console=ttyS0 loglevel=4 reboot=t rdinit=/bin/reboot -- -f".into();
    }
    let inst = QemuDriver.launch(&spec)?;
    let events = inst.subscribe();
    let exit = inst.wait(BOOT_TIMEOUT)?;
    assert_eq!(exit.reason, EndReason::Crash, "{exit:?}");
    assert!(
        exit.detail.contains("guest reset (triple fault or reboot)"),
        "{exit:?}"
    );
    let ev = next_event(&events, LifecycleKind::Crash, Duration::from_secs(5))?;
    assert!(
        ev.lifecycle.detail.contains("guest-reset"),
        "{}",
        ev.lifecycle.detail
    );
    assert_eq!(inst.query()?.state, RunState::Exited);
    Ok(())
}

/// A size-limited tmpfs, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Result<SmallFs, BoxError> {
        std::fs::create_dir_all(dir)?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()?;
        if !st.success() {
            return Err(
                format!("mount tmpfs on {} failed ({st}): needs root", dir.display()).into(),
            );
        }
        Ok(SmallFs(dir.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
// Heavy: needs QEMU (TCG), root (tmpfs mount), the guest image.
fn a_snapshot_to_a_full_disk_fails_at_once_and_leaves_nothing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut spec = plain_spec("drv-full", tmp.path());
    spec.memory_mib = 128;
    let inst = QemuDriver.launch(&spec)?;
    wait_console(inst.as_ref(), "VMR-WAIT", BOOT_TIMEOUT)?;
    let fs = SmallFs::mount(&tmp.path().join("small"), "1m")?;
    let start = Instant::now();
    let e = inst
        .snapshot(&fs.0, SnapshotOptions::default())
        .expect_err("a 1 MiB file system cannot hold the snapshot");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}: {e}");
    let t = e.to_string();
    assert!(matches!(e, DriverError::Command { .. }), "{t}");
    // QEMU's view (the broken pipe) and the writer's error text.
    assert!(t.contains("No space left on device"), "{t}");
    eprintln!("snapshot to a full disk failed after {took:?}: {t}");
    let left: Vec<_> = std::fs::read_dir(&fs.0)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    for f in ["vmstate.err", "vmstate.failed"] {
        assert!(
            !tmp.path().join(f).exists(),
            "{f} left in the work directory"
        );
    }
    // The guest was resumed after the failed cut, and no pause detail
    // lingers for a later event.
    assert_eq!(inst.query()?.state, RunState::Running);
    let events = inst.subscribe();
    inst.pause()?;
    next_event(&events, LifecycleKind::Pause, Duration::from_secs(5))?;
    let last = inst
        .subscribe()
        .receiver()
        .try_iter()
        .filter(|e| e.kind() == LifecycleKind::Pause)
        .last()
        .ok_or("no pause event")?;
    assert_eq!(last.lifecycle.detail, "paused by the driver");
    drop(fs);
    inst.stop(Duration::from_secs(1))?;
    Ok(())
}

/// Whether any process has `dir` in its command line.
fn qemu_running_in(dir: &Path) -> bool {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains(&needle))
}

/// A stand-in QEMU: greets on the QMP socket named on its command line,
/// answers qmp_capabilities, closes the socket when the next command
/// arrives, and then stays alive.
const FAKE_QEMU: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys, time
open("@PIDFILE@", "w").write(str(os.getpid()))
path = None
for a in sys.argv:
    if a.startswith("socket,id=vmr-qmp,path="):
        path = a.split("path=", 1)[1].split(",")[0]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(1)
c, _ = s.accept()
f = c.makefile("rwb")
f.write(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}\n')
f.flush()
cmd = json.loads(f.readline())
f.write(json.dumps({"return": {}, "id": cmd["id"]}).encode() + b"\n")
f.flush()
f.readline()
sys.stderr.write("fake qemu: closing QMP mid-command\n")
c.shutdown(socket.SHUT_RDWR)
c.close()
time.sleep(60)
"#;
