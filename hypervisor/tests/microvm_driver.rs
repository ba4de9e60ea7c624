//! The microVM driver end to end with the freestanding test guest and the
//! `vhost-tap-blk` / `vhost-tap-net` binaries: launch with a recorded disk
//! and NIC, pause and resume, a snapshot of the running guest, a crash
//! reported as a lifecycle event, and a clone restored from the snapshot
//! onto new backends that replays the recorded requests and crashes the
//! same way. Also incremental snapshot chains moved to another directory,
//! gdb through the driver's endpoint, and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmr_hypervisor::events::now_ns;
use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_hypervisor::{
    BootSpec, DebugListen, DiskSpec, DriverError, Instance, InstanceSpec, MemoryKind, NicSpec,
    RunState, SnapshotOptions,
};
use vmr_proto::{Direction, LifecycleKind};
use vmr_testkit::capture::{self, disk_write, inject};
use vmr_testkit::qemu::NetNs;
use vmr_testkit::{workspace_bin, ChildGuard};
use vmr_vmm::guest_abi::{build_test_guest, dirty_pattern, ARENA_GPA, CMD_DIRTY, END_OF_LIST};

/// `CMD_NET_DISK` of `guest/test-guest/workload.h`.
const CMD_NET_DISK: u32 = 0x10;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const TAP: &str = "vmrd0";
const WAIT: Duration = Duration::from_secs(60);

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm (read-write), which is unavailable: {e}");
    }
}

fn guest_elf() -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest");
    build_test_guest(&out).unwrap_or_else(|e| panic!("{e}"))
}

fn driver() -> Box<dyn vmr_hypervisor::Driver> {
    vmr_hypervisor::driver("microvm").expect("the microvm driver exists")
}

fn microvm(inst: &dyn Instance) -> &MicrovmInstance {
    inst.as_any()
        .downcast_ref::<MicrovmInstance>()
        .expect("a microVM instance")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} (iproute2, python3 and root are required): {e}")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn quiet_netns() -> NetNs {
    let ns = NetNs::create().unwrap_or_else(|e| panic!("{e}"));
    for key in ["all", "default"] {
        run(ns
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{key}.disable_ipv6=1")]));
    }
    ns
}

/// Sends `frame` out of the TAP in `ns`, that is, to the guest.
fn send(ns: &NetNs, frame: &[u8]) {
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    run(ns.command("python3").args([
        "-c",
        "import socket,sys\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind((sys.argv[1],0))\ns.send(bytes.fromhex(sys.argv[2]))",
        TAP,
        &hex,
    ]));
}

struct Backends {
    _blk: ChildGuard,
    _net: ChildGuard,
    blk_sock: PathBuf,
    net_sock: PathBuf,
    blk_capture: PathBuf,
    net_capture: PathBuf,
    control: PathBuf,
}

