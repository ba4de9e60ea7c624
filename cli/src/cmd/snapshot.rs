//! `vmr snapshot list|show|take|pin|delete`.
//!
//! `list` and `show` read the snapshot store directly (the manifests
//! `vmr-snapshot` writes under `<instance>/<snapshot>/manifest.json`), so
//! they work without an agent; with `--agent` they ask the capture agent,
//! which also knows which snapshots are pinned. `take`, `pin` and `delete`
//! are calls to the agent (`vmr.v1.CaptureAgent`).

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use vmr_proto::pb;
use vmr_proto::pb::capture_agent_client::CaptureAgentClient;
use vmr_snapshot::manifest::Manifest;
use vmr_snapshot::restore::{self, RestoreError};
use vmr_snapshot::store::{SnapshotStore, StoreConfig};

use crate::config::Config;
use crate::error::{CliError, CliResult};
use crate::grpc::{self, Service};
use crate::output::{println_safe, Out, Table};
use crate::util::{human_bytes, rfc3339_ns};

/// `vmr snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// An instance's snapshots, oldest cut first.
    List(ListArgs),
    /// One snapshot's manifest.
    Show(ShowArgs),
    /// Take a snapshot of a running instance now (through the agent).
    Take(TakeArgs),
    /// Exempt a snapshot from retention (`--unpin` returns it).
    Pin(PinArgs),
    /// Delete a snapshot (through the agent).
    Delete(IdArgs),
}

/// Arguments of `vmr snapshot list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The instance.
    pub instance: String,
    /// Ask the capture agent instead of reading the store.
    #[arg(long)]
    pub agent: bool,
}

/// Arguments of `vmr snapshot show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    pub instance: String,
    /// The snapshot id, or `latest`.
    pub snapshot: String,
}

/// Arguments of `vmr snapshot take`.
#[derive(Debug, Args)]
pub struct TakeArgs {
    pub instance: String,
    /// Only memory pages dirtied since the last snapshot.
    #[arg(long)]
    pub incremental: bool,
    /// Exempt it from retention.
    #[arg(long)]
    pub pin: bool,
    /// Return once the agent accepted it, without waiting for the upload.
    #[arg(long)]
    pub no_wait: bool,
    /// Longest wait for the snapshot, seconds.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub timeout: f64,
}

/// Arguments of `vmr snapshot pin`.
#[derive(Debug, Args)]
pub struct PinArgs {
    pub instance: String,
    pub snapshot: String,
    /// Return it to retention instead.
    #[arg(long)]
    pub unpin: bool,
}

/// An instance and one of its snapshots.
#[derive(Debug, Args)]
pub struct IdArgs {
    pub instance: String,
    pub snapshot: String,
}

fn check_instance(i: &str) -> CliResult {
    vmr_proto::InstanceId::new(i.to_string())
        .map(|_| ())
        .map_err(|e| CliError::usage(format!("instance {i:?}: {e}")))
}

fn open_store(cfg: &Config) -> CliResult<SnapshotStore> {
    let url = &cfg.endpoints.object_store_url;
    SnapshotStore::open(&StoreConfig::new(url.clone())).map_err(|e| {
        CliError::precondition(format!("cannot open the snapshot store {url}: {e}")).hint(
            "set --object-store-url / VMR_OBJECT_STORE_URL (file:///path or s3://bucket/prefix)",
        )
    })
}

fn restore_error(cfg: &Config, e: RestoreError) -> CliError {
    match e {
        RestoreError::NotFound { .. } => CliError::not_found(e.to_string())
            .hint("list the instance's snapshots with `vmr snapshot list INSTANCE`"),
        RestoreError::Store { .. } => CliError::unavailable(format!(
            "the snapshot store {} did not answer: {e}",
            cfg.endpoints.object_store_url
        )),
        other => CliError::precondition(other.to_string()),
    }
}

