//! Which part of a recording to replay.
//!
//! A [`Window`] is resolved against the recording's [`Span`] into
//! [`Bounds`], which place each event [`Position::Before`], inside or
//! [`Position::After`] the window. Forms:
//!
//! | form | text | meaning |
//! | --- | --- | --- |
//! | [`Window::All`] | `all` | everything after the cut |
//! | [`Window::AfterCut`] | `30s`, `first 500ms` | the first guest-time stretch after the snapshot |
//! | [`Window::Percent`] | `10%..40%` | a share of the recorded span (guest time) |
//! | [`Window::Time`] | `time:2s..5s`, `time:2s..` | guest-time offsets since the cut |
//! | [`Window::WallTime`] | `wall:<ns>..<ns>` | recorded wall-clock times (ns since the Unix epoch) |
//! | [`Window::Seq`] | `seq:100..200`, `seq:100..` | a `seq` range, both ends included |
//! | [`Window::Portion`] | `middle-third`, `2/3`, `last-quarter` | one of N equal parts of the span |
//!
//! ```
//! use std::time::Duration;
//! use replayer::window::{Position, Span, Window};
//!
//! let span = Span { first_seq: 1, last_seq: 90, guest: Duration::from_secs(9), first_wall_ns: 0, last_wall_ns: 9_000_000_000 };
//! let b: Window = "middle-third".parse().unwrap();
//! let b = b.resolve(Some(&span)).unwrap();
//! assert_eq!(b.position(10, Duration::from_secs(2), 0), Position::Before);
//! assert_eq!(b.position(40, Duration::from_secs(4), 0), Position::Inside);
//! assert_eq!(b.position(70, Duration::from_secs(7), 0), Position::After);
//! ```

use std::str::FromStr;
use std::time::Duration;

use crate::schedule::Timeline;
use crate::source::{EventSource, SourceError, SourceItem};

/// Errors of windows.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WindowError {
    #[error("window {0:?} is not understood: {1}")]
    Parse(String, String),
    #[error("the window is empty: {0}")]
    Empty(String),
    #[error("{0} out of range: {1}")]
    OutOfRange(&'static str, String),
    #[error("this window needs the recording's span, which was not measured")]
    NeedsSpan,
    #[error("the window starts after the recording ends: {0}")]
    PastEnd(String),
}

/// What part of the recording to replay.
#[derive(Debug, Clone, PartialEq)]
pub enum Window {
    All,
    /// The first stretch of guest time after the snapshot.
    AfterCut(Duration),
    /// From `from` to `to` percent (0 to 100) of the recorded span.
    Percent {
        from: f64,
        to: f64,
    },
    /// Guest-time offsets since the cut; `to: None` runs to the end.
    Time {
        from: Duration,
        to: Option<Duration>,
    },
    /// Recorded wall-clock times, ns since the Unix epoch, both included.
    WallTime {
        from_ns: u64,
        to_ns: u64,
    },
    /// A `seq` range, both ends included; `to: None` runs to the end.
    Seq {
        from: u64,
        to: Option<u64>,
    },
    /// Part `index` (0-based) of `parts` equal parts of the span.
    Portion {
        index: u32,
        parts: u32,
    },
}

/// The extent of a recording after the cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Guest-time offset of the last event.
    pub guest: Duration,
    pub first_wall_ns: u64,
    pub last_wall_ns: u64,
}

impl Span {
    /// Measures a recording by reading `source` to its end, feeding
    /// `timeline` (this reads every event the source reads: it costs a
    /// full pass). `None` when there is no event after the cut.
    pub fn measure(
        source: EventSource,
        mut timeline: Timeline,
    ) -> Result<Option<Span>, SourceError> {
        let mut span: Option<Span> = None;
        for item in source {
            if let SourceItem::Event(e) = item? {
                let e = e.event;
                let offset = timeline.observe(&e);
                let s = span.get_or_insert(Span {
                    first_seq: e.seq,
                    last_seq: e.seq,
                    guest: offset,
                    first_wall_ns: e.wall_time_ns,
                    last_wall_ns: e.wall_time_ns,
                });
                s.last_seq = e.seq;
                s.guest = offset;
                s.first_wall_ns = s.first_wall_ns.min(e.wall_time_ns);
                s.last_wall_ns = s.last_wall_ns.max(e.wall_time_ns);
            }
        }
        Ok(span)
    }
}

/// Where an event lies relative to a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Before,
    Inside,
    After,
}

