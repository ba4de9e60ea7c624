//! The backend's part of a snapshot cut: the `checkpoint` control command.
//!
//! `{"cmd":"checkpoint","next_layer":"<path>"}` waits until the device
//! thread(s) are idle (no request in flight; with the guest paused the
//! front-end's GET_VRING_BASE has already stopped the queues, so nothing new
//! arrives), makes every capture record written so far durable in the spool
//! (the tee's FLUSH barrier, an fsync), reads the last `seq` handed out, and
//! for a disk freezes the top copy-on-write layer and opens `next_layer` as
//! the new top ([`Disk::checkpoint`]). It answers
//!
//! ```json
//! {"ok":true,"seq":812,"frozen_layer":"/…/vda.layers/base","clusters":42,
//!  "top":"/…/vda.layers/0001","chain":["/…/vda.layers/base"],"idle_us":120}
//! ```
//!
//! `seq` is the last number the instance's shared counter handed out when
//! the device was idle (`null` without a capture); the net backend answers
//! the same without the layer fields, and refuses `next_layer`. A block
//! backend without `next_layer` only drains and syncs.
//!
//! On a running guest the command still answers, between two requests: the
//! frozen layer is then a crash-consistent image of the disk.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::blk::{BlockBackend, Disk};
use crate::capture::Tee;
use crate::net::NetBackend;
use crate::seq::SeqSource;

/// Errors of a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The capture could not be made durable.
    #[error("capture records are not durable")]
    Capture(#[source] crate::capture::CaptureError),
    /// The disk layer could not be frozen.
    #[error("cannot freeze the disk layer")]
    Disk(#[source] crate::blk::DiskError),
    /// A net backend has no disk layers.
    #[error("a net backend has no disk layer; leave next_layer out")]
    NoLayer,
    /// The control socket could not be used.
    #[error("control socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The backend answered with an error or something unreadable.
    #[error("backend at {path} refused the checkpoint: {reason}")]
    Refused { path: PathBuf, reason: String },
}

/// What a checkpoint reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReply {
    /// Last `seq` handed out by the instance's counter while the device was
    /// idle (`None` without a capture).
    pub seq: Option<u64>,
    /// The layer frozen (disks with `next_layer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_layer: Option<PathBuf>,
    /// Clusters in the frozen layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<u64>,
    /// The new top layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top: Option<PathBuf>,
    /// Every frozen layer of the disk after the checkpoint, bottom first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<PathBuf>,
    /// How long the device was held idle, µs.
    pub idle_us: u64,
}

/// A backend that can take part in a cut.
pub trait Checkpoint: Send + Sync {
    /// Drains, syncs the capture, reads the `seq`, and (disks) freezes the
    /// top layer and opens `next_layer` over it.
    fn checkpoint(&self, next_layer: Option<&Path>) -> Result<CheckpointReply, CheckpointError>;
}

fn last_seq(seq: Option<&Arc<dyn SeqSource>>) -> Option<u64> {
    seq.map(|s| s.peek().saturating_sub(1))
}

fn sync(tee: Option<&Tee>) -> Result<(), CheckpointError> {
    tee.map_or(Ok(()), |t| t.sync().map_err(CheckpointError::Capture))
}

/// The checkpoint of a block backend.
pub struct BlockCheckpoint {
    /// The backend.
    pub backend: BlockBackend,
    /// The instance's counter (the tee's), if recording.
    pub seq: Option<Arc<dyn SeqSource>>,
}

impl Checkpoint for BlockCheckpoint {
    fn checkpoint(&self, next_layer: Option<&Path>) -> Result<CheckpointReply, CheckpointError> {
        self.backend.quiesce(|disk: &Disk, tee| {
            let t0 = Instant::now();
            sync(tee)?;
            let seq = last_seq(self.seq.as_ref());
            let mut reply = CheckpointReply {
                seq,
                frozen_layer: None,
                clusters: None,
                top: None,
                chain: Vec::new(),
                idle_us: 0,
            };
            if let Some(next) = next_layer {
                let c = disk.checkpoint(next).map_err(CheckpointError::Disk)?;
                reply.frozen_layer = Some(c.frozen_layer);
                reply.clusters = Some(c.clusters);
                reply.top = Some(c.top);
                reply.chain = c.chain;
            } else {
                disk.flush().map_err(CheckpointError::Disk)?;
            }
            reply.idle_us = t0.elapsed().as_micros() as u64;
            Ok(reply)
        })
    }
}

/// The checkpoint of a net backend.
pub struct NetCheckpoint {
    /// The backend.
    pub backend: NetBackend,
    /// The instance's counter (the tee's), if recording.
    pub seq: Option<Arc<dyn SeqSource>>,
}

impl Checkpoint for NetCheckpoint {
    fn checkpoint(&self, next_layer: Option<&Path>) -> Result<CheckpointReply, CheckpointError> {
        if next_layer.is_some() {
            return Err(CheckpointError::NoLayer);
        }
        self.backend.quiesce(|tee| {
            let t0 = Instant::now();
            sync(tee)?;
            Ok(CheckpointReply {
                seq: last_seq(self.seq.as_ref()),
                frozen_layer: None,
                clusters: None,
                top: None,
                chain: Vec::new(),
                idle_us: t0.elapsed().as_micros() as u64,
            })
        })
    }
}

