//! The live output stream of a replay-mode vhost-tap backend, as the
//! replayer reads it.
//!
//! A `{"cmd":"subscribe"}` request turns a control connection into a stream
//! of one JSON object per line, each with a `type`: `delivered` (a frame
//! reached the guest: it was put in the receive used ring), `tx` (the guest
//! sent a frame), `block` (the clone completed a block request, with the
//! hash of the data written or read and the original record it answers),
//! `fault` (a rule armed in the backend fired) and `lagged` (lines this
//! subscriber lost because it read too slowly). [`Subscription`] connects,
//! subscribes and parses the lines into [`Output`]s.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// How long one read of the stream waits before it reports
/// [`Read::Idle`], so the reader can look at its stop flag.
pub const READ_POLL: Duration = Duration::from_millis(50);
/// Longest line accepted from the stream (a 64 KiB frame in hex and its
/// fields fit with room to spare).
pub const MAX_LINE: usize = 1 << 20;

/// Errors of a subscription.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the backend refused the subscription: {0}")]
    Refused(String),
    #[error("a stream line is longer than {MAX_LINE} bytes")]
    TooLong,
}

/// One line of the stream (the fields the replayer uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Output {
    /// A frame reached the guest.
    Delivered {
        device: String,
        /// The original's `seq` the frame was injected with.
        seq: Option<u64>,
        /// Host `CLOCK_MONOTONIC` when it was put in the used ring (ns).
        mono_ns: u64,
        len: usize,
    },
    /// The guest transmitted a frame (hex).
    Tx {
        device: String,
        #[serde(deserialize_with = "hex")]
        frame: Vec<u8>,
        /// The last original `seq` delivered to the guest before it.
        after_seq: Option<u64>,
        mono_ns: u64,
    },
    /// The clone completed a block request.
    Block {
        device: String,
        op: String,
        sector: u64,
        len: u32,
        status: String,
        /// xxh3-128 (hex) of the data written or read.
        hash: Option<String>,
        /// The original record's `seq` the request was matched with.
        answers: Option<u64>,
        /// Whether it matched that record.
        matched: Option<bool>,
        mono_ns: u64,
    },
    /// A rule armed in the backend fired.
    Fault {
        device: String,
        kind: String,
        target: String,
        seq: Option<u64>,
    },
    /// Lines lost by this subscriber.
    Lagged { lost: u64 },
}

fn hex<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s: &str = Deserialize::deserialize(d)?;
    decode_hex(s).ok_or_else(|| serde::de::Error::custom("not hex"))
}

/// Decodes hex (either case); `None` for odd length or other characters.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some(nib(p[0])? << 4 | nib(p[1])?))
        .collect()
}

/// Lowercase hex.
pub fn encode_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

/// What one read of the stream gave.
#[derive(Debug)]
pub enum Read {
    Output(Output),
    /// A line of a type (or form) this replayer does not know; skipped.
    Unknown(String),
    /// Nothing within [`READ_POLL`].
    Idle,
    /// The backend closed the stream.
    End,
}

/// A subscribed control connection.
pub struct Subscription {
    reader: BufReader<UnixStream>,
    buf: Vec<u8>,
}

impl Subscription {
    /// Connects to the control socket at `path` and subscribes (without
    /// write data); waits at most `timeout` for the answer.
    pub fn open(path: &Path, timeout: Duration) -> Result<Self, OutputError> {
        let s = UnixStream::connect(path).map_err(|source| OutputError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut reader = BufReader::with_capacity(256 << 10, s);
        writeln!(reader.get_mut(), "{{\"cmd\":\"subscribe\",\"data\":false}}")?;
        let mut answer = String::new();
        reader.read_line(&mut answer)?;
        if !answer.contains("\"subscribed\":true") {
            return Err(OutputError::Refused(answer.trim().to_string()));
        }
        reader.get_ref().set_read_timeout(Some(READ_POLL))?;
        Ok(Self {
            reader,
            buf: Vec::new(),
        })
    }

    /// The next line, or [`Read::Idle`] after [`READ_POLL`] without one.
    pub fn read(&mut self) -> Result<Read, OutputError> {
        loop {
            let avail = match self.reader.fill_buf() {
                Ok(a) => a,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(Read::Idle)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if avail.is_empty() {
                return Ok(Read::End);
            }
            let (take, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            if self.buf.len() + take > MAX_LINE {
                return Err(OutputError::TooLong);
            }
            self.buf.extend_from_slice(&avail[..take]);
            self.reader.consume(take);
            if done {
                let line = std::mem::take(&mut self.buf);
                return Ok(parse_line(&line));
            }
        }
    }
}

/// Parses one stream line.
pub fn parse_line(line: &[u8]) -> Read {
    match serde_json::from_slice::<Output>(line) {
        Ok(o) => Read::Output(o),
        Err(_) => Read::Unknown(String::from_utf8_lossy(line).trim().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_each_type_parse() {
        let r = parse_line(br#"{"type":"delivered","device":"net0","seq":12,"at_ns":null,"clock_ns":5,"mono_ns":99,"late_ns":0,"clone_seq":3,"len":60}"#);
        assert!(matches!(
            r,
            Read::Output(Output::Delivered {
                seq: Some(12),
                mono_ns: 99,
                len: 60,
                ..
            })
        ));
        let r = parse_line(br#"{"type":"tx","device":"net0","after_seq":12,"clock_ns":5,"mono_ns":7,"clone_seq":null,"frame":"00ff"}"#);
        assert!(
            matches!(r, Read::Output(Output::Tx { ref frame, after_seq: Some(12), .. }) if frame == &[0, 255])
        );
        let r = parse_line(br#"{"type":"block","device":"vda","op":"write","sector":8,"len":512,"status":"ok","hash":"00112233445566778899aabbccddeeff","answers":40,"matched":false,"clock_ns":0,"mono_ns":1,"clone_seq":2}"#);
        assert!(matches!(
            r,
            Read::Output(Output::Block {
                answers: Some(40),
                matched: Some(false),
                sector: 8,
                ..
            })
        ));
        assert!(matches!(
            parse_line(br#"{"type":"lagged","lost":3}"#),
            Read::Output(Output::Lagged { lost: 3 })
        ));
        assert!(matches!(
            parse_line(br#"{"type":"something-new"}"#),
            Read::Unknown(_)
        ));
        assert!(matches!(
            parse_line(br#"{"type":"tx","device":"n","frame":"zz","mono_ns":1}"#),
            Read::Unknown(_)
        ));
        assert_eq!(decode_hex("0aFf"), Some(vec![10, 255]));
        assert_eq!(encode_hex(&[10, 255]), "0aff");
    }
}
