//! The console's client of the replayer's gRPC API: JSON shapes of the
//! browser's requests and the conversions to and from `vmr.v1`.

use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use vmr_proto::pb;

/// A lazily connected channel to the replayer (it reconnects by itself
/// when the replayer comes back).
pub fn channel(url: &str) -> Result<Channel, String> {
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("replayer_url {url:?}: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(2));
    Ok(ep.connect_lazy())
}

/// A request carrying the caller's bearer token.
pub fn authed<T>(token: &str, msg: T) -> Result<Request<T>, Status> {
    let mut r = Request::new(msg);
    let v: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| Status::unauthenticated("the token is not printable ASCII"))?;
    r.metadata_mut().insert("authorization", v);
    Ok(r)
}

/// Whether a status means the replayer could not be reached at all.
pub fn is_unreachable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) && (s.message().contains("transport")
        || s.message().contains("connect")
        || s.message().contains("connection")
        || s.message().contains("tcp")
        || s.code() == Code::Unavailable)
}

/// Name of a clone state.
pub fn state_name(s: i32) -> &'static str {
    match pb::CloneState::try_from(s).unwrap_or(pb::CloneState::Unspecified) {
        pb::CloneState::Restoring => "restoring",
        pb::CloneState::Replaying => "replaying",
        pb::CloneState::Paused => "paused",
        pb::CloneState::Finished => "finished",
        pb::CloneState::Failed => "failed",
        pb::CloneState::Crashed => "crashed",
        pb::CloneState::Stopped => "stopped",
        pb::CloneState::Ready => "ready",
        pb::CloneState::Live => "live",
        pb::CloneState::Unspecified => "unspecified",
    }
}

/// A clone as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CloneOut {
    pub clone_id: String,
    pub instance_id: String,
    pub snapshot_id: String,
    pub state: &'static str,
    pub replayed_seq: u64,
    pub delivered: u64,
    pub seq_at_cut: u64,
    pub divergences: u32,
    pub detail: String,
    /// Speed factor; `None` with `fast` for as fast as possible.
    pub speed: Option<f64>,
    pub fast: bool,
    /// Recorded wall time of `replayed_seq` (the position on the timeline).
    pub position_ns: Option<u64>,
    /// How to reach the guest once live (empty otherwise).
    pub access_hint: String,
    pub faults_injected: u32,
    pub switches: u32,
}

impl CloneOut {
    pub fn from_pb(c: &pb::Clone, time_of_seq: impl Fn(&str, u64) -> Option<u64>) -> Self {
        let (speed, fast) = match c.speed.as_ref().and_then(|s| s.speed.as_ref()) {
            Some(pb::speed::Speed::Factor(f)) => (Some(*f), false),
            Some(pb::speed::Speed::AsFastAsPossible(true)) => (None, true),
            _ => (Some(1.0), false),
        };
        let pos_seq = c.replayed_seq.max(c.seq_at_cut);
        Self {
            clone_id: c.clone_id.clone(),
            instance_id: c.instance_id.clone(),
            snapshot_id: c.snapshot_id.clone(),
            state: state_name(c.state),
            replayed_seq: c.replayed_seq,
            delivered: c.delivered,
            seq_at_cut: c.seq_at_cut,
            divergences: c.divergences,
            detail: c.detail.clone(),
            speed,
            fast,
            position_ns: if pos_seq > 0 {
                time_of_seq(&c.instance_id, pos_seq)
            } else {
                None
            },
            access_hint: c
                .access
                .as_ref()
                .map(|a| a.hint.clone())
                .unwrap_or_default(),
            faults_injected: c.faults_injected,
            switches: c.switches,
        }
    }
}

/// A divergence as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DivergenceOut {
    pub seq: u64,
    pub device: String,
    pub description: String,
    pub kind: &'static str,
}

