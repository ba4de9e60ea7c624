//! The replayer service end to end over real processes: a microVM session
//! with the freestanding test guest is recorded by capture-mode
//! `vhost-tap-blk` / `vhost-tap-net`, its events are produced to a Tansu
//! broker the way the capture agent ships them, and a snapshot of it is
//! stored by vmr-snapshot. Then, through the `replayer` binary's gRPC API:
//! health, authorization per tenant, bad requests and their codes, a clone
//! stepped, resumed and watched until it crashes after the same recorded
//! `seq` as the original, a deleted clone, and a shutdown that leaves
//! nothing running.
//!
//! Heavy: needs /dev/kvm, root (network namespaces), python3, iproute2, the
//! Tansu broker, the schema-registry and vhost-tap binaries
//! (`cargo build -p schema-registry -p vhost-tap`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Recording, PARTITIONS};
use tonic::{Code, Request};
use vmr_hypervisor::microvm::MicrovmInstance;
use vmr_hypervisor::{BootSpec, DiskSpec, Instance, InstanceSpec, NicSpec, SnapshotOptions};
use vmr_proto::pb::replayer_client::ReplayerClient;
use vmr_proto::{pb, topics::partition_for, Direction, Event, LifecycleKind, Payload};
use vmr_testkit::qemu::NetNs;
use vmr_testkit::{free_port, workspace_bin, ChildGuard};
use vmr_vmm::guest_abi::build_test_guest;

const CMD_NET_DISK: u32 = 0x10;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const TAP: &str = "vmrs0";
const WAIT: Duration = Duration::from_secs(60);
const INSTANCE: &str = "shop-1";
const TOKEN_A: &str = "token-of-tenant-shop-0001";
const TOKEN_B: &str = "token-of-tenant-other-0002";

use common::require_prerequisites;

fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    common::wait_for(what, WAIT, f)
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

fn send(ns: &NetNs, frame: &[u8]) {
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    run(ns.command("python3").args([
        "-c",
        "import socket,sys\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind((sys.argv[1],0))\ns.send(bytes.fromhex(sys.argv[2]))",
        TAP,
        &hex,
    ]));
}

fn request(payload: &[u8]) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