/// The instance's snapshots in the configured store, oldest cut first.
pub fn list_store(cfg: &Config, instance: &str) -> CliResult<Vec<Manifest>> {
    check_instance(instance)?;
    let store = open_store(cfg)?;
    grpc::block_on(restore::list(&store, instance))?.map_err(|e| restore_error(cfg, e))
}

/// A manifest as the `--json` summary object (docs/cli.md).
pub fn manifest_json(m: &Manifest, pinned: Option<bool>) -> Value {
    json!({
        "instance": m.instance,
        "snapshot_id": m.snapshot_id,
        "base_snapshot_id": m.base_snapshot_id,
        "driver": m.driver,
        "image": m.image,
        "memory": serde_json::to_value(m.memory).unwrap_or(Value::Null),
        "seq_at_cut": m.seq_at_cut,
        "wall_time_ns": m.wall_time_ns,
        "time": rfc3339_ns(m.wall_time_ns),
        "pause_us": m.pause_us,
        "objects": m.objects.len(),
        "bytes": m.total_bytes(),
        "pinned": pinned,
    })
}

fn print_list(out: &Out, instance: &str, source: &str, items: &[(Manifest, Option<bool>)]) {
    if out.json {
        out.json_doc(&json!({
            "instance": instance,
            "source": source,
            "snapshots": items.iter().map(|(m, p)| manifest_json(m, *p)).collect::<Vec<_>>(),
        }));
        return;
    }
    let mut t = Table::new(&[
        "SNAPSHOT",
        "TIME",
        "SEQ AT CUT",
        "MEMORY",
        "BASE",
        "SIZE",
        "PAUSE",
        "PINNED",
    ]);
    for (m, p) in items {
        t.row(vec![
            m.snapshot_id.clone(),
            rfc3339_ns(m.wall_time_ns),
            m.seq_at_cut.to_string(),
            serde_json::to_value(m.memory)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            m.base_snapshot_id.clone().unwrap_or_else(|| "-".into()),
            human_bytes(m.total_bytes()),
            format!("{} ms", m.pause_us / 1000),
            p.map_or("-".into(), |p| if p { "yes" } else { "no" }.into()),
        ]);
    }
    t.print();
}

fn from_proto(m: Option<pb::SnapshotManifest>) -> CliResult<Manifest> {
    let m = m.ok_or_else(|| CliError::other("the agent answered without a manifest"))?;
    Manifest::from_proto(m)
        .map_err(|e| CliError::other(format!("the agent sent an invalid manifest: {e}")))
}

async fn agent(cfg: &Config) -> CliResult<CaptureAgentClient<tonic::transport::Channel>> {
    Ok(CaptureAgentClient::new(
        grpc::connect(Service::Agent, &cfg.agent_url).await?,
    ))
}

fn aerr(what: &str) -> impl Fn(tonic::Status) -> CliError + '_ {
    move |s| grpc::status_error(Service::Agent, what, &s)
}

fn op_state(s: i32) -> &'static str {
    match pb::OperationState::try_from(s).unwrap_or(pb::OperationState::Unspecified) {
        pb::OperationState::Unspecified => "unspecified",
        pb::OperationState::Pending => "pending",
        pb::OperationState::Running => "running",
        pb::OperationState::Succeeded => "succeeded",
        pb::OperationState::Failed => "failed",
    }
}

fn op_json(o: &pb::Operation) -> Value {
    json!({
        "operation_id": o.id,
        "instance_id": o.instance_id,
        "state": op_state(o.state),
        "stage": o.stage,
        "bytes_done": o.bytes_done,
        "bytes_total": o.bytes_total,
        "done": o.done,
        "error": (!o.error.is_empty()).then(|| o.error.clone()),
        "started_ns": o.started_ns,
        "finished_ns": o.finished_ns,
        "snapshot": o.manifest.clone().and_then(|m| Manifest::from_proto(m).ok()).map(|m| manifest_json(&m, None)),
    })
}

