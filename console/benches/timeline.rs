//! The timeline overview of one hour of recording at 1,000 events/s.
//!
//! Feeds 3.6 M events (block reads and writes, received and sent frames,
//! one sensor reading a second, lifecycle markers including a snapshot every
//! five minutes, a gap and a crash) into the aggregator, serves the console
//! on 127.0.0.1 and measures, over real HTTP, the timeline request for the
//! whole hour and for zoomed windows: the server part (request to the last
//! byte of the JSON) and its size. When chromium, chromedriver and selenium
//! are installed it also loads the page in headless Chromium
//! (`benches/page_load.py`) and reports the time from the page's timeline
//! request to the drawn canvas.
//!
//! `cargo bench -p vmr-console --bench timeline` prints a table.
//! `VMR_CONSOLE_SCREENSHOT=<png>` saves the page's screenshot there.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use vmr_console::aggregate::Aggregator;
use vmr_console::server::{router, AppState};
use vmr_console::Config;
use vmr_proto::{
    BlockIo, BlockOp, BlockStatus, Direction, EnvSample, Event, Gap, InstanceId, Lifecycle,
    LifecycleKind, NetFrame, Payload,
};

const INSTANCE: &str = "bench-1";
const TOKEN: &str = "bench-token-0000000001";
const RATE: u64 = 1_000;
const SECONDS: u64 = 3_600;
const LOAD_BUDGET: Duration = Duration::from_secs(1);

fn events(t0: u64) -> impl Iterator<Item = Event> {
    let id = InstanceId::new(INSTANCE).expect("valid id");
    let step = 1_000_000_000 / RATE;
    let frame = {
        let mut f = vec![
            0x52, 0x54, 0, 0x12, 0x34, 0x56, 2, 0, 0, 0, 0, 1, 0x08, 0x00,
        ];
        f.resize(64, 0);
        f
    };
    (1..=RATE * SECONDS).map(move |seq| {
        let t = t0 + seq * step;
        let life = |kind, detail: String, gap: Option<Gap>, snap: Option<String>| {
            Payload::Lifecycle(Lifecycle {
                kind,
                detail,
                regs: vec![],
                gap,
                snapshot_id: snap,
            })
        };
        let payload = if seq == 1 {
            life(LifecycleKind::Boot, "boot".into(), None, None)
        } else if seq == RATE * SECONDS {
            life(LifecycleKind::Crash, "kernel panic".into(), None, None)
        } else if seq % (RATE * 300) == 0 {
            let id = format!("snap-{:04}", seq / (RATE * 300));
            life(LifecycleKind::Snapshot, String::new(), None, Some(id))
        } else if seq == RATE * 1800 + 1 {
            life(
                LifecycleKind::Gap,
                String::new(),
                Some(Gap {
                    first_seq: seq - 10,
                    count: 10,
                    reason: "sink fell behind".into(),
                }),
                None,
            )
        } else if seq % RATE == 0 {
            Payload::Env(EnvSample {
                sensor: "host.cpu.temperature".into(),
                value: 50.0 + 10.0 * ((seq / RATE) as f64 / 300.0).sin(),
                unit: "celsius".into(),
            })
        } else {
            match seq % 4 {
                0 | 1 => Payload::Net(NetFrame {
                    device: "net0".into(),
                    queue: 0,
                    direction: if seq % 4 == 0 {
                        Direction::Rx
                    } else {
                        Direction::Tx
                    },
                    frame: frame.clone(),
                }),
                n => Payload::Block(BlockIo {
                    device: "vda".into(),
                    queue: 0,
                    op: if n == 2 {
                        BlockOp::Read
                    } else {
                        BlockOp::Write
                    },
                    sector: seq % 100_000 * 8,
                    len: 4096,
                    data: vec![],
                    content_hash: None,
                    status: BlockStatus::Ok,
                }),
            }
        };
        Event {
            instance: id.clone(),
            seq,
            wall_time_ns: t,
            mono_time_ns: t,
            epoch: 1,
            payload,
        }
    })
}

