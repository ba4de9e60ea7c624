//! Length-prefixed event files.
//!
//! A capture file (and a local spool segment) is a sequence of frames: a
//! little-endian `u32` length followed by that many bytes of a protobuf
//! [`crate::pb::Event`]. A zero length ends the data early (a reused segment
//! file marks the end of its new records that way; events are never empty). Frames larger than [`MAX_FRAME_LEN`] are refused so a
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
    if buf.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an empty event would read as the end marker",
        ));
    }
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

/// Encodes the start of a frame for `event`, a block record whose `data`
/// (empty in `event`) is `data_len` bytes that the caller writes right after
/// the returned head, so a large payload can go from where it lies (guest
/// memory) to the file without being copied into the record first.
///
/// `out` receives the length prefix, the event's fields and the block
/// message with every field but `data`, then `data`'s key and length; the
/// payload comes last, which protobuf decoders accept in any field order.
pub fn encode_block_frame_head(
    event: &pb::Event,
    data_len: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    let Some(pb::event::Payload::Block(block)) = &event.payload else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a split frame needs a block event",
        ));
    };
    if !block.data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a split frame's block event must not hold data itself",
        ));
    }
    const DATA_TAG: u32 = 6;
    const BLOCK_TAG: u32 = 10;
    let block_len = block.encoded_len()
        + prost::encoding::key_len(DATA_TAG)
        + encoded_len_varint(data_len as u64)
        + data_len;
    out.clear();
    out.extend_from_slice(&[0; 4]);
    if !event.instance_id.is_empty() {
        prost::encoding::string::encode(1, &event.instance_id, out);
    }
    for (tag, v) in [
        (2, event.seq),
        (3, event.wall_time_ns),
        (4, event.mono_time_ns),
    ] {
        if v != 0 {
            prost::encoding::uint64::encode(tag, &v, out);
        }
    }
    encode_key(BLOCK_TAG, WireType::LengthDelimited, out);
    encode_varint(block_len as u64, out);
    block
        .encode(out)
        .expect("encoding into a Vec cannot run out of space");
    encode_key(DATA_TAG, WireType::LengthDelimited, out);
    encode_varint(data_len as u64, out);
    let frame_len = out.len() - 4 + data_len;
    if frame_len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("event of {frame_len} bytes exceeds the frame limit"),
        ));
    }
    out[..4].copy_from_slice(&(frame_len as u32).to_le_bytes());
    Ok(())
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
        if len == 0 {
            // End marker: whatever follows is not part of the stream.
            return Ok(None);
        }
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

/// Reads a capture: one file, or a directory of segment files (`*.events`,
/// read in name order, which is the order of their first `seq`).
pub fn open_capture(path: &std::path::Path) -> io::Result<CaptureReader> {
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "events") {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    files.reverse();
    Ok(CaptureReader {
        rest: files,
        current: None,
    })
}

/// The events of a capture's files, one file after the other (each up to
/// its end or its end marker).
pub struct CaptureReader {
    /// Still to read, last first.
    rest: Vec<std::path::PathBuf>,
    current: Option<EventReader<io::BufReader<std::fs::File>>>,
}

impl Iterator for CaptureReader {
    type Item = Result<pb::Event, FramingError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = &mut self.current {
                match r.next_event() {
                    Ok(None) => self.current = None,
                    other => return other.transpose(),
                }
            }
            let path = self.rest.pop()?;
            match std::fs::File::open(&path) {
                Ok(f) => self.current = Some(EventReader::new(io::BufReader::new(f))),
                // A live spool deleted or reused the segment since it was listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
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
    fn a_split_block_frame_decodes_like_a_whole_one() {
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let whole = pb::Event {
            instance_id: "vm-7".into(),
            seq: 42,
            wall_time_ns: 1_700_000_000_000_000_000,
            mono_time_ns: 5,
            payload: Some(pb::event::Payload::Block(pb::BlockIo {
                device: "vda".into(),
                queue: 1,
                op: pb::BlockOp::Write as i32,
                sector: 2048,
                len: data.len() as u32,
                data: data.clone(),
                status: pb::BlockStatus::Ok as i32,
                ..Default::default()
            })),
        };
        let mut head_only = whole.clone();
        if let Some(pb::event::Payload::Block(b)) = &mut head_only.payload {
            b.data.clear();
        }
        let mut frame = Vec::new();
        encode_block_frame_head(&head_only, data.len(), &mut frame).unwrap();
        frame.extend_from_slice(&data);
        let got: Vec<_> = EventReader::new(frame.as_slice())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, vec![whole.clone()]);
        // Refused: data already inside, or not a block event.
        assert!(encode_block_frame_head(&whole, 1, &mut frame).is_err());
        assert!(encode_block_frame_head(&event(1), 1, &mut frame).is_err());
        assert!(encode_block_frame_head(&head_only, MAX_FRAME_LEN, &mut frame).is_err());
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
