//! The Confluent wire format for protobuf record values.
//!
//! ```text
//! byte 0        magic, always 0
//! bytes 1..5    schema id, 4 bytes big-endian
//! then          message indexes: the path of the value's message inside the
//!               schema file, as zigzag varints: the count, then each index.
//!               The common path [0] (first top-level message) is the single
//!               byte 0 (a count of zero).
//! then          the protobuf-encoded message
//! ```
//!
//! Encoding appends to a caller's buffer and decoding borrows the payload from
//! the input, so neither allocates.
//!
//! ```
//! use schema_registry::codec::{decode, encode_header};
//!
//! let mut buf = Vec::new();
//! encode_header(7, &[0], &mut buf);
//! buf.extend_from_slice(b"\x08\x01"); // the protobuf payload
//! let framed = decode(&buf).unwrap();
//! assert_eq!(framed.schema_id, 7);
//! assert_eq!(framed.message_indexes.as_slice(), &[0]);
//! assert_eq!(framed.payload, b"\x08\x01");
//! ```

/// The first byte of every framed value.
pub const MAGIC: u8 = 0;

/// Deepest message path (nesting level) the decoder accepts.
pub const MAX_MESSAGE_DEPTH: usize = 16;

/// Errors decoding a framed value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The input ends before the header does.
    #[error("framed value is truncated: needed at least {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    /// The first byte is not the magic byte 0.
    #[error("framed value starts with {0:#04x}, not the magic byte 0")]
    BadMagic(u8),
    /// A varint runs past the input or past 5 bytes.
    #[error("malformed varint in the message indexes at byte {0}")]
    BadVarint(usize),
    /// The message-index count or an index is negative.
    #[error("negative message index or count {0}")]
    Negative(i32),
    /// The message path is deeper than [`MAX_MESSAGE_DEPTH`].
    #[error("message path of depth {0} exceeds the supported {MAX_MESSAGE_DEPTH}")]
    TooDeep(usize),
}

/// The path of a message inside its schema file: index among the top-level
/// messages, then among that message's nested messages, and so on. Stored
/// inline (no allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MessageIndexes {
    len: usize,
    items: [i32; MAX_MESSAGE_DEPTH],
}

impl MessageIndexes {
    /// The path `[0]`: the first top-level message.
    pub const FIRST: Self = Self {
        len: 1,
        items: [0; MAX_MESSAGE_DEPTH],
    };

    /// Builds a path from a slice.
    pub fn new(path: &[i32]) -> Result<Self, CodecError> {
        if path.len() > MAX_MESSAGE_DEPTH {
            return Err(CodecError::TooDeep(path.len()));
        }
        if let Some(&n) = path.iter().find(|&&i| i < 0) {
            return Err(CodecError::Negative(n));
        }
        let mut items = [0; MAX_MESSAGE_DEPTH];
        items[..path.len()].copy_from_slice(path);
        Ok(Self {
            len: path.len(),
            items,
        })
    }

    /// The path as a slice.
    pub fn as_slice(&self) -> &[i32] {
        &self.items[..self.len]
    }
}

impl std::fmt::Debug for MessageIndexes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// A decoded framed value; the payload borrows the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed<'a> {
    /// Registry id of the writer's schema.
    pub schema_id: u32,
    /// Path of the value's message inside that schema.
    pub message_indexes: MessageIndexes,
    /// The protobuf-encoded message.
    pub payload: &'a [u8],
}