/// A GET over a fresh connection: (time to the last byte, status line, body size).
fn get(addr: &str, path: &str) -> (Duration, String, usize) {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect to the console");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("response");
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&out);
    let status = text.lines().next().unwrap_or("").to_string();
    let body = text
        .find("\r\n\r\n")
        .map(|i| out.len() - i - 4)
        .unwrap_or(0);
    (took, status, body)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let t0 = 1_760_000_000u64 * 1_000_000_000;
    let agg = Arc::new(RwLock::new(Aggregator::new()));
    let start = Instant::now();
    {
        let mut a = agg.write();
        for e in events(t0) {
            a.ingest(&e, None);
        }
    }
    let ingest = start.elapsed();
    let n = RATE * SECONDS;

    let store = tempfile::tempdir().expect("temp dir");
    let config = Config::parse(&format!(
        r#"
replayer_url = "http://127.0.0.1:9"
[kafka]
bootstrap_servers = "127.0.0.1:9"
[store]
url = "file://{}"
[[tokens]]
token = "{TOKEN}"
tenant = "bench"
[[tenants]]
name = "bench"
instance_prefix = "bench-"
"#,
        store.path().display()
    ))
    .expect("bench configuration");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let state = {
        let _in_runtime = rt.enter();
        Arc::new(AppState::new(config, agg, None))
    };
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    rt.spawn(async move { axum::serve(listener, router(state)).await });

    println!("timeline overview of one hour at {RATE} events/s ({n} events aggregated)");
    println!(
        "aggregation: {:.2} s ({:.2} M events/s)",
        ingest.as_secs_f64(),
        n as f64 / ingest.as_secs_f64() / 1e6
    );
    println!();
    println!("| view | points | resolution | p50 ms | p95 ms | max ms | body KiB |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let hour = SECONDS * 1_000_000_000;
    let views = [
        ("whole hour", 0, 0, 1200),
        ("whole hour, 4K width", 0, 0, 3840),
        (
            "10 minutes",
            t0 + hour / 2,
            t0 + hour / 2 + 600_000_000_000,
            1200,
        ),
        (
            "1 minute",
            t0 + hour / 2,
            t0 + hour / 2 + 60_000_000_000,
            1200,
        ),
        (
            "5 seconds",
            t0 + hour / 2,
            t0 + hour / 2 + 5_000_000_000,
            1200,
        ),
    ];
    let mut worst = Duration::ZERO;
    for (name, from, to, points) in views {
        let path = if from == 0 {
            format!("/api/instances/{INSTANCE}/timeline?points={points}")
        } else {
            format!("/api/instances/{INSTANCE}/timeline?points={points}&from={from}&to={to}")
        };
        let mut times = Vec::new();
        let mut size = 0;
        let mut res = String::new();
        for _ in 0..30 {
            let (d, status, body) = get(&addr, &path);
            assert!(status.contains(" 200 "), "{path}: {status}");
            times.push(d);
            size = body;
        }
        let (_, _, _) = get(&addr, &path);
        // The resolution the server picked, from one more answer.
        {
            let mut s = TcpStream::connect(&addr).expect("connect");
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n").expect("request");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("response");
            if let Some(i) = out.find("\"resolution_ns\":") {
                let v: String = out[i + 16..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                let ns: u64 = v.parse().unwrap_or(0);
                res = if ns >= 1_000_000_000 {
                    format!("{} s", ns / 1_000_000_000)
                } else {
                    format!("{} ms", ns / 1_000_000)
                };
            }
        }
        let p50 = percentile(&mut times, 0.5);
        let p95 = percentile(&mut times, 0.95);
        let max = percentile(&mut times, 1.0);
        worst = worst.max(p95);
        println!(
            "| {name} | {points} | {res} | {:.2} | {:.2} | {:.2} | {:.1} |",
            p50.as_secs_f64() * 1e3,
            p95.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            size as f64 / 1024.0
        );
    }
    println!();
    println!(
        "server p95 worst view: {:.2} ms (budget {} ms): {}",
        worst.as_secs_f64() * 1e3,
        LOAD_BUDGET.as_millis(),
        if worst < LOAD_BUDGET {
            "ok"
        } else {
            "OVER BUDGET"
        }
    );

    // The page in Chromium, when it is installed.
    let have = |bin: &str| {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false)
    };
    let selenium = std::process::Command::new("python3")
        .args(["-c", "import selenium"])
        .status()
        .is_ok_and(|s| s.success());
    if have("chromium") && have("chromedriver") && selenium {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/page_load.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .env("CONSOLE_URL", format!("http://{addr}"))
            .env("TOKEN", TOKEN)
            .env("INSTANCE", INSTANCE)
            .output()
            .expect("run page_load.py");
        println!();
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            println!(
                "page load in Chromium failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::process::exit(1);
        }
    } else {
        println!("page load in Chromium: not measured (needs chromium, chromedriver and python3 selenium)");
    }
    if worst >= LOAD_BUDGET {
        std::process::exit(1);
    }
}
