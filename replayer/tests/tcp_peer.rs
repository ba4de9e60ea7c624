//! The recorded peer against the real Linux TCP stack.
//!
//! Two network namespaces joined by a veth pair stand in for the guest and
//! the network: namespace S runs a small TCP server on 10.9.0.2 (the
//! "guest"), namespace C holds the clients on 10.9.0.1 (the "peer"). A
//! conversation is recorded with an AF_PACKET socket on C's end: three
//! concurrent client connections (peer-initiated) and one connection the
//! server opens back to the client (guest-initiated). Then the server is
//! replaced by a fresh process, whose kernel picks new initial sequence
//! numbers, timestamps and ephemeral ports — the clone's situation — C's
//! address is removed so C's kernel stays out of it, and the recording is
//! replayed through the AF_PACKET socket with [`TcpPeer`] in between.
//!
//! Needs root, iproute2 (`ip`) and python3. Nothing is left behind: the
//! server and client processes are killed and the namespaces deleted.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use replayer::net::{
    Action, Direction, Divergence, Next, PeerConfig, RecordedFrame, Report, Setup, TcpPeer,
};

const SERVER_PY: &str = r#"
import os, socket, sys, threading
out = sys.argv[1]
# "PORT": answer the second request of that client port with BAD instead of
# ANS; "PORT+": with BAD! (one byte longer).
arg = sys.argv[2] if len(sys.argv) > 2 else "0"
diverge, longer = int(arg.rstrip("+")), arg.endswith("+")
os.makedirs(out, exist_ok=True)

def save(name, data):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(out, name))

def readline(s):
    got = b""
    while not got.endswith(b"\n"):
        d = s.recv(4096)
        if not d:
            break
        got += d
    return got

def callback(port):
    s = socket.create_connection(("10.9.0.1", port), timeout=20)
    sent = b"HELLO from the server\n"
    s.sendall(sent)
    got = readline(s)
    s.close()
    save("cb-in", got)
    save("cb-out", sent)

def serve(c, addr):
    port = addr[1]
    c.settimeout(30)
    got = sent = buf = b""
    n = 0
    while True:
        d = c.recv(4096)
        if not d:
            break
        got += d
        buf += d
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            n += 1
            if line.startswith(b"CALLBACK "):
                threading.Thread(target=callback, args=(int(line.split()[1]),)).start()
                ans = b"OK calling back\n"
            else:
                ans = b"ANS " + line.upper() + b" " + str(len(line)).encode() + b"\n"
                if port == diverge and n == 2:
                    ans = (b"BAD!" if longer else b"BAD") + ans[3:]
            c.sendall(ans)
            sent += ans
    c.close()
    save("in-%d" % port, got)
    save("out-%d" % port, sent)

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.9.0.2", 7000))
srv.listen(16)
print("ready", flush=True)
while True:
    c, a = srv.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"#;

const CLIENT_PY: &str = r#"
import socket, threading

def readline(s):
    got = b""
    while not got.endswith(b"\n"):
        d = s.recv(4096)
        if not d:
            raise SystemExit("connection closed early")
        got += d
    return got

lst = socket.socket()
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("10.9.0.1", 7001))
lst.listen(1)
lst.settimeout(20)

def cb():
    c, a = lst.accept()
    c.settimeout(20)
    hello = readline(c)
    c.sendall(b"WELCOME " + hello.upper())
    while c.recv(4096):
        pass
    c.close()

def conn(i):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.9.0.1", 40000 + i))
    s.settimeout(20)
    s.connect(("10.9.0.2", 7000))
    if i == 4:
        # Bulk: more than the receiver's initial window, in many segments.
        reqs = [b"bulk " + bytes(ord("a") + k % 26 for k in range(60000))]
    else:
        reqs = [b"CALLBACK 7001"] if i == 1 else []
        reqs += [b"req %d.%d %s" % (i, j, b"abc" * (5 * j + i)) for j in range(4)]
    for r in reqs:
        s.sendall(r + b"\n")
        readline(s)
    s.shutdown(socket.SHUT_WR)
    while s.recv(4096):
        pass
    s.close()