/// Runs the control command (the reply object of the control socket).
pub fn handle(target: Option<&dyn Checkpoint>, next_layer: Option<&Path>) -> serde_json::Value {
    let Some(t) = target else {
        return json!({"ok": false, "error": "this backend does not take checkpoints"});
    };
    match t.checkpoint(next_layer) {
        Ok(r) => {
            let mut v = serde_json::to_value(&r).unwrap_or_else(|_| json!({}));
            v["ok"] = json!(true);
            v
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            json!({"ok": false, "error": msg})
        }
    }
}

/// Asks the backend listening on the control socket `path` for a
/// checkpoint, waiting at most `timeout` for its answer.
pub fn request(
    path: &Path,
    next_layer: Option<&Path>,
    timeout: Duration,
) -> Result<CheckpointReply, CheckpointError> {
    let sock = |source| CheckpointError::Socket {
        path: path.to_owned(),
        source,
    };
    let s = UnixStream::connect(path).map_err(sock)?;
    s.set_read_timeout(Some(timeout)).map_err(sock)?;
    s.set_write_timeout(Some(timeout)).map_err(sock)?;
    let mut req = json!({"cmd": "checkpoint"});
    if let Some(n) = next_layer {
        req["next_layer"] = json!(n);
    }
    let mut w = s.try_clone().map_err(sock)?;
    writeln!(w, "{req}").map_err(sock)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(sock)?;
    let refused = |reason: String| CheckpointError::Refused {
        path: path.to_owned(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| refused(format!("unreadable answer: {e}")))?;
    if v["ok"] != json!(true) {
        return Err(refused(v["error"].as_str().unwrap_or("no reason").into()));
    }
    serde_json::from_value(v).map_err(|e| refused(format!("unreadable answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::BlockConfig;
    use crate::capture::{MemorySink, TeeConfig};
    use crate::metrics::Metrics;
    use crate::seq::AtomicSeq;

    #[test]
    fn checkpoint_over_the_control_socket() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 65536]).unwrap();
        let l0 = dir.path().join("l0");
        let disk = Disk::open(&img, Some(&l0), false).unwrap();
        disk.write(0, &[1; 4096], &mut Vec::new()).unwrap();
        disk.write(8192, &[2; 100], &mut Vec::new()).unwrap();
        let metrics = Arc::new(Metrics::default());
        let seq: Arc<dyn SeqSource> = Arc::new(AtomicSeq::new(1));
        let sink = Arc::new(MemorySink::new());
        let tee = Tee::start(
            TeeConfig::new("vm"),
            sink.clone(),
            seq.clone(),
            metrics.clone(),
        )
        .unwrap();
        tee.record_lifecycle(vmr_proto::pb::LifecycleKind::Boot, "one");
        tee.record_lifecycle(vmr_proto::pb::LifecycleKind::Boot, "two");
        let backend = BlockBackend::new(
            BlockConfig::new("vda"),
            disk,
            Some(tee.clone()),
            None,
            metrics.clone(),
        )
        .unwrap();
        // A socket that answers each line through `handle`, as the control
        // socket's dispatch does.
        let ctl = dir.path().join("ctl");
        let listener = std::os::unix::net::UnixListener::bind(&ctl).unwrap();
        let cp = BlockCheckpoint {
            backend: backend.clone(),
            seq: Some(seq.clone()),
        };
        let server = std::thread::spawn(move || {
            for _ in 0..3 {
                let (conn, _) = listener.accept().unwrap();
                let mut out = conn.try_clone().unwrap();
                let mut line = String::new();
                BufReader::new(conn).read_line(&mut line).unwrap();
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let next = v["next_layer"].as_str().map(PathBuf::from);
                let reply = handle(Some(&cp), next.as_deref());
                writeln!(out, "{reply}").unwrap();
            }
        });
        let l1 = dir.path().join("l1");
        let r = request(&ctl, Some(&l1), Duration::from_secs(10)).unwrap();
        assert_eq!(r.seq, Some(2));
        assert_eq!(r.frozen_layer.as_deref(), Some(l0.as_path()));
        assert_eq!(r.clusters, Some(2));
        assert_eq!(r.top.as_deref(), Some(l1.as_path()));
        assert_eq!(r.chain, vec![l0.clone()]);
        // The records up to the cut went through the sink's sync.
        assert_eq!(sink.take().len(), 2);
        // The same target again is refused, with the reason.
        let e = request(&ctl, Some(&l1), Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains("already a layer"), "{e}");
        // Without a layer: drain and sync only.
        let r = request(&ctl, None, Duration::from_secs(10)).unwrap();
        assert_eq!(r.frozen_layer, None);
        assert_eq!(r.seq, Some(2));
        assert_eq!(backend.disk().layer_paths().0, vec![l0]);
        server.join().unwrap();
        tee.shutdown();
    }

    #[test]
    fn a_backend_without_checkpoints_says_so() {
        let v = handle(None, None);
        assert_eq!(v["ok"], json!(false));
        assert!(v["error"].as_str().unwrap().contains("checkpoints"));
    }
}
