//! The demo-linux machine image under QEMU (TCG) on real vhost-tap backends:
//! its key-value service (vmr-kv-1) stores records on the recorded disk and
//! answers over the recorded NIC, and a PUT with an over-long key panics the
//! guest kernel, which QEMU reports through pvpanic as `GUEST_PANICKED` and
//! keeps paused for inspection.
//!
//! The image is read through its `image.toml` with the driver layer's loader
//! (`vmr_hypervisor::image::MachineImage`), so the test also shows that the
//! manifest `guest/linux/build.sh` writes is one the driver layer accepts.
//!
//! Heavy: needs qemu-system-x86_64, root (network namespaces, TAP devices),
//! the demo-linux image (`guest/linux/build.sh`) and the vhost-tap binaries
//! (`cargo build -p vhost-tap --bins`). Run with
//! `cargo test -p vmr-testkit --test demo_linux_qemu`.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vmr_hypervisor::image::{DiskSource, MachineImage};
use vmr_proto::framing::EventReader;
use vmr_proto::{BlockOp, BlockStatus, Direction, Event, Payload};
use vmr_testkit::guest::{self, KV_BLOCK, KV_KEY_MAX};
use vmr_testkit::qemu::{NetDevice, NetNs, Qemu, QemuConfig};
use vmr_testkit::{workspace_bin, ChildGuard};

type TestResult = Result<(), Box<dyn std::error::Error>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bound on every wait for the guest (TCG is slow; a boot takes seconds).
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one reply of the service.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// TAP device vhost-tap-net creates in the test's namespace.
const TAP_NAME: &str = "vmrkv0";
const INSTANCE: &str = "demo-linux-e2e";

