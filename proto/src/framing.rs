//! Length-prefixed event files.
//!
//! A capture file (and a local spool segment) is a sequence of frames: a
//! little-endian `u32` length followed by that many bytes of a protobuf
//! [`crate::pb::Event`]. Frames larger than [`MAX_FRAME_LEN`] are refused so a
//! corrupt length cannot make a reader allocate without bound.

use std::io::{self, Read, Write};

use prost::Message;

use crate::pb;

/// Largest frame accepted (the block topic's record limit).
pub const MAX_FRAME_LEN: usize = crate::topics::BLOCK_MAX_MESSAGE_BYTES;

/// Errors reading a framed event stream.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("i/o error")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    Oversized { len: usize },
    #[error("stream ends inside a frame")]
    Truncated,
    #[error("frame does not decode as an event")]
    Decode(#[from] prost::DecodeError),
}

/// Writes one event as a frame; returns the number of bytes written.
pub fn write_event<W: Write>(w: &mut W, event: &pb::Event, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    event
        .encode(buf)
        .expect("encoding into a Vec cannot run out of space");
    if buf.len() > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("event of {} bytes exceeds the frame limit", buf.len()),
        ));
    }
    w.write_all(&(buf.len() as u32).to_le_bytes())?;
    w.write_all(buf)?;
    Ok(4 + buf.len())
}

/// Reads framed events one by one.
pub struct EventReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> EventReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    /// The next event, `Ok(None)` at a clean end of stream.
    pub fn next_event(&mut self) -> Result<Option<pb::Event>, FramingError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(FramingError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FramingError::Oversized { len });
        }
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                FramingError::Truncated
            } else {
                FramingError::Io(e)
            }
        })?;
        Ok(Some(pb::Event::decode(self.buf.as_slice())?))
    }
}

impl<R: Read> Iterator for EventReader<R> {
    type Item = Result<pb::Event, FramingError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> pb::Event {
        pb::Event {
            instance_id: "vm-1".into(),
            seq,
            wall_time_ns: 1,
            mono_time_ns: 2,
            payload: Some(pb::event::Payload::Net(pb::NetFrame {
                device: "net0".into(),
                queue: 0,
                direction: pb::Direction::Rx as i32,
                frame: vec![0xab; 60],
            })),
        }
    }

    #[test]
    fn round_trip() {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for seq in 1..=3 {
            write_event(&mut out, &event(seq), &mut buf).unwrap();
        }
        let got: Vec<_> = EventReader::new(out.as_slice())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, vec![event(1), event(2), event(3)]);
    }

    #[test]
    fn truncated_and_oversized_are_errors() {
        let mut out = Vec::new();
        write_event(&mut out, &event(1), &mut Vec::new()).unwrap();
        let cut = &out[..out.len() - 1];
        assert!(matches!(
            EventReader::new(cut).next_event(),
            Err(FramingError::Truncated)
        ));
        let huge = (MAX_FRAME_LEN as u32 + 1).to_le_bytes();
        assert!(matches!(
            EventReader::new(&huge[..]).next_event(),
            Err(FramingError::Oversized { .. })
        ));
        let garbage = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(matches!(
            EventReader::new(&garbage[..]).next_event(),
            Err(FramingError::Decode(_))
        ));
    }
}
