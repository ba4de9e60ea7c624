//! The Linux guest image built by `guest/linux/build.sh` and what its demo
//! workloads do, so tests can check the disk and the captured records against
//! what the guest did.
//!
//! The workload itself lives in `guest/linux/init`; the constants here mirror it
//! (block offsets, lengths and patterns, network messages, serial markers).

use std::path::{Path, PathBuf};

/// Errors locating the guest image or reading its output.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(
        "Linux guest image not found in {dir}: run guest/linux/build.sh (scripts/setup.sh does) \
         or point $VMR_GUEST_LINUX at a built image directory"
    )]
    Missing { dir: PathBuf },
    #[error(
        "demo-linux image not found in {dir} (no image.toml naming demo-linux): run \
         guest/linux/build.sh (scripts/setup.sh does) or point $VMR_DEMO_LINUX at a built \
         image directory"
    )]
    MissingDemoLinux { dir: PathBuf },
    #[error("could not read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Guest address on its NIC (`eth0`), with prefix length.
pub const GUEST_IP_CIDR: &str = "192.168.77.2/24";
/// Guest address without the prefix.
pub const GUEST_IP: &str = "192.168.77.2";
/// The peer the guest pings and talks TCP to (the host end of the TAP).
pub const PEER_IP: &str = "192.168.77.1";
/// Peer address with prefix length, as assigned to the TAP.
pub const PEER_IP_CIDR: &str = "192.168.77.1/24";
/// TCP port of the peer's line echo service.
pub const PEER_PORT: u16 = 7777;
/// MAC address given to the guest NIC.
pub const GUEST_MAC: &str = "52:54:00:77:00:02";
/// Disk size the workloads need (two rounds of 16 MiB plus the first 16 MiB).
pub const MIN_DISK_BYTES: u64 = 48 << 20;

/// `(index, offset within the round, length)` of the blocks one disk step writes.
/// Must match `DISK_BLOCKS` in `guest/linux/init`.
pub const DISK_BLOCKS: [(u32, u64, usize); 4] = [
    (0, 1 << 20, 4096),
    (1, (5 << 20) + 12 * 1024, 4096),
    (2, 9 << 20, 16384),
    (3, 13 << 20, 65536),
];

/// Bytes between the bases of consecutive disk rounds.
pub const ROUND_STRIDE: u64 = 16 << 20;

/// A block a disk step writes: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBlock {
    pub round: u32,
    pub index: u32,
    /// Byte offset on the disk.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The blocks disk step `round` writes with nonce `token`.
pub fn disk_blocks(token: &str, round: u32) -> Vec<DiskBlock> {
    DISK_BLOCKS
        .iter()
        .map(|&(index, off, len)| {
            let line = format!("vmr:{token}:r{round}:b{index}\n");
            let data: Vec<u8> = line.bytes().cycle().take(len).collect();
            DiskBlock {
                round,
                index,
                offset: u64::from(round) * ROUND_STRIDE + off,
                data,
            }
        })
        .collect()
}

/// The line net step `round` sends to the peer.
pub fn net_message(token: &str, round: u32) -> String {
    format!("vmr-net:{token}:r{round}")
}

/// The peer's reply to `line` (the guest checks it).
pub fn echo_reply(line: &str) -> String {
    format!("vmr-echo:{line}")
}

/// Kernel command line for a run of `steps` (e.g. `"disk:1,net:1"`).
pub fn cmdline(steps: &str, token: &str) -> String {
    format!(
        "console=ttyS0 panic=-1 loglevel=4 vmr.steps={steps} vmr.token={token} \
         vmr.ip={GUEST_IP_CIDR} vmr.peer={PEER_IP} vmr.port={PEER_PORT}"
    )
}

/// A built guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The build's manifest (kernel package and version, source hash).
    pub manifest: String,
}

impl GuestImage {
    /// The image in `$VMR_GUEST_LINUX`, else `<cache>/guest-linux`.
    pub fn locate() -> Result<Self, GuestError> {
        let dir = std::env::var_os("VMR_GUEST_LINUX")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::cache_dir().join("guest-linux"));
        Self::open(&dir)
    }

    /// The image in `dir`.
    pub fn open(dir: &Path) -> Result<Self, GuestError> {
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initramfs.cpio.gz");
        let manifest_path = dir.join("manifest");
        if !kernel.is_file() || !initrd.is_file() || !manifest_path.is_file() {
            return Err(GuestError::Missing {
                dir: dir.to_path_buf(),
            });
        }
        let manifest =
            std::fs::read_to_string(&manifest_path).map_err(|source| GuestError::Read {
                path: manifest_path,
                source,
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            kernel,
            initrd,
            manifest,
        })
    }
}

/// Name of the Linux machine image that runs the key-value service.
pub const DEMO_LINUX: &str = "demo-linux";
/// TCP port of the demo-linux key-value service (`vmr.service_port`).
pub const SERVICE_PORT: u16 = 7000;
/// Protocol name of the key-value service in `image.toml`.
pub const SERVICE_PROTOCOL: &str = "vmr-kv-1";
/// Bytes per stored record: record `n` is the block at byte `n * KV_BLOCK`.
pub const KV_BLOCK: usize = 4096;
/// Longest key the service stores; a longer one overflows its key buffer and
/// panics the guest kernel.
pub const KV_KEY_MAX: usize = 200;

