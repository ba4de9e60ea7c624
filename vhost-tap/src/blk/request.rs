//! Parsing and validating virtio-blk requests from descriptor chains.
//!
//! A request is a chain of device-readable descriptors (the 16-byte header,
//! then the payload of writes, discards and write-zeroes) followed by
//! device-writable descriptors (the payload of reads and get-id, then the
//! 1-byte status). [`parse_chain`] walks the chain once into a reusable
//! segment list (no allocation once the list has grown), checks every rule
//! and returns a [`Request`] or a [`RequestError`].

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};
use vmr_proto::pb;

/// Size of the request header.
pub const HEADER_LEN: u32 = 16;
/// Size of one discard / write-zeroes segment.
pub const RANGE_LEN: u32 = 16;
/// Sector size.
pub const SECTOR: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_LEN: u32 = 20;

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is empty")]
    Empty,
    #[error("descriptor chain is cut short (loop, bad next index or bad indirect table)")]
    Truncated,
    #[error("descriptor chain has more than {0} descriptors")]
    TooManyDescriptors(usize),
    #[error("descriptor points outside guest memory")]
    OutOfRange,
    #[error("readable descriptor after a writable one")]
    WrongOrder,
    #[error("chain has no room for the header")]
    NoHeader,
    #[error("chain has no writable status byte")]
    NoStatus,
    #[error("payload in the wrong direction for the request type")]
    WrongDirection,
    #[error("payload of {0} bytes exceeds the limit")]
    Oversized(u64),
    #[error("payload length {0} is not a multiple of the unit")]
    Misaligned(u64),
    #[error("too many discard/write-zeroes segments")]
    TooManySegments,
}

impl RequestError {
    /// Whether the chain still has a usable status byte, so the request can
    /// be completed with `IOERR`; otherwise it is returned unused.
    pub fn has_status(&self) -> bool {
        !matches!(
            self,
            Self::Empty
                | Self::Truncated
                | Self::OutOfRange
                | Self::WrongOrder
                | Self::NoStatus
                | Self::TooManyDescriptors(_)
        )
    }
}

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// Limits a request must respect.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest read/write payload in bytes.
    pub max_data: u32,
    /// Most descriptors in one chain.
    pub max_descriptors: usize,
    /// Most discard / write-zeroes segments in one request.
    pub max_ranges: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_data: 4 << 20,
            max_descriptors: 1024,
            max_ranges: 16,
        }
    }
}

/// Request types the device understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// Any other type: completed with `UNSUPP`.
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }

    /// The operation recorded for this type.
    pub fn op(&self) -> pb::BlockOp {
        match self {
            Self::In => pb::BlockOp::Read,
            Self::Out => pb::BlockOp::Write,
            Self::Flush => pb::BlockOp::Flush,
            Self::GetId => pb::BlockOp::GetId,
            Self::Discard => pb::BlockOp::Discard,
            Self::WriteZeroes => pb::BlockOp::WriteZeroes,
            Self::Unsupported(_) => pb::BlockOp::Unspecified,
        }
    }
}

/// A validated request. Its payload is described by the segment list that
/// [`parse_chain`] filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub rtype: RequestType,
    pub sector: u64,
    /// Payload bytes: data of reads and writes, the answer room of get-id,
    /// the segment list of discard / write-zeroes.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Walks `chain` into `segs` and validates it as a virtio-blk request.
