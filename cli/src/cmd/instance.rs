//! `vmr instance launch|list|show|pause|resume|stop|watch`: a gRPC client of
//! the capture agent (`vmr.v1.CaptureAgent`,
//! proto/proto/vmr/v1/agent.proto).

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use vmr_proto::pb;
use vmr_proto::pb::capture_agent_client::CaptureAgentClient;

use crate::config::Config;
use crate::error::{CliError, CliResult};
use crate::grpc::{self, Service};
use crate::output::{println_safe, Out, Table};
use crate::util::rfc3339_ns;

/// `vmr instance` subcommands.
#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Launch a recorded instance of a machine image.
    Launch(LaunchArgs),
    /// The agent's instances.
    List,
    /// One instance in detail: devices, backends, shipping.
    Show(IdArg),
    /// Pause a running instance.
    Pause(IdArg),
    /// Resume a paused instance.
    Resume(IdArg),
    /// Stop an instance (its recorded events and snapshots stay).
    Stop(IdArg),
    /// Follow an instance's lifecycle events until it stops.
    Watch(WatchArgs),
}

/// An instance id.
#[derive(Debug, Args)]
pub struct IdArg {
    pub instance: String,
}

/// Arguments of `vmr instance launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Machine image name (as the agent's image directories hold it).
    pub image: String,
    /// Instance id (default: the agent generates one).
    #[arg(long)]
    pub id: Option<String>,
    /// Hypervisor driver: qemu or microvm (default: the image's first).
    #[arg(long)]
    pub driver: Option<String>,
    /// QEMU acceleration: kvm, tcg or auto.
    #[arg(long)]
    pub accel: Option<String>,
    /// Network namespace of the NICs' TAP devices.
    #[arg(long)]
    pub netns: Option<String>,
    /// TAP name prefix (NIC i gets <prefix><i>).
    #[arg(long)]
    pub tap_prefix: Option<String>,
    /// Take a snapshot every SECS seconds (0: none).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub snapshot_every: u32,
    /// Incremental snapshots between full ones.
    #[arg(long)]
    pub incremental: bool,
}

/// Arguments of `vmr instance watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    pub instance: String,
    /// Only new events, not the history.
    #[arg(long)]
    pub new_only: bool,
    /// Stop at the first event of this lifecycle kind (boot, crash, ...).
    #[arg(long, value_name = "KIND")]
    pub until: Option<String>,
    /// Longest wait, seconds.
    #[arg(long, default_value_t = 3600.0, value_name = "SECS")]
    pub timeout: f64,
}

/// A state's stable name.
pub fn state_name(s: i32) -> &'static str {
    match pb::InstanceState::try_from(s).unwrap_or(pb::InstanceState::Unspecified) {
        pb::InstanceState::Unspecified => "unspecified",
        pb::InstanceState::Starting => "starting",
        pb::InstanceState::Running => "running",
        pb::InstanceState::Paused => "paused",
        pb::InstanceState::Stopping => "stopping",
        pb::InstanceState::Stopped => "stopped",
        pb::InstanceState::Crashed => "crashed",
        pb::InstanceState::Failed => "failed",
    }
}

