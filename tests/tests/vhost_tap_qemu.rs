//! End-to-end tests: QEMU (TCG) boots the Debian cloud kernel with the demo
//! initramfs (guest/linux) on vhost-user disks and NICs, and the tests check
//! what reached the disk image and the capture files against what the guest did.
//!
//! Heavy: they need qemu-system-x86_64, qemu-storage-daemon, root (network
//! namespaces, TAP devices), the guest image (`guest/linux/build.sh`) and the
//! workspace binaries (`cargo build --workspace --bins`). Run with
//! `cargo test -p vmr-testkit --test vhost_tap_qemu -- --test-threads=1`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use vmr_proto::framing::EventReader;
use vmr_proto::{BlockOp, BlockStatus, ContentHash, Direction, Event, Payload};
use vmr_testkit::guest::{self, GuestImage};
use vmr_testkit::qemu::{EchoPeer, NetDevice, NetNs, Qemu, QemuConfig};
use vmr_testkit::{workspace_bin, ChildGuard};

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const DISK_BYTES: u64 = 64 << 20;
/// Name of the TAP device vhost-tap-net creates in the test's namespace.
const TAP_NAME: &str = "vmrtap0";

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn image() -> GuestImage {
    GuestImage::locate().unwrap_or_else(|e| panic!("{e}"))
}

fn blank_disk(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(DISK_BYTES)
}

fn wait_for_socket(path: &Path, guard: &mut ChildGuard) -> TestResult {
    vmr_testkit::process::wait_until(
        &format!("{} socket {}", guard.name(), path.display()),
        Duration::from_secs(15),
        || {
            if let Some(status) = guard.try_wait() {
                // Surface the exit immediately; wait_until retries only Err.
                return Ok(Some(status));
            }
            if path.exists() {
                Ok(None)
            } else {
                Err("not yet".to_string())
            }
        },
    )?
    .map_or(Ok(()), |status| {
        Err(format!("{} exited ({status}) before listening", guard.name()).into())
    })
}

