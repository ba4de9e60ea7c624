//! Fault hooks: the replayer fails block requests and drops, delays or
//! duplicates frames.
//!
//! A rule targets a device, a direction or block operation and sector
//! range, may wait for a `seq` or a replay-clock time, and may fire with a
//! probability drawn from its own seeded generator, so a run with the same
//! rules, seeds and inputs fires the same faults. Deciding is quick (a lock
//! and a scan of the armed rules); no rule ever makes a device thread sleep:
//! a delayed frame is handed to the replay scheduler instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vmr_proto::pb;

/// What to do with one block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFault {
    /// Process normally.
    None,
    /// Complete with `VIRTIO_BLK_S_IOERR` without touching the disk.
    IoError,
}

/// What to do with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFault {
    /// Deliver normally.
    Pass,
    /// Do not deliver.
    Drop,
    /// Deliver later (replay-clock time).
    Delay(Duration),
    /// Deliver twice.
    Duplicate,
}

impl FrameFault {
    /// The rule kind's name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::Delay(_) => "delay",
            Self::Duplicate => "duplicate",
        }
    }
}

/// Where an event stands in the replay, for rules that wait for a `seq` or
/// a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCtx<'a> {
    /// The device's name.
    pub device: &'a str,
    /// The original's `seq` of the event: an injected frame's own, the last
    /// one delivered before a transmitted frame, the record a block request
    /// answers (None: unknown).
    pub seq: Option<u64>,
    /// Replay clock, nanoseconds.
    pub clock_ns: u64,
}

/// A fault decision and the rule that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fired<T> {
    pub fault: T,
    /// Id of the rule (as returned by [`RuleFaults::add`]); 0 for none.
    pub rule: u64,
}

/// Decides faults. Called for every request or frame, so it must be quick.
pub trait FaultHook: Send + Sync {
    /// Fault for a block request.
    fn block(
        &self,
        ctx: &FaultCtx<'_>,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
    ) -> Fired<BlockFault>;
    /// Fault for a frame in `direction`.
    fn frame(
        &self,
        ctx: &FaultCtx<'_>,
        direction: pb::Direction,
        frame: &[u8],
    ) -> Fired<FrameFault>;
}

/// Kind of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Block requests complete with an I/O error.
    IoError,
    /// Frames are not delivered.
    Drop,
    /// Frames are delivered `delay_ms` later.
    Delay,
    /// Frames are delivered twice.
    Duplicate,
}

/// A fault rule, as given over the control socket. Every field but `kind`
/// is optional; a rule with several conditions fires only when all hold.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    pub kind: FaultKind,
    /// Only this device (by name); any if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Frame rules: `rx` (to the guest) or `tx` (from the guest); required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// `io-error`: only this operation; any if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// `io-error`: first sector of the range (requests that touch it match).
    #[serde(default)]
    pub sector_start: u64,
    /// `io-error`: end of the range (exclusive).
    #[serde(default = "max_u64")]
    pub sector_end: u64,
    /// `delay`: how long, in replay-clock milliseconds (at most 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Firings before the rule disarms itself (at least 1).
    #[serde(default = "one")]
    pub count: u64,
    /// Only events at or after this original `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_seq: Option<u64>,
    /// Only once the replay clock reached this time (ns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ns: Option<u64>,
    /// Fire on a matching event with this probability (0 < p <= 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    /// Seed of the rule's generator (with `probability`; default 0).
    #[serde(default)]
    pub seed: u64,
}

fn one() -> u64 {
    1
}
fn max_u64() -> u64 {
    u64::MAX
}

impl FaultRule {
    /// A rule of `kind` with no conditions, firing once.
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            device: None,
            direction: None,
            op: None,
            sector_start: 0,
            sector_end: u64::MAX,
            delay_ms: None,
            count: 1,
            at_seq: None,
            at_ns: None,
            probability: None,
            seed: 0,
        }
    }

    /// A frame rule of `kind` in `direction` (`rx` or `tx`), firing `count` times.
    pub fn frame(kind: FaultKind, direction: &str, count: u64) -> Self {
        Self {
            direction: Some(direction.into()),
            count,
            ..Self::new(kind)
        }
    }
}