/// A resolved window: every bound that applies. An event is inside when it
/// is within all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bounds {
    pub seq_from: u64,
    pub seq_to: Option<u64>,
    pub guest_from: Duration,
    pub guest_to: Option<Duration>,
    pub wall_from_ns: u64,
    pub wall_to_ns: Option<u64>,
}

impl Bounds {
    /// Where the event `seq` at `guest_offset`, recorded at `wall_ns`, lies.
    pub fn position(&self, seq: u64, guest_offset: Duration, wall_ns: u64) -> Position {
        if self.seq_to.is_some_and(|t| seq > t)
            || self.guest_to.is_some_and(|t| guest_offset > t)
            || self.wall_to_ns.is_some_and(|t| wall_ns > t)
        {
            Position::After
        } else if seq < self.seq_from
            || guest_offset < self.guest_from
            || wall_ns < self.wall_from_ns
        {
            Position::Before
        } else {
            Position::Inside
        }
    }

    /// The last `seq` the source needs, when the window bounds it.
    pub fn until_seq(&self) -> Option<u64> {
        self.seq_to
    }
}

fn check_pct(p: f64) -> Result<f64, WindowError> {
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(WindowError::OutOfRange(
            "percentage",
            format!("{p} is not within 0..100"),
        ))
    }
}

impl Window {
    /// Whether resolving needs the recording's [`Span`].
    pub fn needs_span(&self) -> bool {
        matches!(self, Window::Percent { .. } | Window::Portion { .. })
    }

    /// Resolves the window. `span` is needed by [`Window::needs_span`]
    /// forms; when given, it is also used to refuse windows that start
    /// after the recording ends.
    pub fn resolve(&self, span: Option<&Span>) -> Result<Bounds, WindowError> {
        let share = |from: f64, to: f64| -> Result<Bounds, WindowError> {
            let span = span.ok_or(WindowError::NeedsSpan)?;
            let at = |p: f64| Duration::from_secs_f64(span.guest.as_secs_f64() * p / 100.0);
            Ok(Bounds {
                guest_from: at(from),
                guest_to: Some(at(to)),
                ..Bounds::default()
            })
        };
        let b = match *self {
            Window::All => Bounds::default(),
            Window::AfterCut(d) => {
                if d.is_zero() {
                    return Err(WindowError::Empty("a zero duration".into()));
                }
                Bounds {
                    guest_to: Some(d),
                    ..Bounds::default()
                }
            }
            Window::Percent { from, to } => {
                let (from, to) = (check_pct(from)?, check_pct(to)?);
                if from >= to {
                    return Err(WindowError::Empty(format!("{from}% is not before {to}%")));
                }
                share(from, to)?
            }
            Window::Portion { index, parts } => {
                if parts == 0 || index >= parts {
                    return Err(WindowError::OutOfRange(
                        "portion",
                        format!("part {} of {parts} does not exist", index + 1),
                    ));
                }
                let part = 100.0 / f64::from(parts);
                let mut b = share(part * f64::from(index), part * f64::from(index + 1))?;
                if index + 1 == parts {
                    // The last part runs to the end, rounding included.
                    b.guest_to = None;
                }
                b
            }
            Window::Time { from, to } => {
                if to.is_some_and(|t| t <= from) {
                    return Err(WindowError::Empty(format!("{from:?} is not before {to:?}")));
                }
                Bounds {
                    guest_from: from,
                    guest_to: to,
                    ..Bounds::default()
                }
            }
            Window::WallTime { from_ns, to_ns } => {
                if to_ns < from_ns {
                    return Err(WindowError::Empty(format!("{from_ns} is after {to_ns}")));
                }
                Bounds {
                    wall_from_ns: from_ns,
                    wall_to_ns: Some(to_ns),
                    ..Bounds::default()
                }
            }
            Window::Seq { from, to } => {
                if to.is_some_and(|t| t < from) {
                    return Err(WindowError::Empty(format!("seq {from} is after {to:?}")));
                }
                Bounds {
                    seq_from: from,
                    seq_to: to,
                    ..Bounds::default()
                }
            }
        };
        if let Some(span) = span {
            if b.seq_from > span.last_seq {
                return Err(WindowError::PastEnd(format!(
                    "seq {} > last seq {}",
                    b.seq_from, span.last_seq
                )));
            }
            if b.guest_from > span.guest {
                return Err(WindowError::PastEnd(format!(
                    "{:?} > recorded {:?}",
                    b.guest_from, span.guest
                )));
            }
            if b.wall_from_ns > span.last_wall_ns {
                return Err(WindowError::PastEnd(format!(
                    "wall time {} > last {}",
                    b.wall_from_ns, span.last_wall_ns
                )));
            }
        }
        Ok(b)
    }
}

