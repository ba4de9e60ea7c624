//! The state-file container: magic, version, sections, CRC32, size cap.
//! Byte layout in `docs/snapshot-format.md`.
//!
//! ```text
//! offset size  field
//! 0      8     magic "VMRSNAP\0"
//! 8      4     format version (u32 LE)
//! 12     4     section count (u32 LE)
//! 16     8     total file length in bytes, including the CRC (u64 LE)
//! 24     ...   sections: kind u32 LE, reserved u32 (0), length u64 LE, payload
//! end-4  4     CRC-32 (IEEE) of every preceding byte (u32 LE)
//! ```

/// File magic.
pub const MAGIC: [u8; 8] = *b"VMRSNAP\0";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Largest state file accepted (64 MiB).
pub const MAX_FILE_LEN: u64 = 64 << 20;
/// Most sections accepted.
pub const MAX_SECTIONS: u32 = 4096;
/// Header length.
pub const HEADER_LEN: usize = 24;
/// Section header length.
pub const SECTION_HEADER_LEN: usize = 16;
/// Trailer (CRC) length.
pub const TRAILER_LEN: usize = 4;

/// Errors reading a state file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The file does not start with the magic.
    #[error("not a vmreplay snapshot (bad magic)")]
    BadMagic,
    /// The version is not ours.
    #[error("snapshot format version {found} is not supported (this build reads version {FORMAT_VERSION})")]
    Version {
        /// Version in the file.
        found: u32,
    },
    /// The file is shorter than its header says.
    #[error("snapshot file is truncated ({len} bytes, expected {expected})")]
    Truncated {
        /// Actual length.
        len: u64,
        /// Expected length.
        expected: u64,
    },
    /// Bytes after the declared end.
    #[error("snapshot file has {0} bytes of trailing data")]
    TrailingData(u64),
    /// Over the size cap.
    #[error("snapshot file of {0} bytes exceeds the {MAX_FILE_LEN}-byte limit")]
    TooLarge(u64),
    /// Too many sections.
    #[error("snapshot has {0} sections (limit {MAX_SECTIONS})")]
    TooManySections(u32),
    /// The checksum does not match.
    #[error("snapshot checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// A section runs past the end.
    #[error("section {index} is malformed: {reason}")]
    BadSection {
        /// Index of the section.
        index: u32,
        /// What is wrong.
        reason: &'static str,
    },
}

/// One section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Section kind (see [`kind`]).
    pub kind: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Section kinds.
