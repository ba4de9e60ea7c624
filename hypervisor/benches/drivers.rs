//! Driver benchmark: launch to the first console line, snapshot pause time
//! and size, and restore to running, printed as a table.
//!
//! QEMU rows: the demo-linux image with 512 MiB of guest memory under TCG,
//! on vhost-tap-blk and vhost-tap-net backends (recording to capture files)
//! in a network namespace of its own. Each figure is the median of
//! `$VMR_BENCH_RUNS` runs (default 3), with the minimum and maximum.
//!
//! microVM rows: the freestanding test guest's image with 512 MiB of guest
//! memory on KVM, on the same backends. Restore to running includes copying
//! the memory file into a shared memfd (the devices need shared memory).
//!
//! Heavy: needs /dev/kvm, qemu-system-x86_64, root (network namespaces, TAP), the
//! guest image (guest/linux/build.sh) and the vhost-tap binaries
//! (`cargo build --release -p vhost-tap --bins`: the benchmark runs from
//! target/release and takes the backends from there). Run with
//! `cargo bench -p vmr-hypervisor --bench drivers`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmr_hypervisor::image::{DiskSource, MachineImage};
use vmr_hypervisor::microvm::MicrovmDriver;
use vmr_hypervisor::qemu::QemuDriver;
use vmr_hypervisor::{Driver, Instance, InstanceSpec, RunState, SnapshotOptions};
use vmr_testkit::qemu::NetNs;
use vmr_testkit::ChildGuard;

type BoxError = Box<dyn std::error::Error>;

const MEMORY_MIB: u32 = 512;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Backends for one instance; they drop after the instance that uses them.
struct Rig {
    _blk: ChildGuard,
    _net: ChildGuard,
    _ns: NetNs,
    dir: PathBuf,
}

