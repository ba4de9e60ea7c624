//! `vmr.v1.CaptureAgent` over tonic: request checks, the blocking host
//! calls on the blocking pool, status codes, streams.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use vmr_proto::{pb, InstanceId};

use super::host::{Host, HostError};
use super::snapshot::{SnapshotControl, SnapshotRequest, NOT_CONFIGURED};

/// The service.
pub struct CaptureAgentService {
    pub(crate) host: Arc<Host>,
    pub(crate) snapshots: Option<Arc<dyn SnapshotControl>>,
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl CaptureAgentService {
    /// Runs `f` on the blocking pool; counts and logs a failure.
    async fn blocking<T: Send + 'static>(
        &self,
        method: &'static str,
        f: impl FnOnce(&Host) -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, Status> {
        let host = self.host.clone();
        let r = tokio::task::spawn_blocking(move || f(&host))
            .await
            .map_err(|e| Status::internal(format!("the {method} call panicked: {e}")))?;
        r.map_err(|e| self.fail(method, e))
    }

    fn fail(&self, method: &'static str, e: HostError) -> Status {
        self.host.count_error(method, e.code_name());
        tracing::info!(method, code = e.code_name(), error = %e, "request refused");
        e.into()
    }

    fn snapshots(&self, method: &'static str) -> Result<Arc<dyn SnapshotControl>, Status> {
        self.snapshots.clone().ok_or_else(|| {
            self.host.count_error(method, "unimplemented");
            Status::unimplemented(NOT_CONFIGURED)
        })
    }

    fn instance_id(&self, method: &'static str, id: &str) -> Result<InstanceId, Status> {
        InstanceId::new(id).map_err(|e| {
            self.fail(
                method,
                HostError::InvalidArgument {
                    field: "instance_id".into(),
                    reason: e.to_string(),
                },
            )
        })
    }

    /// Runs a snapshot-engine call on the blocking pool.
    async fn engine<T: Send + 'static>(
        &self,
        method: &'static str,
        f: impl FnOnce(&dyn SnapshotControl) -> Result<T, super::SnapshotControlError> + Send + 'static,
    ) -> Result<T, Status> {
        let eng = self.snapshots(method)?;
        let r = tokio::task::spawn_blocking(move || f(&*eng))
            .await
            .map_err(|e| Status::internal(format!("the {method} call panicked: {e}")))?;
        r.map_err(|e| {
            let s: Status = e.into();
            self.host
                .count_error(method, &format!("{:?}", s.code()).to_lowercase());
            s
        })
    }
}