/// Longest delay a rule may ask for.
pub const MAX_DELAY_MS: u64 = 60_000;
/// Most rules armed at once.
pub const MAX_RULES: usize = 1024;

/// Errors in fault rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultError {
    #[error("unknown direction {0:?} (rx|tx)")]
    Direction(String),
    #[error("unknown block operation {0:?}")]
    Op(String),
    #[error("count must be at least 1")]
    Count,
    #[error("a {0} rule needs a direction (rx|tx)")]
    NeedsDirection(&'static str),
    #[error("an io-error rule takes no direction")]
    BlockDirection,
    #[error("op and sectors only apply to io-error rules")]
    FrameOp,
    #[error("a delay rule needs delay_ms between 1 and {MAX_DELAY_MS}")]
    Delay,
    #[error("delay_ms only applies to delay rules")]
    DelayKind,
    #[error("probability must be in (0, 1]")]
    Probability,
    #[error("sector_start must be below sector_end")]
    Range,
    #[error("too many armed rules (limit {MAX_RULES})")]
    TooMany,
}

fn parse_dir(d: &str) -> Result<pb::Direction, FaultError> {
    match d {
        "rx" => Ok(pb::Direction::Rx),
        "tx" => Ok(pb::Direction::Tx),
        other => Err(FaultError::Direction(other.into())),
    }
}

fn parse_op(op: &str) -> Result<pb::BlockOp, FaultError> {
    crate::capture::replay::parse_op(op).ok_or_else(|| FaultError::Op(op.into()))
}

fn kind_name(k: FaultKind) -> &'static str {
    match k {
        FaultKind::IoError => "io-error",
        FaultKind::Drop => "drop",
        FaultKind::Delay => "delay",
        FaultKind::Duplicate => "duplicate",
    }
}

/// splitmix64: small, seedable and the same everywhere.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug)]
struct Armed {
    id: u64,
    rule: FaultRule,
    op: Option<pb::BlockOp>,
    dir: Option<pb::Direction>,
    left: u64,
    rng: u64,
}

impl Armed {
    /// Whether the rule's conditions hold for an event (and, with a
    /// probability, whether its draw says fire: the draw is taken only for
    /// events that meet every other condition).
    fn decide(&mut self, ctx: &FaultCtx<'_>) -> bool {
        let r = &self.rule;
        if r.device.as_deref().is_some_and(|d| d != ctx.device) {
            return false;
        }
        if r.at_seq.is_some_and(|s| ctx.seq.is_none_or(|e| e < s)) {
            return false;
        }
        if r.at_ns.is_some_and(|t| ctx.clock_ns < t) {
            return false;
        }
        match r.probability {
            Some(p) => {
                let x = (splitmix(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64;
                x < p
            }
            None => true,
        }
    }
}

/// A [`FaultHook`] driven by a list of counted rules.
#[derive(Debug, Default)]
pub struct RuleFaults {
    rules: Mutex<Vec<Armed>>,
    next_id: AtomicU64,
}

impl RuleFaults {
    /// No rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks and arms a rule; returns its id.
    pub fn add(&self, rule: FaultRule) -> Result<u64, FaultError> {
        if rule.count == 0 {
            return Err(FaultError::Count);
        }
        if rule.probability.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(FaultError::Probability);
        }
        let (op, dir) = match rule.kind {
            FaultKind::IoError => {
                if rule.direction.is_some() {
                    return Err(FaultError::BlockDirection);
                }
                if rule.sector_start >= rule.sector_end {
                    return Err(FaultError::Range);
                }
                (rule.op.as_deref().map(parse_op).transpose()?, None)
            }
            k => {
                let d = rule
                    .direction
                    .as_deref()
                    .ok_or(FaultError::NeedsDirection(kind_name(k)))?;
                if rule.op.is_some() || rule.sector_start != 0 || rule.sector_end != u64::MAX {
                    return Err(FaultError::FrameOp);
                }
                (None, Some(parse_dir(d)?))
            }
        };
        match (rule.kind, rule.delay_ms) {
            (FaultKind::Delay, Some(1..=MAX_DELAY_MS)) => {}
            (FaultKind::Delay, _) => return Err(FaultError::Delay),
            (_, Some(_)) => return Err(FaultError::DelayKind),
            _ => {}
        }
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        if rules.len() >= MAX_RULES {
            return Err(FaultError::TooMany);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        rules.push(Armed {
            id,
            op,
            dir,
            left: rule.count,
            rng: rule.seed,
            rule,
        });
        Ok(id)
    }

    /// Disarms every rule.
    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Rules still armed, with the firings they have left.
    pub fn armed(&self) -> Vec<(u64, FaultRule, u64)> {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|a| (a.id, a.rule.clone(), a.left))
            .collect()
    }

    /// The first armed rule that `wants` and whose conditions hold: fires
    /// it (counting it down) and returns its id and rule.
    fn fire(
        &self,
        ctx: &FaultCtx<'_>,
        wants: impl Fn(&Armed) -> bool,
    ) -> Option<(u64, FaultKind, Option<u64>)> {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let i = rules.iter_mut().position(|a| wants(a) && a.decide(ctx))?;
        let a = &mut rules[i];
        let out = (a.id, a.rule.kind, a.rule.delay_ms);
        a.left = a.left.saturating_sub(1);
        if a.left == 0 {
            rules.remove(i);
        }
        Some(out)
    }
}

impl FaultHook for RuleFaults {
    fn block(
        &self,
        ctx: &FaultCtx<'_>,
        op: pb::BlockOp,
        sector: u64,
        len: u32,
    ) -> Fired<BlockFault> {
        let end = sector.saturating_add(u64::from(len).div_ceil(512).max(1));
        match self.fire(ctx, |a| {
            a.rule.kind == FaultKind::IoError
                && a.op.is_none_or(|o| o == op)
                && sector < a.rule.sector_end
                && end > a.rule.sector_start
        }) {
            Some((rule, _, _)) => Fired {
                fault: BlockFault::IoError,
                rule,
            },
            None => Fired {
                fault: BlockFault::None,
                rule: 0,
            },
        }
    }