threads = [threading.Thread(target=cb)] + [threading.Thread(target=conn, args=(i,)) for i in (1, 2, 3, 4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("done", flush=True)
"#;

const PACKET_OUTGOING: u8 = 4;
const ETH_P_ALL: u16 = 0x0003;

fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn output(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails (never skips) when a prerequisite is missing.
fn check_prerequisites() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "prerequisite missing: this test needs root (network namespaces, AF_PACKET)"
    );
    for (tool, arg) in [("ip", "-V"), ("python3", "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "prerequisite missing: `{tool}` (iproute2 / python3) is needed"
        );
    }
}

/// The two namespaces and the veth pair; deleted on drop.
struct Net {
    s: String,
    c: String,
    s_if: String,
    c_if: String,
}

impl Net {
    fn create() -> Net {
        let tag = std::process::id() % 100_000;
        let net = Net {
            s: format!("vmrtcpS{tag}"),
            c: format!("vmrtcpC{tag}"),
            s_if: format!("vts{tag}"),
            c_if: format!("vtc{tag}"),
        };
        run(&["ip", "netns", "add", &net.s]);
        run(&["ip", "netns", "add", &net.c]);
        for ns in [&net.s, &net.c] {
            // IPv4 only keeps the recording to the conversation; no forwarding
            // in C, so C's kernel drops what is not for it without an answer.
            net.exec_sh(
                ns,
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
                 echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; \
                 echo 0 > /proc/sys/net/ipv4/ip_forward",
            );
        }
        run(&[
            "ip", "link", "add", &net.s_if, "netns", &net.s, "type", "veth", "peer", "name",
            &net.c_if, "netns", &net.c,
        ]);
        run(&[
            "ip",
            "-n",
            &net.s,
            "addr",
            "add",
            "10.9.0.2/24",
            "dev",
            &net.s_if,
        ]);
        run(&[
            "ip",
            "-n",
            &net.c,
            "addr",
            "add",
            "10.9.0.1/24",
            "dev",
            &net.c_if,
        ]);
        // C sends MTU-sized frames (no segmentation offload) so each
        // recorded frame can be injected again as it is.
        run(&[
            "ip",
            "-n",
            &net.c,
            "link",
            "set",
            &net.c_if,
            "gso_max_segs",
            "1",
        ]);
        for (ns, dev) in [(&net.s, &net.s_if), (&net.c, &net.c_if)] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        net
    }

    fn exec_sh(&self, ns: &str, script: &str) {
        run(&["ip", "netns", "exec", ns, "sh", "-c", script]);
    }

    fn guest_mac(&self) -> [u8; 6] {
        let text = output(&["ip", "-n", &self.s, "-o", "link", "show", "dev", &self.s_if]);
        let hex = text
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("veth has a MAC address");
        let mut mac = [0u8; 6];
        for (m, h) in mac.iter_mut().zip(hex.split(':')) {
            *m = u8::from_str_radix(h, 16).expect("ip prints hex MACs");
        }
        mac
    }

    /// `Tcp: InCsumErrors` of namespace S.
    fn s_tcp_csum_errors(&self) -> u64 {
        let text = output(&["ip", "netns", "exec", &self.s, "cat", "/proc/net/snmp"]);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
        let names: Vec<&str> = lines[0].split_whitespace().collect();
        let values: Vec<&str> = lines[1].split_whitespace().collect();
        let i = names
            .iter()
            .position(|n| *n == "InCsumErrors")
            .expect("kernel reports InCsumErrors");
        values[i].parse().expect("a counter")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.s, &self.c] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn start(ns: &str, script: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-u"])
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python3");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    fn expect_line(&self, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l == want => return,
                Ok(_) => {}
                Err(e) => panic!("no {want:?} from the process within {timeout:?}: {e}"),
            }
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An AF_PACKET socket bound to one interface of a namespace.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn open(ns: &str, ifname: &str) -> PacketSocket {
        let ns_path = format!("/run/netns/{ns}");
        let ifname = CString::new(ifname).expect("no NUL in the name");
        // The socket belongs to the namespace it is created in; a thread of
        // its own enters the namespace so the test's threads stay outside.
        let fd = std::thread::scope(|s| {
            s.spawn(|| {
                let nsf = File::open(&ns_path).expect("namespace file");
                // SAFETY: a valid namespace fd; only this thread moves.
                let rc = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                // SAFETY: plain socket creation.
                let raw = unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_RAW,
                        i32::from(ETH_P_ALL.to_be()),
                    )
                };
                assert!(
                    raw >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: `raw` is a new descriptor nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                // SAFETY: a NUL-terminated name.
                let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
                assert!(ifindex > 0, "no interface {ifname:?}");
                // SAFETY: sockaddr_ll is plain data; zero is a valid start.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = ETH_P_ALL.to_be();
                sll.sll_ifindex = ifindex as i32;
                // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
                let rc = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                fd
            })
            .join()
            .expect("socket thread")
        });
        PacketSocket { fd }
    }

    /// One frame and its packet type, or `None` after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<(Vec<u8>, u8)> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 65_536];
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: buffer and address are valid for the sizes passed.
        let got = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if got < 0 {
            return None;
        }
        buf.truncate(got as usize);
        Some((buf, sll.sll_pkttype))
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// TCP flags of an IPv4 TCP frame.
fn tcp_flags(f: &[u8]) -> Option<u8> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[23] != 6 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    f.get(14 + ihl + 13).copied()
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("server output dir")
        .map(|e| e.expect("dir entry"))
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".tmp"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("server output file"),
            )
        })
        .collect();
    v.sort();
    v
}