pub fn parse_chain<M: GuestMemory>(
    mem: &M,
    chain: impl Iterator<Item = Descriptor>,
    segs: &mut Vec<Segment>,
    limits: &Limits,
) -> Result<Request, RequestError> {
    segs.clear();
    let mut last_has_next = false;
    let (mut readable, mut writable) = (0u64, 0u64);
    for desc in chain {
        if segs.len() == limits.max_descriptors {
            return Err(RequestError::TooManyDescriptors(limits.max_descriptors));
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
            write: desc.is_write_only(),
        };
        if seg.len > 0
            && !mem.check_range(
                seg.addr,
                seg.len as usize,
                if seg.write {
                    Permissions::Write
                } else {
                    Permissions::Read
                },
            )
        {
            return Err(RequestError::OutOfRange);
        }
        if seg.write {
            writable += u64::from(seg.len);
        } else {
            if writable > 0 || segs.last().is_some_and(|s| s.write) {
                return Err(RequestError::WrongOrder);
            }
            readable += u64::from(seg.len);
        }
        last_has_next = desc.has_next();
        segs.push(seg);
    }
    if segs.is_empty() {
        return Err(RequestError::Empty);
    }
    if last_has_next {
        return Err(RequestError::Truncated);
    }
    // Status: the last byte of the last writable descriptor.
    let status = match segs.last() {
        Some(s) if s.write && s.len > 0 => s
            .addr
            .checked_add(u64::from(s.len) - 1)
            .ok_or(RequestError::OutOfRange)?,
        _ => return Err(RequestError::NoStatus),
    };
    if readable < u64::from(HEADER_LEN) {
        return Err(RequestError::NoHeader);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    gather(mem, segs, 0, &mut header).map_err(|_| RequestError::OutOfRange)?;
    let rtype = RequestType::from_raw(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8-byte slice"));
    let out_data = readable - u64::from(HEADER_LEN);
    let in_data = writable - 1;
    let (data_len, unit) = match rtype {
        RequestType::In => {
            if out_data != 0 {
                return Err(RequestError::WrongDirection);
            }
            (in_data, SECTOR)
        }
        RequestType::Out => {
            if in_data != 0 {
                return Err(RequestError::WrongDirection);
            }
            (out_data, SECTOR)
        }
        RequestType::Flush => {
            if in_data != 0 || out_data != 0 {
                return Err(RequestError::WrongDirection);
            }
            (0, 1)
        }
        RequestType::GetId => {
            if out_data != 0 || in_data == 0 {
                return Err(RequestError::WrongDirection);
            }
            (in_data.min(u64::from(ID_LEN)), 1)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if in_data != 0 || out_data == 0 {
                return Err(RequestError::WrongDirection);
            }
            if out_data > u64::from(limits.max_ranges) * u64::from(RANGE_LEN) {
                return Err(RequestError::TooManySegments);
            }
            (out_data, u64::from(RANGE_LEN))
        }
        RequestType::Unsupported(_) => (0, 1),
    };
    if data_len > u64::from(limits.max_data) {
        return Err(RequestError::Oversized(data_len));
    }
    if data_len % unit != 0 {
        return Err(RequestError::Misaligned(data_len));
    }
    Ok(Request {
        rtype,
        sector,
        data_len: data_len as u32,
        status,
    })
}

/// Copies readable bytes starting `skip` bytes into the readable part of the
/// chain into `out` (which must fit).
pub fn gather<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for s in segs.iter().filter(|s| !s.write) {
        if done == out.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], s.addr.unchecked_add(skip))?;
        done += n;
        skip = 0;
    }
    if done < out.len() {
        return Err(vm_memory::GuestMemoryError::PartialBuffer {
            expected: out.len(),
            completed: done,
        });
    }
    Ok(())
}

pub use crate::iov::IoVecs;

/// Fills `iov` with the host addresses of `len` bytes of the chain's
/// device-readable part after `skip` bytes (the request header), splitting
/// where a buffer crosses guest memory regions. Fails like [`gather`] on an
/// address outside guest memory or a chain shorter than `len`.
pub fn host_iov<M: vm_memory::GuestMemory>(
    mem: &M,
    segs: &[Segment],
    skip: u32,
    len: u32,
    iov: &mut IoVecs,
) -> Result<(), vm_memory::GuestMemoryError> {
    let iov = &mut iov.0;
    iov.clear();
    let mut skip = u64::from(skip);
    let mut left = u64::from(len);
    for s in segs.iter().filter(|s| !s.write) {
        if left == 0 {
            break;
        }
        let seg_len = u64::from(s.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(left);
        for slice in mem.get_slices(
            s.addr.unchecked_add(skip),
            n as usize,
            vm_memory::Permissions::Read,
        )? {
            let slice = slice?;
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: slice.len(),
            });
        }
        left -= n;
        skip = 0;
    }
    if left > 0 {
        return Err(vm_memory::GuestMemoryError::PartialBuffer {
            expected: len as usize,
            completed: (u64::from(len) - left) as usize,
        });
    }
    Ok(())
}

