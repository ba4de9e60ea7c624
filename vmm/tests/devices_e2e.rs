//! End to end with the `vhost-tap-blk` and `vhost-tap-net` binaries: the
//! test guest serves requests from its NIC and appends them to its disk,
//! behind the virtio-mmio transport. Mid-workload the VM is snapshotted; the
//! original carries on, takes request 2 and then a poison request that
//! triple-faults it. A clone restored from the snapshot into a new VM, with
//! new backends in replay mode over a copy of the disk at the cut, is given
//! the request frames recorded in the original's capture file and must write
//! the same next disk sector and send the same reply (byte for byte, per the
//! capture records), then crash with the same registers.
//!
//! The original's backends run in capture mode; frames reach it through its
//! TAP, sent from inside a network namespace the test creates with an
//! AF_PACKET socket. The clone's NIC gets its frames through the replay
//! backend's control socket (`inject`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guest_elf, require_kvm};
use vhost_tap::blk::disk::map_path;
use vmr_proto::{Direction, LifecycleKind};
use vmr_testkit::capture::{self, disk_write, inject};
use vmr_testkit::{workspace_bin, ChildGuard};
use vmr_vmm::devices::dirty_log::DirtyLog;
use vmr_vmm::devices::mmio::DeviceKind;
use vmr_vmm::devices::{self, VirtioSpec};
use vmr_vmm::serial::SharedBuffer;
use vmr_vmm::snapshot::{MemoryKind, RestoreMemory};
use vmr_vmm::vm::{BootSource, SnapshotDevice};

/// `CMD_NET_DISK` of `guest/test-guest/workload.h`.
const CMD_NET_DISK: u32 = 0x10;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const TAP: &str = "vmrt0";
const MEM: u64 = 32 << 20;
const WAIT: Duration = Duration::from_secs(60);

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("vmrdev-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        // No IPv6 chatter (router solicitations, MLD) on the TAP.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
            ],
        );
        run(
            "ip",
            &[
                "netns",
                "exec",
                &name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        Self(name)
    }

    /// Waits for the backend's TAP and brings it up.
    fn tap_up(&self) {
        let start = Instant::now();
        while !Command::new("ip")
            .args(["-n", &self.0, "link", "show", TAP])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                start.elapsed() < WAIT,
                "vhost-tap-net never created {TAP} in {}",
                self.0
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        run("ip", &["-n", &self.0, "link", "set", TAP, "up"]);
    }

    /// Sends `frame` out of the TAP interface, that is, to the guest.
    fn send(&self, frame: &[u8]) {
        let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.0,
                "python3",
                "-c",
                "import socket,sys\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind((sys.argv[1],0))\ns.send(bytes.fromhex(sys.argv[2]))",
                TAP,
                &hex,
            ],
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd} (iproute2, python3 and root are required): {e}")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One VM's backends.
struct Backends {
    _blk: ChildGuard,
    _net: ChildGuard,
    blk_sock: PathBuf,
    net_sock: PathBuf,
    blk_capture: PathBuf,
    net_capture: PathBuf,
    control: PathBuf,
}

/// Where the NIC's frames come from.
enum NetSide<'a> {
    /// Capture mode over a TAP in this namespace (the original).
    Tap(&'a Netns),
    /// Replay mode: frames injected through the control socket (the clone).
    Replay,
}

