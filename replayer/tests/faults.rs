//! The replayer's fault injector: seeded decisions are repeatable, every
//! injected fault is recorded, and bad fault requests are refused with the
//! reason.

use std::time::Duration;

use replayer::clone::faults::{
    rules_from_specs, FaultAction, FaultError, FaultInjector, FaultRule,
};

/// Event faults (I/O errors armed, synthetic frames) over 1000 recorded
/// events of two disks and a NIC at 1 ms each; what was injected.
fn run_events(seed: u64) -> Vec<String> {
    let rules = vec![
        FaultRule {
            action: FaultAction::IoError {
                op: Some(vmr_proto::BlockOp::Write),
                sector_start: 0,
                sector_end: u64::MAX,
                count: 1,
            },
            device: Some("vda".into()),
            from_seq: 0,
            to_seq: 0,
            probability: 0.05,
            at_seq: vec![],
            at_time_ns: vec![],
            max_count: 10,
        },
        FaultRule {
            action: FaultAction::Synthetic(frame(0)),
            device: Some("net0".into()),
            from_seq: 0,
            to_seq: 0,
            probability: 0.0,
            at_seq: vec![],
            at_time_ns: vec![250_000_000, 500_000_000],
            max_count: 0,
        },
    ];
    let mut inj = FaultInjector::new(seed, rules);
    for seq in 1..=1000u64 {
        let dev = match seq % 3 {
            0 => Some("vda"),
            1 => Some("vdb"),
            _ => None,
        };
        let _ = inj.apply_event(seq, dev, seq * 1_000_000);
    }
    inj.injected().iter().map(|i| i.to_string()).collect()
}

#[test]
fn event_faults_repeat_from_the_seed() {
    let a = run_events(5);
    assert_eq!(a, run_events(5), "one seed, one set of faults");
    assert_ne!(a, run_events(6), "another seed gives other faults");
    let io: Vec<&String> = a.iter().filter(|s| s.starts_with("armed")).collect();
    assert!(!io.is_empty() && io.len() <= 10, "{io:?}");
    assert!(
        io.iter()
            .all(|s| s.contains("for write") && s.ends_with("on vda")),
        "{io:?}"
    );
    // Synthetic frames: once at each time, on the first event at or after it.
    let synth: Vec<&String> = a
        .iter()
        .filter(|s| s.starts_with("injected a synthetic"))
        .collect();
    assert_eq!(
        synth,
        vec![
            "injected a synthetic frame of 60 bytes at seq 250 on net0",
            "injected a synthetic frame of 60 bytes at seq 500 on net0"
        ]
    );
}
use vmr_proto::pb;

fn frame(seq: u64) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[12] = 0x88;
    f[13] = 0xb5;
    f[14..22].copy_from_slice(&seq.to_be_bytes());
    f
}

fn rules() -> Vec<FaultRule> {
    vec![
        FaultRule {
            action: FaultAction::Drop,
            device: Some("net0".into()),
            from_seq: 0,
            to_seq: 0,
            probability: 0.2,
            at_seq: vec![],
            at_time_ns: vec![],
            max_count: 0,
        },
        FaultRule {
            action: FaultAction::Corrupt,
            device: None,
            from_seq: 100,
            to_seq: 300,
            probability: 0.1,
            at_seq: vec![],
            at_time_ns: vec![],
            max_count: 5,
        },
        FaultRule {
            action: FaultAction::Duplicate,
            device: None,
            from_seq: 0,
            to_seq: 0,
            probability: 0.0,
            at_seq: vec![7, 8],
            at_time_ns: vec![],
            max_count: 0,
        },
    ]
}

/// Runs 1000 frames of two NICs through an injector; returns what it
/// injected and the frames as they would be delivered.
fn run(seed: u64) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut inj = FaultInjector::new(seed, rules());
    let mut delivered = Vec::new();
    for seq in 1..=1000u64 {
        let dev = if seq % 3 == 0 { "net1" } else { "net0" };
        let mut f = frame(seq);
        let fault = inj.apply(seq, dev, &mut f);
        if fault.as_ref().map(|x| x.action.clone()) != Some(FaultAction::Drop) {
            delivered.push(f);
        }
    }
    assert_eq!(inj.seed(), seed);
    (
        inj.injected().iter().map(|i| i.to_string()).collect(),
        delivered,
    )
}

#[test]
fn same_seed_injects_the_same_faults() {
    let (a, fa) = run(42);
    let (b, fb) = run(42);
    assert_eq!(a, b);
    assert_eq!(fa, fb);
    let (c, _) = run(43);
    assert_ne!(a, c, "another seed gives other faults");

    // Drops only on net0, about 20% of its ~667 frames.
    let drops: Vec<&String> = a.iter().filter(|s| s.starts_with("dropped")).collect();
    assert!(drops.iter().all(|s| s.ends_with("on net0")), "{drops:?}");
    assert!((60..=220).contains(&drops.len()), "{} drops", drops.len());
    // Corruptions: at most 5, all within seq 100..=300, past the header.
    let corrupt: Vec<&String> = a.iter().filter(|s| s.starts_with("corrupted")).collect();
    assert!(!corrupt.is_empty() && corrupt.len() <= 5, "{corrupt:?}");
    // Exact duplicates on seq 7 and 8 unless a drop on the same frame came first.
    for seq in [7u64, 8] {
        assert!(
            a.iter().any(|s| s.contains(&format!("frame seq {seq} "))),
            "seq {seq} has a fault: {a:?}"
        );
    }
    let changed = fa
        .iter()
        .filter(|f| {
            let seq = u64::from_be_bytes(f[14..22].try_into().unwrap());
            **f != frame(seq)
        })
        .count();
    // A corruption may hit the seq bytes themselves; count differing frames
    // instead of matching them to seqs.
    assert!(changed <= corrupt.len());
    assert!(changed >= 1 || corrupt.is_empty());
}