async fn take(cfg: &Config, a: &TakeArgs, out: &Out) -> CliResult {
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        return Err(CliError::usage(
            "--timeout must be a positive number of seconds",
        ));
    }
    let mut c = agent(cfg).await?;
    let req = grpc::request(
        pb::TakeSnapshotRequest {
            instance_id: a.instance.clone(),
            incremental: a.incremental,
            pin: a.pin,
        },
        cfg.token.as_deref(),
    )?;
    let mut op = c
        .take_snapshot(req)
        .await
        .map_err(aerr("taking a snapshot"))?
        .into_inner();
    if !a.no_wait && !op.done {
        let bar = crate::progress::bar(out, Some(0), true);
        bar.set_message(format!("snapshot of {}", a.instance));
        let req = grpc::request(
            pb::GetOperationRequest {
                operation_id: op.id.clone(),
            },
            cfg.token.as_deref(),
        )?;
        let mut stream = c
            .watch_operation(req)
            .await
            .map_err(aerr("watching the snapshot"))?
            .into_inner();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs_f64(a.timeout);
        loop {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => {
                    bar.finish_and_clear();
                    return Err(CliError::unavailable(format!(
                        "the snapshot {} did not finish within {:.0}s",
                        op.id, a.timeout
                    ))
                    .hint("raise --timeout; the agent goes on with it"));
                }
                Ok(None) => break,
                Ok(Some(Err(s))) => {
                    bar.finish_and_clear();
                    return Err(aerr("the snapshot's progress")(s));
                }
                Ok(Some(Ok(o))) => {
                    if o.bytes_total > 0 {
                        bar.set_length(o.bytes_total);
                        bar.set_position(o.bytes_done);
                    }
                    bar.set_message(format!("snapshot of {}: {}", a.instance, o.stage));
                    let done = o.done;
                    op = o;
                    if done {
                        break;
                    }
                }
            }
        }
        bar.finish_and_clear();
    }
    if op.state == pb::OperationState::Failed as i32 {
        return Err(CliError::other(format!(
            "the snapshot of {} failed: {}",
            a.instance, op.error
        )));
    }
    if out.json {
        out.json_doc(&op_json(&op));
    } else if let Some(m) = op.manifest.clone() {
        let m = from_proto(Some(m))?;
        println_safe(&format!(
            "snapshot {} of {}: seq at cut {}, {} in {} objects, guest paused {} ms",
            m.snapshot_id,
            m.instance,
            m.seq_at_cut,
            human_bytes(m.total_bytes()),
            m.objects.len(),
            m.pause_us / 1000
        ));
    } else {
        println_safe(&format!(
            "snapshot operation {} of {}: {} ({})",
            op.id,
            a.instance,
            op_state(op.state),
            op.stage
        ));
    }
    Ok(())
}