    fn frame(
        &self,
        ctx: &FaultCtx<'_>,
        direction: pb::Direction,
        _frame: &[u8],
    ) -> Fired<FrameFault> {
        let Some((rule, kind, delay)) = self.fire(ctx, |a| a.dir == Some(direction)) else {
            return Fired {
                fault: FrameFault::Pass,
                rule: 0,
            };
        };
        let fault = match kind {
            FaultKind::Drop => FrameFault::Drop,
            FaultKind::Delay => FrameFault::Delay(Duration::from_millis(delay.unwrap_or(0))),
            FaultKind::Duplicate => FrameFault::Duplicate,
            FaultKind::IoError => FrameFault::Pass,
        };
        Fired { fault, rule }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(seq: Option<u64>, clock_ns: u64) -> FaultCtx<'static> {
        FaultCtx {
            device: "net0",
            seq,
            clock_ns,
        }
    }

    fn rule(json: &str) -> FaultRule {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn rules_fire_count_times_and_match_ranges() {
        let f = RuleFaults::new();
        let c = ctx(None, 0);
        f.add(rule(
            r#"{"kind":"io-error","op":"read","sector_start":100,"sector_end":200,"count":2}"#,
        ))
        .unwrap();
        let b = |op, s, l| f.block(&c, op, s, l).fault;
        assert_eq!(b(pb::BlockOp::Read, 0, 512), BlockFault::None);
        assert_eq!(b(pb::BlockOp::Write, 150, 512), BlockFault::None);
        assert_eq!(b(pb::BlockOp::Read, 99, 1024), BlockFault::IoError);
        assert_eq!(b(pb::BlockOp::Read, 199, 512), BlockFault::IoError);
        assert_eq!(b(pb::BlockOp::Read, 150, 512), BlockFault::None);

        let id = f
            .add(FaultRule::frame(FaultKind::Duplicate, "rx", 1))
            .unwrap();
        assert_eq!(f.frame(&c, pb::Direction::Tx, b"").fault, FrameFault::Pass);
        let d = f.frame(&c, pb::Direction::Rx, b"");
        assert_eq!((d.fault, d.rule), (FrameFault::Duplicate, id));
        assert_eq!(f.frame(&c, pb::Direction::Rx, b"").fault, FrameFault::Pass);
        assert_eq!(
            f.add(FaultRule::frame(FaultKind::Drop, "up", 1)),
            Err(FaultError::Direction("up".into()))
        );
        assert!(
            serde_json::from_str::<FaultRule>(r#"{"kind":"drop","direction":"rx","x":1}"#).is_err()
        );
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        let f = RuleFaults::new();
        let cases = [
            (
                r#"{"kind":"drop","direction":"rx","count":0}"#,
                FaultError::Count,
            ),
            (r#"{"kind":"drop"}"#, FaultError::NeedsDirection("drop")),
            (
                r#"{"kind":"io-error","direction":"rx"}"#,
                FaultError::BlockDirection,
            ),
            (r#"{"kind":"delay","direction":"rx"}"#, FaultError::Delay),
            (
                r#"{"kind":"delay","direction":"rx","delay_ms":0}"#,
                FaultError::Delay,
            ),
            (
                r#"{"kind":"delay","direction":"rx","delay_ms":60001}"#,
                FaultError::Delay,
            ),
            (
                r#"{"kind":"drop","direction":"rx","delay_ms":5}"#,
                FaultError::DelayKind,
            ),
            (
                r#"{"kind":"drop","direction":"rx","op":"read"}"#,
                FaultError::FrameOp,
            ),
            (
                r#"{"kind":"drop","direction":"rx","probability":0}"#,
                FaultError::Probability,
            ),
            (
                r#"{"kind":"drop","direction":"rx","probability":1.5}"#,
                FaultError::Probability,
            ),
            (
                r#"{"kind":"io-error","sector_start":8,"sector_end":8}"#,
                FaultError::Range,
            ),
            (
                r#"{"kind":"io-error","op":"scribble"}"#,
                FaultError::Op("scribble".into()),
            ),
        ];
        for (json, err) in cases {
            assert_eq!(f.add(rule(json)), Err(err), "{json}");
        }
        assert!(f.armed().is_empty());
    }

    #[test]
    fn seq_time_device_and_probability_conditions() {
        let f = RuleFaults::new();
        f.add(rule(
            r#"{"kind":"drop","direction":"rx","at_seq":100,"device":"net0"}"#,
        ))
        .unwrap();
        assert_eq!(
            f.frame(&ctx(Some(99), 0), pb::Direction::Rx, b"").fault,
            FrameFault::Pass
        );
        assert_eq!(
            f.frame(&ctx(None, 0), pb::Direction::Rx, b"").fault,
            FrameFault::Pass
        );
        let other = FaultCtx {
            device: "net1",
            seq: Some(100),
            clock_ns: 0,
        };
        assert_eq!(
            f.frame(&other, pb::Direction::Rx, b"").fault,
            FrameFault::Pass
        );
        assert_eq!(
            f.frame(&ctx(Some(100), 0), pb::Direction::Rx, b"").fault,
            FrameFault::Drop
        );

        f.add(rule(r#"{"kind":"io-error","at_ns":5000000}"#))
            .unwrap();
        let b = |c: &FaultCtx<'_>| f.block(c, pb::BlockOp::Write, 0, 512).fault;
        assert_eq!(b(&ctx(None, 4_999_999)), BlockFault::None);
        assert_eq!(b(&ctx(None, 5_000_000)), BlockFault::IoError);

        // The same seed fires on the same events.
        let pattern = |seed: u64| {
            let f = RuleFaults::new();
            f.add(FaultRule {
                probability: Some(0.3),
                seed,
                count: 1_000_000,
                ..FaultRule::frame(FaultKind::Drop, "rx", 1)
            })
            .unwrap();
            (0..1000)
                .map(|i| {
                    f.frame(&ctx(Some(i), 0), pb::Direction::Rx, b"").fault == FrameFault::Drop
                })
                .collect::<Vec<_>>()
        };
        let a = pattern(7);
        assert_eq!(a, pattern(7));
        assert_ne!(a, pattern(8));
        let hits = a.iter().filter(|&&x| x).count();
        assert!((200..400).contains(&hits), "{hits} of 1000 at p=0.3");
    }
}