#[test]
fn corruption_inverts_one_byte_past_the_ethernet_header() {
    let mut inj = FaultInjector::new(
        7,
        vec![FaultRule {
            action: FaultAction::Corrupt,
            device: None,
            from_seq: 0,
            to_seq: 0,
            probability: 0.0,
            at_seq: vec![5],
            at_time_ns: vec![],
            max_count: 0,
        }],
    );
    let mut f = frame(5);
    let orig = f.clone();
    let got = inj.apply(5, "net0", &mut f).expect("seq 5 is scheduled");
    let off = got.offset.expect("a corruption has an offset");
    assert!(off >= 14 && off < f.len());
    assert_eq!(f[off], orig[off] ^ 0xff);
    let diff = f.iter().zip(&orig).filter(|(a, b)| a != b).count();
    assert_eq!(diff, 1);
    assert!(inj.apply(6, "net0", &mut frame(6)).is_none());
    assert_eq!(inj.injected().len(), 1);
}

#[test]
fn fault_specs_convert_and_bad_ones_are_refused() {
    let spec = |kind: pb::FaultKind, p: f64, delay_ms: u64| pb::FaultSpec {
        kind: kind as i32,
        target: Some(pb::FaultTarget {
            device: "net0".into(),
            from_seq: 10,
            to_seq: 20,
            ..Default::default()
        }),
        schedule: Some(pb::FaultSchedule {
            probability: p,
            at_seq: vec![],
            max_count: 3,
            ..Default::default()
        }),
        delay_ms,
        ..Default::default()
    };
    let r = rules_from_specs(&[
        spec(pb::FaultKind::DropFrame, 0.5, 0),
        spec(pb::FaultKind::DelayFrame, 1.0, 250),
        spec(pb::FaultKind::DuplicateFrame, 0.1, 0),
    ])
    .expect("valid specs");
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].action, FaultAction::Drop);
    assert_eq!(r[1].action, FaultAction::Delay(Duration::from_millis(250)));
    assert_eq!(r[2].device.as_deref(), Some("net0"));
    assert_eq!((r[2].from_seq, r[2].to_seq, r[2].max_count), (10, 20, 3));

    // Block I/O errors: op, sector range and count; corruption; a
    // synthetic frame.
    let mut io = spec(pb::FaultKind::BlockIoerr, 0.5, 0);
    io.target = Some(pb::FaultTarget {
        device: "vda".into(),
        op: pb::BlockOp::Read as i32,
        sector_start: 100,
        sector_end: 200,
        ..Default::default()
    });
    io.count = 2;
    let mut synth = spec(pb::FaultKind::SyntheticFrame, 0.0, 0);
    synth.schedule = Some(pb::FaultSchedule {
        at_time_ns: vec![5_000_000],
        ..Default::default()
    });
    synth.frame = frame(0);
    let r = rules_from_specs(&[io, spec(pb::FaultKind::CorruptFrame, 0.2, 0), synth])
        .expect("valid specs");
    assert_eq!(
        r[0].action,
        FaultAction::IoError {
            op: Some(vmr_proto::BlockOp::Read),
            sector_start: 100,
            sector_end: 200,
            count: 2
        }
    );
    assert_eq!(r[1].action, FaultAction::Corrupt);
    assert_eq!(r[2].action, FaultAction::Synthetic(frame(0)));
    assert_eq!(r[2].at_time_ns, vec![5_000_000]);
    let mut bad_range = spec(pb::FaultKind::BlockIoerr, 0.5, 0);
    bad_range.target = Some(pb::FaultTarget {
        sector_start: 10,
        sector_end: 10,
        ..Default::default()
    });
    let mut short = spec(pb::FaultKind::SyntheticFrame, 0.5, 0);
    short.frame = vec![0; 10];
    let mut op_on_frames = spec(pb::FaultKind::DropFrame, 0.5, 0);
    op_on_frames.target = Some(pb::FaultTarget {
        op: pb::BlockOp::Write as i32,
        ..Default::default()
    });
    for bad in [bad_range, short, op_on_frames] {
        let e = rules_from_specs(&[bad]).unwrap_err();
        assert!(matches!(e, FaultError::Invalid { index: 0, .. }), "{e}");
    }
    for bad in [
        spec(pb::FaultKind::Unspecified, 0.5, 0),
        spec(pb::FaultKind::DropFrame, 1.5, 0),
        spec(pb::FaultKind::DropFrame, 0.0, 0),
        spec(pb::FaultKind::DelayFrame, 0.5, 0),
    ] {
        let e = rules_from_specs(&[bad]).unwrap_err();
        assert!(matches!(e, FaultError::Invalid { index: 0, .. }), "{e}");
    }
}