#[tonic::async_trait]
impl pb::capture_agent_server::CaptureAgent for CaptureAgentService {
    async fn launch_instance(
        &self,
        req: Request<pb::LaunchInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let req = req.into_inner();
        let snapshots = self.snapshots.clone();
        let out = self
            .blocking("LaunchInstance", move |h| {
                let spec = req.spec.clone().unwrap_or_default();
                let e = h.launch(req)?;
                if let (Some(s), Some(i)) = (&snapshots, e.running()) {
                    s.launched(i, &spec);
                }
                Ok(h.inspect(&e))
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn list_instances(
        &self,
        _req: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let instances = self
            .blocking("ListInstances", |h| {
                Ok(h.entries().iter().map(|e| h.inspect(e)).collect())
            })
            .await?;
        Ok(Response::new(pb::ListInstancesResponse { instances }))
    }

    async fn get_instance(
        &self,
        req: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let id = req.into_inner().instance_id;
        let out = self
            .blocking("GetInstance", move |h| {
                let e = h.entry(&id)?;
                Ok(h.inspect(&e))
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn pause_instance(
        &self,
        req: Request<pb::PauseInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let id = req.into_inner().instance_id;
        let out = self
            .blocking("PauseInstance", move |h| {
                let e = h.pause(&id)?;
                Ok(h.inspect(&e))
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn resume_instance(
        &self,
        req: Request<pb::ResumeInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let id = req.into_inner().instance_id;
        let out = self
            .blocking("ResumeInstance", move |h| {
                let e = h.resume(&id)?;
                Ok(h.inspect(&e))
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn stop_instance(
        &self,
        req: Request<pb::StopInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let id = req.into_inner().instance_id;
        let snapshots = self.snapshots.clone();
        let out = self
            .blocking("StopInstance", move |h| {
                if let Some(s) = &snapshots {
                    s.stopping(&id);
                }
                let e = h.stop(&id)?;
                Ok(h.inspect(&e))
            })
            .await?;
        Ok(Response::new(out))
    }

    type WatchStream = Stream_<pb::InstanceEvent>;

    async fn watch(
        &self,
        req: Request<pb::WatchInstanceRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        let one = (!req.instance_id.is_empty()).then(|| req.instance_id.clone());
        if let Some(id) = &one {
            self.host.entry(id).map_err(|e| self.fail("Watch", e))?;
        }
        // Subscribe before reading the history; the running numbers drop
        // what both hold.
        let mut rx = self.host.subscribe();
        let history = if req.skip_history {
            Vec::new()
        } else {
            self.host.history(one.as_deref())
        };
        let last_n = history.last().map_or(0, |(n, _)| *n);
        let ended = |ev: &pb::InstanceEvent| {
            matches!(
                pb::InstanceState::try_from(ev.state),
                Ok(pb::InstanceState::Stopped | pb::InstanceState::Failed)
            ) && (ev.detail == "stopped" || ev.detail == "launch failed")
        };
        let done_in_history = one.is_some() && history.last().is_some_and(|(_, e)| ended(e));
        let (tx, out) = tokio::sync::mpsc::channel::<Result<pb::InstanceEvent, Status>>(64);
        tokio::spawn(async move {
            for (_, mut ev) in history {
                ev.replayed = true;
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            if done_in_history {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok((n, ev)) => {
                        if n <= last_n || one.as_ref().is_some_and(|id| *id != ev.instance_id) {
                            continue;
                        }
                        let end = one.is_some() && ended(&ev);
                        if tx.send(Ok(ev)).await.is_err() || end {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "the watcher fell {k} events behind; watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn update_capture_filter(
        &self,
        req: Request<pb::UpdateCaptureFilterRequest>,
    ) -> Result<Response<pb::DeviceStatus>, Status> {
        let req = req.into_inner();
        let out = self
            .blocking("UpdateCaptureFilter", move |h| h.update_filter(&req))
            .await?;
        Ok(Response::new(out))
    }

    async fn take_snapshot(
        &self,
        req: Request<pb::TakeSnapshotRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let req = req.into_inner();
        self.snapshots("TakeSnapshot")?;
        let inst = self
            .blocking("TakeSnapshot", move |h| {
                let e = h.entry(&req.instance_id)?;
                let st = e.state();
                match (e.running(), st) {
                    (Some(i), pb::InstanceState::Running | pb::InstanceState::Paused) => {
                        Ok((i, req))
                    }
                    _ => Err(HostError::FailedPrecondition(format!(
                        "cannot snapshot instance {}: it is {}",
                        req.instance_id,
                        st.as_str_name()
                    ))),
                }
            })
            .await?;
        let (i, req) = inst;
        let op = self
            .engine("TakeSnapshot", move |eng| {
                eng.take(
                    i,
                    SnapshotRequest {
                        incremental: req.incremental,
                        pin: req.pin,
                    },
                )
            })
            .await?;
        Ok(Response::new(op.into()))
    }

    async fn get_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let id = req.into_inner().operation_id;
        let op = self
            .engine("GetOperation", move |eng| eng.operation(&id))
            .await?;
        Ok(Response::new(op.into()))
    }

    type WatchOperationStream = Stream_<pb::Operation>;

    async fn watch_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<Response<Self::WatchOperationStream>, Status> {
        let id = req.into_inner().operation_id;
        let rx = self
            .engine("WatchOperation", move |eng| eng.watch(&id))
            .await?;
        let stream = tokio_stream::wrappers::WatchStream::new(rx);
        // Ends with (and including) the first finished state.
        let mut finished = false;
        let s = stream
            .take_while(move |op| {
                let go = !finished;
                finished = op.state.is_done();
                go
            })
            .map(|op| Ok(pb::Operation::from(op)));
        Ok(Response::new(Box::pin(s)))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let id = self.instance_id("ListSnapshots", &req.into_inner().instance_id)?;
        let list = self
            .engine("ListSnapshots", move |eng| eng.list(&id))
            .await?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: list.into_iter().map(Into::into).collect(),
        }))
    }

    async fn pin_snapshot(
        &self,
        req: Request<pb::PinSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let req = req.into_inner();
        let id = self.instance_id("PinSnapshot", &req.instance_id)?;
        let e = self
            .engine("PinSnapshot", move |eng| {
                eng.pin(&id, &req.snapshot_id, req.pinned)
            })
            .await?;
        Ok(Response::new(e.into()))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let req = req.into_inner();
        let id = self.instance_id("DeleteSnapshot", &req.instance_id)?;
        self.engine("DeleteSnapshot", move |eng| {
            eng.delete(&id, &req.snapshot_id)
        })
        .await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }
}