impl From<&pb::Divergence> for DivergenceOut {
    fn from(d: &pb::Divergence) -> Self {
        let kind =
            match pb::DivergenceKind::try_from(d.kind).unwrap_or(pb::DivergenceKind::Unspecified) {
                pb::DivergenceKind::BlockWriteData => "block_write_data",
                pb::DivergenceKind::BlockWriteMissing => "block_write_missing",
                pb::DivergenceKind::Crash => "crash",
                pb::DivergenceKind::NetStream => "net_stream",
                pb::DivergenceKind::InjectedFault => "injected_fault",
                pb::DivergenceKind::BlockReadData => "block_read_data",
                pb::DivergenceKind::Unspecified => "other",
            };
        Self {
            seq: d.seq,
            device: d.device.clone(),
            description: d.description.clone(),
            kind,
        }
    }
}

/// Which event kinds to replay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterIn {
    #[serde(default)]
    pub block: bool,
    #[serde(default)]
    pub net: bool,
    #[serde(default)]
    pub env: bool,
}

/// One fault rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultIn {
    /// `drop`, `delay`, `duplicate` or `block_ioerr`.
    pub kind: String,
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub from_seq: u64,
    #[serde(default)]
    pub to_seq: u64,
    #[serde(default)]
    pub at_seq: Vec<u64>,
    #[serde(default)]
    pub probability: f64,
    #[serde(default)]
    pub max_count: u32,
    #[serde(default)]
    pub delay_ms: u64,
}

/// The page's request to start a replay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateIn {
    pub instance_id: String,
    /// Unset: the latest snapshot.
    pub snapshot_id: Option<String>,
    #[serde(default)]
    pub from_seq: u64,
    #[serde(default)]
    pub to_seq: u64,
    /// Speed factor (0.1 to 100); unset: recorded speed.
    pub speed: Option<f64>,
    #[serde(default)]
    pub fast: bool,
    pub filter: Option<FilterIn>,
    #[serde(default)]
    pub faults: Vec<FaultIn>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub start_paused: bool,
}

fn speed_pb(speed: Option<f64>, fast: bool) -> Option<pb::Speed> {
    if fast {
        Some(pb::Speed {
            speed: Some(pb::speed::Speed::AsFastAsPossible(true)),
        })
    } else {
        speed.map(|f| pb::Speed {
            speed: Some(pb::speed::Speed::Factor(f)),
        })
    }
}