/// Starts the vhost-tap binary `name` on `dir/<socket>` with `args`, capturing
/// to `capture` with the instance's seq file; it logs to `dir/<name>.log`.
fn start_tap(
    dir: &Path,
    name: &str,
    socket: &str,
    args: &[&OsStr],
    capture: &Path,
) -> Result<(ChildGuard, PathBuf), Box<dyn std::error::Error>> {
    let bin = workspace_bin(name)?;
    let socket = dir.join(socket);
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--socket")
        .arg(&socket)
        .args(args)
        .args(["--instance-id", "e2e-vm"])
        .arg("--capture")
        .arg(capture)
        .arg("--seq-file")
        .arg(dir.join("e2e-vm.seq"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut guard = ChildGuard::spawn(name, &mut cmd)?;
    wait_for_socket(&socket, &mut guard)?;
    Ok((guard, socket))
}

/// A vhost-tap-blk backend serving `disk`, capturing to `capture`.
fn start_blk(
    dir: &Path,
    disk: &Path,
    capture: &Path,
) -> Result<(ChildGuard, PathBuf), Box<dyn std::error::Error>> {
    let args = [
        "--image".as_ref(),
        disk.as_os_str(),
        "--device".as_ref(),
        "vda".as_ref(),
    ];
    start_tap(dir, "vhost-tap-blk", "blk.sock", &args, capture)
}

/// A vhost-tap-net backend whose TAP lives in `ns`, capturing to `capture`.
fn start_net(
    dir: &Path,
    ns: &NetNs,
    capture: &Path,
) -> Result<(ChildGuard, PathBuf), Box<dyn std::error::Error>> {
    let args: Vec<&OsStr> = ["--tap", TAP_NAME, "--netns", ns.name()]
        .into_iter()
        .chain(["--device", "net0", "--mac", guest::GUEST_MAC])
        .map(OsStr::new)
        .collect();
    start_tap(dir, "vhost-tap-net", "net.sock", &args, capture)
}

/// A blank disk and a network namespace, served by vhost-tap-blk and
/// vhost-tap-net that capture to files and share the instance's seq file.
/// Fields drop in order: backends, namespace, then the directory.
struct TapRig {
    blk: ChildGuard,
    net: ChildGuard,
    ns: NetNs,
    blk_sock: PathBuf,
    net_sock: PathBuf,
    disk: PathBuf,
    dir: tempfile::TempDir,
}

impl TapRig {
    fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let disk = dir.path().join("disk.raw");
        blank_disk(&disk)?;
        let ns = NetNs::create()?;
        let (blk, blk_sock) = start_blk(dir.path(), &disk, &dir.path().join("blk.events"))?;
        let (net, net_sock) = start_net(dir.path(), &ns, &dir.path().join("net.events"))?;
        Ok(Self {
            blk,
            net,
            ns,
            blk_sock,
            net_sock,
            disk,
            dir,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Gives the guest the rig's disk and NIC.
    fn attach(&self, cfg: &mut QemuConfig) {
        cfg.blk_sockets.push(self.blk_sock.clone());
        cfg.nets.push(NetDevice {
            socket: self.net_sock.clone(),
            mac: guest::GUEST_MAC.into(),
        });
    }

    /// Configures the namespace's end of the TAP once the guest's NIC is up,
    /// and starts the echo peer there.
    fn start_peer(&self) -> Result<EchoPeer, Box<dyn std::error::Error>> {
        self.ns.wait_for_link(TAP_NAME, Duration::from_secs(30))?;
        self.ns.configure(TAP_NAME, guest::PEER_IP_CIDR)?;
        Ok(EchoPeer::start(&self.ns, guest::PEER_PORT)?)
    }

    /// The backends' logs.
    fn logs(&self) -> [PathBuf; 2] {
        [
            self.path().join("vhost-tap-blk.log"),
            self.path().join("vhost-tap-net.log"),
        ]
    }

    /// Stops the backends (so the capture files are complete) and checks the
    /// image and both captures against the guest's `rounds`.
    fn stop_and_check(&mut self, token: &str, rounds: &[u32]) -> TestResult {
        self.blk.stop(Duration::from_secs(10));
        self.net.stop(Duration::from_secs(10));
        check_disk(&self.disk, token, rounds)?;
        let blk_events = read_events(&self.path().join("blk.events"))?;
        let net_events = read_events(&self.path().join("net.events"))?;
        check_seq(&[&blk_events, &net_events]);
        check_block_capture(&blk_events, token, rounds)?;
        check_net_capture(&net_events, token, rounds)
    }
}

fn read_events(path: &Path) -> Result<Vec<Event>, Box<dyn std::error::Error>> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for ev in EventReader::new(std::io::BufReader::new(f)) {
        out.push(Event::try_from(ev?)?);
    }
    Ok(out)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The disk image holds every block the given rounds wrote.
fn check_disk(disk: &Path, token: &str, rounds: &[u32]) -> TestResult {
    let bytes = std::fs::read(disk)?;
    for &r in rounds {
        for b in guest::disk_blocks(token, r) {
            let at = b.offset as usize;
            assert_eq!(
                &bytes[at..at + b.data.len()],
                &b.data[..],
                "disk image lacks block r{}b{} at {}",
                b.round,
                b.index,
                b.offset
            );
        }
    }
    Ok(())
}

/// Both backends share the instance's sequence counter (`--seq-file`): within
/// each capture `seq` grows, and together the captures cover one contiguous
/// range without duplicates.
fn check_seq(captures: &[&[Event]]) {
    let mut all = Vec::new();
    for (i, events) in captures.iter().enumerate() {
        assert!(!events.is_empty(), "capture {i}: no events captured");
        for w in events.windows(2) {
            assert!(
                w[1].seq > w[0].seq,
                "capture {i}: seq {} follows {}",
                w[1].seq,
                w[0].seq
            );
        }
        all.extend(events.iter().map(|e| e.seq));
    }
    all.sort_unstable();
    for w in all.windows(2) {
        assert_eq!(w[1], w[0] + 1, "merged seq jumps from {} to {}", w[0], w[1]);
    }
    for events in captures {
        assert!(
            events.iter().all(|e| e.instance.as_str() == "e2e-vm"),
            "wrong instance id"
        );
    }
}

/// The block capture holds, for every block of `rounds`: a write with its
/// sector and bytes, a flush after it, and a read of the same range whose
/// content hash is the hash of those bytes.
fn check_block_capture(events: &[Event], token: &str, rounds: &[u32]) -> TestResult {
    let blocks: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::Block(b) => Some((e.seq, b)),
            _ => None,
        })
        .collect();
    assert_eq!(
        blocks.len(),
        events.len(),
        "block capture holds non-block events"
    );
    for &r in rounds {
        for want in guest::disk_blocks(token, r) {
            let sector = want.offset / 512;
            let (wseq, w) = blocks
                .iter()
                .find(|(_, b)| b.op == BlockOp::Write && b.sector == sector)
                .ok_or_else(|| {
                    format!("no write captured at sector {sector} (r{r}b{})", want.index)
                })?;
            assert_eq!(
                w.len as usize,
                want.data.len(),
                "write length at sector {sector}"
            );
            assert!(
                w.data == want.data,
                "captured write data at sector {sector} differs"
            );
            assert_eq!(w.status, BlockStatus::Ok);
            assert!(
                blocks.iter().any(|(s, b)| *s > *wseq
                    && b.op == BlockOp::Flush
                    && b.status == BlockStatus::Ok),
                "no flush after the write at sector {sector}"
            );
            let (_, rd) = blocks
                .iter()
                .find(|(s, b)| *s > *wseq && b.op == BlockOp::Read && b.sector == sector)
                .ok_or_else(|| format!("no read captured at sector {sector} after its write"))?;
            assert_eq!(
                rd.len as usize,
                want.data.len(),
                "read length at sector {sector}"
            );
            assert_eq!(rd.status, BlockStatus::Ok);
            match &rd.content_hash {
                Some(ContentHash::Sha256(h)) => {
                    assert_eq!(
                        *h,
                        sha256(&want.data),
                        "SHA-256 of the read at sector {sector}"
                    )
                }
                Some(ContentHash::Xxh3_128(h)) => assert_eq!(
                    *h,
                    xxhash_rust::xxh3::xxh3_128(&want.data).to_be_bytes(),
                    "xxh3-128 of the read at sector {sector}"
                ),
                None => {
                    return Err(format!("read at sector {sector} carries no content hash").into())
                }
            }
        }
    }
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The net capture holds the guest's TCP message (TX), the peer's reply (RX)
/// and ICMP echo replies (RX) for every round.
fn check_net_capture(events: &[Event], token: &str, rounds: &[u32]) -> TestResult {
    let frames: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::Net(n) => Some(n),
            _ => None,
        })
        .collect();
    assert_eq!(
        frames.len(),
        events.len(),
        "net capture holds non-net events"
    );
    for &r in rounds {
        let msg = guest::net_message(token, r);
        let reply = guest::echo_reply(&msg);
        assert!(
            frames
                .iter()
                .any(|f| f.direction == Direction::Tx && contains(&f.frame, msg.as_bytes())),
            "no TX frame carries {msg:?}"
        );
        assert!(
            frames
                .iter()
                .any(|f| f.direction == Direction::Rx && contains(&f.frame, reply.as_bytes())),
            "no RX frame carries {reply:?}"
        );
    }
    // ICMP echo reply from the peer: IPv4, protocol 1, type 0.
    let icmp_replies = frames
        .iter()
        .filter(|f| {
            f.direction == Direction::Rx
                && f.frame.len() > 34
                && f.frame[12..14] == [0x08, 0x00]
                && f.frame[23] == 1
                && f.frame[14 + usize::from(f.frame[14] & 0x0f) * 4] == 0
        })
        .count();
    assert!(
        icmp_replies >= rounds.len(),
        "only {icmp_replies} ICMP echo replies captured"
    );
    // Every frame the guest sent comes from its MAC.
    let mac: Vec<u8> = guest::GUEST_MAC
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("GUEST_MAC is valid hex"))
        .collect();
    for f in frames.iter().filter(|f| f.direction == Direction::Tx) {
        assert_eq!(&f.frame[6..12], &mac[..], "TX frame from another MAC");
    }
    Ok(())
}