fn start_backends(
    dir: &Path,
    tag: &str,
    image: &Path,
    overlay: &Path,
    net: NetSide<'_>,
) -> Backends {
    let blk_bin = workspace_bin("vhost-tap-blk").unwrap_or_else(|e| panic!("{e}"));
    let net_bin = workspace_bin("vhost-tap-net").unwrap_or_else(|e| panic!("{e}"));
    let path = |suffix: &str| dir.join(format!("{tag}-{suffix}"));
    let mode = match net {
        NetSide::Tap(_) => "capture",
        NetSide::Replay => "replay",
    };
    let mut blk = Command::new(&blk_bin);
    blk.arg("--socket")
        .arg(path("blk.sock"))
        .arg("--image")
        .arg(image)
        .arg("--overlay")
        .arg(overlay)
        .args(["--mode", mode, "--instance-id", tag, "--device", "vda"])
        .arg("--capture")
        .arg(path("blk.events"));
    let mut netc = Command::new(&net_bin);
    netc.arg("--socket")
        .arg(path("net.sock"))
        .args(["--mode", mode, "--instance-id", tag, "--device", "net0"])
        .arg("--capture")
        .arg(path("net.events"));
    match net {
        NetSide::Tap(ns) => {
            netc.args(["--tap", TAP, "--netns", &ns.0]);
        }
        NetSide::Replay => {
            netc.arg("--control").arg(path("net.ctl"));
        }
    }
    let b = Backends {
        _blk: ChildGuard::spawn(format!("vhost-tap-blk {tag}"), &mut blk)
            .unwrap_or_else(|e| panic!("{e}")),
        _net: ChildGuard::spawn(format!("vhost-tap-net {tag}"), &mut netc)
            .unwrap_or_else(|e| panic!("{e}")),
        blk_sock: path("blk.sock"),
        net_sock: path("net.sock"),
        blk_capture: path("blk.events"),
        net_capture: path("net.events"),
        control: path("net.ctl"),
    };
    let mut wait_paths = vec![&b.blk_sock, &b.net_sock];
    if matches!(net, NetSide::Replay) {
        wait_paths.push(&b.control);
    }
    for s in wait_paths {
        let start = Instant::now();
        while !s.exists() {
            assert!(
                start.elapsed() < WAIT,
                "backend socket {} never appeared",
                s.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    b
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

fn wait_serial(serial: &SharedBuffer, needle: &str) {
    wait_for(&format!("guest console line {needle:?}"), || {
        String::from_utf8_lossy(&serial.contents())
            .contains(needle)
            .then_some(())
    });
}

fn done_line(seq: u32) -> String {
    format!("vmr-guest: request {seq:016x} done")
}

#[test]
// Heavy: needs /dev/kvm, root (network namespaces), python3 and the vhost-tap binaries.
fn snapshot_clone_continues_and_replays_the_crash() {
    require_kvm();
    let elf = guest_elf();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("temp dir is writable");

    // The original.
    let ns_a = Netns::new("a");
    let overlay_a = dir.join("a.overlay");
    let a = start_backends(dir, "a", &image, &overlay_a, NetSide::Tap(&ns_a));
    let common::Guest {
        mut vm,
        ports,
        serial: serial_a,
    } = common::new_guest(MEM);
    let log = Arc::new(DirtyLog::new(MEM).expect("memfd"));
    for (kind, sock, cfg) in [
        (
            DeviceKind::Block,
            &a.blk_sock,
            DeviceKind::Block.local_config(1 << 20, GUEST_MAC),
        ),
        (
            DeviceKind::Net,
            &a.net_sock,
            DeviceKind::Net.local_config(0, GUEST_MAC),
        ),
    ] {
        devices::attach(
            &vm,
            VirtioSpec {
                kind,
                socket: sock.clone(),
                local_config: cfg,
            },
            Some(log.clone()),
        )
        .expect("backend reachable");
    }
    vm.load(&BootSource::Elf(elf)).expect("guest loads");
    vm.start().expect("vCPUs start");
    ports.push_commands(&[CMD_NET_DISK]);
    wait_serial(&serial_a, "vmr-guest: net ready");
    ns_a.tap_up();

    // Two requests before the cut.
    for seq in 0..2u32 {
        ns_a.send(&request(
            format!("request {seq}: hello from the peer").as_bytes(),
        ));
        wait_serial(&serial_a, &done_line(seq));
    }

    // Snapshot; the disk state at the cut is the overlay at this moment.
    vm.pause().expect("pause");
    let snap = dir.join("snap");
    vm.snapshot(&snap, MemoryKind::Full).expect("snapshot");
    let overlay_b = dir.join("b.overlay");
    std::fs::copy(&overlay_a, &overlay_b).expect("overlay copy");
    std::fs::copy(map_path(&overlay_a), map_path(&overlay_b)).expect("overlay map copy");
    vm.resume().expect("resume");

    // The original goes on: request 2, then the poison request.
    ns_a.send(&request(b"request 2: after the snapshot"));
    wait_serial(&serial_a, &done_line(2));
    ns_a.send(&request(b"POISON: crash now"));
    let crash_a = vm
        .wait_for_stop(WAIT)
        .expect("the poison request stops the original");
    assert_eq!(crash_a.kind, LifecycleKind::TripleFault, "{crash_a:?}");

    let rx_a = wait_for("the original's four requests in its capture", || {
        let f = frames(&a.net_capture, Direction::Rx);
        (f.len() >= 4).then_some(f)
    });
    let reply_a = wait_for("the original's reply to request 2", || {
        frames(&a.net_capture, Direction::Tx)
            .into_iter()
            .find(|f| f.get(14..21) == Some(&[b'R', b'P', b'L', 2, 0, 0, 0][..]))
    });
    let write_a = wait_for("the original's write of request 2", || {
        disk_write(&a.blk_capture, 3)
    });
    assert_eq!(&write_a[..7], &[b'R', b'E', b'Q', 2, 0, 0, 0]);

    // The clone: a new VM from the snapshot, new backends, the same requests.
    let b = start_backends(dir, "b", &image, &overlay_b, NetSide::Replay);
    let common::Restored {
        vm: clone,
        serial: serial_b,
        devices: restored,
    } = common::restore_clone(
        &snap,
        &b.blk_sock,
        &b.net_sock,
        Some(Arc::new(DirtyLog::new(MEM).expect("memfd"))),
        // Lazy without background prefetch: every page the clone needs
        // comes in through a fault, including the binaries' (postcopy).
        RestoreMemory::SharedOnDemand,
    );
    assert_eq!(restored.len(), 2);
    for d in &restored {
        assert!(
            d.device().lock().expect("not poisoned").joined_postcopy(),
            "the {} binary serves its faults through postcopy",
            d.id()
        );
    }
    clone.resume().expect("clone runs");

    // Replay the recorded request 2: same disk write, same reply.
    inject(&b.control, &rx_a[2]);
    wait_serial(&serial_b, &done_line(2));
    let write_b = wait_for("the clone's write of request 2", || {
        disk_write(&b.blk_capture, 3)
    });
    assert_eq!(
        write_b, write_a,
        "the clone's next disk write matches the original's"
    );
    let reply_b = wait_for("the clone's reply to request 2", || {
        frames(&b.net_capture, Direction::Tx).into_iter().next()
    });
    assert_eq!(
        reply_b, reply_a,
        "the clone's reply matches the original's byte for byte"
    );
    assert!(
        disk_write(&b.blk_capture, 1).is_none(),
        "requests before the cut are not redone"
    );

    // Replay the recorded poison request: the same crash.
    inject(&b.control, &rx_a[3]);
    let crash_b = clone
        .wait_for_stop(WAIT)
        .expect("the poison request stops the clone");
    assert_eq!(crash_b.kind, LifecycleKind::TripleFault);
    assert_eq!(crash_b.regs, crash_a.regs, "same faulting state");
    let lazy = clone.memory().lazy().cloned().expect("restored lazily");
    let stats = lazy.stats();
    assert!(
        stats.backend_faults > 0 && stats.error.is_none(),
        "the backends' faults were served: {stats:?}"
    );
    // Filling the rest ends postcopy with both binaries.
    clone.memory().start_prefetch();
    lazy.wait_populated(WAIT)
        .expect("every page of the clone is populated");
    assert!(lazy.stats().complete);
}

/// Frames of the test guest's protocol in one direction.
fn frames(path: &Path, dir: Direction) -> Vec<Vec<u8>> {
    capture::frames(path, dir, ETHERTYPE)
}

/// A request frame from the peer to the test guest.
fn request(payload: &[u8]) -> Vec<u8> {
    capture::ethernet(GUEST_MAC, PEER_MAC, ETHERTYPE, payload)
}