impl CreateIn {
    pub fn to_pb(&self) -> Result<pb::CreateCloneRequest, String> {
        let faults = self
            .faults
            .iter()
            .map(|f| {
                let kind = match f.kind.as_str() {
                    "drop" => pb::FaultKind::DropFrame,
                    "delay" => pb::FaultKind::DelayFrame,
                    "duplicate" => pb::FaultKind::DuplicateFrame,
                    "block_ioerr" => pb::FaultKind::BlockIoerr,
                    other => return Err(format!("unknown fault kind {other:?}")),
                };
                Ok(pb::FaultSpec {
                    kind: kind as i32,
                    target: Some(pb::FaultTarget {
                        device: f.device.clone(),
                        from_seq: f.from_seq,
                        to_seq: f.to_seq,
                        ..Default::default()
                    }),
                    schedule: Some(pb::FaultSchedule {
                        probability: f.probability,
                        at_seq: f.at_seq.clone(),
                        max_count: f.max_count,
                        ..Default::default()
                    }),
                    delay_ms: f.delay_ms,
                    ..Default::default()
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pb::CreateCloneRequest {
            instance_id: self.instance_id.clone(),
            snapshot: self.snapshot_id.as_ref().map(|id| pb::SnapshotSelector {
                pick: Some(pb::snapshot_selector::Pick::SnapshotId(id.clone())),
            }),
            window: (self.from_seq != 0 || self.to_seq != 0).then_some(pb::ReplayWindow {
                from_seq: self.from_seq,
                to_seq: self.to_seq,
                ..Default::default()
            }),
            speed: speed_pb(self.speed, self.fast),
            filter: self.filter.as_ref().map(|f| pb::EventFilter {
                include_block: f.block,
                include_net: f.net,
                include_env: f.env,
                ..Default::default()
            }),
            faults,
            seed: self.seed,
            start_paused: self.start_paused,
            gdb: false,
        })
    }
}

/// The page's control request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlIn {
    /// `start`, `pause`, `resume`, `step`, `run_to`, `set_speed`, `stop`,
    /// `switch_snapshot`, `go_live`.
    pub action: String,
    #[serde(default)]
    pub steps: u64,
    #[serde(default)]
    pub run_to_seq: u64,
    pub speed: Option<f64>,
    #[serde(default)]
    pub fast: bool,
    /// `switch_snapshot`: the snapshot to restart from (unset: the same).
    pub snapshot_id: Option<String>,
    /// `switch_snapshot`: the window to restart with.
    #[serde(default)]
    pub from_seq: u64,
    #[serde(default)]
    pub to_seq: u64,
    /// `switch_snapshot`: start the replay at once.
    #[serde(default)]
    pub start: bool,
}

/// Why a control request cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("unknown action {0:?}")]
    Unknown(String),
}

impl ControlIn {
    pub fn to_pb(&self, clone_id: &str) -> Result<pb::ControlRequest, ControlError> {
        use pb::ControlAction as A;
        let action = match self.action.as_str() {
            "start" => A::Start,
            "pause" => A::Pause,
            "resume" => A::Resume,
            "step" => A::Step,
            "run_to" => A::RunTo,
            "set_speed" => A::SetSpeed,
            "stop" => A::Stop,
            "switch_snapshot" => A::Switch,
            "go_live" => A::GoLive,
            other => return Err(ControlError::Unknown(other.to_string())),
        };
        Ok(pb::ControlRequest {
            clone_id: clone_id.to_string(),
            action: action as i32,
            steps: if action == A::Step {
                self.steps.max(1)
            } else {
                self.steps
            },
            speed: speed_pb(self.speed, self.fast),
            run_to_seq: self.run_to_seq,
            snapshot: self.snapshot_id.as_ref().map(|id| pb::SnapshotSelector {
                pick: Some(pb::snapshot_selector::Pick::SnapshotId(id.clone())),
            }),
            window: (self.from_seq != 0 || self.to_seq != 0).then_some(pb::ReplayWindow {
                from_seq: self.from_seq,
                to_seq: self.to_seq,
                ..Default::default()
            }),
            start: self.start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_conversion() {
        let c: CreateIn = serde_json::from_str(
            r#"{"instance_id":"shop-1","snapshot_id":"0001","speed":2.5,"from_seq":3,
                "filter":{"net":true},"faults":[{"kind":"drop","at_seq":[9]}],"seed":9}"#,
        )
        .expect("valid json");
        let p = c.to_pb().expect("converts");
        assert_eq!(p.window.expect("window").from_seq, 3);
        assert!(p
            .filter
            .as_ref()
            .is_some_and(|f| f.include_net && !f.include_block));
        assert_eq!(p.faults[0].kind, pb::FaultKind::DropFrame as i32);
        assert!(matches!(
            p.speed.and_then(|s| s.speed),
            Some(pb::speed::Speed::Factor(f)) if f == 2.5
        ));
        let bad: CreateIn =
            serde_json::from_str(r#"{"instance_id":"x","faults":[{"kind":"melt"}]}"#)
                .expect("valid json");
        assert!(bad.to_pb().expect_err("refused").contains("melt"));
    }

    #[test]
    fn controls() {
        let step: ControlIn = serde_json::from_str(r#"{"action":"step"}"#).expect("json");
        let p = step.to_pb("c1").expect("converts");
        assert_eq!((p.action, p.steps), (pb::ControlAction::Step as i32, 1));
        let sw: ControlIn = serde_json::from_str(
            r#"{"action":"switch_snapshot","snapshot_id":"0002","start":true}"#,
        )
        .expect("json");
        let p = sw.to_pb("c1").expect("converts");
        assert_eq!(p.action, pb::ControlAction::Switch as i32);
        assert!(p.start && p.snapshot.is_some());
        let bad: ControlIn = serde_json::from_str(r#"{"action":"explode"}"#).expect("json");
        assert!(matches!(bad.to_pb("c1"), Err(ControlError::Unknown(_))));
    }
}
