//! The replayer's library: reading a recorded instance's events back from
//! Kafka and scheduling them for replay into a clone.
//!
//! - [`source`]: consumes the event topics of one instance from a snapshot's
//!   offsets and merges them by `seq` into one ordered stream, reporting gaps
//!   and undecodable records as items of the stream.
//! - [`schedule`]: rebuilds the guest's running time from event timestamps and
//!   recorded pauses ([`schedule::Timeline`]) and paces dispatch
//!   ([`schedule::ReplayClock`]: 0.1x to 100x, as fast as possible, pause,
//!   step, run to a `seq` or a time).
//! - [`window`]: which part of the recording to replay.
//! - [`filter`]: which events to deliver.
//! - [`replay`]: the loop that ties them together, up to a delivery
//!   callback.
//! - [`outputs`]: the live output stream of a replay-mode backend
//!   (acknowledged deliveries, the clone's frames and block requests).
//!
//! The gRPC service is built on these modules; they do not depend on it.

pub mod clone;
pub mod filter;
pub mod net;
pub mod outputs;
pub mod replay;
pub mod schedule;
pub mod service;
pub mod source;
pub mod window;

use std::fmt;

use vmr_proto::{topics, Payload};

/// The kind of a recorded event, one per event topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Block,
    Net,
    Env,
    Lifecycle,
}

impl Kind {
    /// Every kind, in the order of [`topics::EVENT_TOPICS`].
    pub const ALL: [Kind; 4] = [Kind::Block, Kind::Net, Kind::Env, Kind::Lifecycle];

    /// The kind of a payload.
    pub fn of(payload: &Payload) -> Kind {
        match payload {
            Payload::Block(_) => Kind::Block,
            Payload::Net(_) => Kind::Net,
            Payload::Env(_) => Kind::Env,
            Payload::Lifecycle(_) => Kind::Lifecycle,
        }
    }

    /// The standard topic of this kind (`vmr.block.v1`, ...).
    pub fn topic(self) -> &'static str {
        match self {
            Kind::Block => topics::BLOCK,
            Kind::Net => topics::NET,
            Kind::Env => topics::ENV,
            Kind::Lifecycle => topics::LIFECYCLE,
        }
    }

    /// The kind's short name: `block`, `net`, `env` or `lifecycle`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Block => "block",
            Kind::Net => "net",
            Kind::Env => "env",
            Kind::Lifecycle => "lifecycle",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "block" => Ok(Kind::Block),
            "net" => Ok(Kind::Net),
            "env" => Ok(Kind::Env),
            "lifecycle" => Ok(Kind::Lifecycle),
            other => Err(format!(
                "unknown event kind {other:?}: use block, net, env or lifecycle"
            )),
        }
    }
}

/// A set of [`Kind`]s.
///
/// ```
/// use replayer::{Kind, KindSet};
/// let set: KindSet = [Kind::Net, Kind::Lifecycle].into_iter().collect();
/// assert!(set.contains(Kind::Net) && !set.contains(Kind::Block));
/// assert!(KindSet::all().is_all());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KindSet(u8);

impl KindSet {
    /// No kind.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Every kind.
    pub const fn all() -> Self {
        Self(0b1111)
    }

    pub fn contains(self, kind: Kind) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn insert(&mut self, kind: Kind) {
        self.0 |= kind.bit();
    }

    pub fn remove(&mut self, kind: Kind) {
        self.0 &= !kind.bit();
    }

    /// This set with `kind` added.
    pub fn with(mut self, kind: Kind) -> Self {
        self.insert(kind);
        self
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn is_all(self) -> bool {
        self.0 == Self::all().0
    }

    /// The kinds in the set, in [`Kind::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Kind> {
        Kind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

impl FromIterator<Kind> for KindSet {
    fn from_iter<I: IntoIterator<Item = Kind>>(iter: I) -> Self {
        let mut s = KindSet::empty();
        for k in iter {
            s.insert(k);
        }
        s
    }
}

impl fmt::Debug for KindSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}