fn done_line(seq: u32) -> String {
    format!("vmr-guest: request {seq:016x} done")
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

/// What the recording left: the snapshot store, the seq at the cut and the
/// seq of the frame that crashed the original.
struct Recorded {
    store_url: String,
    /// An instance whose snapshot's events the broker's retention deleted.
    expired_instance: String,
    seq_at_cut: u64,
    poison_seq: u64,
    last_seq: u64,
    /// The recorded events after the cut, in seq order.
    after_cut: Vec<Event>,
}

fn record(rec: &Recording, dir: &Path, elf: &Path, rt: &tokio::runtime::Runtime) -> Recorded {
    let ns = NetNs::create().unwrap_or_else(|e| panic!("{e}"));
    for key in ["all", "default"] {
        run(ns
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{key}.disable_ipv6=1")]));
    }
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("temp dir is writable");
    let seq_file = dir.join("orig.seq");
    let blk_cap = dir.join("orig-blk.events");
    let net_cap = dir.join("orig-net.events");
    let blk_sock = dir.join("orig-blk.sock");
    let net_sock = dir.join("orig-net.sock");
    let bin = |n: &str| workspace_bin(n).unwrap_or_else(|e| panic!("{e}"));
    let mut blk = Command::new(bin("vhost-tap-blk"));
    blk.arg("--socket").arg(&blk_sock).arg("--image").arg(&disk);
    blk.args([
        "--mode",
        "capture",
        "--instance-id",
        INSTANCE,
        "--device",
        "vda",
        "--seq-lease",
        "1",
    ]);
    blk.arg("--capture")
        .arg(&blk_cap)
        .arg("--seq-file")
        .arg(&seq_file);
    let mut net = Command::new(bin("vhost-tap-net"));
    net.arg("--socket").arg(&net_sock);
    net.args([
        "--mode",
        "capture",
        "--instance-id",
        INSTANCE,
        "--device",
        "net0",
        "--seq-lease",
        "1",
    ]);
    net.arg("--capture")
        .arg(&net_cap)
        .arg("--seq-file")
        .arg(&seq_file);
    net.args(["--tap", TAP, "--netns", ns.name()]);
    let mut blk =
        ChildGuard::spawn("vhost-tap-blk orig", &mut blk).unwrap_or_else(|e| panic!("{e}"));
    let mut net =
        ChildGuard::spawn("vhost-tap-net orig", &mut net).unwrap_or_else(|e| panic!("{e}"));
    for s in [&blk_sock, &net_sock] {
        wait_for(&format!("socket {}", s.display()), || {
            s.exists().then_some(())
        });
    }
    let work = dir.join("orig");
    std::fs::create_dir_all(&work).expect("temp dir is writable");
    let mut spec = InstanceSpec::new(
        INSTANCE,
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
        socket: blk_sock.clone(),
    });
    spec.nics.push(NicSpec {
        name: "net0".into(),
        socket: net_sock.clone(),
        mac: vmr_hypervisor::MacAddr(GUEST_MAC),
    });
    let drv = vmr_hypervisor::driver("microvm").expect("the microvm driver exists");
    let orig = drv.launch(&spec).expect("launch the original");
    let events = orig.subscribe();
    orig.as_any()
        .downcast_ref::<MicrovmInstance>()
        .expect("a microVM instance")
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

    // The cut: the driver pauses and drains the backends; everything
    // numbered so far is in the snapshot.
    let snap = dir.join("snaps").join("0001");
    std::fs::create_dir_all(&snap).expect("snapshot dir");
    orig.snapshot(&snap, SnapshotOptions::default())
        .expect("snapshot");
    std::thread::sleep(Duration::from_millis(500));
    let layer = dir.join("vda-at-cut.raw");
    std::fs::copy(&disk, &layer).expect("disk copy at the cut");
    let seq_at_cut = all_events(&[&blk_cap, &net_cap])
        .iter()
        .map(|e| e.seq)
        .max()
        .expect("events before the cut");

    send(&ns, &request(b"request 2: after the snapshot"));
    wait_console(orig.as_ref(), &done_line(2));
    send(&ns, &request(b"POISON: crash now"));
    events
        .wait_for(WAIT, |e| e.kind() == LifecycleKind::TripleFault)
        .unwrap_or_else(|gone| panic!("the original did not crash (source gone: {gone})"));
    orig.stop(Duration::from_secs(5))
        .expect("stop the original");
    let poison_seq = wait_for("the poison frame in the capture", || {
        all_events(&[&net_cap])
            .into_iter()
            .find_map(|e| match &e.payload {
                Payload::Net(n)
                    if n.direction == Direction::Rx
                        && n.frame.windows(6).any(|w| w == b"POISON") =>
                {
                    Some(e.seq)
                }
                _ => None,
            })
    });
    blk.stop(Duration::from_secs(5));
    net.stop(Duration::from_secs(5));

    // Ship the captures to the topics in seq order, as the agent does.
    let mut all = all_events(&[&blk_cap, &net_cap]);
    all.sort_by_key(|e| e.seq);
    // First, the same events as another instance's (on another partition),
    // eight days old: past the topics' seven-day retention, so the broker
    // deletes them when it restarts, leaving that instance's snapshot
    // without its events.
    let home = partition_for(INSTANCE, PARTITIONS);
    let expired = (0..64)
        .map(|i| format!("shop-expired-{i}"))
        .find(|id| partition_for(id, PARTITIONS) != home)
        .expect("an id on another partition");
    let old_ms = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as i64)
        - 8 * 24 * 3600 * 1000;
    let expired_events: Vec<Event> = all
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.instance = vmr_proto::InstanceId::new(&expired).expect("a valid id");
            e
        })
        .collect();
    let expired_offsets = rec.send_at(&expired_events, Some(old_ms));
    // Newer records after them (retention never empties a partition's log).
    let newer: Vec<Event> = expired_events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.seq += 1_000_000;
            e
        })
        .collect();
    rec.send(&newer);
    let offsets = rec.send(&all);
    let mut next: HashMap<&str, i64> = HashMap::new();
    for (e, off) in all.iter().zip(&offsets) {
        let n = next.entry(e.topic()).or_insert(-1);
        if e.seq <= seq_at_cut {
            *n = off + 1;
        } else if *n < 0 {
            *n = *off;
        }
    }
    let part = partition_for(INSTANCE, PARTITIONS);
    let manifest_offsets = vmr_proto::topics::EVENT_TOPICS
        .iter()
        .map(|t| vmr_snapshot::PartitionOffset {
            topic: t.to_string(),
            partition: part,
            next_offset: next.get(t).copied().unwrap_or(0).max(0),
        })
        .collect::<Vec<_>>();

    let store_dir = dir.join("store");
    let store_url = format!("file://{}", store_dir.display());
    let store =
        vmr_snapshot::SnapshotStore::open(&vmr_snapshot::StoreConfig::new(store_url.clone()))
            .expect("open the store");
    // Snapshot 0003 stores the disk as a chain of two packed layers (the
    // form the capture agent's snapshots have): clusters of the first half
    // in position 0, of the second half in position 1, on a blank disk.
    let raw = std::fs::read(&layer).expect("the disk at the cut");
    let half = raw.len() / 2;
    let packed = [
        pack_layer(&raw, 0..half, &dir.join("vda.0.packed")),
        pack_layer(&raw, half..raw.len(), &dir.join("vda.1.packed")),
    ];
    for id in ["0001", "0002", "0003"] {
        let src = dir.join("snaps").join(id);
        if id != "0001" {
            std::fs::create_dir_all(&src).expect("snapshot dir");
            for f in std::fs::read_dir(&snap).expect("snapshot dir") {
                let f = f.expect("entry");
                std::fs::copy(f.path(), src.join(f.file_name())).expect("copy snapshot");
            }
        }
        let req = vmr_snapshot::UploadRequest {
            dir: src,
            snapshot_id: id.into(),
            image: "test-guest".into(),
            seq_at_cut,
            mono_time_ns: 0,
            offsets: manifest_offsets.clone(),
            disk_layers: if id == "0003" {
                packed
                    .iter()
                    .enumerate()
                    .map(|(i, p)| vmr_snapshot::DiskLayerFile {
                        device: "vda".into(),
                        position: i as u32,
                        path: p.clone(),
                    })
                    .collect()
            } else {
                vec![vmr_snapshot::DiskLayerFile {
                    device: "vda".into(),
                    position: 0,
                    path: layer.clone(),
                }]
            },
            base_snapshot_id: None,
        };
        rt.block_on(vmr_snapshot::upload(
            &store,
            &req,
            &vmr_snapshot::no_progress,
        ))
        .expect("upload the snapshot");
    }
    // The expired instance's snapshot starts at its first (deleted) records.
    let mut first: HashMap<&str, i64> = HashMap::new();
    for (e, off) in expired_events.iter().zip(&expired_offsets) {
        first.entry(e.topic()).or_insert(*off);
    }
    let expired_part = partition_for(&expired, PARTITIONS);
    // The driver's artifacts name the instance: a copy names the other one.
    let expired_snap = dir.join("snaps").join("expired");
    std::fs::create_dir_all(&expired_snap).expect("snapshot dir");
    for f in std::fs::read_dir(&snap).expect("snapshot dir") {
        let f = f.expect("entry");
        std::fs::copy(f.path(), expired_snap.join(f.file_name())).expect("copy snapshot");
    }
    let arts = expired_snap.join("artifacts.json");
    let text = std::fs::read_to_string(&arts).expect("artifacts.json");
    assert!(text.contains(&format!("\"{INSTANCE}\"")), "{text}");
    std::fs::write(
        &arts,
        text.replace(&format!("\"{INSTANCE}\""), &format!("\"{expired}\"")),
    )
    .expect("write artifacts.json");
    let req = vmr_snapshot::UploadRequest {
        dir: expired_snap,
        snapshot_id: "0001".into(),
        image: "test-guest".into(),
        seq_at_cut: 0,
        mono_time_ns: 0,
        offsets: vmr_proto::topics::EVENT_TOPICS
            .iter()
            .map(|t| vmr_snapshot::PartitionOffset {
                topic: t.to_string(),
                partition: expired_part,
                next_offset: first.get(t).copied().unwrap_or(0),
            })
            .collect(),
        disk_layers: vec![vmr_snapshot::DiskLayerFile {
            device: "vda".into(),
            position: 0,
            path: layer.clone(),
        }],
        base_snapshot_id: None,
    };
    rt.block_on(vmr_snapshot::upload(
        &store,
        &req,
        &vmr_snapshot::no_progress,
    ))
    .expect("upload the expired instance's snapshot");
    // Damage snapshot 0002's memory object in the store.
    let mem = walk(&store_dir.join(INSTANCE).join("0002"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("objects of 0002");
    let mut bytes = std::fs::read(&mem).expect("object");
    bytes[0] ^= 0xff;
    std::fs::write(&mem, bytes).expect("damage the object");
    Recorded {
        store_url,
        expired_instance: expired,
        seq_at_cut,
        poison_seq,
        last_seq: all.last().map(|e| e.seq).unwrap_or(0),
        after_cut: all.iter().filter(|e| e.seq > seq_at_cut).cloned().collect(),
    }
}

/// The service names the reflection service lists.
async fn reflection_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut c = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection call")
        .into_inner();
    let msg = resp
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    match msg.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// The names of the files the reflection service returns for `symbol`.
async fn reflection_file_of(channel: tonic::transport::Channel, symbol: &str) -> Vec<String> {
    use prost::Message;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut c = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
    };
    let mut resp = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection call")
        .into_inner();
    let msg = resp
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    match msg.message_response {
        Some(MessageResponse::FileDescriptorResponse(f)) => f
            .file_descriptor_proto
            .iter()
            .map(|b| {
                prost_types::FileDescriptorProto::decode(b.as_slice())
                    .expect("a file descriptor")
                    .name
                    .unwrap_or_default()
            })
            .collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// Writes a packed disk layer (`VMRLAY01`: a 64-byte header, one map bit
/// per 4 KiB cluster, then the allocated clusters in order from the next
/// cluster boundary) holding the non-zero clusters of `disk` in `range`.
fn pack_layer(disk: &[u8], range: std::ops::Range<usize>, out: &Path) -> PathBuf {
    const CLUSTER: usize = 4096;
    let clusters = disk.len().div_ceil(CLUSTER);
    let map_bytes = clusters.div_ceil(8);
    let data_at = (64 + map_bytes).div_ceil(CLUSTER) * CLUSTER;
    let mut map = vec![0u8; map_bytes];
    let mut data = Vec::new();
    for c in 0..clusters {
        let (a, b) = (c * CLUSTER, ((c + 1) * CLUSTER).min(disk.len()));
        if a >= range.start && b <= range.end && disk[a..b].iter().any(|x| *x != 0) {
            map[c / 8] |= 1 << (c % 8);
            data.extend_from_slice(&disk[a..b]);
            data.resize(data.len().div_ceil(CLUSTER) * CLUSTER, 0);
        }
    }
    let n: u64 = map.iter().map(|b| u64::from(b.count_ones())).sum();
    let mut f = vec![0u8; data_at];
    f[0..8].copy_from_slice(b"VMRLAY01");
    f[8..12].copy_from_slice(&1u32.to_le_bytes());
    f[12..16].copy_from_slice(&(CLUSTER as u32).to_le_bytes());
    f[16..24].copy_from_slice(&(disk.len() as u64).to_le_bytes());
    f[24..32].copy_from_slice(&n.to_le_bytes());
    f[32..40].copy_from_slice(&(data_at as u64).to_le_bytes());
    f[64..64 + map_bytes].copy_from_slice(&map);
    f.extend_from_slice(&data);
    std::fs::write(out, f).expect("write the packed layer");
    out.to_path_buf()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn all_events(paths: &[&Path]) -> Vec<Event> {
    paths
        .iter()
        .flat_map(|p| replayer::clone::read_capture(p))
        .collect()
}

/// The seq range `window` selects of `events` (the recording after the
/// cut, in seq order), as the replay places them: guest time rebuilt from
/// a cut at monotonic time 0 (the manifests' `mono_time_ns`), paused there;
/// the window resolved on the recording's span; the events inside until
/// the first after it. `None` when none is inside.
fn expected_range(events: &[Event], window: &replayer::window::Window) -> Option<(u64, u64)> {
    use replayer::window::{Position, Span};
    let mut t = replayer::schedule::Timeline::new(0, true);
    let placed: Vec<(u64, Duration, u64)> = events
        .iter()
        .map(|e| (e.seq, t.observe(e), e.wall_time_ns))
        .collect();
    let span = Span {
        first_seq: placed.first()?.0,
        last_seq: placed.last()?.0,
        guest: placed.last()?.1,
        first_wall_ns: placed.iter().map(|p| p.2).min()?,
        last_wall_ns: placed.iter().map(|p| p.2).max()?,
    };
    let b = window.resolve(Some(&span)).ok()?;
    let mut inside = Vec::new();
    for (seq, off, wall) in placed {
        match b.position(seq, off, wall) {
            Position::After => break,
            Position::Inside => inside.push(seq),
            Position::Before => {}
        }
    }
    Some((*inside.first()?, *inside.last()?))
}

/// Creates a paused clone with `window`; its applied window, then deletes
/// it. A refusal is returned as the status.
async fn applied_window(
    c: &mut ReplayerClient<tonic::transport::Channel>,
    window: pb::ReplayWindow,
) -> Result<pb::AppliedWindow, tonic::Status> {
    let req = pb::CreateCloneRequest {
        instance_id: INSTANCE.into(),
        snapshot: Some(pb::SnapshotSelector {
            pick: Some(pb::snapshot_selector::Pick::SnapshotId("0001".into())),
        }),
        window: Some(window),
        start_paused: true,
        ..Default::default()
    };
    let clone = c.create_clone(authed(TOKEN_A, req)).await?.into_inner();
    c.delete_clone(authed(
        TOKEN_A,
        pb::DeleteCloneRequest {
            clone_id: clone.clone_id.clone(),
        },
    ))
    .await
    .expect("delete the window clone");
    Ok(clone.window.expect("a clone reports its applied window"))
}

async fn check_windows(c: &mut ReplayerClient<tonic::transport::Channel>, rec: &Recorded) {
    use pb::replay_window::Form;
    use replayer::window::Window;
    let events = &rec.after_cut;
    assert!(
        events.len() >= 3,
        "a recording after the cut: {}",
        events.len()
    );
    let mut t = replayer::schedule::Timeline::new(0, true);
    let guest_end = events.iter().map(|e| t.observe(e)).last().expect("events");
    let form = |f: Form| pb::ReplayWindow {
        form: Some(f),
        ..Default::default()
    };
    let walls: Vec<u64> = events.iter().map(|e| e.wall_time_ns).collect();
    let (w_from, w_to) = (walls[1], walls[walls.len() - 2]);
    let q = guest_end.as_nanos() as u64 / 4;
    // (what, request, the library's window)
    let cases: Vec<(&str, pb::ReplayWindow, Window)> = vec![
        (
            "a seq range",
            pb::ReplayWindow {
                from_seq: rec.poison_seq,
                to_seq: rec.poison_seq,
                ..Default::default()
            },
            Window::Seq {
                from: rec.poison_seq,
                to: Some(rec.poison_seq),
            },
        ),
        (
            "a duration after the cut",
            form(Form::AfterCutNs(2 * q)),
            Window::AfterCut(Duration::from_nanos(2 * q)),
        ),
        (
            "a percentage",
            form(Form::Percent(pb::PercentWindow {
                from_percent: 50.0,
                to_percent: None,
            })),
            Window::Percent {
                from: 50.0,
                to: 100.0,
            },
        ),
        (
            "a guest-time range",
            form(Form::Time(pb::TimeWindow {
                from_ns: q,
                to_ns: Some(3 * q),
            })),
            Window::Time {
                from: Duration::from_nanos(q),
                to: Some(Duration::from_nanos(3 * q)),
            },
        ),
        (
            "a wall-time range",
            form(Form::WallTime(pb::WallTimeWindow {
                from_ns: w_from,
                to_ns: Some(w_to),
            })),
            Window::WallTime {
                from_ns: w_from,
                to_ns: w_to,
            },
        ),
        (
            "the last half",
            form(Form::Portion(pb::PortionWindow { part: 2, parts: 2 })),
            Window::Portion { index: 1, parts: 2 },
        ),
        (
            "the middle third",
            form(Form::Portion(pb::PortionWindow { part: 2, parts: 3 })),
            Window::Portion { index: 1, parts: 3 },
        ),
        (
            "the first third, as text",
            form(Form::Text("first-third".into())),
            Window::Portion { index: 0, parts: 3 },
        ),
    ];
    for (what, req, lib) in cases {
        let got = applied_window(c, req).await;
        match expected_range(events, &lib) {
            Some((first, last)) => {
                let w = got.unwrap_or_else(|e| panic!("{what}: refused: {e:?}"));
                assert_eq!(
                    (w.first_seq, w.last_seq),
                    (first, last),
                    "{what}: the applied seq range: {w:?}"
                );
                assert_eq!(w.form, lib.to_string(), "{what}");
                assert!(
                    w.events >= 1 && w.events <= last - first + 1,
                    "{what}: {w:?}"
                );
                assert!(
                    w.first_wall_ns <= w.last_wall_ns && w.first_guest_ns <= w.last_guest_ns,
                    "{what}: {w:?}"
                );
                eprintln!(
                    "window {what} ({}): seq {first}..={last}, {} events",
                    w.form, w.events
                );
            }
            None => {
                let e = got.expect_err(&format!("{what} holds no event"));
                assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
                assert!(e.message().contains("no recorded event"), "{what}: {e:?}");
                eprintln!("window {what}: holds no event, refused: {}", e.message());
            }
        }
    }
    // The seq range names its ends exactly; unset windows are the whole
    // recording after the cut.
    let all = applied_window(
        c,
        pb::ReplayWindow {
            from_seq: rec.seq_at_cut + 1,
            ..Default::default()
        },
    )
    .await
    .expect("a window from the first seq after the cut");
    assert_eq!(
        (all.first_seq, all.last_seq),
        (rec.seq_at_cut + 1, rec.last_seq),
        "{all:?}"
    );
    let clone = c
        .create_clone(authed(
            TOKEN_A,
            pb::CreateCloneRequest {
                instance_id: INSTANCE.into(),
                start_paused: true,
                ..Default::default()
            },
        ))
        .await
        .expect("a clone without a window")
        .into_inner();
    let w = clone.window.clone().expect("applied window");
    assert_eq!(
        (w.form.as_str(), w.first_seq, w.last_seq),
        ("all", rec.seq_at_cut + 1, rec.last_seq),
        "{w:?}"
    );
    c.delete_clone(authed(
        TOKEN_A,
        pb::DeleteCloneRequest {
            clone_id: clone.clone_id,
        },
    ))
    .await
    .expect("delete");

    // Bad windows: malformed ones are INVALID_ARGUMENT, windows past the
    // recording OUT_OF_RANGE, windows before the cut FAILED_PRECONDITION,
    // each with the reason.
    let bad: Vec<(pb::ReplayWindow, Code, &str)> = vec![
        (
            pb::ReplayWindow::default(),
            Code::InvalidArgument,
            "needs from_seq/to_seq or one form",
        ),
        (
            pb::ReplayWindow {
                from_seq: 5,
                form: Some(Form::AfterCutNs(1)),
                ..Default::default()
            },
            Code::InvalidArgument,
            "not both",
        ),
        (
            form(Form::AfterCutNs(0)),
            Code::InvalidArgument,
            "at least 1",
        ),
        (
            form(Form::Percent(pb::PercentWindow {
                from_percent: 40.0,
                to_percent: Some(10.0),
            })),
            Code::InvalidArgument,
            "is not before",
        ),
        (
            form(Form::Percent(pb::PercentWindow {
                from_percent: 10.0,
                to_percent: Some(140.0),
            })),
            Code::InvalidArgument,
            "not within 0..100",
        ),
        (
            form(Form::Portion(pb::PortionWindow { part: 0, parts: 3 })),
            Code::InvalidArgument,
            "does not exist",
        ),
        (
            form(Form::Portion(pb::PortionWindow { part: 4, parts: 3 })),
            Code::InvalidArgument,
            "does not exist",
        ),
        (
            form(Form::Text("fortnight".into())),
            Code::InvalidArgument,
            "is not understood",
        ),
        (
            form(Form::Time(pb::TimeWindow {
                from_ns: 5,
                to_ns: Some(5),
            })),
            Code::InvalidArgument,
            "is not before",
        ),
        (
            form(Form::Time(pb::TimeWindow {
                from_ns: guest_end.as_nanos() as u64 + 3_600_000_000_000,
                to_ns: None,
            })),
            Code::OutOfRange,
            "starts after the recorded events end",
        ),
        (
            pb::ReplayWindow {
                from_seq: rec.last_seq + 10,
                ..Default::default()
            },
            Code::OutOfRange,
            "starts after the recorded events end",
        ),
        (
            form(Form::WallTime(pb::WallTimeWindow {
                from_ns: 1,
                to_ns: Some(2),
            })),
            Code::FailedPrecondition,
            "before the snapshot's cut",
        ),
    ];
    for (w, code, text) in bad {
        let e = applied_window(c, w.clone())
            .await
            .expect_err(&format!("{w:?} is refused"));
        assert_eq!(e.code(), code, "{w:?}: {e:?}");
        assert!(e.message().contains(text), "{w:?}: {e:?}");
    }
}

fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

/// A plain HTTP/1.0 GET; the body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

fn netns_list() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned()
}

/// Processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(cmd);
            }
        }
    }
    out
}