/// Backends for one instance: capture mode behind a TAP in `ns`, or replay
/// mode fed through the control socket.
fn start_backends(
    dir: &Path,
    tag: &str,
    image: &Path,
    overlay: &Path,
    ns: Option<&NetNs>,
) -> Backends {
    let path = |suffix: &str| dir.join(format!("{tag}-{suffix}"));
    let mode = if ns.is_some() { "capture" } else { "replay" };
    let mut blk = Command::new(workspace_bin("vhost-tap-blk").unwrap_or_else(|e| panic!("{e}")));
    blk.arg("--socket")
        .arg(path("blk.sock"))
        .arg("--image")
        .arg(image)
        .arg("--overlay")
        .arg(overlay)
        .args(["--mode", mode, "--instance-id", tag, "--device", "vda"])
        .arg("--capture")
        .arg(path("blk.events"));
    let mut net = Command::new(workspace_bin("vhost-tap-net").unwrap_or_else(|e| panic!("{e}")));
    net.arg("--socket")
        .arg(path("net.sock"))
        .args(["--mode", mode, "--instance-id", tag, "--device", "net0"])
        .arg("--capture")
        .arg(path("net.events"));
    match ns {
        Some(ns) => {
            net.args(["--tap", TAP, "--netns", ns.name()]);
        }
        None => {
            net.arg("--control").arg(path("net.ctl"));
        }
    }
    let b = Backends {
        _blk: ChildGuard::spawn(format!("vhost-tap-blk {tag}"), &mut blk)
            .unwrap_or_else(|e| panic!("{e}")),
        _net: ChildGuard::spawn(format!("vhost-tap-net {tag}"), &mut net)
            .unwrap_or_else(|e| panic!("{e}")),
        blk_sock: path("blk.sock"),
        net_sock: path("net.sock"),
        blk_capture: path("blk.events"),
        net_capture: path("net.events"),
        control: path("net.ctl"),
    };
    let mut sockets = vec![&b.blk_sock, &b.net_sock];
    if ns.is_none() {
        sockets.push(&b.control);
    }
    for s in sockets {
        wait_for(&format!("backend socket {}", s.display()), || {
            s.exists().then_some(())
        });
    }
    b
}

/// The allocation map beside a `vhost-tap-blk` overlay (`<overlay>.map`).
fn map_path(overlay: &Path) -> PathBuf {
    let mut s = overlay.as_os_str().to_owned();
    s.push(".map");
    PathBuf::from(s)
}