/// Waits for `VMR-DONE` and checks that `expect_ok` steps passed; on failure
/// shows the guest's markers and the tails of the backend `logs`.
fn assert_steps(qemu: &mut Qemu, expect_ok: u32, logs: &[PathBuf]) -> TestResult {
    let line = qemu.wait_for_serial("VMR-DONE", STEP_TIMEOUT)?;
    let done = guest::parse_done(&line).ok_or_else(|| format!("bad marker {line:?}"))?;
    let markers = guest::markers(&qemu.serial());
    assert_eq!(
        done,
        guest::Done {
            ok: expect_ok,
            fail: 0
        },
        "guest steps failed; markers:\n{}\n{}",
        markers.join("\n"),
        log_tails(logs)
    );
    Ok(())
}

fn log_tails(logs: &[PathBuf]) -> String {
    logs.iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"));
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("--- {} (tail):\n{}", p.display(), tail.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn token() -> String {
    format!("t{}", std::process::id())
}

#[test]
// Heavy: needs QEMU (TCG), root (netns, TAP), vhost-tap binaries, guest image (guest/linux/build.sh).
fn guest_disk_and_net_go_through_vhost_tap_and_are_captured() -> TestResult {
    let image = image();
    let mut rig = TapRig::start()?;
    let token = token();
    let mut cfg = QemuConfig::new(
        rig.path(),
        &image.kernel,
        &image.initrd,
        &guest::cmdline("disk:1,net:1", &token),
    );
    rig.attach(&mut cfg);
    let mut qemu = Qemu::start("qemu", cfg)?;
    let peer = rig.start_peer()?;

    let ready = qemu.wait_for_serial("VMR-READY", BOOT_TIMEOUT)?;
    assert!(
        ready.contains("disk=1 net=1"),
        "guest lacks a device: {ready}"
    );
    assert_steps(&mut qemu, 2, &rig.logs())?;
    qemu.wait_exit(Duration::from_secs(30))?;
    assert_eq!(peer.received(), vec![guest::net_message(&token, 1)]);

    // The guest's own read-back hashes match the patterns.
    let serial = qemu.serial();
    for b in guest::disk_blocks(&token, 1) {
        let want = format!(
            "off={} len={} sha256={}",
            b.offset,
            b.data.len(),
            hex(&sha256(&b.data))
        );
        assert!(serial.contains(&want), "guest did not read back {want}");
    }
    rig.stop_and_check(&token, &[1])
}

#[test]
// Heavy: needs QEMU (TCG), root (netns, TAP), vhost-tap binaries, guest image (guest/linux/build.sh).
fn guest_migrated_to_a_file_continues_on_the_same_vhost_tap_backends() -> TestResult {
    let image = image();
    let mut rig = TapRig::start()?;
    let token = token();
    let steps = "disk:1,net:1,wait,disk:2,net:2";
    let src_dir = rig.path().join("src");
    let dst_dir = rig.path().join("dst");
    std::fs::create_dir_all(&src_dir)?;
    std::fs::create_dir_all(&dst_dir)?;
    let mut cfg = QemuConfig::new(
        &src_dir,
        &image.kernel,
        &image.initrd,
        &guest::cmdline(steps, &token),
    );
    rig.attach(&mut cfg);
    let mut src = Qemu::start("qemu-source", cfg.clone())?;
    let peer = rig.start_peer()?;
    src.wait_for_serial("VMR-READY", BOOT_TIMEOUT)?;
    src.wait_for_serial("VMR-WAIT", STEP_TIMEOUT)?;
    let before = guest::markers(&src.serial());
    assert!(
        before.iter().any(|m| m == "VMR-STEP-OK disk:1")
            && before.iter().any(|m| m == "VMR-STEP-OK net:1"),
        "first round failed:\n{}\n{}",
        before.join("\n"),
        log_tails(&rig.logs())
    );

    // Stop, migrate to a file, and let the source go (the backends then wait
    // for the next frontend).
    // The destination loads the file and continues on the same backends.
    let mut dst = migrate_through_file(src, cfg, rig.path(), dst_dir)?;
    assert!(
        std::fs::metadata(rig.path().join("vm.state"))?.len() > 0,
        "empty migration stream"
    );
    dst.wait_for_serial("VMR-RESUMED go", Duration::from_secs(60))?;
    let line = dst.wait_for_serial("VMR-DONE", STEP_TIMEOUT)?;
    let done = guest::parse_done(&line).ok_or_else(|| format!("bad marker {line:?}"))?;
    assert_eq!(
        done,
        guest::Done { ok: 5, fail: 0 },
        "steps failed; markers:\n{}\n{}",
        guest::markers(&dst.serial()).join("\n"),
        log_tails(&rig.logs())
    );
    dst.wait_exit(Duration::from_secs(30))?;
    assert_eq!(
        peer.received(),
        vec![guest::net_message(&token, 1), guest::net_message(&token, 2)]
    );

    rig.stop_and_check(&token, &[1, 2])
}

/// Checks the harness and the guest image independently of vhost-tap: the
/// same disk workload and a migration to a file on qemu-storage-daemon.
#[test]
// Heavy: needs QEMU (TCG), qemu-storage-daemon, guest image (guest/linux/build.sh).
fn guest_image_and_migration_work_on_qemu_storage_daemon() -> TestResult {
    let image = image();
    let qsd = PathBuf::from("/usr/bin/qemu-storage-daemon");
    assert!(
        qsd.is_file(),
        "{} missing: install qemu-system-common",
        qsd.display()
    );
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.raw");
    blank_disk(&disk)?;
    let socket = dir.path().join("qsd.sock");
    let log = std::fs::File::create(dir.path().join("qsd.log"))?;
    let mut cmd = Command::new(&qsd);
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk,filename={},cache.direct=off",
            disk.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut qsd_guard = ChildGuard::spawn("qemu-storage-daemon", &mut cmd)?;
    wait_for_socket(&socket, &mut qsd_guard)?;

    let token = token();
    disk_only_migration(&image, dir.path(), &disk, socket, &token)
}

/// Migrates `src` (started from `cfg`) to `dir/vm.state`, quits it, starts
/// the destination QEMU in `dst_dir` from that file and lets the waiting
/// guest go on.
fn migrate_through_file(
    mut src: Qemu,
    cfg: QemuConfig,
    dir: &Path,
    dst_dir: PathBuf,
) -> Result<Qemu, Box<dyn std::error::Error>> {
    let state = dir.join("vm.state");
    src.migrate_to_file(&state, Duration::from_secs(120))?;
    src.quit(Duration::from_secs(10))?;
    let mut dst_cfg = cfg;
    dst_cfg.work_dir = dst_dir;
    dst_cfg.incoming = Some(format!("exec:cat '{}'", state.display()));
    let mut dst = Qemu::start("qemu-destination", dst_cfg)?;
    dst.finish_incoming(Duration::from_secs(120))?;
    dst.send_serial("go")?;
    Ok(dst)
}

/// Boots a disk-only guest on the vhost-user-blk backend at `socket`, runs
/// `disk:1`, migrates it to a file, continues on a second QEMU and runs
/// `disk:2`; checks the markers and the disk image.
fn disk_only_migration(
    image: &GuestImage,
    dir: &Path,
    disk: &Path,
    socket: PathBuf,
    token: &str,
) -> TestResult {
    let src_dir = dir.join("src");
    let dst_dir = dir.join("dst");
    std::fs::create_dir_all(&src_dir)?;
    std::fs::create_dir_all(&dst_dir)?;
    let mut cfg = QemuConfig::new(
        &src_dir,
        &image.kernel,
        &image.initrd,
        &guest::cmdline("disk:1,wait,disk:2", token),
    );
    cfg.blk_sockets.push(socket);
    let mut src = Qemu::start("qemu-source", cfg.clone())?;
    let ready = src.wait_for_serial("VMR-READY", BOOT_TIMEOUT)?;
    assert!(ready.contains("disk=1"), "guest has no disk: {ready}");
    src.wait_for_serial("VMR-WAIT", STEP_TIMEOUT)?;
    check_disk(disk, token, &[1])?;

    let mut dst = migrate_through_file(src, cfg, dir, dst_dir)?;
    let line = dst.wait_for_serial("VMR-DONE", STEP_TIMEOUT)?;
    assert_eq!(
        guest::parse_done(&line),
        Some(guest::Done { ok: 3, fail: 0 }),
        "markers:\n{}",
        guest::markers(&dst.serial()).join("\n")
    );
    dst.wait_exit(Duration::from_secs(30))?;
    check_disk(disk, token, &[1, 2])?;
    Ok(())
}

/// The disk half of the migration scenario on vhost-tap-blk alone: the
/// backend accepts the destination QEMU, the guest's later writes land on the
/// same image, and one capture file records both rounds with contiguous seq.
#[test]
// Heavy: needs QEMU (TCG), vhost-tap-blk binary, guest image (guest/linux/build.sh).
fn guest_disk_survives_migration_on_vhost_tap_blk() -> TestResult {
    let image = image();
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.raw");
    blank_disk(&disk)?;
    let capture = dir.path().join("blk.events");
    let (mut blk, socket) = start_blk(dir.path(), &disk, &capture)?;
    let token = token();
    disk_only_migration(&image, dir.path(), &disk, socket, &token)?;
    blk.stop(Duration::from_secs(10));
    let events = read_events(&capture)?;
    check_seq(&[&events]);
    check_block_capture(&events, &token, &[1, 2])?;
    Ok(())
}

/// The guest's network step and the echo peer over a plain TAP that QEMU
/// opens itself inside the test's namespace: the reference for the vhost-tap
/// NIC tests (same guest, peer and namespace; only the backend differs).
#[test]
// Heavy: needs QEMU (TCG), root (netns, TAP), guest image (guest/linux/build.sh).
fn guest_network_step_works_over_a_qemu_tap_in_a_namespace() -> TestResult {
    let image = image();
    let dir = tempfile::tempdir()?;
    let ns = NetNs::create()?;
    let token = token();
    let mut cfg = QemuConfig::new(
        dir.path(),
        &image.kernel,
        &image.initrd,
        &guest::cmdline("net:1", &token),
    );
    cfg.netns = Some(ns.name().to_string());
    cfg.extra_args = [
        "-netdev",
        "tap,id=t0,ifname=qtap0,script=no,downscript=no",
        "-device",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("virtio-net-pci,netdev=t0,mac={}", guest::GUEST_MAC)])
    .collect();
    let mut qemu = Qemu::start("qemu", cfg)?;
    ns.wait_for_link("qtap0", Duration::from_secs(30))?;
    ns.configure("qtap0", guest::PEER_IP_CIDR)?;
    let peer = EchoPeer::start(&ns, guest::PEER_PORT)?;
    assert_steps(&mut qemu, 1, &[])?;
    assert!(
        qemu.serial().contains("VMR-PING r=1 ok"),
        "guest could not ping the peer"
    );
    qemu.wait_exit(Duration::from_secs(30))?;
    assert_eq!(peer.received(), vec![guest::net_message(&token, 1)]);
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
#[should_panic(expected = "no events captured")]
fn capture_checks_reject_an_empty_capture() {
    check_seq(&[&[]]);
}

/// The network namespace and the echo peer the NIC tests rely on.
#[test]
// Heavy: needs root (network namespaces), busybox.
fn echo_peer_answers_inside_its_namespace() -> TestResult {
    let ns = NetNs::create()?;
    let peer = EchoPeer::start(&ns, guest::PEER_PORT)?;
    let out = ns
        .command("sh")
        .arg("-c")
        .arg(format!(
            "echo hello | timeout 10 busybox nc 127.0.0.1 {}",
            guest::PEER_PORT
        ))
        .output()?;
    assert!(out.status.success(), "nc failed: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "vmr-echo:hello"
    );
    assert_eq!(peer.received(), vec!["hello".to_string()]);
    let name = ns.name().to_string();
    drop(peer);
    drop(ns);
    let list =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .into_owned();
    assert!(!list.contains(&name), "namespace {name} left behind");
    Ok(())
}