#[test]
fn service_clones_replays_and_controls_a_recorded_microvm() {
    require_prerequisites();
    let elf = build_test_guest(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest"))
        .unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rec = Recording::start();
    let recorded = record(&rec, dir, &elf, &rt);
    // The broker applies retention when it starts: the expired instance's
    // records go.
    rec.broker.restart().expect("the broker restarts");
    assert!(recorded.poison_seq > recorded.seq_at_cut && recorded.last_seq >= recorded.poison_seq);

    // The server.
    let work = dir.join("replayer-work");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"
work_dir = "{work}"
max_clones = 4
metrics_listen = "{metrics_addr}"
[kafka]
bootstrap_servers = "{bootstrap}"
[store]
url = "{store}"
[backends]
blk = "{blk}"
net = "{net}"
[[images]]
name = "test-guest"
kernel = "{kernel}"
memory_mib = 32
nics = [{{ name = "net0", mac = "52:54:00:12:34:56" }}]
[[tokens]]
token = "{TOKEN_A}"
tenant = "shop"
[[tokens]]
token = "{TOKEN_B}"
tenant = "other"
[[tenants]]
name = "shop"
instance_prefix = "shop-"
[[tenants]]
name = "other"
instances = ["other-1"]
"#,
        work = work.display(),
        bootstrap = rec.bootstrap(),
        store = recorded.store_url,
        blk = workspace_bin("vhost-tap-blk")
            .unwrap_or_else(|e| panic!("{e}"))
            .display(),
        net = workspace_bin("vhost-tap-net")
            .unwrap_or_else(|e| panic!("{e}"))
            .display(),
        kernel = elf.display(),
        metrics_addr = metrics_addr,
    );
    let config_path = dir.join("replayer.toml");
    std::fs::write(&config_path, config).expect("write config");
    let check = Command::new(env!("CARGO_BIN_EXE_replayer"))
        .arg("--config")
        .arg(&config_path)
        .arg("--check-config")
        .output()
        .expect("run replayer --check-config");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = ChildGuard::spawn(
        "replayer",
        Command::new(env!("CARGO_BIN_EXE_replayer"))
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", &addr]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://{addr}");
    let channel = rt.block_on(async {
        let start = Instant::now();
        loop {
            match tonic::transport::Endpoint::from_shared(url.clone())
                .expect("url")
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(start.elapsed() < WAIT, "the replayer never listened: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });

    rt.block_on(async {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let h = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "vmr.v1.Replayer".into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            h.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        // Reflection lists the services and describes vmr.v1.Replayer.
        let services = reflection_services(channel.clone()).await;
        for name in ["vmr.v1.Replayer", "grpc.health.v1.Health"] {
            assert!(services.iter().any(|s| s == name), "{services:?}");
        }
        let file = reflection_file_of(channel.clone(), "vmr.v1.Replayer").await;
        assert!(file.iter().any(|f| f == "vmr/v1/replayer.proto"), "{file:?}");

        let mut c = ReplayerClient::new(channel.clone());
        let create = |snapshot: Option<&str>| pb::CreateCloneRequest {
            instance_id: INSTANCE.into(),
            snapshot: snapshot.map(|id| pb::SnapshotSelector {
                pick: Some(pb::snapshot_selector::Pick::SnapshotId(id.into())),
            }),
            start_paused: true,
            ..Default::default()
        };
        let code = |r: Result<tonic::Response<pb::Clone>, tonic::Status>| r.err().map(|s| s.code());

        // Authorization.
        assert_eq!(
            code(c.create_clone(Request::new(create(Some("0001")))).await),
            Some(Code::Unauthenticated)
        );
        assert_eq!(
            code(
                c.create_clone(authed("not-a-token", create(Some("0001"))))
                    .await
            ),
            Some(Code::Unauthenticated)
        );
        assert_eq!(
            code(c.create_clone(authed(TOKEN_B, create(Some("0001")))).await),
            Some(Code::PermissionDenied)
        );

        // Bad requests.
        let mut bad = create(Some("0001"));
        bad.instance_id = "../etc".into();
        assert_eq!(
            code(c.create_clone(authed(TOKEN_A, bad)).await),
            Some(Code::InvalidArgument)
        );
        let mut bad = create(Some("0001"));
        bad.filter = Some(pb::EventFilter::default());
        assert_eq!(
            code(c.create_clone(authed(TOKEN_A, bad)).await),
            Some(Code::InvalidArgument)
        );
        let mut bad = create(Some("0001"));
        bad.speed = Some(pb::Speed {
            speed: Some(pb::speed::Speed::Factor(1000.0)),
        });
        assert_eq!(
            code(c.create_clone(authed(TOKEN_A, bad)).await),
            Some(Code::InvalidArgument)
        );
        let mut bad = create(Some("0001"));
        bad.window = Some(pb::ReplayWindow {
            from_seq: 0,
            to_seq: recorded.seq_at_cut,
            ..Default::default()
        });
        assert_eq!(
            code(c.create_clone(authed(TOKEN_A, bad)).await),
            Some(Code::FailedPrecondition)
        );
        let fault = |kind: pb::FaultKind, probability: f64, at_seq: Vec<u64>| pb::FaultSpec {
            kind: kind as i32,
            schedule: Some(pb::FaultSchedule { probability, at_seq, max_count: 0, ..Default::default() }),
            ..Default::default()
        };
        let mut bad = create(Some("0001"));
        let mut io = fault(pb::FaultKind::BlockIoerr, 0.5, vec![]);
        io.target = Some(pb::FaultTarget { sector_start: 8, sector_end: 4, ..Default::default() });
        bad.faults = vec![io];
        let status = c.create_clone(authed(TOKEN_A, bad)).await.expect_err("an empty sector range is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("sector_end"), "{status:?}");
        // An instance nobody recorded.
        let mut bad = create(None);
        bad.instance_id = "shop-unknown".into();
        let status = c.create_clone(authed(TOKEN_A, bad)).await.expect_err("no snapshot of an unknown instance");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(status.message().contains("shop-unknown"), "{status:?}");
        // Another tenant's instance.
        let mut bad = create(None);
        bad.instance_id = "other-1".into();
        let status = c.create_clone(authed(TOKEN_A, bad)).await.expect_err("another tenant's instance");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("may not see instance other-1"), "{status:?}");
        // A window past the retained data.
        let mut bad = create(Some("0001"));
        bad.window = Some(pb::ReplayWindow { from_seq: 0, to_seq: recorded.last_seq + 1000, ..Default::default() });
        let status = c.create_clone(authed(TOKEN_A, bad)).await.expect_err("a window past the data");
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(status.message().contains("recorded events end at seq"), "{status:?}");
        // Events missing from Kafka (retention).
        let mut bad = create(None);
        bad.instance_id = recorded.expired_instance.clone();
        let status = c.create_clone(authed(TOKEN_A, bad)).await.expect_err("the events are gone");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("events missing from Kafka (retention)"), "{status:?}");
        // Malformed filters.
        let mut bad = create(Some("0001"));
        bad.filter = Some(pb::EventFilter {
            include_net: true,
            exclude_net: Some(pb::NetMatch { ports: vec![70000], ..Default::default() }),
            ..Default::default()
        });
        let status = c.create_clone(authed(TOKEN_A, bad)).await.expect_err("a port above 65535");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("exclude_net"), "{status:?}");
        let mut bad = create(Some("0001"));
        bad.filter = Some(pb::EventFilter {
            include_net: true,
            net: Some(pb::NetMatch { ips: vec!["10.0.0.300".into()], ..Default::default() }),
            ..Default::default()
        });
        assert_eq!(code(c.create_clone(authed(TOKEN_A, bad)).await), Some(Code::InvalidArgument));
        // Nothing of these was left behind, and the server is healthy.
        assert!(!netns_list().contains("vmr-c"), "{}", netns_list());
        let h = health
            .check(tonic_health::pb::HealthCheckRequest { service: "vmr.v1.Replayer".into() })
            .await
            .expect("health check after bad requests")
            .into_inner();
        assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        let mut bad = create(Some("0001"));
        bad.faults = vec![fault(pb::FaultKind::DropFrame, 2.0, vec![])];
        assert_eq!(code(c.create_clone(authed(TOKEN_A, bad)).await), Some(Code::InvalidArgument));
        assert_eq!(
            code(
                c.create_clone(authed(TOKEN_A, create(Some("no-such"))))
                    .await
            ),
            Some(Code::NotFound)
        );
        assert_eq!(
            code(c.create_clone(authed(TOKEN_A, create(Some("0002")))).await),
            Some(Code::DataLoss)
        );
        assert_eq!(
            c.get_clone(authed(
                TOKEN_A,
                pb::GetCloneRequest {
                    clone_id: "nope".into()
                }
            ))
            .await
            .err()
            .map(|s| s.code()),
            Some(Code::NotFound)
        );

        // Every window form resolves as the library does on the recording.
        check_windows(&mut c, &recorded).await;

        // A clone, restored and waiting.
        let clone = c
            .create_clone(authed(TOKEN_A, create(Some("0001"))))
            .await
            .expect("create clone")
            .into_inner();
        assert_eq!(clone.state, pb::CloneState::Ready as i32, "{clone:?}");
        assert_eq!(clone.seq_at_cut, recorded.seq_at_cut);
        let id = clone.clone_id.clone();
        assert!(
            netns_list().contains(&format!("vmr-{id}")),
            "the clone has its own namespace"
        );

        // The other tenant sees nothing of it.
        assert_eq!(
            c.get_clone(authed(
                TOKEN_B,
                pb::GetCloneRequest {
                    clone_id: id.clone()
                }
            ))
            .await
            .err()
            .map(|s| s.code()),
            Some(Code::PermissionDenied)
        );
        let theirs = c
            .list_clones(authed(TOKEN_B, pb::ListClonesRequest {}))
            .await
            .expect("list")
            .into_inner();
        assert!(theirs.clones.is_empty(), "{theirs:?}");
        let ours = c
            .list_clones(authed(TOKEN_A, pb::ListClonesRequest {}))
            .await
            .expect("list")
            .into_inner();
        assert_eq!(ours.clones.len(), 1);

        let mut watch = c
            .watch(authed(
                TOKEN_A,
                pb::WatchRequest {
                    clone_id: id.clone(),
                },
            ))
            .await
            .expect("watch")
            .into_inner();
        let control = |action: pb::ControlAction, steps: u64| {
            authed(
                TOKEN_A,
                pb::ControlRequest {
                    clone_id: id.clone(),
                    action: action as i32,
                    steps,
                    ..Default::default()
                },
            )
        };
        assert_eq!(
            c.control(control(pb::ControlAction::Pause, 0))
                .await
                .err()
                .map(|s| s.code()),
            Some(Code::FailedPrecondition),
            "pausing a replay that has not started"
        );
        assert_eq!(
            c.control(control(pb::ControlAction::Step, 0))
                .await
                .err()
                .map(|s| s.code()),
            Some(Code::InvalidArgument)
        );

        // One step: exactly one event, then paused.
        c.control(control(pb::ControlAction::Step, 1))
            .await
            .expect("step");
        let start = Instant::now();
        let stepped = loop {
            let s = c
                .get_clone(authed(
                    TOKEN_A,
                    pb::GetCloneRequest {
                        clone_id: id.clone(),
                    },
                ))
                .await
                .expect("get")
                .into_inner();
            if s.delivered == 1 && s.state == pb::CloneState::Paused as i32 {
                break s;
            }
            assert!(start.elapsed() < WAIT, "the step never completed: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(stepped.replayed_seq > recorded.seq_at_cut, "{stepped:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let still = c
            .get_clone(authed(
                TOKEN_A,
                pb::GetCloneRequest {
                    clone_id: id.clone(),
                },
            ))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(
            (still.delivered, still.state),
            (1, pb::CloneState::Paused as i32),
            "paused stays paused"
        );
        assert_eq!(
            c.control(control(pb::ControlAction::Start, 0))
                .await
                .err()
                .map(|s| s.code()),
            Some(Code::FailedPrecondition),
            "a second start"
        );
        let resumed = c
            .control(control(pb::ControlAction::Resume, 0))
            .await
            .expect("resume")
            .into_inner();
        assert_ne!(resumed.state, pb::CloneState::Paused as i32, "{resumed:?}");

        // Watch until the crash.
        let mut console = Vec::new();
        let mut crash = None;
        let mut last = None;
        let mut saw_replaying = false;
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, watch.message())
                .await
                .expect("the watch ended before the crash within the timeout")
                .expect("watch stream");
            let Some(m) = msg else { break };
            console.extend_from_slice(&m.console);
            if let Some(l) = &m.lifecycle {
                if l.lifecycle.as_ref().map(|x| x.kind)
                    == Some(pb::LifecycleKind::TripleFault as i32)
                {
                    crash = Some(l.clone());
                }
            }
            if let Some(cl) = m.clone {
                saw_replaying |= cl.state == pb::CloneState::Replaying as i32;
                last = Some(cl);
            }
        }
        let crash = crash.expect("Watch reported the clone's triple fault");
        assert_eq!(
            crash.last_seq_applied, recorded.poison_seq,
            "the clone crashed after the same recorded seq as the original"
        );
        let last = last.expect("progress messages");
        assert_eq!(last.state, pb::CloneState::Crashed as i32, "{last:?}");
        assert_eq!(last.replayed_seq, recorded.poison_seq, "{last:?}");
        assert!(saw_replaying, "progress while replaying");
        let console = String::from_utf8_lossy(&console);
        assert!(
            console.contains(&done_line(2)),
            "the clone answered request 2: {console}"
        );
        let div = c
            .get_divergences(authed(
                TOKEN_A,
                pb::GetDivergencesRequest {
                    clone_id: id.clone(),
                },
            ))
            .await
            .expect("divergences")
            .into_inner();
        assert!(
            div.divergences.is_empty(),
            "the clone wrote what the original wrote: {div:?}"
        );
        eprintln!(
            "clone {id}: cut at seq {}, crashed after seq {} like the original",
            recorded.seq_at_cut, crash.last_seq_applied
        );

        // A second clone, deleted: its namespace and processes go.
        let mut with_gdb = create(Some("0001"));
        with_gdb.gdb = true;
        let second = c
            .create_clone(authed(TOKEN_A, with_gdb))
            .await
            .expect("second clone")
            .into_inner();
        assert_ne!(second.clone_id, id);
        assert!(netns_list().contains(&format!("vmr-{}", second.clone_id)));
        // Its gdb stub listens on loopback; the first clone has none.
        let gdb = c
            .get_debugger(authed(TOKEN_A, pb::GetDebuggerRequest { clone_id: second.clone_id.clone() }))
            .await
            .expect("debugger address")
            .into_inner();
        let gdb_addr: std::net::SocketAddr = gdb.address.parse().expect("host:port");
        assert!(gdb_addr.ip().is_loopback() && gdb_addr.port() != 0, "{gdb_addr}");
        std::net::TcpStream::connect_timeout(&gdb_addr, Duration::from_secs(5)).expect("the gdb stub accepts a connection");
        assert_eq!(
            c.get_debugger(authed(TOKEN_A, pb::GetDebuggerRequest { clone_id: id.clone() })).await.err().map(|s| s.code()),
            Some(Code::FailedPrecondition)
        );
        // Run to a seq before the poison frame: paused there, not crashed;
        // then stopped by the operator.
        let sid = second.clone_id.clone();
        let ctl2 = |action: pb::ControlAction, run_to_seq: u64| {
            authed(TOKEN_A, pb::ControlRequest { clone_id: sid.clone(), action: action as i32, run_to_seq, ..Default::default() })
        };
        assert_eq!(
            c.control(ctl2(pb::ControlAction::RunTo, recorded.seq_at_cut)).await.err().map(|s| s.code()),
            Some(Code::InvalidArgument),
            "a run to the cut itself"
        );
        let target = recorded.poison_seq - 1;
        c.control(ctl2(pb::ControlAction::RunTo, target)).await.expect("run to");
        let start = Instant::now();
        let ran = loop {
            let s = c.get_clone(authed(TOKEN_A, pb::GetCloneRequest { clone_id: sid.clone() })).await.expect("get").into_inner();
            if s.delivered > 0 && s.state == pb::CloneState::Paused as i32 {
                break s;
            }
            assert!(start.elapsed() < WAIT, "the run to seq {target} never paused: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(ran.replayed_seq > recorded.seq_at_cut && ran.replayed_seq <= target, "{ran:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let held = c.get_clone(authed(TOKEN_A, pb::GetCloneRequest { clone_id: sid.clone() })).await.expect("get").into_inner();
        assert_eq!(held.state, pb::CloneState::Paused as i32, "no crash before the poison frame: {held:?}");
        let stopped = c.control(ctl2(pb::ControlAction::Stop, 0)).await.expect("stop").into_inner();
        assert_eq!(stopped.state, pb::CloneState::Stopped as i32, "{stopped:?}");
        assert_eq!(
            c.control(ctl2(pb::ControlAction::Resume, 0)).await.err().map(|s| s.code()),
            Some(Code::FailedPrecondition),
            "resuming a stopped replay"
        );
        // Metrics list both clones with their state.
        let metrics = http_get(&metrics_addr, "/metrics");
        assert!(metrics.contains("replayer_clones 2"), "{metrics}");
        assert!(metrics.contains(&format!("replayer_clone_state{{clone=\"{sid}\",instance=\"{INSTANCE}\",tenant=\"shop\",state=\"stopped\"}} 1")), "{metrics}");
        assert!(metrics.contains(&format!("replayer_clone_state{{clone=\"{id}\",instance=\"{INSTANCE}\",tenant=\"shop\",state=\"crashed\"}} 1")), "{metrics}");
        assert!(metrics.contains("replayer_permission_denied_total"), "{metrics}");
        assert_eq!(
            c.delete_clone(authed(
                TOKEN_B,
                pb::DeleteCloneRequest {
                    clone_id: second.clone_id.clone()
                }
            ))
            .await
            .err()
            .map(|s| s.code()),
            Some(Code::PermissionDenied)
        );
        c.delete_clone(authed(
            TOKEN_A,
            pb::DeleteCloneRequest {
                clone_id: second.clone_id.clone(),
            },
        ))
        .await
        .expect("delete");
        assert!(!netns_list().contains(&format!("vmr-{}", second.clone_id)));
        assert!(
            processes_with(&second.clone_id).is_empty(),
            "{:?}",
            processes_with(&second.clone_id)
        );
        assert_eq!(
            c.get_clone(authed(
                TOKEN_A,
                pb::GetCloneRequest {
                    clone_id: second.clone_id.clone()
                }
            ))
            .await
            .err()
            .map(|s| s.code()),
            Some(Code::NotFound)
        );

        // A clone whose replay drops the poison frame (a seeded fault): it
        // does not crash, and Watch and the divergences report the fault.
        let mut faulty = create(Some("0001"));
        faulty.faults = vec![fault(pb::FaultKind::DropFrame, 0.0, vec![recorded.poison_seq])];
        faulty.seed = 9;
        let third = c.create_clone(authed(TOKEN_A, faulty)).await.expect("clone with a fault").into_inner();
        let tid = third.clone_id.clone();
        let mut watch3 = c.watch(authed(TOKEN_A, pb::WatchRequest { clone_id: tid.clone() })).await.expect("watch").into_inner();
        c.control(authed(TOKEN_A, pb::ControlRequest { clone_id: tid.clone(), action: pb::ControlAction::Start as i32, ..Default::default() }))
            .await
            .expect("start");
        let expected = format!("injected fault: dropped received frame seq {} on net0 (seed 9)", recorded.poison_seq);
        let deadline = Instant::now() + WAIT;
        let watched = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, watch3.message())
                .await
                .expect("Watch reported the injected fault within the timeout")
                .expect("watch stream")
                .expect("the watch ended before reporting the fault");
            if let Some(d) = m.divergence {
                if d.description == expected {
                    break d;
                }
            }
        };
        assert_eq!((watched.seq, watched.device.as_str()), (recorded.poison_seq, "net0"));
        let start = Instant::now();
        let done = loop {
            let s = c.get_clone(authed(TOKEN_A, pb::GetCloneRequest { clone_id: tid.clone() })).await.expect("get").into_inner();
            if s.state != pb::CloneState::Replaying as i32 && s.state != pb::CloneState::Ready as i32 {
                break s;
            }
            assert!(start.elapsed() < WAIT, "the faulty replay never ended: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(done.state, pb::CloneState::Finished as i32, "without the poison frame the clone does not crash: {done:?}");
        assert!(done.detail.contains("1 faults injected (seed 9)"), "{done:?}");
        let div3 = c.get_divergences(authed(TOKEN_A, pb::GetDivergencesRequest { clone_id: tid.clone() })).await.expect("divergences").into_inner();
        let faults: Vec<_> = div3.divergences.iter().filter(|d| d.description.starts_with("injected fault:")).collect();
        assert_eq!(faults.len(), 1, "{div3:?}");
        assert_eq!(faults[0].description, expected);
        eprintln!("clone {tid}: seed 9 dropped seq {}; replay finished without a crash", recorded.poison_seq);
        c.delete_clone(authed(TOKEN_A, pb::DeleteCloneRequest { clone_id: tid.clone() })).await.expect("delete");
        assert!(!netns_list().contains(&format!("vmr-{tid}")));

        // A snapshot whose disk is a chain of packed layers: the clone
        // reads the same disk and crashes after the same seq.
        let mut chained = create(Some("0003"));
        chained.start_paused = false;
        chained.speed = Some(pb::Speed { speed: Some(pb::speed::Speed::AsFastAsPossible(true)) });
        let ch = c.create_clone(authed(TOKEN_A, chained)).await.expect("clone of a layer chain").into_inner();
        let mut w = c.watch(authed(TOKEN_A, pb::WatchRequest { clone_id: ch.clone_id.clone() })).await.expect("watch").into_inner();
        let deadline = Instant::now() + WAIT;
        let mut crash = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, w.message()).await.expect("the chained clone's watch ends").expect("watch stream");
            let Some(m) = m else { break };
            if let Some(l) = m.lifecycle {
                if l.lifecycle.as_ref().map(|x| x.kind) == Some(pb::LifecycleKind::TripleFault as i32) {
                    crash = Some(l);
                }
            }
        }
        let crash = crash.expect("the chained clone crashed");
        assert_eq!(crash.last_seq_applied, recorded.poison_seq);
        let d = c.get_divergences(authed(TOKEN_A, pb::GetDivergencesRequest { clone_id: ch.clone_id.clone() })).await.expect("divergences").into_inner();
        assert!(d.divergences.is_empty(), "the chained clone wrote what the original wrote: {d:?}");
        eprintln!("clone {} of a two-layer disk chain: crashed after seq {}", ch.clone_id, crash.last_seq_applied);
        c.delete_clone(authed(TOKEN_A, pb::DeleteCloneRequest { clone_id: ch.clone_id.clone() })).await.expect("delete");
    });

    // Shut the server down with the first clone still there.
    drop(channel);
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait() {
            break s;
        }
        assert!(
            start.elapsed() < WAIT,
            "the replayer did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "replayer exit: {status}");
    assert!(
        !netns_list().contains("vmr-c"),
        "namespaces left: {}",
        netns_list()
    );
    let left = processes_with(&work.display().to_string());
    assert!(left.is_empty(), "processes left: {left:?}");
}