/// Waits until the server wrote the logs of all five connections.
fn wait_for_logs(dir: &Path, timeout: Duration) -> Vec<(String, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    loop {
        let f = files(dir);
        if f.len() == 10 {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "server logged {:?} within {timeout:?}, want 10 files",
            f.iter().map(|x| &x.0).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Recording {
    frames: Vec<RecordedFrame>,
    logs: Vec<(String, Vec<u8>)>,
}

fn record(net: &Net, dir: &Path) -> Recording {
    let sock = PacketSocket::open(&net.c, &net.c_if);
    let out = dir.join("recorded");
    let server = Proc::start(
        &net.s,
        &dir.join("server.py"),
        &[out.to_str().expect("utf-8 path")],
    );
    server.expect_line("ready", Duration::from_secs(10));
    let mut client = Proc::start(&net.c, &dir.join("client.py"), &[]);
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut exited_at: Option<Instant> = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "recording did not finish in 30 s"
        );
        if let Some((data, kind)) = sock.recv(Duration::from_millis(20)) {
            let direction = if kind == PACKET_OUTGOING {
                Direction::ToGuest
            } else {
                Direction::FromGuest
            };
            frames.push(RecordedFrame {
                seq: frames.len() as u64 + 1,
                direction,
                data,
            });
            continue;
        }
        match exited_at {
            None => {
                if let Ok(Some(st)) = client.child.try_wait() {
                    assert!(st.success(), "client failed during the recording");
                    exited_at = Some(Instant::now());
                }
            }
            // Quiet for a while after the client is done.
            Some(t) if t.elapsed() > Duration::from_millis(500) => break,
            Some(_) => {}
        }
    }
    client.expect_line("done", Duration::from_secs(1));
    assert!(client.wait_exit(Duration::from_secs(1)));
    let logs = wait_for_logs(&out, Duration::from_secs(5));
    drop(server);
    Recording { frames, logs }
}

struct Replay {
    report: Report,
    logs: Vec<(String, Vec<u8>)>,
    clone_resets: usize,
    clone_synacks: Vec<u32>,
    /// The first frame the peer injected (a correctly rewritten SYN).
    first_injected: Vec<u8>,
    /// Resets among the frames sent to the server.
    injected_resets: usize,
}

/// Replays `rec` against a fresh server; `diverge` (`PORT` or `PORT+`, see
/// the server) makes it answer the
/// second request of that client port differently.
fn replay(net: &Net, dir: &Path, name: &str, rec: &Recording, diverge: Option<&str>) -> Replay {
    // The fresh server learns nothing from recorded ARP: its neighbour table
    // is empty, so it asks and the peer answers.
    run(&["ip", "-n", &net.s, "neigh", "flush", "all"]);
    let frames: Vec<RecordedFrame> = rec
        .frames
        .iter()
        .filter(|f| f.data.get(12..14) != Some(&[0x08, 0x06]))
        .cloned()
        .collect();
    let config = PeerConfig {
        wait_timeout: Duration::from_secs(5),
        ..PeerConfig::new(net.guest_mac())
    };
    let mut peer = TcpPeer::new(config, frames).expect("recording in seq order");

    let sock = PacketSocket::open(&net.c, &net.c_if);
    let out = dir.join(name);
    let mut args = vec![out.to_str().expect("utf-8 path").to_string()];
    if let Some(p) = diverge {
        args.push(p.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Proc::start(&net.s, &dir.join("server.py"), &args);
    server.expect_line("ready", Duration::from_secs(10));

    let mut clone_resets = 0;
    let mut injected_resets = 0;
    let mut clone_synacks = Vec::new();
    let mut handle = |peer: &mut TcpPeer, frame: &[u8]| {
        match tcp_flags(frame) {
            Some(fl) if fl & 0x04 != 0 => clone_resets += 1,
            Some(fl) if fl & 0x12 == 0x12 => {
                let ihl = usize::from(frame[14] & 0x0f) * 4;
                let at = 14 + ihl + 4;
                clone_synacks.push(u32::from_be_bytes(
                    frame[at..at + 4].try_into().expect("4 bytes"),
                ));
            }
            _ => {}
        }
        for a in peer.on_clone_output(frame) {
            match a {
                Action::Inject { frame, .. } => sock.send(&frame),
                Action::Diverged { flow, divergence } => eprintln!("{name}: {flow}: {divergence}"),
                Action::Unexpected {
                    guest,
                    peer,
                    connect,
                } => {
                    eprintln!("{name}: unexpected {guest} -> {peer} connect={connect}")
                }
            }
        }
    };
    let mut first_injected = Vec::new();
    let (mut injected, mut waits, mut waiting) = (0u64, 0u64, false);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(40);
    loop {
        assert!(Instant::now() < deadline, "replay did not finish in 40 s");
        while let Some((f, kind)) = sock.recv(Duration::ZERO) {
            if kind != PACKET_OUTGOING {
                handle(&mut peer, &f);
            }
        }
        match peer.next_inbound(Instant::now()) {
            Next::Inject { frame, .. } => {
                injected += 1;
                injected_resets += usize::from(tcp_flags(&frame).is_some_and(|f| f & 0x04 != 0));
                waiting = false;
                sock.send(&frame);
                if first_injected.is_empty() {
                    first_injected = frame;
                }
            }
            Next::Ack { frame, .. } => sock.send(&frame),
            Next::WaitForClone { until, .. } => {
                if !waiting {
                    waiting = true;
                    waits += 1;
                }
                let left = until.saturating_duration_since(Instant::now());
                if let Some((f, kind)) = sock.recv(left.min(Duration::from_millis(50))) {
                    if kind != PACKET_OUTGOING {
                        handle(&mut peer, &f);
                    }
                }
            }
            Next::Done => break,
        }
    }
    let replay_time = started.elapsed();
    // Let the server finish: it logs each connection when it closes.
    let settle = Instant::now() + Duration::from_secs(10);
    let logs = loop {
        while let Some((f, kind)) = sock.recv(Duration::from_millis(20)) {
            if kind != PACKET_OUTGOING {
                handle(&mut peer, &f);
            }
        }
        let f = files(&out);
        if f.len() == 10 || Instant::now() > settle {
            break f;
        }
    };
    drop(server);
    eprintln!(
        "{name}: {injected} recorded frames injected, {waits} waits for the server, \
         {} ms until the last recorded frame",
        replay_time.as_millis()
    );
    Replay {
        report: peer.report(),
        logs,
        clone_resets,
        clone_synacks,
        first_injected,
        injected_resets,
    }
}

fn recorded_synacks(rec: &Recording) -> Vec<u32> {
    rec.frames
        .iter()
        .filter(|f| f.direction == Direction::FromGuest)
        .filter(|f| tcp_flags(&f.data).is_some_and(|fl| fl & 0x12 == 0x12))
        .map(|f| {
            let ihl = usize::from(f.data[14] & 0x0f) * 4;
            let at = 14 + ihl + 4;
            u32::from_be_bytes(f.data[at..at + 4].try_into().expect("4 bytes"))
        })
        .collect()
}

/// The replay against a server that answered port 40002's second request
/// differently: the conversation still completed without resets, and the
/// report names the first divergence on that connection only.
fn check_divergence(rec: &Recording, diff: &Replay, clone_prefix: &[u8]) {
    assert_eq!(diff.clone_resets, 0, "the server reset a connection");
    assert_eq!(diff.injected_resets, 0, "the server got a reset");
    let log = |l: &[(String, Vec<u8>)], n: &str| l.iter().find(|x| x.0 == n).map(|x| x.1.clone());
    assert_eq!(
        diff.logs.len(),
        rec.logs.len(),
        "every connection completed"
    );
    for (n, bytes) in &rec.logs {
        if n != "out-40002" {
            assert_eq!(log(&diff.logs, n).as_ref(), Some(bytes), "{n}");
        }
    }
    assert_ne!(log(&diff.logs, "out-40002"), log(&rec.logs, "out-40002"));
    let all = diff.report.divergences();
    assert!(!all.is_empty(), "no divergence reported");
    for (fl, _) in &all {
        assert_eq!(
            fl.peer.port(),
            40_002,
            "only port 40002 diverged: {}",
            diff.report
        );
    }
    let recorded_out = log(&rec.logs, "out-40002").expect("recorded answers");
    let first_answer = recorded_out
        .iter()
        .position(|b| *b == b'\n')
        .expect("a line")
        + 1;
    match all[0].1 {
        Divergence::PayloadDiffers {
            offset,
            recorded,
            clone,
        } => {
            assert_eq!(*offset, first_answer as u64);
            assert!(recorded.starts_with(b"ANS "), "{recorded:?}");
            assert!(clone.starts_with(clone_prefix), "{clone:?}");
        }
        other => panic!("first divergence is {other}"),
    }
}

/// The scripts and the servers' logs; removed on drop.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("vmr-tcp-peer-")
        .tempdir()
        .expect("temp dir");
    std::fs::write(dir.path().join("server.py"), SERVER_PY).expect("write server.py");
    std::fs::write(dir.path().join("client.py"), CLIENT_PY).expect("write client.py");
    dir
}

#[test]
fn replays_a_recorded_conversation_against_a_fresh_linux_server() {
    check_prerequisites();
    let tmp = workdir();
    let dir = tmp.path();
    let net = Net::create();

    let rec = record(&net, dir);
    let names: Vec<&str> = rec.logs.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "cb-in",
            "cb-out",
            "in-40001",
            "in-40002",
            "in-40003",
            "in-40004",
            "out-40001",
            "out-40002",
            "out-40003",
            "out-40004"
        ]
    );
    let to_guest = rec
        .frames
        .iter()
        .filter(|f| f.direction == Direction::ToGuest)
        .count();
    eprintln!(
        "recorded {} frames ({to_guest} to the server)",
        rec.frames.len()
    );

    // From now on C's kernel neither answers ARP nor resets the server's
    // segments: the replayer is the only peer.
    run(&["ip", "-n", &net.c, "addr", "flush", "dev", &net.c_if]);
    let csum_before = net.s_tcp_csum_errors();

    let same = replay(&net, dir, "replay-same", &rec, None);
    eprintln!("{}", same.report);
    assert_eq!(
        same.logs, rec.logs,
        "the fresh server got and answered the same bytes"
    );
    assert_eq!(same.clone_resets, 0, "the server reset a connection");
    assert_eq!(same.injected_resets, 0, "the server got a reset");
    assert!(same.report.is_clean(), "divergences:\n{}", same.report);
    assert_eq!(same.report.flows.len(), 5);
    let setups: Vec<Setup> = same.report.flows.iter().map(|f| f.setup).collect();
    assert_eq!(
        setups
            .iter()
            .filter(|s| **s == Setup::PeerInitiated)
            .count(),
        4
    );
    assert_eq!(
        setups
            .iter()
            .filter(|s| **s == Setup::GuestInitiated)
            .count(),
        1
    );
    assert!(
        same.report.arp_replies >= 1,
        "the peer answered the server's ARP"
    );
    // New initial sequence numbers: the rewriting was needed.
    let old = recorded_synacks(&rec);
    assert_eq!(same.clone_synacks.len(), 4);
    assert!(
        same.clone_synacks.iter().all(|s| !old.contains(s)),
        "{old:?} {:?}",
        same.clone_synacks
    );
    assert_eq!(
        net.s_tcp_csum_errors(),
        csum_before,
        "the server's kernel rejected a checksum"
    );

    // A fresh server answers the second request of port 40002 differently,
    // first with as many bytes as recorded, then with one byte more (the
    // clone's stream is shifted from there on: the peer must stay consistent
    // to the end).
    for (name, how, clone_prefix) in [
        ("replay-diverge", "40002", &b"BAD "[..]),
        ("replay-longer", "40002+", &b"BAD! "[..]),
    ] {
        let diff = replay(&net, dir, name, &rec, Some(how));
        eprintln!("{}", diff.report);
        check_divergence(&rec, &diff, clone_prefix);
    }

    // The server's kernel checks the checksums of injected frames: the
    // first replayed frame (a SYN) with a broken TCP checksum is counted.
    let sock = PacketSocket::open(&net.c, &net.c_if);
    let mut bad = same.first_injected.clone();
    assert_eq!(tcp_flags(&bad), Some(0x02), "the replay began with a SYN");
    let ihl = usize::from(bad[14] & 0x0f) * 4;
    bad[14 + ihl + 16] ^= 0x5a;
    let before = net.s_tcp_csum_errors();
    sock.send(&bad);
    let deadline = Instant::now() + Duration::from_secs(2);
    while net.s_tcp_csum_errors() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        net.s_tcp_csum_errors(),
        before + 1,
        "a bad checksum went unnoticed"
    );

    drop(net);
}