impl Window {
    /// Refuses a window that no recording can make sense of (an empty
    /// range, a percentage outside 0 to 100, a part that does not exist),
    /// without the recording: what [`Window::resolve`] refuses whatever the
    /// span.
    pub fn validate(&self) -> Result<(), WindowError> {
        // A span longer than any recording, so only the window's own
        // contradictions are found.
        let any = Span {
            first_seq: 0,
            last_seq: u64::MAX,
            guest: Duration::from_secs(1 << 40),
            first_wall_ns: 0,
            last_wall_ns: u64::MAX,
        };
        self.resolve(Some(&any)).map(|_| ())
    }
}

/// `1.5s`, `500ms`, `20us`, `100ns`: the shortest exact form.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        "0s".into()
    } else if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else if ns.is_multiple_of(1_000) {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

/// The text form, which [`Window::from_str`] reads back.
impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Window::All => f.write_str("all"),
            Window::AfterCut(d) => f.write_str(&format_duration(*d)),
            Window::Percent { from, to } => write!(f, "{from}%..{to}%"),
            Window::Time { from, to } => write!(
                f,
                "time:{}..{}",
                format_duration(*from),
                to.map(format_duration).unwrap_or_default()
            ),
            Window::WallTime { from_ns, to_ns } => write!(f, "wall:{from_ns}..{to_ns}"),
            Window::Seq { from, to } => write!(
                f,
                "seq:{from}..{}",
                to.map(|t| t.to_string()).unwrap_or_default()
            ),
            Window::Portion { index, parts } => write!(f, "{}/{parts}", index + 1),
        }
    }
}