pub mod kind {
    /// Snapshot metadata (JSON).
    pub const META: u32 = 1;
    /// VM-wide KVM state: irqchip, PIT, clock (JSON).
    pub const VM: u32 = 2;
    /// One vCPU (JSON), one section per vCPU.
    pub const VCPU: u32 = 3;
    /// The serial port (JSON).
    pub const SERIAL: u32 = 4;
    /// One device: u16 LE id length, UTF-8 id, then the device's own bytes.
    pub const DEVICE: u32 = 5;
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Serializes sections into a state file.
pub fn encode(sections: &[Section]) -> Result<Vec<u8>, FormatError> {
    let count =
        u32::try_from(sections.len()).map_err(|_| FormatError::TooManySections(u32::MAX))?;
    if count > MAX_SECTIONS {
        return Err(FormatError::TooManySections(count));
    }
    let total: u64 = (HEADER_LEN + TRAILER_LEN) as u64
        + sections
            .iter()
            .map(|s| (SECTION_HEADER_LEN + s.payload.len()) as u64)
            .sum::<u64>();
    if total > MAX_FILE_LEN {
        return Err(FormatError::TooLarge(total));
    }
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    for s in sections {
        out.extend_from_slice(&s.kind.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(s.payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&s.payload);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Parses and verifies a state file. Checks, in order: size cap, length,
/// magic, version, declared length, CRC, section framing.
pub fn decode(bytes: &[u8]) -> Result<Vec<Section>, FormatError> {
    let len = bytes.len() as u64;
    if len > MAX_FILE_LEN {
        return Err(FormatError::TooLarge(len));
    }
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        return Err(if bytes.len() < 8 && MAGIC.starts_with(bytes) {
            FormatError::Truncated {
                len,
                expected: (HEADER_LEN + TRAILER_LEN) as u64,
            }
        } else {
            FormatError::BadMagic
        });
    }
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(FormatError::Truncated {
            len,
            expected: (HEADER_LEN + TRAILER_LEN) as u64,
        });
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let count = u32_at(bytes, 12);
    if count > MAX_SECTIONS {
        return Err(FormatError::TooManySections(count));
    }
    let total = u64_at(bytes, 16);
    if total > MAX_FILE_LEN {
        return Err(FormatError::TooLarge(total));
    }
    if len < total {
        return Err(FormatError::Truncated {
            len,
            expected: total,
        });
    }
    if len > total {
        return Err(FormatError::TrailingData(len - total));
    }
    let body = &bytes[..bytes.len() - TRAILER_LEN];
    let stored = u32_at(bytes, bytes.len() - TRAILER_LEN);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(FormatError::BadCrc { stored, computed });
    }
    let mut sections = Vec::with_capacity(count as usize);
    let mut off = HEADER_LEN;
    for index in 0..count {
        if body.len() - off < SECTION_HEADER_LEN {
            return Err(FormatError::BadSection {
                index,
                reason: "header runs past the end",
            });
        }
        let kind = u32_at(body, off);
        if u32_at(body, off + 4) != 0 {
            return Err(FormatError::BadSection {
                index,
                reason: "reserved field is not zero",
            });
        }
        let plen = u64_at(body, off + 8);
        off += SECTION_HEADER_LEN;
        if plen > (body.len() - off) as u64 {
            return Err(FormatError::BadSection {
                index,
                reason: "payload runs past the end",
            });
        }
        let plen = plen as usize;
        sections.push(Section {
            kind,
            payload: body[off..off + plen].to_vec(),
        });
        off += plen;
    }
    if off != body.len() {
        return Err(FormatError::BadSection {
            index: count,
            reason: "bytes after the last section",
        });
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode(&[
            Section {
                kind: kind::META,
                payload: b"{\"a\":1}".to_vec(),
            },
            Section {
                kind: kind::VCPU,
                payload: vec![1, 2, 3],
            },
        ])
        .expect("small")
    }

    fn recrc(b: &mut [u8]) {
        let n = b.len() - 4;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn round_trip() {
        let s = decode(&sample()).expect("valid");
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].payload, vec![1, 2, 3]);
        assert_eq!(s[0].kind, kind::META);
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut b = sample();
        b[0] = b'X';
        assert_eq!(decode(&b), Err(FormatError::BadMagic));
        assert_eq!(
            decode(b"hello world, not a snapshot"),
            Err(FormatError::BadMagic)
        );
        assert_eq!(
            decode(b""),
            Err(FormatError::Truncated {
                len: 0,
                expected: 28
            })
        );
    }

    #[test]
    fn bad_crc_is_refused() {
        let mut b = sample();
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        assert!(matches!(decode(&b), Err(FormatError::BadCrc { .. })));
        let mut c = sample();
        let last = c.len() - 1;
        c[last] ^= 1;
        assert!(matches!(decode(&c), Err(FormatError::BadCrc { .. })));
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut b = sample();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        recrc(&mut b);
        assert_eq!(decode(&b), Err(FormatError::Version { found: 2 }));
        let e = decode(&b).expect_err("refused").to_string();
        assert!(e.contains("version 2"), "{e}");
    }

    #[test]
    fn truncated_is_refused() {
        let b = sample();
        for cut in [1, 10, 27, b.len() - 1] {
            let r = decode(&b[..cut]);
            assert!(
                matches!(r, Err(FormatError::Truncated { .. })),
                "cut {cut}: {r:?}"
            );
        }
        let mut t = b.clone();
        t.push(0);
        assert_eq!(decode(&t), Err(FormatError::TrailingData(1)));
    }

    #[test]
    fn oversized_is_refused() {
        let mut b = sample();
        b[16..24].copy_from_slice(&(MAX_FILE_LEN + 1).to_le_bytes());
        recrc(&mut b);
        assert_eq!(decode(&b), Err(FormatError::TooLarge(MAX_FILE_LEN + 1)));
        let big = vec![0u8; MAX_FILE_LEN as usize + 1];
        assert_eq!(decode(&big), Err(FormatError::TooLarge(MAX_FILE_LEN + 1)));
        let huge = Section {
            kind: kind::DEVICE,
            payload: vec![0; MAX_FILE_LEN as usize],
        };
        assert!(matches!(encode(&[huge]), Err(FormatError::TooLarge(_))));
    }

    #[test]
    fn section_overrun_is_refused_even_with_a_valid_crc() {
        let mut b = sample();
        // First section's length field: claim more than there is.
        b[HEADER_LEN + 8..HEADER_LEN + 16].copy_from_slice(&1_000_000u64.to_le_bytes());
        recrc(&mut b);
        assert!(matches!(
            decode(&b),
            Err(FormatError::BadSection { index: 0, .. })
        ));
        let mut c = sample();
        c[12..16].copy_from_slice(&(MAX_SECTIONS + 1).to_le_bytes());
        recrc(&mut c);
        assert_eq!(
            decode(&c),
            Err(FormatError::TooManySections(MAX_SECTIONS + 1))
        );
    }
}