fn spec_for(dir: &Path, id: &str, elf: &Path, b: &Backends) -> InstanceSpec {
    let work = dir.join(id);
    std::fs::create_dir_all(&work).expect("temp dir is writable");
    let mut spec = InstanceSpec::new(
        id,
        &work,
        BootSpec::Kernel {
            kernel: elf.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    spec.memory_mib = 32;
    spec.disks.push(DiskSpec {
        name: "vda".into(),
        socket: b.blk_sock.clone(),
    });
    spec.nics.push(NicSpec {
        name: "net0".into(),
        socket: b.net_sock.clone(),
        mac: vmr_hypervisor::MacAddr(GUEST_MAC),
    });
    spec
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_console(inst: &dyn Instance, needle: &str) {
    let file = inst.query().expect("query").console_file;
    wait_for(&format!("console line {needle:?}"), || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains(needle)
            .then_some(())
    });
}

fn wait_event(
    sub: &vmr_hypervisor::Subscription<vmr_hypervisor::DriverEvent>,
    kind: LifecycleKind,
) -> vmr_hypervisor::DriverEvent {
    sub.wait_for(WAIT, |e| e.kind() == kind)
        .unwrap_or_else(|gone| panic!("no {kind:?} event (source gone: {gone})"))
}

fn done_line(seq: u32) -> String {
    format!("vmr-guest: request {seq:016x} done")
}

#[test]
// Heavy: needs /dev/kvm, root (network namespaces), python3 and the vhost-tap binaries.
fn lifecycle_scenario_with_recorded_disk_and_nic() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("temp dir is writable");
    let ns = quiet_netns();
    let b = start_backends(dir, "s", &image, &dir.join("s.overlay"), Some(&ns));
    let spec = spec_for(dir, "scenario", &elf, &b);
    let crash = common::lifecycle(
        driver().as_ref(),
        &spec,
        common::Guest {
            ready: &|inst| {
                microvm(inst).ports().push_commands(&[CMD_NET_DISK]);
                wait_console(inst, "vmr-guest: net ready");
                ns.wait_for_link(TAP, WAIT)
                    .unwrap_or_else(|e| panic!("{e}"));
                ns.ip(&["link", "set", TAP, "up"])
                    .unwrap_or_else(|e| panic!("{e}"));
                send(&ns, &request(b"request 0: hello"));
                wait_console(inst, &done_line(0));
            },
            crash: &|_| send(&ns, &request(b"POISON: crash now")),
            crash_kind: LifecycleKind::TripleFault,
        },
    );
    assert!(
        !crash.lifecycle.regs.is_empty(),
        "the crash carries registers"
    );
    assert!(
        wait_for("the request and the poison frame in the capture", || {
            let f = frames(&b.net_capture, Direction::Rx);
            (f.len() >= 2).then_some(f)
        })
        .iter()
        .any(|f| f.windows(6).any(|w| w == b"POISON")),
        "the crashing frame was recorded"
    );
}

#[test]
// Heavy: needs /dev/kvm, root (network namespaces), python3 and the vhost-tap binaries.
fn launch_snapshot_crash_and_clone_replay_through_the_driver() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("temp dir is writable");
    let ns = quiet_netns();
    let overlay_a = dir.join("a.overlay");
    let a = start_backends(dir, "a", &image, &overlay_a, Some(&ns));

    let drv = driver();
    let orig = drv
        .launch(&spec_for(dir, "orig", &elf, &a))
        .expect("launch with a recorded disk and NIC");
    let events = orig.subscribe();
    wait_event(&events, LifecycleKind::Boot);
    assert_eq!(orig.query().expect("query").state, RunState::Running);
    microvm(orig.as_ref())
        .ports()
        .push_commands(&[CMD_NET_DISK]);
    wait_console(orig.as_ref(), "vmr-guest: net ready");
    ns.wait_for_link(TAP, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    ns.ip(&["link", "set", TAP, "up"])
        .unwrap_or_else(|e| panic!("{e}"));
    for seq in 0..2u32 {
        send(&ns, &request(format!("request {seq}: hello").as_bytes()));
        wait_console(orig.as_ref(), &done_line(seq));
    }

    // Pause and resume, seen as events and in the state.
    orig.pause().expect("pause");
    wait_event(&events, LifecycleKind::Pause);
    assert_eq!(orig.query().expect("query").state, RunState::Paused);
    orig.resume().expect("resume");
    wait_event(&events, LifecycleKind::Resume);
    assert_eq!(orig.query().expect("query").state, RunState::Running);

    // A snapshot of the running guest: paused for the cut, resumed after.
    let snap = dir.join("snaps").join("0001");
    std::fs::create_dir_all(&snap).expect("snapshot dir");
    let arts = orig
        .snapshot(&snap, SnapshotOptions::default())
        .expect("snapshot");
    let overlay_b = dir.join("b.overlay");
    std::fs::copy(&overlay_a, &overlay_b).expect("overlay copy at the cut");
    std::fs::copy(map_path(&overlay_a), map_path(&overlay_b)).expect("overlay map copy at the cut");
    assert!(
        arts.pause.is_some(),
        "a running guest is paused for the cut"
    );
    assert_eq!(arts.memory, MemoryKind::Full);
    assert!(
        arts.get("devices").is_ok() && arts.total_bytes() > 0,
        "{arts:?}"
    );
    assert_eq!(orig.query().expect("query").state, RunState::Running);

    // The original goes on, then crashes on the poison request.
    send(&ns, &request(b"request 2: after the snapshot"));
    wait_console(orig.as_ref(), &done_line(2));
    let (before, _) = now_ns();
    send(&ns, &request(b"POISON: crash now"));
    let crash_a = wait_event(&events, LifecycleKind::TripleFault);
    let (after, _) = now_ns();
    assert!(
        (before..=after).contains(&crash_a.wall_time_ns),
        "the crash is stamped with its time"
    );
    assert!(
        !crash_a.lifecycle.regs.is_empty(),
        "the crash carries registers"
    );
    assert_eq!(orig.query().expect("query").state, RunState::Crashed);
    let exit = orig.wait(WAIT).expect("a crashed instance has ended");
    assert!(exit.detail.contains("TripleFault"), "{exit:?}");

    let rx_a = wait_for("the original's four requests in its capture", || {
        let f = frames(&a.net_capture, Direction::Rx);
        (f.len() >= 4).then_some(f)
    });
    let write_a = wait_for("the original's write of request 2", || {
        disk_write(&a.blk_capture, 3)
    });

    // A clone from the snapshot on new backends, left paused by restore.
    let b = start_backends(dir, "b", &image, &overlay_b, None);
    let clone = drv
        .restore(&spec_for(dir, "clone", &elf, &b), &snap)
        .expect("restore onto new sockets");
    assert_eq!(clone.query().expect("query").state, RunState::Paused);
    let clone_events = clone.subscribe();
    clone.resume().expect("the clone runs");
    inject(&b.control, &rx_a[2]);
    wait_console(clone.as_ref(), &done_line(2));
    let write_b = wait_for("the clone's write of request 2", || {
        disk_write(&b.blk_capture, 3)
    });
    assert_eq!(write_b, write_a, "the clone writes what the original wrote");
    inject(&b.control, &rx_a[3]);
    let crash_b = wait_event(&clone_events, LifecycleKind::TripleFault);
    assert_eq!(
        crash_b.lifecycle.regs, crash_a.lifecycle.regs,
        "same faulting state"
    );

    for inst in [&orig, &clone] {
        inst.stop(Duration::from_secs(5)).expect("stop");
        assert_eq!(inst.query().expect("query").state, RunState::Exited);
    }
}

fn read_u64(inst: &MicrovmInstance, gpa: u64) -> u64 {
    use vm_memory::{Bytes, GuestAddress};
    let vm = inst.vmm().expect("running");
    vm.memory()
        .guest_memory()
        .read_obj::<u64>(GuestAddress(gpa))
        .expect("address inside guest memory")
}

fn dirty(inst: &MicrovmInstance, pages: &[u32]) {
    let mut words = vec![CMD_DIRTY];
    words.extend_from_slice(pages);
    words.push(END_OF_LIST);
    let before = inst.ports().with(|s| s.done.len());
    inst.ports().push_commands(&words);
    assert!(
        inst.ports().wait(WAIT, |s| s.done.len() > before),
        "dirty command did not finish"
    );
}

fn boot_cpu_only(dir: &Path, id: &str, elf: &Path) -> Box<dyn Instance> {
    let work = dir.join(id);
    std::fs::create_dir_all(&work).expect("temp dir is writable");
    let mut spec = InstanceSpec::new(
        id,
        &work,
        BootSpec::Kernel {
            kernel: elf.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    spec.memory_mib = 32;
    spec.debug = Some(DebugListen::Tcp("127.0.0.1:0".parse().expect("address")));
    let inst = driver().launch(&spec).expect("launch");
    let ports = microvm(inst.as_ref()).ports().clone();
    assert!(
        ports.wait(WAIT, |s| s.first_read_at.is_some()),
        "guest never polled its command port"
    );
    inst
}

#[test]
// Heavy: needs /dev/kvm.
fn incremental_chain_moved_elsewhere_restores_from_its_last_link() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let inst = boot_cpu_only(dir, "chain", &elf);
    let m = microvm(inst.as_ref());
    let chain = dir.join("chain-snaps");
    let links = ["0001", "0002", "0003"];
    let pages: [&[u32]; 3] = [&[1, 2, 3], &[2, 7], &[3, 9, 11]];
    for (i, (link, p)) in links.iter().zip(pages).enumerate() {
        dirty(m, p);
        let d = chain.join(link);
        std::fs::create_dir_all(&d).expect("snapshot dir");
        let memory = if i == 0 {
            MemoryKind::Full
        } else {
            MemoryKind::Incremental
        };
        let arts = inst
            .snapshot(&d, SnapshotOptions { memory })
            .expect("snapshot");
        assert_eq!(arts.memory, memory);
        if i > 0 {
            assert_eq!(
                arts.parent.as_deref(),
                Some(format!("../{}", links[i - 1]).as_str())
            );
        }
    }
    let expect: Vec<(u32, u64)> = [1u32, 2, 3, 7, 9, 11]
        .iter()
        .map(|&p| (p, read_u64(m, ARENA_GPA + u64::from(p) * 4096)))
        .collect();
    assert_eq!(
        expect[1].1,
        dirty_pattern(2, 2),
        "page 2 was last dirtied in round 2"
    );
    inst.stop(Duration::from_secs(5)).expect("stop");

    // Move the whole chain; restore from the last link.
    let moved = dir.join("elsewhere");
    std::fs::rename(&chain, &moved).expect("move the chain");
    let work = dir.join("restored");
    std::fs::create_dir_all(&work).expect("temp dir is writable");
    let spec = InstanceSpec::new(
        "restored",
        &work,
        BootSpec::Kernel {
            kernel: elf.clone(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    let clone = driver()
        .restore(&spec, &moved.join("0003"))
        .expect("restore from the moved chain's last link");
    let mc = microvm(clone.as_ref());
    for (p, v) in expect {
        assert_eq!(
            read_u64(mc, ARENA_GPA + u64::from(p) * 4096),
            v,
            "arena page {p}"
        );
    }
    clone.resume().expect("the clone runs");
    dirty(mc, &[5]);
    assert_eq!(read_u64(mc, ARENA_GPA + 5 * 4096), dirty_pattern(5, 4));
}

#[test]
// Heavy: needs /dev/kvm.
fn a_staged_snapshot_is_a_snapshot_only_once_complete_and_the_chain_keeps_every_page() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let inst = boot_cpu_only(dir, "staged", &elf);
    let m = microvm(inst.as_ref());
    let chain = dir.join("staged-snaps");
    let link = |n: &str| {
        let d = chain.join(n);
        std::fs::create_dir_all(&d).expect("snapshot dir");
        d
    };
    let work = dir.join("restored");
    std::fs::create_dir_all(&work).expect("temp dir is writable");
    let spec = InstanceSpec::new(
        "restored",
        &work,
        BootSpec::Kernel {
            kernel: elf.clone(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    let inc = SnapshotOptions {
        memory: MemoryKind::Incremental,
    };
    inst.snapshot(&link("0001"), SnapshotOptions::default())
        .expect("full snapshot");

    dirty(m, &[1, 2]);
    let d2 = link("0002");
    let staged = inst.snapshot_staged(&d2, inc).expect("staged");
    // The driver paused the running guest for the staging only.
    assert_eq!(inst.query().expect("query").state, RunState::Running);
    // What a crash now leaves is no snapshot, for the driver or a restore.
    let e = vmr_hypervisor::SnapshotArtifacts::load(&d2, "microvm").expect_err("incomplete");
    assert!(e.to_string().contains("artifacts.json"), "{e}");
    assert!(
        driver().restore(&spec, &d2).is_err(),
        "an incomplete snapshot restored"
    );
    dirty(m, &[2, 5]);
    let arts = staged.complete(None).expect("completes");
    assert!(arts.pause.is_some(), "the driver paused the guest");
    assert_eq!(arts.parent.as_deref(), Some("../0001"));
    vmr_hypervisor::SnapshotArtifacts::load(&d2, "microvm").expect("complete");

    // An abandoned one leaves nothing behind and loses no page.
    dirty(m, &[9]);
    let d3 = link("0003");
    drop(inst.snapshot_staged(&d3, inc).expect("staged"));
    assert!(
        std::fs::read_dir(&d3).expect("dir").next().is_none(),
        "an abandoned snapshot left files"
    );
    dirty(m, &[11]);
    let d4 = link("0004");
    let arts = inst
        .snapshot(&d4, inc)
        .expect("snapshot after the abandoned one");
    assert_eq!(arts.parent.as_deref(), Some("../0002"));
    let expect: Vec<(u32, u64)> = [1u32, 2, 5, 9, 11]
        .iter()
        .map(|&p| (p, read_u64(m, ARENA_GPA + u64::from(p) * 4096)))
        .collect();
    assert_eq!(expect[1].1, dirty_pattern(2, 2));
    assert_eq!(expect[3].1, dirty_pattern(9, 3));
    inst.stop(Duration::from_secs(5)).expect("stop");

    let clone = driver().restore(&spec, &d4).expect("restore from 0004");
    let mc = microvm(clone.as_ref());
    for (p, v) in expect {
        assert_eq!(
            read_u64(mc, ARENA_GPA + u64::from(p) * 4096),
            v,
            "arena page {p}"
        );
    }
    clone.stop(Duration::from_secs(5)).expect("stop");
}

#[test]
// Heavy: needs /dev/kvm and gdb (Debian package gdb).
fn gdb_reads_registers_of_a_paused_instance_through_the_endpoint() {
    require_kvm();
    assert!(
        Command::new("gdb").arg("--version").output().is_ok(),
        "`gdb` is required (Debian package gdb)"
    );
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let inst = boot_cpu_only(tmp.path(), "gdb", &elf);
    let Some(DebugListen::Tcp(addr)) = inst.debugger() else {
        panic!("the spec asked for a debugger");
    };
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    inst.pause().expect("pause");
    let out = Command::new("timeout")
        .args(["60", "gdb", "-batch", "-nx"])
        .arg(&elf)
        .args(["-ex", &format!("target remote {addr}")])
        .args(["-ex", "info registers rip"])
        .args(["-ex", "detach"])
        .output()
        .expect("gdb runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rip = text
        .lines()
        .find(|l| l.starts_with("rip "))
        .unwrap_or_else(|| panic!("gdb printed no rip:\n{text}"));
    assert!(rip.contains("0x"), "{rip}");

    // The debugger's detach leaves the instance paused: queued work does not
    // run until the driver resumes it.
    assert_eq!(inst.query().expect("query").state, RunState::Paused);
    let ports = microvm(inst.as_ref()).ports().clone();
    let before = ports.with(|s| s.values.len());
    ports.push_commands(&[vmr_vmm::guest_abi::CMD_COUNT | (32 << 8)]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ports.with(|s| s.values.len()),
        before,
        "the guest ran after the debugger detached from a paused instance"
    );
    inst.resume().expect("resume");
    assert!(
        ports.wait(WAIT, |s| s.values.len() >= before + 32),
        "the guest runs once resumed"
    );
    inst.stop(Duration::from_secs(5)).expect("stop");
}

#[test]
// Heavy: needs /dev/kvm.
fn stop_releases_the_debugger_and_full_snapshots_outlive_their_predecessors() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let inst = boot_cpu_only(dir, "gone", &elf);

    // A snapshot directory removed after upload does not stop later
    // snapshots: a full one needs nothing older; an incremental one says why
    // it cannot be taken.
    let first = dir.join("s1");
    std::fs::create_dir(&first).expect("dir");
    inst.snapshot(&first, SnapshotOptions::default())
        .expect("first snapshot");
    std::fs::remove_dir_all(&first).expect("remove the uploaded snapshot");
    let second = dir.join("s2");
    std::fs::create_dir(&second).expect("dir");
    inst.snapshot(&second, SnapshotOptions::default())
        .expect("a full snapshot after the previous one was removed");
    std::fs::remove_dir_all(&second).expect("remove");
    let third = dir.join("s3");
    std::fs::create_dir(&third).expect("dir");
    let e = inst
        .snapshot(
            &third,
            SnapshotOptions {
                memory: MemoryKind::Incremental,
            },
        )
        .expect_err("an incremental snapshot without its parent");
    let e = vmr_hypervisor::error_chain(&e);
    assert!(e.contains("take a full snapshot"), "{e}");
    std::fs::write(third.join("stray"), b"x").expect("write");
    let e = inst
        .snapshot(&third, SnapshotOptions::default())
        .expect_err("a snapshot into a non-empty directory");
    assert!(e.to_string().contains("not empty"), "{e}");

    // Stopping releases the VM and closes the debugger's port.
    let Some(DebugListen::Tcp(addr)) = inst.debugger() else {
        panic!("the spec asked for a debugger");
    };
    let weak = std::sync::Arc::downgrade(&microvm(inst.as_ref()).vmm().expect("running"));
    inst.stop(Duration::from_secs(5)).expect("stop");
    assert!(weak.upgrade().is_none(), "the VM is gone after stop");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the debugger port is closed after stop"
    );
}

#[test]
// Heavy: needs /dev/kvm.
fn bad_input_gets_errors_that_name_the_cause() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let drv = driver();

    let e = vmr_hypervisor::driver("xen").err().expect("unknown driver");
    assert!(e.to_string().contains("unknown driver \"xen\""), "{e}");

    let mut spec = InstanceSpec::new(
        "bad",
        dir,
        BootSpec::Kernel {
            kernel: dir.join("no-such-kernel"),
            initrd: None,
            cmdline: String::new(),
        },
    );
    let e = drv.launch(&spec).err().expect("missing kernel");
    assert!(
        matches!(e, DriverError::Spec { ref field, .. } if field == "boot.kernel"),
        "{e}"
    );

    spec.boot = BootSpec::Kernel {
        kernel: elf.clone(),
        initrd: None,
        cmdline: String::new(),
    };
    spec.debug = Some(DebugListen::Tcp("0.0.0.0:0".parse().expect("address")));
    let e = drv.launch(&spec).err().expect("public debugger");
    assert!(e.to_string().contains("loopback"), "{e}");
    spec.debug = None;

    spec.disks.push(DiskSpec {
        name: "vda".into(),
        socket: dir.join("nobody-listens.sock"),
    });
    let e = drv.launch(&spec).err().expect("backend not listening");
    assert!(e.to_string().contains("disks[0]"), "{e}");
    spec.disks.clear();

    // A snapshot, then damage it.
    let inst = boot_cpu_only(dir, "victim", &elf);
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).expect("snapshot dir");
    let arts = inst
        .snapshot(&snap, SnapshotOptions::default())
        .expect("snapshot");
    inst.stop(Duration::from_secs(5)).expect("stop");
    let e = drv
        .restore(&spec, &snap)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.is_empty(), "an intact snapshot restores: {e}");

    let mem = arts
        .artifacts
        .iter()
        .find(|a| a.kind == vmr_hypervisor::artifacts::ArtifactKind::Memory)
        .expect("a memory artifact");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join(&mem.file))
        .expect("memory file");
    f.set_len(mem.size / 2).expect("truncate");
    let e = drv.restore(&spec, &snap).err().expect("truncated memory");
    assert!(
        matches!(e, DriverError::Artifact { ref artifact, .. } if *artifact == mem.name),
        "{e}"
    );

    let qemu_made = dir.join("qemu-snap");
    std::fs::create_dir_all(&qemu_made).expect("dir");
    let mut other = arts.clone();
    other.driver = "qemu".into();
    other.artifacts.clear();
    other.store(&qemu_made).expect("store");
    let e = drv
        .restore(&spec, &qemu_made)
        .err()
        .expect("other driver's snapshot");
    assert!(e.to_string().contains("written by the qemu driver"), "{e}");
}

/// Frames of the test guest's protocol in one direction.
fn frames(path: &Path, dir: Direction) -> Vec<Vec<u8>> {
    capture::frames(path, dir, ETHERTYPE)
}

/// A request frame from the peer to the test guest.
fn request(payload: &[u8]) -> Vec<u8> {
    capture::ethernet(GUEST_MAC, PEER_MAC, ETHERTYPE, payload)
}