fn kind_name(k: i32) -> String {
    pb::LifecycleKind::try_from(k)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("LIFECYCLE_KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("kind {k}"))
}

/// An instance as JSON (docs/cli.md).
pub fn instance_json(i: &pb::Instance) -> Value {
    let spec = i.spec.clone().unwrap_or_default();
    json!({
        "instance_id": i.instance_id,
        "state": state_name(i.state),
        "image": spec.image,
        "driver": i.driver,
        "last_seq": i.last_seq,
        "last_seq_shipped": i.last_seq_shipped,
        "lag_events": i.lag_events,
        "gaps": i.gaps,
        "launched_ns": i.launched_ns,
        "snapshot_interval_secs": spec.snapshot_interval_secs,
        "detail": i.detail,
        "devices": i.devices.iter().map(|d| {
            let b = d.backend.clone().unwrap_or_default();
            let s = d.shipping.unwrap_or_default();
            json!({
                "name": d.name, "kind": d.kind, "tap": d.tap,
                "backend": {"pid": b.pid, "restarts": b.restarts, "last_exit": b.last_exit},
                "shipping": {
                    "spool_bytes": s.spool_bytes, "last_seq_shipped": s.last_seq_shipped,
                    "lag_events": s.lag_events, "events_shipped": s.events_shipped,
                    "bytes_shipped": s.bytes_shipped, "producer_errors": s.producer_errors,
                    "connected": s.connected,
                },
            })
        }).collect::<Vec<_>>(),
    })
}

fn print_instance(out: &Out, i: &pb::Instance) {
    if out.json {
        out.json_doc(&instance_json(i));
        return;
    }
    let spec = i.spec.clone().unwrap_or_default();
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, v) in [
        ("instance", i.instance_id.clone()),
        ("state", state_name(i.state).into()),
        ("image", spec.image.clone()),
        ("driver", i.driver.clone()),
        (
            "launched",
            if i.launched_ns > 0 {
                rfc3339_ns(i.launched_ns)
            } else {
                "-".into()
            },
        ),
        ("last seq", i.last_seq.to_string()),
        ("last seq shipped", i.last_seq_shipped.to_string()),
        ("lag (events)", i.lag_events.to_string()),
        ("gaps", i.gaps.to_string()),
        (
            "snapshot every",
            format!("{} s", spec.snapshot_interval_secs),
        ),
        ("detail", i.detail.clone()),
    ] {
        t.row(vec![k.into(), v]);
    }
    t.print();
    if !i.devices.is_empty() {
        let mut d = Table::new(&[
            "DEVICE",
            "KIND",
            "PID",
            "RESTARTS",
            "SHIPPED",
            "LAG",
            "CONNECTED",
        ]);
        for x in &i.devices {
            let b = x.backend.clone().unwrap_or_default();
            let s = x.shipping.unwrap_or_default();
            d.row(vec![
                x.name.clone(),
                x.kind.clone(),
                if b.pid == 0 {
                    "-".into()
                } else {
                    b.pid.to_string()
                },
                b.restarts.to_string(),
                s.events_shipped.to_string(),
                s.lag_events.to_string(),
                if s.connected { "yes" } else { "no" }.into(),
            ]);
        }
        d.print();
    }
}

fn check_id(i: &str) -> CliResult {
    vmr_proto::InstanceId::new(i.to_string())
        .map(|_| ())
        .map_err(|e| CliError::usage(format!("instance {i:?}: {e}")))
}

fn aerr(what: &str) -> impl Fn(tonic::Status) -> CliError + '_ {
    move |s| grpc::status_error(Service::Agent, what, &s)
}