fn put_zigzag_varint(v: i32, out: &mut Vec<u8>) {
    let mut z = ((v << 1) ^ (v >> 31)) as u32;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Reads a zigzag varint at `*pos`, advancing it.
fn get_zigzag_varint(input: &[u8], pos: &mut usize) -> Result<i32, CodecError> {
    let start = *pos;
    let mut z: u32 = 0;
    for shift in (0..35).step_by(7) {
        let b = *input.get(*pos).ok_or(CodecError::BadVarint(start))?;
        *pos += 1;
        z |= u32::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
        if b & 0x80 == 0 {
            return Ok(((z >> 1) as i32) ^ -((z & 1) as i32));
        }
    }
    Err(CodecError::BadVarint(start))
}

/// Appends the header (magic, schema id, message indexes) to `out`; the
/// caller appends the protobuf payload after it. `[0]` and `[]` are both
/// written as the single byte 0.
pub fn encode_header(schema_id: u32, message_indexes: &[i32], out: &mut Vec<u8>) {
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    if message_indexes.is_empty() || message_indexes == [0] {
        out.push(0);
        return;
    }
    put_zigzag_varint(message_indexes.len() as i32, out);
    for &i in message_indexes {
        put_zigzag_varint(i, out);
    }
}

/// Appends a complete framed value (header, then `payload`) to `out`.
pub fn encode(schema_id: u32, message_indexes: &[i32], payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(5 + 1 + payload.len());
    encode_header(schema_id, message_indexes, out);
    out.extend_from_slice(payload);
}

/// Appends a complete framed value with `message` encoded in place (no
/// intermediate buffer) to `out`.
pub fn encode_message<M: prost::Message>(
    schema_id: u32,
    message_indexes: &[i32],
    message: &M,
    out: &mut Vec<u8>,
) {
    out.reserve(5 + 1 + message.encoded_len());
    encode_header(schema_id, message_indexes, out);
    message.encode_raw(out);
}

/// Decodes a framed value.
pub fn decode(input: &[u8]) -> Result<Framed<'_>, CodecError> {
    if input.len() < 6 {
        // Magic, four id bytes and at least one byte of message indexes.
        if let Some(&b) = input.first() {
            if b != MAGIC {
                return Err(CodecError::BadMagic(b));
            }
        }
        return Err(CodecError::Truncated {
            needed: 6,
            got: input.len(),
        });
    }
    if input[0] != MAGIC {
        return Err(CodecError::BadMagic(input[0]));
    }
    let schema_id = u32::from_be_bytes([input[1], input[2], input[3], input[4]]);
    let mut pos = 5;
    let count = get_zigzag_varint(input, &mut pos)?;
    let message_indexes = if count == 0 {
        MessageIndexes::FIRST
    } else if count < 0 {
        return Err(CodecError::Negative(count));
    } else {
        let count = count as usize;
        if count > MAX_MESSAGE_DEPTH {
            return Err(CodecError::TooDeep(count));
        }
        let mut items = [0; MAX_MESSAGE_DEPTH];
        for item in items.iter_mut().take(count) {
            let i = get_zigzag_varint(input, &mut pos)?;
            if i < 0 {
                return Err(CodecError::Negative(i));
            }
            *item = i;
        }
        MessageIndexes { len: count, items }
    };
    Ok(Framed {
        schema_id,
        message_indexes,
        payload: &input[pos..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_message_uses_the_single_zero_byte() {
        let mut buf = Vec::new();
        encode(0x0102_0304, &[0], b"pay", &mut buf);
        assert_eq!(buf, [0, 1, 2, 3, 4, 0, b'p', b'a', b'y']);
        let f = decode(&buf).unwrap();
        assert_eq!(f.schema_id, 0x0102_0304);
        assert_eq!(f.message_indexes.as_slice(), &[0]);
        assert_eq!(f.payload, b"pay");
    }

    #[test]
    fn other_paths_are_count_then_zigzag_indexes() {
        let mut buf = Vec::new();
        encode(5, &[2], b"", &mut buf);
        // count 1 -> zigzag 2, index 2 -> zigzag 4.
        assert_eq!(buf, [0, 0, 0, 0, 5, 2, 4]);
        assert_eq!(decode(&buf).unwrap().message_indexes.as_slice(), &[2]);

        buf.clear();
        encode(5, &[1, 0, 70], b"x", &mut buf);
        // count 3 -> 6; 1 -> 2; 0 -> 0; 70 -> 140 = 0x8c 0x01.
        assert_eq!(buf, [0, 0, 0, 0, 5, 6, 2, 0, 0x8c, 0x01, b'x']);
        let f = decode(&buf).unwrap();
        assert_eq!(f.message_indexes.as_slice(), &[1, 0, 70]);
        assert_eq!(f.payload, b"x");
    }

    #[test]
    fn round_trips_many_paths() {
        let mut buf = Vec::new();
        for path in [&[][..], &[3], &[0, 0], &[1000, 5, 123_456_789]] {
            buf.clear();
            encode(u32::MAX, path, b"abc", &mut buf);
            let f = decode(&buf).unwrap();
            let expected: &[i32] = if path.is_empty() { &[0] } else { path };
            assert_eq!(f.message_indexes.as_slice(), expected);
            assert_eq!(f.schema_id, u32::MAX);
            assert_eq!(f.payload, b"abc");
        }
    }

    #[test]
    fn encode_message_matches_encode() {
        let msg = prost_types::Duration {
            seconds: 5,
            nanos: 7,
        };
        let mut a = Vec::new();
        encode_message(9, &[0], &msg, &mut a);
        let mut b = Vec::new();
        encode(9, &[0], &prost::Message::encode_to_vec(&msg), &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        assert_eq!(
            decode(&[]),
            Err(CodecError::Truncated { needed: 6, got: 0 })
        );
        assert_eq!(
            decode(&[0, 0, 0]),
            Err(CodecError::Truncated { needed: 6, got: 3 })
        );
        assert_eq!(decode(&[1, 0, 0, 0, 1, 0]), Err(CodecError::BadMagic(1)));
        assert_eq!(decode(&[7]), Err(CodecError::BadMagic(7)));
        // Count says two indexes but only one follows.
        assert_eq!(
            decode(&[0, 0, 0, 0, 1, 4, 2]),
            Err(CodecError::BadVarint(7))
        );
        // Unterminated varint.
        assert_eq!(
            decode(&[0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(CodecError::BadVarint(5))
        );
        // Negative count (zigzag 1 = -1).
        assert_eq!(decode(&[0, 0, 0, 0, 1, 1]), Err(CodecError::Negative(-1)));
        // Count 17.
        assert_eq!(decode(&[0, 0, 0, 0, 1, 34]), Err(CodecError::TooDeep(17)));
        assert!(MessageIndexes::new(&[-1]).is_err());
    }
}