fn tap(dir: &Path, name: &str, args: &[&OsStr]) -> Result<ChildGuard, BoxError> {
    let bin = vmr_testkit::workspace_bin(name)
        .map_err(|e| format!("{e} (build it with `cargo build -p vhost-tap --bins`)"))?;
    let socket = dir.join(format!("{name}.sock"));
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--socket")
        .arg(&socket)
        .args(args)
        .arg("--capture")
        .arg(dir.join(format!("{name}.events")))
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut g = ChildGuard::spawn(name, &mut cmd)?;
    let start = Instant::now();
    while !socket.exists() {
        if let Some(s) = g.try_wait() {
            return Err(format!("{name} exited ({s})").into());
        }
        if start.elapsed() > Duration::from_secs(15) {
            return Err(format!("{name} did not listen").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(g)
}

impl Rig {
    fn start(dir: &Path, disk: &Path) -> Result<Rig, BoxError> {
        std::fs::create_dir_all(dir)?;
        let ns = NetNs::create()?;
        let blk = tap(
            dir,
            "vhost-tap-blk",
            &["--image".as_ref(), disk.as_os_str()],
        )?;
        let net = tap(
            dir,
            "vhost-tap-net",
            &["--tap", "vmrtap0", "--netns", ns.name()].map(OsStr::new),
        )?;
        Ok(Rig {
            _blk: blk,
            _net: net,
            _ns: ns,
            dir: dir.to_path_buf(),
        })
    }

    fn spec(
        &self,
        driver: &str,
        image: &MachineImage,
        id: &str,
        work: &Path,
    ) -> Result<InstanceSpec, BoxError> {
        std::fs::create_dir_all(work)?;
        let dir = self.dir.clone();
        let mut spec = image.instance_spec(driver, id, work, move |d| {
            dir.join(if d == "vda" {
                "vhost-tap-blk.sock"
            } else {
                "vhost-tap-net.sock"
            })
        })?;
        spec.memory_mib = MEMORY_MIB;
        Ok(spec)
    }
}

fn console_has(file: &Path, pred: impl Fn(&str) -> bool) -> bool {
    std::fs::read(file)
        .map(|b| pred(&String::from_utf8_lossy(&b)))
        .unwrap_or(false)
}

fn wait_console(inst: &dyn Instance, pred: impl Fn(&str) -> bool) -> Result<(), BoxError> {
    let file = inst.query()?.console_file;
    let start = Instant::now();
    while !console_has(&file, &pred) {
        if start.elapsed() > BOOT_TIMEOUT || inst.query()?.state == RunState::Exited {
            return Err(format!("console condition not met in {}", file.display()).into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

#[derive(Default)]
struct Samples {
    driver: &'static str,
    launch_first_line: Vec<Duration>,
    launch_ready: Vec<Duration>,
    pause: Vec<Duration>,
    size: Vec<u64>,
    restore: Vec<Duration>,
}

fn one_run(image: &MachineImage, root: &Path, s: &mut Samples) -> Result<(), BoxError> {
    let disk = root.join("disk.raw");
    match &image.disks.first().ok_or("the image has no disk")?.source {
        DiskSource::Blank(n) => std::fs::File::create(&disk)?.set_len(*n)?,
        DiskSource::File(f) => {
            std::fs::copy(f, &disk)?;
        }
    }
    let rig = Rig::start(&root.join("orig"), &disk)?;
    let spec = rig.spec("qemu", image, "bench-orig", &root.join("orig-work"))?;
    let t0 = Instant::now();
    let inst = QemuDriver.launch(&spec)?;
    wait_console(inst.as_ref(), |t| t.contains('\n'))?;
    s.launch_first_line.push(t0.elapsed());
    wait_console(inst.as_ref(), |t| t.contains("VMR-SERVICE-READY"))?;
    s.launch_ready.push(t0.elapsed());

    let snap = root.join("snap");
    std::fs::create_dir(&snap)?;
    inst.pause()?;
    inst.snapshot(&snap, SnapshotOptions::default())?;
    let copy = root.join("clone.raw");
    std::fs::copy(&disk, &copy)?;
    inst.resume()?;
    let live = root.join("snap-live");
    std::fs::create_dir(&live)?;
    let arts = inst.snapshot(&live, SnapshotOptions::default())?;
    s.pause.push(arts.pause.ok_or("no pause reported")?);
    s.size.push(arts.total_bytes());

    let crig = Rig::start(&root.join("clone"), &copy)?;
    let cspec = crig.spec("qemu", image, "bench-clone", &root.join("clone-work"))?;
    let t0 = Instant::now();
    let clone = QemuDriver.restore(&cspec, &snap)?;
    clone.resume()?;
    s.restore.push(t0.elapsed());
    clone.stop(Duration::from_secs(1))?;
    inst.stop(Duration::from_secs(1))?;
    Ok(())
}

/// One microVM run: the test guest with a disk and a NIC.
fn microvm_run(image: &MachineImage, root: &Path, s: &mut Samples) -> Result<(), BoxError> {
    let disk = root.join("disk.raw");
    std::fs::File::create(&disk)?.set_len(16 << 20)?;
    let rig = Rig::start(&root.join("orig"), &disk)?;
    let mut spec = rig.spec("microvm", image, "bench-mvm", &root.join("orig-work"))?;
    spec.disks = vec![vmr_hypervisor::DiskSpec {
        name: "vda".into(),
        socket: rig.dir.join("vhost-tap-blk.sock"),
    }];
    spec.nics = vec![vmr_hypervisor::NicSpec {
        name: "net0".into(),
        socket: rig.dir.join("vhost-tap-net.sock"),
        mac: vmr_hypervisor::MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
    }];
    let t0 = Instant::now();
    let inst = MicrovmDriver.launch(&spec)?;
    wait_console(inst.as_ref(), |t| t.contains('\n'))?;
    s.launch_first_line.push(t0.elapsed());
    let live = root.join("snap-live");
    std::fs::create_dir(&live)?;
    let arts = inst.snapshot(&live, SnapshotOptions::default())?;
    s.pause.push(arts.pause.ok_or("no pause reported")?);
    s.size.push(arts.total_bytes());
    inst.stop(Duration::from_secs(1))?;
    drop(inst);
    drop(rig);

    let crig = Rig::start(&root.join("clone"), &disk)?;
    let mut cspec = spec.clone();
    cspec.id = "bench-mvm-clone".into();
    cspec.work_dir = root.join("clone-work");
    std::fs::create_dir_all(&cspec.work_dir)?;
    cspec.disks[0].socket = crig.dir.join("vhost-tap-blk.sock");
    cspec.nics[0].socket = crig.dir.join("vhost-tap-net.sock");
    let t0 = Instant::now();
    let clone = MicrovmDriver.restore(&cspec, &live)?;
    clone.resume()?;
    s.restore.push(t0.elapsed());
    clone.stop(Duration::from_secs(1))?;
    Ok(())
}

fn stats<T: Copy + Ord>(v: &[T]) -> (T, T, T) {
    let mut v = v.to_vec();
    v.sort();
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn print_rows(s: &Samples) {
    let d = s.driver;
    let row = |what: &str, v: &[Duration]| {
        if v.is_empty() {
            return;
        }
        let (m, lo, hi) = stats(v);
        println!(
            "| {d} | {what} (ms) | {} | {} | {} |",
            ms(m),
            ms(lo),
            ms(hi)
        );
    };
    row("launch to first console line", &s.launch_first_line);
    row("launch to service ready", &s.launch_ready);
    row("snapshot pause (running guest)", &s.pause);
    let (m, lo, hi) = stats(&s.size);
    let mib = |b: u64| format!("{:.1}", b as f64 / (1 << 20) as f64);
    println!(
        "| {d} | snapshot size (MiB) | {} | {} | {} |",
        mib(m),
        mib(lo),
        mib(hi)
    );
    row("restore to running", &s.restore);
}

fn main() -> Result<(), BoxError> {
    // `cargo bench` passes --bench; `cargo test --benches` does not run it.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let dir = std::env::var_os("VMR_GUEST_LINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| vmr_testkit::cache_dir().join("guest-linux"));
    let image = MachineImage::load(&dir)
        .map_err(|e| format!("{e} (build the image with guest/linux/build.sh)"))?;
    let elf =
        vmr_vmm::guest_abi::build_test_guest(&std::env::temp_dir().join("vmr-bench-test-guest"))?;
    let mut test_guest = MachineImage::load(elf.parent().ok_or("test guest has no directory")?)?;
    test_guest.memory_mib = MEMORY_MIB;
    let runs: usize = std::env::var("VMR_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut q = Samples {
        driver: "qemu",
        ..Samples::default()
    };
    let mut m = Samples {
        driver: "microvm",
        ..Samples::default()
    };
    for i in 0..runs {
        let tmp = tempfile::tempdir()?;
        one_run(&image, tmp.path(), &mut q).map_err(|e| format!("qemu run {}: {e}", i + 1))?;
        let tmp = tempfile::tempdir()?;
        microvm_run(&test_guest, tmp.path(), &mut m)
            .map_err(|e| format!("microvm run {}: {e}", i + 1))?;
    }
    let accel = vmr_hypervisor::qemu::accel::choose(vmr_hypervisor::Accel::Auto);
    println!(
        "driver benchmark, {runs} runs: qemu runs {} ({} MiB, {} vCPU), accel {} ({}); microvm runs {} ({} MiB) on KVM\n",
        image.name, MEMORY_MIB, image.vcpus, accel.accel, accel.reason, test_guest.name, MEMORY_MIB
    );
    println!("| driver | measure | median | min | max |");
    println!("| --- | --- | ---: | ---: | ---: |");
    print_rows(&q);
    print_rows(&m);
    Ok(())
}
