//! The net backend driven by an in-process vhost-user front-end. Replay mode
//! needs no TAP; the TAP test needs root and a network namespace.

use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost_tap::capture::{MemorySink, Tee, TeeConfig};
use vhost_tap::fault::{FaultKind, FaultRule, RuleFaults};
use vhost_tap::metrics::Metrics;
use vhost_tap::net::{ChannelReplaySource, NetBackend, NetConfig, ReplaySource};
use vhost_tap::seq::AtomicSeq;
use vhost_tap::server::Server;
use vhost_tap::testing::{DriverQueue, GuestRam, TestFrontend};
use vhost_tap::Mode;
use vmr_proto::pb;

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, tag]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f
}

fn frames_of(events: &[pb::Event], dir: pb::Direction) -> Vec<Vec<u8>> {
    events
        .iter()
        .filter_map(|e| match e.payload.as_ref()? {
            pb::event::Payload::Net(n) if n.direction == dir as i32 => Some(n.frame.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn replay_mode_injects_frames_and_records_transmissions() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let metrics = Arc::new(Metrics::default());
    let sink = Arc::new(MemorySink::new());
    let tee = Tee::start(
        TeeConfig::new("clone-1"),
        sink.clone(),
        Arc::new(AtomicSeq::default()),
        metrics.clone(),
    )
    .unwrap();
    let source = Arc::new(ChannelReplaySource::new().unwrap());
    let faults = Arc::new(RuleFaults::new());
    let mut cfg = NetConfig::new("net0");
    cfg.mode = Mode::Replay;
    cfg.mtu = 9000;
    let backend = NetBackend::new(
        cfg,
        None,
        Some(source.clone() as Arc<dyn ReplaySource>),
        Some(tee.clone()),
        Some(faults.clone()),
        metrics.clone(),
    )
    .unwrap();
    let server = Server::spawn("net", backend, &sock, false).unwrap();

    let mut ram = GuestRam::new(16 << 20).unwrap();
    let mut fe = TestFrontend::connect(&sock, 2).unwrap();
    let mut rx = DriverQueue::new(&ram, 0x1_0000, 256);
    let mut tx = DriverQueue::new(&ram, 0x2_0000, 256);
    fe.setup(&ram, &[&rx, &tx], 0).unwrap();
    assert_ne!(fe.features & VhostUserVirtioFeatures::LOG_ALL.bits(), 0);
    assert!(fe.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    let (_, cfgspace) = fe
        .fe
        .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
        .unwrap();
    assert_eq!(&cfgspace[0..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(u16::from_le_bytes([cfgspace[6], cfgspace[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfgspace[10], cfgspace[11]]), 9000);

    // Frames pushed before the guest posts buffers wait for them.
    faults
        .add(FaultRule::frame(FaultKind::Duplicate, "rx", 1))
        .unwrap();
    source.push(frame(1, 60));
    source.push(frame(2, 1514));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rx.used_idx(&ram), 0);
    let mut bufs = Vec::new();
    for _ in 0..4 {
        let b = ram.alloc(2048).unwrap();
        let h = rx.add_chain(&ram, &[(b, 2048, true)]);
        rx.publish(&ram, h);
        bufs.push(b);
    }
    fe.kick(0).unwrap();
    assert!(
        TestFrontend::wait_for(5, || rx.used_idx(&ram) == 3),
        "used {} metrics {:?}",
        rx.used_idx(&ram),
        metrics.snapshot()
    );
    let used: Vec<_> = std::iter::from_fn(|| rx.pop_used(&ram)).collect();
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![72, 72, 1526]
    );
    let mut got = vec![0u8; 1526];
    ram.read(bufs[2], &mut got);
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[12..], &frame(2, 1514)[..]);
    // One buffer left: a third injected frame lands there immediately.
    source.push(frame(3, 100));
    assert!(TestFrontend::wait_for(5, || rx.used_idx(&ram) == 4));

    // Transmit: header + frame split over two descriptors; one dropped by a fault.
    faults
        .add(FaultRule::frame(FaultKind::Drop, "tx", 1))
        .unwrap();
    for tag in [7u8, 8] {
        let hdr = ram.alloc(12).unwrap();
        let f = frame(tag, 200);
        let b = ram.alloc(200).unwrap();
        ram.write(b, &f);
        let h = tx.add_chain(&ram, &[(hdr, 12, false), (b, 200, false)]);
        tx.publish(&ram, h);
    }
    fe.kick(1).unwrap();
    assert!(TestFrontend::wait_for(5, || tx.used_idx(&ram) == 2));
    // A malformed TX chain (device-writable) is returned and counted.
    let b = ram.alloc(64).unwrap();
    let h = tx.add_chain(&ram, &[(b, 64, true)]);
    tx.publish(&ram, h);
    fe.kick(1).unwrap();
    assert!(TestFrontend::wait_for(5, || tx.used_idx(&ram) == 3));

    drop(fe);
    server.stop().unwrap();
    tee.shutdown();
    let events = sink.take();
    assert_eq!(
        frames_of(&events, pb::Direction::Rx),
        vec![frame(1, 60), frame(1, 60), frame(2, 1514), frame(3, 100)]
    );
    assert_eq!(frames_of(&events, pb::Direction::Tx), vec![frame(8, 200)]);
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=5).collect::<Vec<_>>()
    );
    let m = metrics.snapshot();
    assert_eq!(
        (m.injected, m.faults, m.malformed),
        (4, 2, 1),
        "a duplicated frame is delivered twice"
    );
}

/// Runs a command, failing the test with its output if it fails.
fn sh(cmd: &str) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
// Heavy: needs root, iproute2 and /dev/net/tun (network namespace + TAP).
fn tap_in_netns_carries_arp_both_ways() {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing"
    );
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
    let ns = Netns(format!("vmrtap{}", std::process::id()));
    sh(&format!("ip netns add {}", ns.0));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let capture = dir.path().join("net.events");
    let mut child = vmr_testkit::process::ChildGuard::spawn(
        "vhost-tap-net",
        std::process::Command::new(env!("CARGO_BIN_EXE_vhost-tap-net"))
            .args([
                "--socket",
                sock.to_str().unwrap(),
                "--tap",
                "vt0",
                "--netns",
                &ns.0,
            ])
            .args([
                "--instance-id",
                "vm-tap",
                "--capture",
                capture.to_str().unwrap(),
            ]),
    )
    .unwrap();
    let mut fe = TestFrontend::connect(&sock, 2).unwrap();
    sh(&format!("ip -n {} addr add 10.77.0.1/24 dev vt0", ns.0));
    let mut ram = GuestRam::new(16 << 20).unwrap();
    let mut rx = DriverQueue::new(&ram, 0x1_0000, 256);
    let mut tx = DriverQueue::new(&ram, 0x2_0000, 256);
    fe.setup(&ram, &[&rx, &tx], 0).unwrap();
    let mut rxbufs = Vec::new();
    for _ in 0..128 {
        let b = ram.alloc(2048).unwrap();
        let h = rx.add_chain(&ram, &[(b, 2048, true)]);
        rx.publish(&ram, h);
        rxbufs.push(b);
    }
    fe.kick(0).unwrap();
    // ARP who-has 10.77.0.1 tell 10.77.0.2 from the guest MAC.
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&[10, 77, 0, 2]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 77, 0, 1]);
    arp.resize(60, 0);
    let mut pkt = vec![0u8; 12];
    pkt.extend_from_slice(&arp);
    let b = ram.alloc(pkt.len() as u64).unwrap();
    ram.write(b, &pkt);
    let h = tx.add_chain(&ram, &[(b, pkt.len() as u32, false)]);
    tx.publish(&ram, h);
    // The interface may still be coming up: resend until a reply arrives.
    // Other frames (IPv6 multicast from the kernel) may arrive first.
    let mut reply = None;
    'outer: for _ in 0..30 {
        fe.kick(1).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        while std::time::Instant::now() < deadline {
            if let Some((head, len)) = rx.pop_used(&ram) {
                let mut f = vec![0u8; len as usize];
                ram.read(rxbufs[head as usize], &mut f);
                let f = f.split_off(12);
                if f.len() >= 22 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                    reply = Some(f);
                    break 'outer;
                }
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let h = tx.add_chain(&ram, &[(b, pkt.len() as u32, false)]);
        tx.publish(&ram, h);
    }
    let reply = reply.expect("no ARP reply came back through the TAP");
    assert_eq!(&reply[0..6], &mac, "reply to the guest MAC");
    assert_eq!(&reply[28..32], &[10, 77, 0, 1], "sender is the host side");
    drop(fe);
    child.stop(Duration::from_secs(5));
    let events: Vec<pb::Event> =
        vmr_proto::framing::EventReader::new(std::fs::File::open(&capture).unwrap())
            .collect::<Result<_, _>>()
            .unwrap();
    assert!(frames_of(&events, pb::Direction::Tx)
        .iter()
        .any(|f| f[..] == arp[..]));
    assert!(frames_of(&events, pb::Direction::Rx)
        .iter()
        .any(|f| f[..] == reply[..]));
}