async fn run_async(cfg: &Config, c: &SnapshotCommand, out: &Out) -> CliResult {
    match c {
        SnapshotCommand::List(a) => {
            check_instance(&a.instance)?;
            if !a.agent {
                let store = open_store(cfg)?;
                let ms = restore::list(&store, &a.instance)
                    .await
                    .map_err(|e| restore_error(cfg, e))?;
                let items: Vec<_> = ms.into_iter().map(|m| (m, None)).collect();
                print_list(out, &a.instance, &cfg.endpoints.object_store_url, &items);
                return Ok(());
            }
            let mut c = agent(cfg).await?;
            let req = grpc::request(
                pb::ListSnapshotsRequest {
                    instance_id: a.instance.clone(),
                },
                cfg.token.as_deref(),
            )?;
            let r = c
                .list_snapshots(req)
                .await
                .map_err(aerr("listing snapshots"))?
                .into_inner();
            let mut items = Vec::new();
            for s in r.snapshots {
                items.push((from_proto(s.manifest)?, Some(s.pinned)));
            }
            items.sort_by_key(|(m, _)| m.wall_time_ns);
            print_list(out, &a.instance, &cfg.agent_url, &items);
            Ok(())
        }
        SnapshotCommand::Show(a) => {
            check_instance(&a.instance)?;
            let store = open_store(cfg)?;
            let m = if a.snapshot == "latest" {
                restore::select(&store, &a.instance, &restore::Selector::Latest).await
            } else {
                restore::load_manifest(&store, &a.instance, &a.snapshot).await
            }
            .map_err(|e| restore_error(cfg, e))?;
            if out.json {
                let mut v = manifest_json(&m, None);
                v["manifest"] = serde_json::to_value(&m).unwrap_or(Value::Null);
                out.json_doc(&v);
            } else {
                let mut t = Table::new(&["FIELD", "VALUE"]);
                for (k, v) in [
                    ("instance", m.instance.clone()),
                    ("snapshot", m.snapshot_id.clone()),
                    (
                        "base",
                        m.base_snapshot_id.clone().unwrap_or_else(|| "-".into()),
                    ),
                    (
                        "driver",
                        format!("{} (format {})", m.driver, m.driver_format),
                    ),
                    ("image", m.image.clone()),
                    ("time", rfc3339_ns(m.wall_time_ns)),
                    ("seq at cut", m.seq_at_cut.to_string()),
                    ("guest pause", format!("{} us", m.pause_us)),
                    (
                        "host",
                        format!("{} (tsc {:?} kHz)", m.host.cpu_model, m.host.tsc_khz),
                    ),
                    ("size", human_bytes(m.total_bytes())),
                ] {
                    t.row(vec![k.into(), v]);
                }
                t.print();
                let mut o = Table::new(&["OBJECT", "KIND", "SIZE", "SHA256"]);
                for x in &m.objects {
                    o.row(vec![
                        x.key.clone(),
                        x.kind.as_str().into(),
                        human_bytes(x.size),
                        x.sha256.chars().take(16).collect(),
                    ]);
                }
                o.print();
                let mut p = Table::new(&["TOPIC", "PARTITION", "NEXT OFFSET"]);
                for x in &m.offsets {
                    p.row(vec![
                        x.topic.clone(),
                        x.partition.to_string(),
                        x.next_offset.to_string(),
                    ]);
                }
                p.print();
            }
            Ok(())
        }
        SnapshotCommand::Take(a) => {
            check_instance(&a.instance)?;
            take(cfg, a, out).await
        }
        SnapshotCommand::Pin(a) => {
            check_instance(&a.instance)?;
            let mut c = agent(cfg).await?;
            let req = grpc::request(
                pb::PinSnapshotRequest {
                    instance_id: a.instance.clone(),
                    snapshot_id: a.snapshot.clone(),
                    pinned: !a.unpin,
                },
                cfg.token.as_deref(),
            )?;
            let info = c
                .pin_snapshot(req)
                .await
                .map_err(aerr("pinning the snapshot"))?
                .into_inner();
            let m = from_proto(info.manifest)?;
            if out.json {
                out.json_doc(&manifest_json(&m, Some(info.pinned)));
            } else {
                println_safe(&format!(
                    "snapshot {} of {} is {}",
                    m.snapshot_id,
                    m.instance,
                    if info.pinned { "pinned" } else { "not pinned" }
                ));
            }
            Ok(())
        }
        SnapshotCommand::Delete(a) => {
            check_instance(&a.instance)?;
            let mut c = agent(cfg).await?;
            let req = grpc::request(
                pb::DeleteSnapshotRequest {
                    instance_id: a.instance.clone(),
                    snapshot_id: a.snapshot.clone(),
                },
                cfg.token.as_deref(),
            )?;
            c.delete_snapshot(req)
                .await
                .map_err(aerr("deleting the snapshot"))?;
            if out.json {
                out.json_doc(
                    &json!({ "deleted": { "instance": a.instance, "snapshot_id": a.snapshot } }),
                );
            } else {
                println_safe(&format!(
                    "deleted snapshot {} of {}",
                    a.snapshot, a.instance
                ));
            }
            Ok(())
        }
    }
}

/// Runs a `snapshot` subcommand.
pub fn run(cfg: &Config, c: &SnapshotCommand, out: &Out) -> CliResult {
    grpc::block_on(run_async(cfg, c, out))?
}