async fn run_async(cfg: &Config, c: &InstanceCommand, out: &Out) -> CliResult {
    match c {
        InstanceCommand::Show(a)
        | InstanceCommand::Pause(a)
        | InstanceCommand::Resume(a)
        | InstanceCommand::Stop(a) => check_id(&a.instance)?,
        InstanceCommand::Watch(a) => {
            check_id(&a.instance)?;
            if !(a.timeout.is_finite() && a.timeout > 0.0) {
                return Err(CliError::usage(
                    "--timeout must be a positive number of seconds",
                ));
            }
        }
        InstanceCommand::Launch(a) => {
            if let Some(id) = &a.id {
                check_id(id)?;
            }
            if let Some(x) = &a.accel {
                if !matches!(x.as_str(), "kvm" | "tcg" | "auto") {
                    return Err(CliError::usage(format!("--accel {x:?}: kvm, tcg or auto")));
                }
            }
        }
        InstanceCommand::List => {}
    }
    let ch = grpc::connect(Service::Agent, &cfg.agent_url).await?;
    let mut client = CaptureAgentClient::new(ch);
    let tok = cfg.token.as_deref();
    let id_of = |c: &InstanceCommand| match c {
        InstanceCommand::Show(a)
        | InstanceCommand::Pause(a)
        | InstanceCommand::Resume(a)
        | InstanceCommand::Stop(a) => a.instance.clone(),
        _ => String::new(),
    };
    match c {
        InstanceCommand::Launch(a) => {
            let spec = pb::InstanceSpec {
                image: a.image.clone(),
                driver: a.driver.clone().unwrap_or_default(),
                accel: a.accel.clone().unwrap_or_default(),
                network: Some(pb::NetworkSpec {
                    netns: a.netns.clone().unwrap_or_default(),
                    tap_prefix: a.tap_prefix.clone().unwrap_or_default(),
                }),
                snapshot_interval_secs: a.snapshot_every,
                incremental: a.incremental,
                ..Default::default()
            };
            out.progress(&format!("launching {} ...", a.image));
            let req = grpc::request(
                pb::LaunchInstanceRequest {
                    instance_id: a.id.clone().unwrap_or_default(),
                    spec: Some(spec),
                },
                tok,
            )?;
            let i = client
                .launch_instance(req)
                .await
                .map_err(aerr("launching the instance"))?
                .into_inner();
            print_instance(out, &i);
        }
        InstanceCommand::List => {
            let req = grpc::request(pb::ListInstancesRequest {}, tok)?;
            let r = client
                .list_instances(req)
                .await
                .map_err(aerr("listing instances"))?
                .into_inner();
            if out.json {
                out.json_doc(&json!({
                    "instances": r.instances.iter().map(instance_json).collect::<Vec<_>>()
                }));
            } else {
                let mut t = Table::new(&[
                    "INSTANCE", "STATE", "IMAGE", "DRIVER", "LAST SEQ", "SHIPPED", "LAUNCHED",
                ]);
                for i in &r.instances {
                    t.row(vec![
                        i.instance_id.clone(),
                        state_name(i.state).into(),
                        i.spec.as_ref().map(|s| s.image.clone()).unwrap_or_default(),
                        i.driver.clone(),
                        i.last_seq.to_string(),
                        i.last_seq_shipped.to_string(),
                        if i.launched_ns > 0 {
                            rfc3339_ns(i.launched_ns)
                        } else {
                            "-".into()
                        },
                    ]);
                }
                t.print();
            }
        }
        InstanceCommand::Show(_) => {
            let req = grpc::request(
                pb::GetInstanceRequest {
                    instance_id: id_of(c),
                },
                tok,
            )?;
            let i = client
                .get_instance(req)
                .await
                .map_err(aerr("reading the instance"))?
                .into_inner();
            print_instance(out, &i);
        }
        InstanceCommand::Pause(_) => {
            let req = grpc::request(
                pb::PauseInstanceRequest {
                    instance_id: id_of(c),
                },
                tok,
            )?;
            let i = client
                .pause_instance(req)
                .await
                .map_err(aerr("pausing the instance"))?
                .into_inner();
            print_instance(out, &i);
        }
        InstanceCommand::Resume(_) => {
            let req = grpc::request(
                pb::ResumeInstanceRequest {
                    instance_id: id_of(c),
                },
                tok,
            )?;
            let i = client
                .resume_instance(req)
                .await
                .map_err(aerr("resuming the instance"))?
                .into_inner();
            print_instance(out, &i);
        }
        InstanceCommand::Stop(_) => {
            out.progress("stopping (the agent ships what the spools hold first) ...");
            let req = grpc::request(
                pb::StopInstanceRequest {
                    instance_id: id_of(c),
                },
                tok,
            )?;
            let i = client
                .stop_instance(req)
                .await
                .map_err(aerr("stopping the instance"))?
                .into_inner();
            print_instance(out, &i);
        }
        InstanceCommand::Watch(a) => {
            let req = grpc::request(
                pb::WatchInstanceRequest {
                    instance_id: a.instance.clone(),
                    skip_history: a.new_only,
                },
                tok,
            )?;
            let mut s = client
                .watch(req)
                .await
                .map_err(aerr("watching the instance"))?
                .into_inner();
            let deadline =
                tokio::time::Instant::now() + std::time::Duration::from_secs_f64(a.timeout);
            loop {
                let m = match tokio::time::timeout_at(deadline, s.next()).await {
                    Err(_) => {
                        return Err(CliError::unavailable(format!(
                            "no end of {}'s events within {:.0}s",
                            a.instance, a.timeout
                        ))
                        .hint("raise --timeout"))
                    }
                    Ok(None) => break,
                    Ok(Some(Err(st))) => return Err(aerr("the watch stream")(st)),
                    Ok(Some(Ok(m))) => m,
                };
                let kind = kind_name(m.kind);
                if out.json {
                    out.json_line(&json!({
                        "instance_id": m.instance_id, "state": state_name(m.state),
                        "kind": kind, "detail": m.detail, "seq": m.seq,
                        "wall_time_ns": m.wall_time_ns, "replayed": m.replayed,
                    }));
                } else {
                    println_safe(&format!(
                        "{}  {}  {:<12} {:<9} seq {:<8} {}",
                        rfc3339_ns(m.wall_time_ns),
                        m.instance_id,
                        kind,
                        state_name(m.state),
                        m.seq,
                        m.detail
                    ));
                }
                if a.until.as_deref() == Some(kind.as_str()) {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Runs an `instance` subcommand.
pub fn run(cfg: &Config, c: &InstanceCommand, out: &Out) -> CliResult {
    grpc::block_on(run_async(cfg, c, out))?
}
