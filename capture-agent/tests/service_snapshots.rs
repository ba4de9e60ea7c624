//! The snapshot RPCs of `capture-agent serve` end to end: the agent as a
//! real process built from its `[snapshots]` table, a real Tansu broker and
//! registry, and microVM instances of the freestanding test guest. Over
//! gRPC, `TakeSnapshot` on a running instance returns an operation that
//! succeeds and `ListSnapshots` lists its snapshot; an instance launched
//! with `snapshot_interval_secs` is snapshotted on its schedule, which ends
//! when the instance is stopped. Three instances launched with the same
//! period share the host's schedule: their cuts (the manifests' times) are
//! staggered by a third of the period, and by half of it once one of them
//! is stopped; retention (keep the newest two) keeps a pinned snapshot and
//! deletes the others' objects from the store.
//!
//! Needs /dev/kvm, the Tansu broker (scripts/setup.sh) and the workspace
//! binaries (`cargo build -p vhost-tap -p schema-registry --bins`). Run:
//! `cargo test -p capture-agent --test service_snapshots -- --test-threads=1`.

#[path = "common/agent_rig.rs"]
mod agent_rig;
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use agent_rig::{require_kvm, test_guest_images, walk, Agent, AgentSetup};
use common::Stack;
use vmr_proto::pb;
use vmr_proto::pb::capture_agent_client::CaptureAgentClient;

type Client = CaptureAgentClient<tonic::transport::Channel>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn spec(interval_secs: u32) -> pb::InstanceSpec {
    pb::InstanceSpec {
        image: "test-guest".into(),
        driver: "microvm".into(),
        snapshot_interval_secs: interval_secs,
        ..Default::default()
    }
}

async fn snapshot_ids(c: &mut Client, instance: &str) -> Vec<String> {
    c.list_snapshots(pb::ListSnapshotsRequest {
        instance_id: instance.into(),
    })
    .await
    .unwrap_or_else(|s| panic!("ListSnapshots {instance}: {s:?}"))
    .into_inner()
    .snapshots
    .into_iter()
    .map(|s| {
        s.manifest
            .expect("a listed snapshot has its manifest")
            .snapshot_id
    })
    .collect()
}