/// The demo-linux machine-image directory: `$VMR_DEMO_LINUX`, else
/// `$VMR_GUEST_LINUX`, else `<cache>/demo-linux` (the symlink
/// `guest/linux/build.sh` maintains). The directory must hold an
/// `image.toml` whose name is `demo-linux`.
pub fn demo_linux_dir() -> Result<PathBuf, GuestError> {
    let dir = std::env::var_os("VMR_DEMO_LINUX")
        .or_else(|| std::env::var_os("VMR_GUEST_LINUX"))
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::cache_dir().join(DEMO_LINUX));
    let manifest = dir.join("image.toml");
    let text = match std::fs::read_to_string(&manifest) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(GuestError::MissingDemoLinux { dir })
        }
        Err(source) => {
            return Err(GuestError::Read {
                path: manifest,
                source,
            })
        }
    };
    let named = text
        .lines()
        .any(|l| l.trim() == format!("name = \"{DEMO_LINUX}\""));
    if named {
        Ok(dir)
    } else {
        Err(GuestError::MissingDemoLinux { dir })
    }
}

/// The 4096-byte block the key-value service writes for record `n`: the line
/// `<n> <key> <value>\n` padded with zero bytes, or `None` if it does not fit.
pub fn kv_record(n: u64, key: &str, value: &str) -> Option<Vec<u8>> {
    let mut block = format!("{n} {key} {value}\n").into_bytes();
    if block.len() > KV_BLOCK {
        return None;
    }
    block.resize(KV_BLOCK, 0);
    Some(block)
}

/// A `VMR-STORED` marker: the service stored record `n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub n: u64,
    pub keylen: usize,
    /// SHA-256 of the 4096-byte block, lower-case hex.
    pub sha256: String,
}

/// Parses `VMR-STORED n=<n> keylen=<len> sha256=<hex>`.
pub fn parse_stored(line: &str) -> Option<Stored> {
    let rest = line.trim().strip_prefix("VMR-STORED ")?;
    let (mut n, mut keylen, mut sha256) = (None, None, None);
    for kv in rest.split_whitespace() {
        match kv.split_once('=') {
            Some(("n", v)) => n = v.parse().ok(),
            Some(("keylen", v)) => keylen = v.parse().ok(),
            Some(("sha256", v)) if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                sha256 = Some(v.to_ascii_lowercase())
            }
            _ => {}
        }
    }
    Some(Stored {
        n: n?,
        keylen: keylen?,
        sha256: sha256?,
    })
}

/// The `VMR-DONE` summary: steps that succeeded and failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub ok: u32,
    pub fail: u32,
}

/// Parses a `VMR-DONE ok=<n> fail=<n>` line.
pub fn parse_done(line: &str) -> Option<Done> {
    let rest = line.trim().strip_prefix("VMR-DONE ")?;
    let mut ok = None;
    let mut fail = None;
    for kv in rest.split_whitespace() {
        match kv.split_once('=') {
            Some(("ok", v)) => ok = v.parse().ok(),
            Some(("fail", v)) => fail = v.parse().ok(),
            _ => {}
        }
    }
    Some(Done {
        ok: ok?,
        fail: fail?,
    })
}

/// Lines of `serial` that start with a marker (`VMR-`), cleaned of the
/// terminal escapes the kernel's console may put before them.
pub fn markers(serial: &str) -> Vec<String> {
    serial
        .lines()
        .filter_map(|l| l.find("VMR-").map(|i| l[i..].trim_end().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_follow_the_init_script() {
        let b = disk_blocks("t1", 1);
        assert_eq!(b.len(), 4);
        assert_eq!(b[0].offset, 17_825_792);
        assert_eq!(b[1].offset, 22_032_384);
        assert_eq!(b[3].offset, 30_408_704);
        assert_eq!(b[3].data.len(), 65536);
        assert!(b[0].data.starts_with(b"vmr:t1:r1:b0\nvmr:t1:r1:b0\n"));
        // Each block must lie below the disk size the workloads need.
        let last = disk_blocks("t1", 2).pop().expect("four blocks");
        assert!(last.offset + last.data.len() as u64 <= MIN_DISK_BYTES);
    }

    #[test]
    fn kv_records_and_stored_markers() {
        let r = kv_record(3, "k", "v w").expect("fits");
        assert_eq!(r.len(), KV_BLOCK);
        assert!(r.starts_with(b"3 k v w\n\0"));
        assert!(r[8..].iter().all(|&b| b == 0));
        assert!(kv_record(0, "k", &"v".repeat(KV_BLOCK)).is_none());
        let line = format!("VMR-STORED n=2 keylen=200 sha256={}", "ab".repeat(32));
        assert_eq!(
            parse_stored(&line),
            Some(Stored {
                n: 2,
                keylen: 200,
                sha256: "ab".repeat(32)
            })
        );
        assert_eq!(parse_stored("VMR-STORED n=2 keylen=1 sha256=zz"), None);
        assert_eq!(parse_stored("VMR-READY n=2"), None);
    }

    #[test]
    fn parses_markers() {
        let serial = "boot\r\n\x1b[2JVMR-READY kernel=x\nVMR-DONE ok=2 fail=0\n";
        let m = markers(serial);
        assert_eq!(m, vec!["VMR-READY kernel=x", "VMR-DONE ok=2 fail=0"]);
        assert_eq!(parse_done(&m[1]), Some(Done { ok: 2, fail: 0 }));
        assert_eq!(parse_done("VMR-DONE ok=x"), None);
    }
}