/// Copies `data` into the writable part of the chain (the status byte at the
/// end is never written by this).
pub fn scatter<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for s in segs.iter().filter(|s| s.write) {
        if done == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], s.addr)?;
        done += n;
    }
    if done < data.len() {
        return Err(vm_memory::GuestMemoryError::PartialBuffer {
            expected: data.len(),
            completed: done,
        });
    }
    Ok(())
}

/// One discard / write-zeroes range: `(sector, num_sectors, flags)`.
pub fn range_at(raw: &[u8], i: usize) -> Option<(u64, u32, u32)> {
    let r = raw.get(i * RANGE_LEN as usize..(i + 1) * RANGE_LEN as usize)?;
    Some((
        u64::from_le_bytes(r[0..8].try_into().ok()?),
        u32::from_le_bytes(r[8..12].try_into().ok()?),
        u32::from_le_bytes(r[12..16].try_into().ok()?),
    ))
}

/// Fuzzing entry point: lays `input` out as guest memory holding a split
/// virtqueue (a 16-entry descriptor table taken from the input, then free
/// memory filled from the input), pops the chain the input names and parses
/// it. Never panics; returns the parse result.
#[cfg(feature = "test-utils")]
pub fn fuzz_parse(input: &[u8]) -> Option<Result<Request, RequestError>> {
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    const QSIZE: u16 = 16;
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).ok()?;
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (head, rest) = input.split_first()?;
    let table_len = (QSIZE as usize * 16).min(rest.len());
    mem.write_slice(&rest[..table_len], vq.desc_table_addr())
        .ok()?;
    // Free memory after the rings gets the rest of the input.
    let free = vq.end().raw_value().max(0x4000);
    let tail = &rest[table_len..];
    let n = tail.len().min(0x1_0000 - free as usize);
    mem.write_slice(&tail[..n], GuestAddress(free)).ok()?;
    vq.avail()
        .ring()
        .ref_at(0)
        .ok()?
        .store(u16::from(*head) % QSIZE);
    vq.avail().idx().store(1);
    let mut q: Queue = vq.create_queue().ok()?;
    let chain = q.iter(&mem).ok()?.next()?;
    let mut segs = Vec::new();
    Some(parse_chain(&mem, chain, &mut segs, &Limits::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap<()>, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// Builds the chain from (addr, len, flags, next) tuples and parses it.
    fn parse(
        mem: &GuestMemoryMmap<()>,
        descs: &[(u64, u32, u16, u16)],
    ) -> Result<Request, RequestError> {
        let vq = MockSplitQueue::new(mem, 16);
        for (i, &(a, l, f, n)) in descs.iter().enumerate() {
            vq.desc_table()
                .store(i as u16, RawDescriptor::from(Descriptor::new(a, l, f, n)))
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        let mut segs = Vec::new();
        parse_chain(mem, chain, &mut segs, &Limits::default())
    }

    #[test]
    fn well_formed_read_and_write() {
        let m = mem();
        header(&m, 0x8000, VIRTIO_BLK_T_IN, 7);
        let r = parse(
            &m,
            &[
                (0x8000, 16, NEXT, 1),
                (0x9000, 4096, WRITE | NEXT, 2),
                (0xa000, 1, WRITE, 0),
            ],
        )
        .unwrap();
        assert_eq!(r.rtype, RequestType::In);
        assert_eq!(
            (r.sector, r.data_len, r.status),
            (7, 4096, GuestAddress(0xa000))
        );
        header(&m, 0x8000, VIRTIO_BLK_T_OUT, 9);
        // Header and data in one descriptor, status in the next.
        let r = parse(&m, &[(0x8000, 16 + 1024, NEXT, 1), (0xa000, 1, WRITE, 0)]).unwrap();
        assert_eq!((r.rtype, r.data_len), (RequestType::Out, 1024));
    }

    #[test]
    fn malformed_chains_are_refused() {
        let m = mem();
        header(&m, 0x8000, VIRTIO_BLK_T_IN, 0);
        // Too short: header only.
        assert_eq!(
            parse(&m, &[(0x8000, 16, 0, 0)]),
            Err(RequestError::NoStatus)
        );
        // Header cut short.
        assert_eq!(
            parse(&m, &[(0x8000, 8, NEXT, 1), (0xa000, 1, WRITE, 0)]),
            Err(RequestError::NoHeader)
        );
        // Wrong direction: read with device-readable payload.
        assert_eq!(
            parse(
                &m,
                &[
                    (0x8000, 16, NEXT, 1),
                    (0x9000, 512, NEXT, 2),
                    (0xa000, 1, WRITE, 0)
                ]
            ),
            Err(RequestError::WrongDirection)
        );
        // Readable after writable.
        assert_eq!(
            parse(
                &m,
                &[
                    (0x8000, 16, NEXT, 1),
                    (0xa000, 1, WRITE | NEXT, 2),
                    (0x9000, 512, 0, 0)
                ]
            ),
            Err(RequestError::WrongOrder)
        );
        // Out of range.
        assert_eq!(
            parse(
                &m,
                &[
                    (0x8000, 16, NEXT, 1),
                    (0xfff_f000, 4096, WRITE | NEXT, 2),
                    (0xa000, 1, WRITE, 0)
                ]
            ),
            Err(RequestError::OutOfRange)
        );
        // Loop: 0 -> 1 -> 0 (readable), and through a writable descriptor.
        assert_eq!(
            parse(&m, &[(0x8000, 16, NEXT, 1), (0x9000, 16, NEXT, 0)]),
            Err(RequestError::Truncated)
        );
        assert_eq!(
            parse(&m, &[(0x8000, 16, NEXT, 1), (0xa000, 1, WRITE | NEXT, 1)]),
            Err(RequestError::Truncated)
        );
        // Next index past the table.
        assert_eq!(
            parse(&m, &[(0x8000, 16, NEXT, 99)]),
            Err(RequestError::Truncated)
        );
        // Oversized: 8 MiB read.
        assert!(matches!(
            parse(
                &m,
                &[
                    (0x8000, 16, NEXT, 1),
                    (0x1_0000, 0x8_0000, WRITE | NEXT, 2),
                    (0x9_0000, 0x78_0000, WRITE | NEXT, 3),
                    (0xa000, 1, WRITE, 0)
                ]
            ),
            Err(RequestError::OutOfRange) | Err(RequestError::Oversized(_))
        ));
        // Misaligned read length.
        assert_eq!(
            parse(
                &m,
                &[
                    (0x8000, 16, NEXT, 1),
                    (0x9000, 100, WRITE | NEXT, 2),
                    (0xa000, 1, WRITE, 0)
                ]
            ),
            Err(RequestError::Misaligned(100))
        );
        // Unknown type parses (completed as unsupported).
        header(&m, 0x8000, 77, 0);
        assert_eq!(
            parse(&m, &[(0x8000, 16, NEXT, 1), (0xa000, 1, WRITE, 0)])
                .unwrap()
                .rtype,
            RequestType::Unsupported(77)
        );
    }

    #[test]
    fn oversized_within_memory() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        header(&m, 0x8000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            parse(
                &m,
                &[
                    (0x8000, 16, NEXT, 1),
                    (0x10_0000, 0x80_0000, WRITE | NEXT, 2),
                    (0xa000, 1, WRITE, 0)
                ]
            ),
            Err(RequestError::Oversized(0x80_0000))
        );
    }
}