#[test]
fn take_snapshot_over_grpc_succeeds_is_listed_and_schedules_follow_the_launch() {
    require_kvm();
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    test_guest_images(w, 32);
    let store = w.join("store");
    let mut agent = Agent::start(AgentSetup::snapshots(
        w,
        &stack,
        &format!(
            "store-url = \"file://{}\"\nkeep-last = 20\n",
            store.display()
        ),
    ));
    rt().block_on(async {
        let mut c = agent.client().await;

        // On demand: an instance without a schedule.
        let m = c
            .launch_instance(pb::LaunchInstanceRequest {
                instance_id: "vm-snap-1".into(),
                spec: Some(spec(0)),
            })
            .await
            .unwrap_or_else(|s| panic!("launch: {s:?}\n{}", agent.log_text()))
            .into_inner();
        assert_eq!(m.state, pb::InstanceState::Running as i32, "{m:?}");
        assert!(snapshot_ids(&mut c, "vm-snap-1").await.is_empty());
        let op = c
            .take_snapshot(pb::TakeSnapshotRequest {
                instance_id: "vm-snap-1".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("TakeSnapshot: {s:?}\n{}", agent.log_text()))
            .into_inner();
        assert_eq!(op.instance_id, "vm-snap-1");
        assert!(!op.id.is_empty());
        let end = Instant::now() + Duration::from_secs(120);
        let done = loop {
            let o = c
                .get_operation(pb::GetOperationRequest {
                    operation_id: op.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if o.done {
                break o;
            }
            assert!(
                Instant::now() < end,
                "operation {} not done in 120 s (stage {})\n{}",
                op.id,
                o.stage,
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            done.state,
            pb::OperationState::Succeeded as i32,
            "{done:?}\n{}",
            agent.log_text()
        );
        let manifest = done
            .manifest
            .expect("a succeeded operation has its manifest");
        assert_eq!(manifest.instance_id, "vm-snap-1");
        assert!(!manifest.snapshot_id.is_empty());
        let listed = snapshot_ids(&mut c, "vm-snap-1").await;
        assert_eq!(listed, vec![manifest.snapshot_id.clone()]);
        // The store is the one `store-url` names.
        assert!(
            std::fs::read_dir(&store).is_ok_and(|mut d| d.next().is_some()),
            "the file store {} holds the snapshot",
            store.display()
        );
        // No schedule for it: the count stays at one.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(snapshot_ids(&mut c, "vm-snap-1").await.len(), 1);
        c.stop_instance(pb::StopInstanceRequest {
            instance_id: "vm-snap-1".into(),
        })
        .await
        .unwrap();

        // Scheduled: every 2 s from the launch until the stop.
        c.launch_instance(pb::LaunchInstanceRequest {
            instance_id: "vm-snap-2".into(),
            spec: Some(spec(2)),
        })
        .await
        .unwrap_or_else(|s| panic!("launch: {s:?}\n{}", agent.log_text()));
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            let n = snapshot_ids(&mut c, "vm-snap-2").await.len();
            if n >= 3 {
                break;
            }
            assert!(
                Instant::now() < end,
                "{n} scheduled snapshots of vm-snap-2 in 90 s\n{}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c.stop_instance(pb::StopInstanceRequest {
            instance_id: "vm-snap-2".into(),
        })
        .await
        .unwrap();
        // A snapshot already started when the stop came may still land.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after_stop = snapshot_ids(&mut c, "vm-snap-2").await.len();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            snapshot_ids(&mut c, "vm-snap-2").await.len(),
            after_stop,
            "no scheduled snapshot after the stop"
        );
    });
    let log = agent.log_text();
    assert!(log.contains("snapshot schedule started"), "{log}");
    assert!(log.contains("snapshot schedule stopped"), "{log}");
    agent.stop_cleanly();
}

/// Every snapshot listed for `instance`: (id, cut wall time ns, pinned).
async fn listed(c: &mut Client, instance: &str) -> Vec<(String, u64, bool)> {
    c.list_snapshots(pb::ListSnapshotsRequest {
        instance_id: instance.into(),
    })
    .await
    .unwrap_or_else(|s| panic!("ListSnapshots {instance}: {s:?}"))
    .into_inner()
    .snapshots
    .into_iter()
    .map(|s| {
        let m = s.manifest.expect("a listed snapshot has its manifest");
        (m.snapshot_id, m.wall_time_ns, s.pinned)
    })
    .collect()
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Every cut seen so far, per instance: id to wall time.
type Seen = BTreeMap<String, BTreeMap<String, u64>>;

/// Polls the listings of `instances` into `seen` until `until` is past.
async fn watch_cuts(c: &mut Client, instances: &[&str], seen: &mut Seen, until: SystemTime) {
    while SystemTime::now() < until {
        for i in instances {
            for (id, t, _) in listed(c, i).await {
                seen.entry(i.to_string()).or_default().insert(id, t);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `x - y` on a circle of `p`, in `[-p/2, p/2)`.
fn circ(x: f64, y: f64, p: f64) -> f64 {
    (x - y + p / 2.0).rem_euclid(p) - p / 2.0
}

/// Checks the cuts of `instances` (in join order) cut at or after
/// `from_ns` and before `to_ns`, against the schedule's rule with all of
/// them in one group: each instance on its own slots `period` apart (a slot
/// skipped because the instance's previous snapshot still ran shows as a
/// gap of two periods), and instance `k` of `n` `k·period/n` after the
/// first one's slots. Returns each instance's offset from the first (s).
fn check_stagger(
    seen: &Seen,
    instances: &[&str],
    period: Duration,
    from_ns: u64,
    to_ns: u64,
    what: &str,
) -> Vec<f64> {
    let p = period.as_secs_f64();
    // Cut times lag their slot by the broker round trip, the pause and the
    // devices' checkpoints, which vary on a loaded host.
    let tol = 1.2;
    let mut cuts: Vec<Vec<f64>> = Vec::new();
    for i in instances {
        let mut ts: Vec<u64> = seen
            .get(*i)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default();
        ts.retain(|&t| t >= from_ns && t < to_ns);
        ts.sort_unstable();
        let ts: Vec<f64> = ts.iter().map(|&t| (t - from_ns) as f64 / 1e9).collect();
        assert!(
            ts.len() >= 3,
            "{what}: {i} has {} cuts in the window: {ts:.2?}",
            ts.len()
        );
        for w in ts.windows(2) {
            let d = w[1] - w[0];
            let k = (d / p).round();
            assert!(
                k >= 1.0 && (d - k * p).abs() < tol,
                "{what}: consecutive cuts of {i} {d:.2} s apart, period {p} s ({ts:.2?})"
            );
        }
        cuts.push(ts);
    }
    let n = instances.len() as f64;
    let mut offsets = Vec::new();
    for (k, ts) in cuts.iter().enumerate() {
        let want = k as f64 * p / n;
        let mean: f64 = ts
            .iter()
            .map(|t| {
                let off = want + circ((t - cuts[0][0]).rem_euclid(p), want, p);
                assert!(
                    (off - want).abs() < tol,
                    "{what}: {} cut at {t:.2} s, {off:.2} s after {}'s slots, expected {want:.2} s",
                    instances[k],
                    instances[0]
                );
                off
            })
            .sum::<f64>()
            / ts.len() as f64;
        offsets.push(mean);
    }
    offsets
}

#[test]
fn schedules_are_staggered_across_the_host_and_retention_keeps_a_pinned_snapshot() {
    require_kvm();
    let stack = Stack::start();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    test_guest_images(w, 16);
    let store = w.join("store");
    let mut agent = Agent::start(AgentSetup::snapshots(
        w,
        &stack,
        &format!(
            // No fsync: this test is about timing, and fsyncs on a busy
            // host stretch the uploads past the slots.
            "store-url = \"file://{}\"\nkeep-last = 2\nfsync = false\n",
            store.display()
        ),
    ));
    let period = Duration::from_secs(10);
    let names = ["vm-st-a", "vm-st-b", "vm-st-c"];
    let mut seen = Seen::new();
    let mut pinned = String::new();
    let (all_in, one_out) = rt().block_on(async {
        let mut c = agent.client().await;
        for n in names {
            let m = c
                .launch_instance(pb::LaunchInstanceRequest {
                    instance_id: n.into(),
                    spec: Some(spec(period.as_secs() as u32)),
                })
                .await
                .unwrap_or_else(|s| panic!("launch {n}: {s:?}\n{}", agent.log_text()))
                .into_inner();
            assert_eq!(m.state, pb::InstanceState::Running as i32, "{m:?}");
        }
        let all_in = SystemTime::now();
        // Pin a's first scheduled snapshot as soon as it is listed.
        let end = Instant::now() + Duration::from_secs(60);
        while pinned.is_empty() {
            if let Some((id, _, _)) = listed(&mut c, "vm-st-a").await.last() {
                pinned = id.clone();
            }
            assert!(
                Instant::now() < end,
                "no scheduled snapshot of vm-st-a\n{}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let e = c
            .pin_snapshot(pb::PinSnapshotRequest {
                instance_id: "vm-st-a".into(),
                snapshot_id: pinned.clone(),
                pinned: true,
            })
            .await
            .unwrap_or_else(|s| panic!("PinSnapshot: {s:?}"))
            .into_inner();
        assert!(e.pinned);
        // Three instances: a third of the period apart, after a period to
        // settle from the launches' re-spreads.
        watch_cuts(&mut c, &names, &mut seen, all_in + period * 5).await;
        // One leaves: the other two re-spread to half a period.
        c.stop_instance(pb::StopInstanceRequest {
            instance_id: "vm-st-c".into(),
        })
        .await
        .unwrap();
        let one_out = SystemTime::now();
        watch_cuts(&mut c, &names, &mut seen, one_out + period * 5).await;
        for n in &names[..2] {
            c.stop_instance(pb::StopInstanceRequest {
                instance_id: n.to_string(),
            })
            .await
            .unwrap();
        }
        (all_in, one_out)
    });
    for (i, cuts) in &seen {
        let rel: Vec<String> = cuts
            .values()
            .map(|&t| format!("{:.2}", (t as f64 - unix_ns(all_in) as f64) / 1e9))
            .collect();
        eprintln!("{i}: cuts at {rel:?} s after the last launch");
    }
    let off3 = check_stagger(
        &seen,
        &names,
        period,
        unix_ns(all_in + period),
        unix_ns(one_out),
        "three instances",
    );
    let off2 = check_stagger(
        &seen,
        &names[..2],
        period,
        unix_ns(one_out + period),
        u64::MAX,
        "after vm-st-c stopped",
    );
    eprintln!("offsets from vm-st-a's slots: three instances {off3:.2?} s, two {off2:.2?} s");
    // No two cuts of the host at once.
    let mut every: Vec<u64> = seen.values().flat_map(|m| m.values().copied()).collect();
    every.sort_unstable();
    for w in every.windows(2) {
        assert!(w[1] - w[0] > 100_000_000, "two cuts within 100 ms: {w:?}");
    }

    // Retention, once the last snapshots landed: the newest two of each,
    // and a's pinned one; the objects of the others are gone.
    rt().block_on(async {
        let mut c = agent.client().await;
        // A snapshot started before the stops may still land: wait until
        // the listings stay the same for 5 s.
        let end = Instant::now() + Duration::from_secs(90);
        let mut last = Vec::new();
        let mut since = Instant::now();
        loop {
            let mut now = Vec::new();
            for n in names {
                for (id, t, _) in listed(&mut c, n).await {
                    seen.entry(n.to_string()).or_default().insert(id.clone(), t);
                    now.push(id);
                }
            }
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() > Duration::from_secs(5) {
                break;
            }
            assert!(Instant::now() < end, "the listings keep changing");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for n in names {
            let left = listed(&mut c, n).await;
            let ids: Vec<&str> = left.iter().map(|(id, _, _)| id.as_str()).collect();
            let want = if n == "vm-st-a" { 3 } else { 2 };
            assert_eq!(left.len(), want, "{n} keeps {ids:?}");
            if n == "vm-st-a" {
                assert!(
                    ids.contains(&pinned.as_str()),
                    "the pinned {pinned} is kept"
                );
                assert!(left.iter().any(|(id, _, p)| *id == pinned && *p));
            } else {
                assert!(left.iter().all(|(_, _, p)| !p));
            }
            // The kept ones are the newest, and whole in the store.
            let mut times: Vec<u64> = seen[n].values().copied().collect();
            times.sort_unstable();
            let newest: Vec<u64> = times.iter().rev().take(2).copied().collect();
            for (id, t, _) in &left {
                assert!(
                    *id == pinned || newest.contains(t),
                    "{n}: {id} is not among the newest"
                );
                let files = walk(&store.join(n).join(id));
                assert!(
                    files.iter().any(|f| f.ends_with("manifest.json"))
                        && files.iter().any(|f| f.to_string_lossy().contains("memory")),
                    "{n}/{id} is whole in the store: {files:?}"
                );
            }
            let deleted: Vec<&String> = seen[n]
                .keys()
                .filter(|id| !ids.contains(&id.as_str()))
                .collect();
            assert!(!deleted.is_empty(), "{n}: retention deleted nothing");
            // Only objects a kept snapshot names stay (the disk layers a
            // later snapshot takes over from its base).
            let named: Vec<PathBuf> = c
                .list_snapshots(pb::ListSnapshotsRequest {
                    instance_id: n.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .snapshots
                .into_iter()
                .flat_map(|s| s.manifest.unwrap().objects)
                .map(|o| store.join(n).join(o.key))
                .collect();
            for id in deleted {
                let files = walk(&store.join(n).join(id));
                let stray: Vec<&PathBuf> = files.iter().filter(|f| !named.contains(f)).collect();
                assert!(
                    stray.is_empty(),
                    "{n}/{id} was deleted, yet {stray:?} remain"
                );
                assert!(
                    !files
                        .iter()
                        .any(|f| f.ends_with("manifest.json")
                            || f.to_string_lossy().contains("memory")),
                    "{n}/{id}: {files:?}"
                );
            }
        }
    });
    let log = agent.log_text();
    assert!(log.contains("snapshot deleted by retention"), "{log}");
    assert!(log.contains("snapshot schedule spread"), "{log}");
    agent.stop_cleanly();
}