fn demo_image() -> MachineImage {
    let dir = guest::demo_linux_dir().unwrap_or_else(|e| panic!("{e}"));
    MachineImage::load(&dir).unwrap_or_else(|e| panic!("{e}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The manifests of both images load with the driver layer's loader and say
/// what the images are.
#[test]
// Heavy: needs the demo-linux image (guest/linux/build.sh), make and gcc.
fn image_manifests_load_with_the_driver_layer() -> TestResult {
    let img = demo_image();
    assert_eq!(img.name, guest::DEMO_LINUX);
    assert_eq!(img.drivers, vec!["qemu".to_string()]);
    assert!(img.initrd.is_some(), "demo-linux has an initramfs");
    let args: Vec<&str> = img.cmdline.split_whitespace().collect();
    assert!(args.contains(&"vmr.workload=service"), "{}", img.cmdline);
    assert!(args.contains(&"console=ttyS0"), "{}", img.cmdline);
    // A panicked kernel must wait for the hypervisor, never reboot.
    for a in args.iter().filter(|a| a.starts_with("panic=")) {
        assert_eq!(*a, "panic=0", "the kernel would reboot after a panic");
    }
    assert!(
        img.qemu_devices.iter().any(|d| d.starts_with("pvpanic")),
        "demo-linux needs a pvpanic device: {:?}",
        img.qemu_devices
    );
    assert_eq!(img.disks.len(), 1);
    assert_eq!(img.disks[0].name, "vda");
    assert_eq!(img.disks[0].source, DiskSource::Blank(64 << 20));
    assert_eq!(img.nics.len(), 1);
    assert_eq!(img.nics[0].mac.to_string(), guest::GUEST_MAC);
    assert_eq!(img.nics[0].ip, Some((guest::GUEST_IP.parse()?, 24)));
    assert_eq!(img.nics[0].peer, Some(guest::PEER_IP.parse()?));
    let service = img.service.as_ref().ok_or("demo-linux names no service")?;
    assert_eq!(service.port, guest::SERVICE_PORT);
    assert_eq!(service.protocol, guest::SERVICE_PROTOCOL);

    // The freestanding test guest, built the way the VMM tests build it.
    let out = tempfile::tempdir()?;
    let elf = vmr_vmm::guest_abi::build_test_guest(out.path())?;
    let tg = MachineImage::load(out.path())?;
    assert_eq!(tg.name, "test-guest");
    assert_eq!(tg.drivers, vec!["microvm".to_string()]);
    assert_eq!(tg.kernel, elf.canonicalize()?);
    assert_eq!(tg.initrd, None);
    assert_eq!(tg.cmdline, "");
    assert_eq!((tg.memory_mib, tg.vcpus), (128, 1));
    Ok(())
}

fn wait_for_socket(path: &Path, guard: &mut ChildGuard) -> TestResult {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = guard.try_wait() {
            return Err(format!("{} exited ({status}) before listening", guard.name()).into());
        }
        if start.elapsed() > Duration::from_secs(15) {
            return Err(format!("{} did not create {}", guard.name(), path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts vhost-tap binary `name` on `dir/<name>.sock`, capturing to
/// `dir/<name>.events` with the instance's shared seq file.
fn start_backend(
    dir: &Path,
    name: &str,
    args: &[&OsStr],
) -> Result<(ChildGuard, PathBuf), Box<dyn std::error::Error>> {
    let bin = workspace_bin(name)?;
    let socket = dir.join(format!("{name}.sock"));
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--socket")
        .arg(&socket)
        .args(args)
        .args(["--instance-id", INSTANCE])
        .arg("--capture")
        .arg(dir.join(format!("{name}.events")))
        .arg("--seq-file")
        .arg(dir.join(format!("{INSTANCE}.seq")))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut guard = ChildGuard::spawn(name, &mut cmd)?;
    wait_for_socket(&socket, &mut guard)?;
    Ok((guard, socket))
}

fn read_events(path: &Path) -> Result<Vec<Event>, Box<dyn std::error::Error>> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for ev in EventReader::new(std::io::BufReader::new(f)) {
        out.push(Event::try_from(ev?)?);
    }
    Ok(out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// One client connection to the guest's service.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(addr: SocketAddrV4) -> Result<Self, BoxError> {
        let stream = TcpStream::connect_timeout(&addr.into(), REPLY_TIMEOUT)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    fn send(&mut self, line: &str) -> Result<(), BoxError> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        Ok(())
    }

    /// Sends `line` and returns the service's one-line answer.
    fn ask(&mut self, line: &str) -> Result<String, BoxError> {
        self.send(line)?;
        let mut reply = String::new();
        let n = self
            .reader
            .read_line(&mut reply)
            .map_err(|e| format!("no answer to {:.40}...: {e}", line))?;
        if n == 0 {
            return Err(format!("connection closed after {:.40}...", line).into());
        }
        Ok(reply.trim_end().to_string())
    }
}

/// Runs `f` on a thread inside the network namespace `ns` (the peer side of
/// the guest's NIC) and returns its result.
fn in_netns<T: Send>(
    ns: &NetNs,
    f: impl FnOnce() -> Result<T, BoxError> + Send,
) -> Result<T, Box<dyn std::error::Error>> {
    let result = std::thread::scope(|s| {
        s.spawn(|| -> Result<T, BoxError> {
            ns.enter()?;
            f()
        })
        .join()
    });
    match result {
        Ok(r) => r.map_err(|e| e.to_string().into()),
        Err(_) => Err("client thread panicked".into()),
    }
}

/// The ordinary conversation over two interleaved connections and a third
/// one after they closed; returns (request, answer) pairs in order.
fn ordinary_requests(addr: SocketAddrV4, key200: &str) -> Result<Vec<(String, String)>, BoxError> {
    let mut a = Conn::open(addr)?;
    let mut b = Conn::open(addr)?;
    let mut pairs = Vec::new();
    let script: Vec<(usize, String)> = vec![
        (0, "PUT alpha one".into()),
        (1, "PUT beta two words".into()),
        (0, format!("PUT {key200} v200")),
        (1, "GET 2".into()),
        (0, "GET 0".into()),
        (1, "GET 1".into()),
        (1, "GET 99".into()),
        (0, "HELLO".into()),
        (0, "PUT lonely".into()),
        (1, "GET x".into()),
        (0, "PUT gamma 3\r".into()),
    ];
    for (who, line) in script {
        let conn = if who == 0 { &mut a } else { &mut b };
        let reply = conn.ask(&line)?;
        pairs.push((line, reply));
    }
    // A third connection after the first two closed sees the same records.
    drop(a);
    drop(b);
    let mut c = Conn::open(addr)?;
    let line = "GET 3".to_string();
    let reply = c.ask(&line)?;
    pairs.push((line, reply));
    Ok(pairs)
}

/// Sends the crashing request; returns whatever came back within a few
/// seconds (nothing is expected: the guest panics).
fn crashing_request(addr: SocketAddrV4, key201: &str) -> Result<Option<String>, BoxError> {
    let mut c = Conn::open(addr)?;
    c.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))?;
    c.send(&format!("PUT {key201} boom"))?;
    let mut reply = String::new();
    Ok(match c.reader.read_line(&mut reply) {
        Ok(n) if n > 0 => Some(reply.trim_end().to_string()),
        _ => None,
    })
}

/// The answers `ordinary_requests` must get, each with the start of its request.
fn expected_answers(key200: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PUT alpha", "OK 0".into()),
        ("PUT beta", "OK 1".into()),
        ("PUT kkk", "OK 2".into()),
        ("GET 2", format!("VAL 2 {key200} v200")),
        ("GET 0", "VAL 0 alpha one".into()),
        ("GET 1", "VAL 1 beta two words".into()),
        ("GET 99", "ERR nosuch".into()),
        ("HELLO", "ERR unknown-command".into()),
        ("PUT lonely", "ERR usage: PUT <key> <value>".into()),
        ("GET x", "ERR badindex".into()),
        ("PUT gamma", "OK 3".into()),
        ("GET 3", "VAL 3 gamma 3".into()),
    ]
}

fn wait_for_status(
    qemu: &mut Qemu,
    want: &str,
    timeout: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    loop {
        let status = qemu.status()?;
        if status == want {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            let serial = qemu.serial();
            let tail = &serial[serial.len().saturating_sub(3000)..];
            return Err(format!(
                "QEMU status is {status:?}, not {want:?}, after {} s; serial tail:\n{tail}",
                timeout.as_secs()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
// Heavy: needs QEMU (TCG), root (netns, TAP), vhost-tap binaries, the demo-linux image (guest/linux/build.sh).
fn demo_linux_service_stores_records_and_an_overlong_key_panics_the_guest() -> TestResult {
    let img = demo_image();
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("vda.raw");
    let disk_bytes = match img.disks.first().map(|d| &d.source) {
        Some(DiskSource::Blank(bytes)) => *bytes,
        other => {
            return Err(format!("demo-linux's first disk is {other:?}, not a blank disk").into())
        }
    };
    std::fs::File::create(&disk)?.set_len(disk_bytes)?;
    let nic = img.nics.first().ok_or("demo-linux has no NIC")?;
    let mac = nic.mac.to_string();
    let (guest_ip, prefix) = nic.ip.ok_or("demo-linux's NIC has no address")?;
    let peer_ip = nic.peer.ok_or("demo-linux's NIC names no peer")?;
    let port = img
        .service
        .as_ref()
        .ok_or("demo-linux names no service")?
        .port;

    // Backends first (QEMU connects to their sockets), then the VM.
    let ns = NetNs::create()?;
    let (mut blk, blk_sock) = start_backend(
        dir.path(),
        "vhost-tap-blk",
        &[
            "--image".as_ref(),
            disk.as_os_str(),
            "--device".as_ref(),
            "vda".as_ref(),
        ],
    )?;
    let net_args: Vec<&OsStr> = [
        "--tap",
        TAP_NAME,
        "--netns",
        ns.name(),
        "--device",
        "net0",
        "--mac",
        &mac,
    ]
    .into_iter()
    .map(OsStr::new)
    .collect();
    let (mut net, net_sock) = start_backend(dir.path(), "vhost-tap-net", &net_args)?;

    let initrd = img.initrd.clone().ok_or("demo-linux has no initrd")?;
    let mut cfg = QemuConfig::new(dir.path(), &img.kernel, &initrd, &img.cmdline);
    cfg.memory_mib = img.memory_mib;
    cfg.blk_sockets.push(blk_sock);
    cfg.nets.push(NetDevice {
        socket: net_sock,
        mac,
    });
    for d in &img.qemu_devices {
        cfg.extra_args.extend(["-device".to_string(), d.clone()]);
    }
    // A panicked guest stays paused (state guest-panicked) for inspection.
    cfg.extra_args
        .extend(["-action".to_string(), "panic=pause".to_string()]);
    let mut qemu = Qemu::start("qemu-demo-linux", cfg)?;

    ns.wait_for_link(TAP_NAME, Duration::from_secs(30))?;
    ns.configure(TAP_NAME, &format!("{peer_ip}/{prefix}"))?;

    let ready = qemu.wait_for_serial("VMR-READY", GUEST_TIMEOUT)?;
    assert!(
        ready.contains("disk=1 net=1 pvpanic=1"),
        "guest lacks a device: {ready}"
    );
    let service = qemu.wait_for_serial("VMR-SERVICE-READY", GUEST_TIMEOUT)?;
    assert_eq!(
        service,
        format!("VMR-SERVICE-READY ip={guest_ip} port={port}")
    );

    // Ordinary requests, including a key of exactly KV_KEY_MAX bytes.
    let key200 = "k".repeat(KV_KEY_MAX);
    let addr = SocketAddrV4::new(guest_ip, port);
    let pairs = in_netns(&ns, || ordinary_requests(addr, &key200))?;
    let want = expected_answers(&key200);
    assert_eq!(pairs.len(), want.len());
    for ((req, got), (prefix, answer)) in pairs.iter().zip(&want) {
        assert!(
            req.starts_with(prefix),
            "script order: {req:.20} vs {prefix}"
        );
        assert_eq!(got, answer, "answer to {req:.60}");
    }

    // The service printed one VMR-STORED per record, and the disk image
    // (served by vhost-tap-blk) holds each record's block.
    let records: Vec<(u64, &str, &str)> = vec![
        (0, "alpha", "one"),
        (1, "beta", "two words"),
        (2, &key200, "v200"),
        (3, "gamma", "3"),
    ];
    qemu.wait_for_serial("VMR-STORED n=3 ", GUEST_TIMEOUT)?;
    let stored: Vec<guest::Stored> = guest::markers(&qemu.serial())
        .iter()
        .filter_map(|m| guest::parse_stored(m))
        .collect();
    assert_eq!(
        stored.len(),
        records.len(),
        "VMR-STORED markers: {stored:?}"
    );
    let image = std::fs::read(&disk)?;
    for (&(n, key, value), st) in records.iter().zip(&stored) {
        let block = guest::kv_record(n, key, value).ok_or("record fits a block")?;
        assert_eq!(st.n, n);
        assert_eq!(st.keylen, key.len());
        assert_eq!(st.sha256, sha256_hex(&block), "guest's hash of record {n}");
        let at = n as usize * KV_BLOCK;
        assert_eq!(
            sha256_hex(&image[at..at + KV_BLOCK]),
            st.sha256,
            "disk image block {n}"
        );
    }
    assert!(
        image[records.len() * KV_BLOCK..].iter().all(|&b| b == 0),
        "the disk holds more than the records"
    );
    assert_eq!(
        qemu.status()?,
        "running",
        "ordinary requests must not stop the guest"
    );

    // The bug: a key one byte over the buffer panics the guest kernel.
    let key201 = "k".repeat(KV_KEY_MAX + 1);
    let reply = in_netns(&ns, || crashing_request(addr, &key201))?;
    assert!(
        !reply.as_deref().is_some_and(|r| r.starts_with("OK")),
        "the overflowing PUT was stored: {reply:?}"
    );
    wait_for_status(&mut qemu, "guest-panicked", GUEST_TIMEOUT)?;
    let serial = qemu.serial();
    assert!(
        guest::markers(&serial)
            .iter()
            .any(|m| m == &format!("VMR-OVERFLOW keylen={}", KV_KEY_MAX + 1)),
        "no VMR-OVERFLOW marker"
    );
    assert!(
        serial.contains("Kernel panic"),
        "no kernel panic on the console"
    );
    let panicked: Vec<_> = qemu
        .qmp()
        .events
        .iter()
        .filter(|e| e["event"] == "GUEST_PANICKED")
        .cloned()
        .collect();
    assert!(
        !panicked.is_empty(),
        "no GUEST_PANICKED event: {:?}",
        qemu.qmp().events
    );
    assert_eq!(panicked[0]["data"]["action"], "pause", "{}", panicked[0]);

    // Stop everything; then the captures are complete.
    qemu.quit(Duration::from_secs(10))?;
    blk.stop(Duration::from_secs(10));
    net.stop(Duration::from_secs(10));
    check_block_capture(
        &read_events(&dir.path().join("vhost-tap-blk.events"))?,
        &records,
    )?;
    check_net_capture(
        &read_events(&dir.path().join("vhost-tap-net.events"))?,
        &key200,
        &key201,
    )?;
    drop(ns);
    Ok(())
}

/// The block capture holds each record's write (sector n*8, the block's
/// bytes) with a flush after it, and no write of the overflowing record.
fn check_block_capture(events: &[Event], records: &[(u64, &str, &str)]) -> TestResult {
    let blocks: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::Block(b) => Some((e.seq, b)),
            _ => None,
        })
        .collect();
    assert!(!blocks.is_empty(), "no block events captured");
    for &(n, key, value) in records {
        let want = guest::kv_record(n, key, value).ok_or("record fits a block")?;
        let sector = n * (KV_BLOCK as u64 / 512);
        let (wseq, w) = blocks
            .iter()
            .find(|(_, b)| b.op == BlockOp::Write && b.sector == sector)
            .ok_or_else(|| format!("no write of record {n} (sector {sector}) captured"))?;
        assert_eq!(w.status, BlockStatus::Ok);
        assert!(w.data == want, "captured write of record {n} differs");
        assert!(
            blocks
                .iter()
                .any(|(s, b)| s > wseq && b.op == BlockOp::Flush && b.status == BlockStatus::Ok),
            "no flush after the write of record {n}"
        );
    }
    let next_sector = records.len() as u64 * (KV_BLOCK as u64 / 512);
    assert!(
        !blocks
            .iter()
            .any(|(_, b)| b.op == BlockOp::Write && b.sector == next_sector),
        "the overflowing record reached the disk"
    );
    Ok(())
}

/// The net capture holds the requests the guest received (RX), its answers
/// (TX), and the crashing request: the input a replay must feed a clone.
fn check_net_capture(events: &[Event], key200: &str, key201: &str) -> TestResult {
    let frames: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::Net(n) => Some(n),
            _ => None,
        })
        .collect();
    let rx = |needle: &str| {
        frames
            .iter()
            .any(|f| f.direction == Direction::Rx && contains(&f.frame, needle.as_bytes()))
    };
    let tx = |needle: &str| {
        frames
            .iter()
            .any(|f| f.direction == Direction::Tx && contains(&f.frame, needle.as_bytes()))
    };
    assert!(rx("PUT alpha one\n"), "no RX frame carries the first PUT");
    assert!(
        rx(&format!("PUT {key200} v200\n")),
        "no RX frame carries the 200-byte key"
    );
    assert!(
        rx(&format!("PUT {key201} boom\n")),
        "no RX frame carries the crashing PUT"
    );
    assert!(
        tx("OK 0\n") && tx("VAL 1 beta two words\n"),
        "answers not captured"
    );
    Ok(())
}
