//! Fault hooks: the replayer fails block requests and drops, delays or
//! duplicates frames.

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
    /// Wait, then deliver.
    Delay(Duration),
    /// Deliver twice.
    Duplicate,
}

/// Decides faults. Called on the device threads for every request or frame,
/// so it must be quick.
pub trait FaultHook: Send + Sync {
    /// Fault for a block request.
    fn block(&self, op: pb::BlockOp, sector: u64, len: u32) -> BlockFault;
    /// Fault for a frame in `direction`.
    fn frame(&self, direction: pb::Direction, frame: &[u8]) -> FrameFault;
}

/// A fault rule, as given over the control socket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FaultRule {
    /// Fail the next `count` block requests matching `op` (any if absent)
    /// that touch sectors in `[sector_start, sector_end)`.
    IoError {
        #[serde(default)]
        op: Option<String>,
        #[serde(default)]
        sector_start: u64,
        #[serde(default = "max_u64")]
        sector_end: u64,
        #[serde(default = "one")]
        count: u64,
    },
    /// Drop the next `count` frames in `direction` (`rx` or `tx`).
    Drop {
        direction: String,
        #[serde(default = "one")]
        count: u64,
    },
    /// Delay the next `count` frames in `direction` by `delay_ms`.
    Delay {
        direction: String,
        delay_ms: u64,
        #[serde(default = "one")]
        count: u64,
    },
    /// Deliver the next `count` frames in `direction` twice.
    Duplicate {
        direction: String,
        #[serde(default = "one")]
        count: u64,
    },
}

fn one() -> u64 {
    1
}
fn max_u64() -> u64 {
    u64::MAX
}

/// Errors in fault rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultError {
    #[error("unknown direction {0:?} (rx|tx)")]
    Direction(String),
    #[error("unknown block operation {0:?}")]
    Op(String),
}

fn parse_dir(d: &str) -> Result<pb::Direction, FaultError> {
    match d {
        "rx" => Ok(pb::Direction::Rx),
        "tx" => Ok(pb::Direction::Tx),
        other => Err(FaultError::Direction(other.into())),
    }
}

fn parse_op(op: &str) -> Result<pb::BlockOp, FaultError> {
    Ok(match op {
        "read" => pb::BlockOp::Read,
        "write" => pb::BlockOp::Write,
        "flush" => pb::BlockOp::Flush,
        "discard" => pb::BlockOp::Discard,
        "write-zeroes" => pb::BlockOp::WriteZeroes,
        "get-id" => pb::BlockOp::GetId,
        other => return Err(FaultError::Op(other.into())),
    })
}

#[derive(Debug)]
struct Armed {
    rule: FaultRule,
    op: Option<pb::BlockOp>,
    dir: Option<pb::Direction>,
    left: u64,
}

/// A [`FaultHook`] driven by a list of one-shot (counted) rules.
#[derive(Debug, Default)]
pub struct RuleFaults {
    rules: Mutex<Vec<Armed>>,
}

impl RuleFaults {
    /// No rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms a rule.
    pub fn add(&self, rule: FaultRule) -> Result<(), FaultError> {
        let (op, dir, left) = match &rule {
            FaultRule::IoError { op, count, .. } => {
                (op.as_deref().map(parse_op).transpose()?, None, *count)
            }
            FaultRule::Drop { direction, count }
            | FaultRule::Delay {
                direction, count, ..
            }
            | FaultRule::Duplicate { direction, count } => {
                (None, Some(parse_dir(direction)?), *count)
            }
        };
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Armed {
                rule,
                op,
                dir,
                left,
            });
        Ok(())
    }

    /// Disarms every rule.
    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl FaultHook for RuleFaults {
    fn block(&self, op: pb::BlockOp, sector: u64, len: u32) -> BlockFault {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let end = sector.saturating_add(u64::from(len).div_ceil(512).max(1));
        let hit = rules.iter_mut().position(|a| match a.rule {
            FaultRule::IoError {
                sector_start,
                sector_end,
                ..
            } => a.op.is_none_or(|o| o == op) && sector < sector_end && end > sector_start,
            _ => false,
        });
        match hit {
            Some(i) => {
                rules[i].left -= 1;
                if rules[i].left == 0 {
                    rules.remove(i);
                }
                BlockFault::IoError
            }
            None => BlockFault::None,
        }
    }

    fn frame(&self, direction: pb::Direction, _frame: &[u8]) -> FrameFault {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = rules
            .iter()
            .position(|a| a.dir == Some(direction) && !matches!(a.rule, FaultRule::IoError { .. }))
        else {
            return FrameFault::Pass;
        };
        let fault = match rules[i].rule {
            FaultRule::Drop { .. } => FrameFault::Drop,
            FaultRule::Delay { delay_ms, .. } => FrameFault::Delay(Duration::from_millis(delay_ms)),
            FaultRule::Duplicate { .. } => FrameFault::Duplicate,
            FaultRule::IoError { .. } => FrameFault::Pass,
        };
        rules[i].left -= 1;
        if rules[i].left == 0 {
            rules.remove(i);
        }
        fault
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_fire_count_times_and_match_ranges() {
        let f = RuleFaults::new();
        let rule: FaultRule = serde_json::from_str(
            r#"{"kind":"io-error","op":"read","sector_start":100,"sector_end":200,"count":2}"#,
        )
        .unwrap();
        f.add(rule).unwrap();
        assert_eq!(f.block(pb::BlockOp::Read, 0, 512), BlockFault::None);
        assert_eq!(f.block(pb::BlockOp::Write, 150, 512), BlockFault::None);
        assert_eq!(f.block(pb::BlockOp::Read, 99, 1024), BlockFault::IoError);
        assert_eq!(f.block(pb::BlockOp::Read, 199, 512), BlockFault::IoError);
        assert_eq!(f.block(pb::BlockOp::Read, 150, 512), BlockFault::None);

        f.add(FaultRule::Duplicate {
            direction: "rx".into(),
            count: 1,
        })
        .unwrap();
        assert_eq!(f.frame(pb::Direction::Tx, b""), FrameFault::Pass);
        assert_eq!(f.frame(pb::Direction::Rx, b""), FrameFault::Duplicate);
        assert_eq!(f.frame(pb::Direction::Rx, b""), FrameFault::Pass);
        assert!(f
            .add(FaultRule::Drop {
                direction: "up".into(),
                count: 1
            })
            .is_err());
        assert!(
            serde_json::from_str::<FaultRule>(r#"{"kind":"drop","direction":"rx","x":1}"#).is_err()
        );
    }
}