/// Parses `1.5s`, `500ms`, `20us`, `100ns`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?} has no unit (ns, us, ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{num:?} is not a number"))?;
    let secs = match unit {
        "ns" => n / 1e9,
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown unit {u:?} (ns, us, ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn portion(name: &str) -> Option<(u32, u32)> {
    let (pos, part) = name.split_once('-')?;
    let parts = match part {
        "half" => 2,
        "third" => 3,
        "quarter" => 4,
        "fifth" => 5,
        "tenth" => 10,
        _ => return None,
    };
    let index = match (pos, parts) {
        ("first", _) => 0,
        ("second", _) => 1,
        ("middle", 3) => 1,
        ("third", p) if p >= 3 => 2,
        ("last", p) => p - 1,
        _ => return None,
    };
    Some((index, parts))
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(text: &str) -> Result<Self, WindowError> {
        let err = |why: String| WindowError::Parse(text.to_string(), why);
        let s = text.trim().to_ascii_lowercase();
        if s == "all" || s.is_empty() {
            return Ok(Window::All);
        }
        let range = |r: &str| -> Result<(String, Option<String>), WindowError> {
            let (a, b) = r
                .split_once("..")
                .ok_or_else(|| err(format!("{r:?} is not a range a..b")))?;
            let b = b.trim();
            Ok((a.trim().to_string(), (!b.is_empty()).then(|| b.to_string())))
        };
        if let Some(r) = s.strip_prefix("seq:") {
            let (a, b) = range(r)?;
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| err(format!("{v:?} is not a seq")))
            };
            return Ok(Window::Seq {
                from: num(&a)?,
                to: b.as_deref().map(num).transpose()?,
            });
        }
        if let Some(r) = s.strip_prefix("time:") {
            let (a, b) = range(r)?;
            return Ok(Window::Time {
                from: parse_duration(&a).map_err(err)?,
                to: b.as_deref().map(parse_duration).transpose().map_err(err)?,
            });
        }
        if let Some(r) = s.strip_prefix("wall:") {
            let (a, b) = range(r)?;
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| err(format!("{v:?} is not ns")))
            };
            let b = b.ok_or_else(|| err("a wall-time window needs its end".into()))?;
            return Ok(Window::WallTime {
                from_ns: num(&a)?,
                to_ns: num(&b)?,
            });
        }
        if s.contains('%') {
            let (a, b) = range(&s)?;
            let pct = |v: &str| {
                v.trim_end_matches('%')
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| err(format!("{v:?} is not a percentage")))
            };
            return Ok(Window::Percent {
                from: pct(&a)?,
                to: pct(b.as_deref().unwrap_or("100"))?,
            });
        }
        if let Some((index, parts)) = portion(&s) {
            return Ok(Window::Portion { index, parts });
        }
        if let Some((i, n)) = s.split_once('/') {
            let num = |v: &str| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| err(format!("{v:?} is not a count")))
            };
            let (i, n) = (num(i)?, num(n)?);
            if i == 0 || i > n {
                return Err(err(format!(
                    "part {i} of {n} does not exist (parts count from 1)"
                )));
            }
            return Ok(Window::Portion {
                index: i - 1,
                parts: n,
            });
        }
        let d = s.strip_prefix("first").unwrap_or(&s);
        parse_duration(d).map(Window::AfterCut).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: Span = Span {
        first_seq: 11,
        last_seq: 110,
        guest: Duration::from_secs(10),
        first_wall_ns: 1_000,
        last_wall_ns: 2_000,
    };

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn parse(s: &str) -> Window {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn all_takes_everything() {
        let b = parse("all").resolve(None).unwrap();
        assert_eq!(b.position(11, secs(0.0), 0), Position::Inside);
        assert_eq!(b.position(u64::MAX, secs(1e6), u64::MAX), Position::Inside);
        assert_eq!(b.until_seq(), None);
    }

    #[test]
    fn duration_after_the_cut() {
        assert_eq!(parse("30s"), Window::AfterCut(secs(30.0)));
        assert_eq!(parse("first 500ms"), Window::AfterCut(secs(0.5)));
        let b = parse("2s").resolve(None).unwrap();
        assert_eq!(b.position(12, secs(1.9), 0), Position::Inside);
        assert_eq!(b.position(13, secs(2.0), 0), Position::Inside);
        assert_eq!(b.position(14, secs(2.1), 0), Position::After);
        assert!(matches!(
            Window::AfterCut(Duration::ZERO).resolve(None),
            Err(WindowError::Empty(_))
        ));
    }

    #[test]
    fn percentage_of_the_span() {
        let w = parse("10%..40%");
        assert_eq!(
            w,
            Window::Percent {
                from: 10.0,
                to: 40.0
            }
        );
        assert!(w.needs_span());
        assert_eq!(w.resolve(None), Err(WindowError::NeedsSpan));
        let b = w.resolve(Some(&SPAN)).unwrap();
        assert_eq!(b.position(20, secs(0.9), 0), Position::Before);
        assert_eq!(b.position(30, secs(1.0), 0), Position::Inside);
        assert_eq!(b.position(40, secs(4.0), 0), Position::Inside);
        assert_eq!(b.position(50, secs(4.1), 0), Position::After);
        assert_eq!(
            parse("90%.."),
            Window::Percent {
                from: 90.0,
                to: 100.0
            }
        );
        assert!(matches!(
            parse("50%..20%").resolve(Some(&SPAN)),
            Err(WindowError::Empty(_))
        ));
        assert!(matches!(
            parse("10%..120%").resolve(Some(&SPAN)),
            Err(WindowError::OutOfRange(..))
        ));
    }

    #[test]
    fn explicit_time_range() {
        assert_eq!(
            parse("time:2s..5s"),
            Window::Time {
                from: secs(2.0),
                to: Some(secs(5.0))
            }
        );
        let b = parse("time:2s..5s").resolve(Some(&SPAN)).unwrap();
        assert_eq!(b.position(11, secs(1.0), 0), Position::Before);
        assert_eq!(b.position(40, secs(3.0), 0), Position::Inside);
        assert_eq!(b.position(90, secs(6.0), 0), Position::After);
        let open = parse("time:2s..").resolve(None).unwrap();
        assert_eq!(open.position(90, secs(600.0), 0), Position::Inside);
        assert!(matches!(
            parse("time:20s..").resolve(Some(&SPAN)),
            Err(WindowError::PastEnd(_))
        ));
        assert!(matches!(
            parse("time:5s..5s").resolve(None),
            Err(WindowError::Empty(_))
        ));
    }

    #[test]
    fn wall_time_range() {
        let b = parse("wall:1200..1500").resolve(Some(&SPAN)).unwrap();
        assert_eq!(b.position(11, secs(0.0), 1100), Position::Before);
        assert_eq!(b.position(12, secs(0.0), 1200), Position::Inside);
        assert_eq!(b.position(13, secs(0.0), 1501), Position::After);
        assert!("wall:5..".parse::<Window>().is_err());
        assert!(matches!(
            parse("wall:3000..4000").resolve(Some(&SPAN)),
            Err(WindowError::PastEnd(_))
        ));
    }

    #[test]
    fn seq_range() {
        let w = parse("seq:20..30");
        assert_eq!(
            w,
            Window::Seq {
                from: 20,
                to: Some(30)
            }
        );
        let b = w.resolve(Some(&SPAN)).unwrap();
        assert_eq!(b.until_seq(), Some(30));
        assert_eq!(b.position(19, secs(0.0), 0), Position::Before);
        assert_eq!(b.position(20, secs(0.0), 0), Position::Inside);
        assert_eq!(b.position(30, secs(0.0), 0), Position::Inside);
        assert_eq!(b.position(31, secs(0.0), 0), Position::After);
        assert_eq!(parse("seq:50.."), Window::Seq { from: 50, to: None });
        assert!(matches!(
            parse("seq:30..20").resolve(None),
            Err(WindowError::Empty(_))
        ));
        assert!(matches!(
            parse("seq:500..").resolve(Some(&SPAN)),
            Err(WindowError::PastEnd(_))
        ));
        assert!("seq:a..b".parse::<Window>().is_err());
    }

    #[test]
    fn portions() {
        assert_eq!(
            parse("middle-third"),
            Window::Portion { index: 1, parts: 3 }
        );
        assert_eq!(parse("first-half"), Window::Portion { index: 0, parts: 2 });
        assert_eq!(
            parse("last-quarter"),
            Window::Portion { index: 3, parts: 4 }
        );
        assert_eq!(parse("2/3"), Window::Portion { index: 1, parts: 3 });
        let b = parse("middle-third").resolve(Some(&SPAN)).unwrap();
        assert_eq!(b.position(20, secs(3.0), 0), Position::Before);
        assert_eq!(b.position(50, secs(5.0), 0), Position::Inside);
        assert_eq!(b.position(80, secs(7.0), 0), Position::After);
        let last = parse("last-third").resolve(Some(&SPAN)).unwrap();
        assert_eq!(last.position(110, secs(10.0), 0), Position::Inside);
        assert_eq!(last.guest_to, None);
        assert!("0/3".parse::<Window>().is_err());
        assert!("4/3".parse::<Window>().is_err());
        assert!(matches!(
            Window::Portion { index: 3, parts: 3 }.resolve(Some(&SPAN)),
            Err(WindowError::OutOfRange(..))
        ));
        assert_eq!(parse("1/3").resolve(None), Err(WindowError::NeedsSpan));
    }

    #[test]
    fn text_form_reads_back() {
        for text in [
            "all",
            "30s",
            "1500ms",
            "10%..40%",
            "time:2s..5s",
            "time:250us..",
            "wall:1200..1500",
            "seq:20..30",
            "seq:50..",
            "2/3",
        ] {
            let w = parse(text);
            assert_eq!(w.to_string(), text);
            assert_eq!(parse(&w.to_string()), w);
        }
        assert_eq!(parse("middle-third").to_string(), "2/3");
    }

    #[test]
    fn validate_refuses_only_what_no_recording_fits() {
        assert!(parse("middle-third").validate().is_ok());
        assert!(parse("time:20s..").validate().is_ok());
        assert!(parse("seq:500..").validate().is_ok());
        for bad in ["50%..20%", "seq:30..20", "time:5s..5s", "wall:9..3"] {
            assert!(parse(bad).validate().is_err(), "{bad}");
        }
        assert!(Window::Portion { index: 3, parts: 3 }.validate().is_err());
        assert!(Window::AfterCut(Duration::ZERO).validate().is_err());
        assert!(Window::Percent {
            from: f64::NAN,
            to: 50.0
        }
        .validate()
        .is_err());
    }

    #[test]
    fn bad_text_is_a_clear_error() {
        for bad in [
            "fortnight",
            "10",
            "5parsecs",
            "seq:",
            "time:x..y",
            "middle-sixth",
        ] {
            let e = bad.parse::<Window>().unwrap_err();
            assert!(e.to_string().contains("is not understood"), "{bad}: {e}");
        }
        assert_eq!(parse_duration("1.5s"), Ok(secs(1.5)));
        assert_eq!(parse_duration("20us"), Ok(Duration::from_micros(20)));
        assert_eq!(parse_duration("2m"), Ok(secs(120.0)));
    }
}
