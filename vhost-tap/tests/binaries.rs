//! The `vhost-tap-blk` binary, driven over its socket and control socket.

use std::time::Duration;

use serde_json::json;
use vhost_tap::control::ControlClient;
use vhost_tap::seq::{FileSeq, SeqSource};
use vhost_tap::testing::{BlkRequestBuilder as Rb, DriverQueue, GuestRam, TestFrontend};
use virtio_bindings::virtio_blk::*;
use vmr_proto::pb;
use vmr_testkit::process::ChildGuard;

#[test]
fn blk_binary_captures_replays_and_shares_seq() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0x5au8; 1 << 20]).unwrap();
    let seq = dir.path().join("vm.seq");
    // Another backend of the instance already used seq 1..=10.
    FileSeq::open(&seq).unwrap().next_n(10);
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("blk.ctl");
    let capture = dir.path().join("blk.events");
    let overlay = dir.path().join("clone.overlay");
    let mut child = ChildGuard::spawn(
        "vhost-tap-blk",
        std::process::Command::new(env!("CARGO_BIN_EXE_vhost-tap-blk")).args([
            "--socket",
            sock.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--overlay",
            overlay.to_str().unwrap(),
            "--mode",
            "replay",
            "--instance-id",
            "clone-7",
            "--capture",
            capture.to_str().unwrap(),
            "--seq-file",
            seq.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ]),
    )
    .unwrap();
    let mut ram = GuestRam::new(16 << 20).unwrap();
    let mut fe = TestFrontend::connect(&sock, 1).unwrap();
    let mut q = DriverQueue::new(&ram, 0x1_0000, 256);
    fe.setup(&ram, &[&q], 0).unwrap();
    assert!(TestFrontend::wait_for(5, || ctl.exists()));
    let mut c = ControlClient::connect(&ctl).unwrap();
    // Fail the next read of sector 0..8.
    c.request(&json!({"cmd":"fault","rule":{"kind":"io-error","op":"read","sector_start":0,"sector_end":8}}))
        .unwrap();
    let post = |ram: &mut GuestRam, q: &mut DriverQueue, t: u32, data_len: u32, fill: u8| {
        let (hdr, st) = Rb::header(ram, t, 0).unwrap();
        let b = ram.alloc(u64::from(data_len)).unwrap();
        ram.write(b, &vec![fill; data_len as usize]);
        let h = q.add_chain(
            ram,
            &[
                (hdr, 16, false),
                (b, data_len, t == VIRTIO_BLK_T_IN),
                (st, 1, true),
            ],
        );
        q.publish(ram, h);
        (b, st)
    };
    let (_, st1) = post(&mut ram, &mut q, VIRTIO_BLK_T_IN, 512, 0);
    let (_, st2) = post(&mut ram, &mut q, VIRTIO_BLK_T_OUT, 512, 0x11);
    let (b3, st3) = post(&mut ram, &mut q, VIRTIO_BLK_T_IN, 512, 0);
    fe.kick(0).unwrap();
    assert!(TestFrontend::wait_for(10, || q.used_idx(&ram) == 3));
    assert_eq!(
        Rb::status(&ram, st1),
        VIRTIO_BLK_S_IOERR as u8,
        "injected fault"
    );
    assert_eq!(Rb::status(&ram, st2), VIRTIO_BLK_S_OK as u8);
    assert_eq!(Rb::status(&ram, st3), VIRTIO_BLK_S_OK as u8);
    let mut got = [0u8; 512];
    ram.read(b3, &mut got);
    assert_eq!(got, [0x11; 512], "the clone reads its own write");
    let m = c.request(&json!({"cmd":"metrics"})).unwrap();
    assert_eq!(m["metrics"]["faults"], 1);
    drop(fe);
    child.stop(Duration::from_secs(5));
    // The image is untouched; the clone's write is in the overlay.
    assert!(std::fs::read(&image).unwrap().iter().all(|b| *b == 0x5a));
    let events: Vec<pb::Event> =
        vmr_proto::framing::EventReader::new(std::fs::File::open(&capture).unwrap())
            .collect::<Result<_, _>>()
            .unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![11, 12, 13]
    );
    let statuses: Vec<i32> = events
        .iter()
        .map(|e| match e.payload.as_ref().unwrap() {
            pb::event::Payload::Block(b) => b.status,
            _ => -1,
        })
        .collect();
    assert_eq!(
        statuses,
        vec![
            pb::BlockStatus::Ioerr as i32,
            pb::BlockStatus::Ok as i32,
            pb::BlockStatus::Ok as i32
        ]
    );
    assert_eq!(FileSeq::open(&seq).unwrap().peek(), 14);
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-tap-blk"))
        .args([
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/nonexistent/disk.raw",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-tap-blk"))
        .args([
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/etc/hostname",
            "--mode",
            "replay",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("overlay"));
}
