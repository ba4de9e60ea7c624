//! Reassembly of one direction's payload byte stream.

use std::collections::BTreeMap;

/// Bytes of one direction of a connection, put back in order by offset.
/// Bytes already held are never overwritten (a retransmission with other
/// content keeps the first copy).
#[derive(Debug, Default, Clone)]
pub(crate) struct Stream {
    /// Contiguous bytes from offset 0.
    data: Vec<u8>,
    /// Bytes past a hole, by offset.
    later: BTreeMap<u64, Vec<u8>>,
}

impl Stream {
    /// Contiguous bytes from offset 0.
    pub fn contiguous(&self) -> &[u8] {
        &self.data
    }

    /// Adds `bytes` at `offset` (negative offsets lie before the stream's
    /// start and are cut off).
    pub fn insert(&mut self, offset: i64, bytes: &[u8]) {
        let (offset, bytes) = if offset < 0 {
            let cut = offset.unsigned_abs();
            if cut >= bytes.len() as u64 {
                return;
            }
            (0u64, &bytes[cut as usize..])
        } else {
            (offset as u64, bytes)
        };
        if bytes.is_empty() {
            return;
        }
        let have = self.data.len() as u64;
        if offset > have {
            let e = self.later.entry(offset).or_default();
            if bytes.len() > e.len() {
                *e = bytes.to_vec();
            }
            return;
        }
        let skip = (have - offset) as usize;
        if skip < bytes.len() {
            self.data.extend_from_slice(&bytes[skip..]);
        }
        // Pull in what the new bytes made contiguous.
        while let Some((&off, _)) = self.later.iter().next() {
            if off > self.data.len() as u64 {
                break;
            }
            let chunk = self.later.remove(&off).unwrap_or_default();
            let skip = (self.data.len() as u64 - off) as usize;
            if skip < chunk.len() {
                self.data.extend_from_slice(&chunk[skip..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reorders_and_ignores_overlap() {
        let mut s = Stream::default();
        s.insert(6, b"world");
        s.insert(-2, b"xxhel");
        assert_eq!(s.contiguous(), b"hel");
        s.insert(2, b"xlo ");
        assert_eq!(s.contiguous(), b"hello world");
        s.insert(0, b"HELLO");
        assert_eq!(s.contiguous(), b"hello world");
    }
}
