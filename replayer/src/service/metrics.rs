//! Prometheus metrics in the text exposition format, served over HTTP at
//! `/metrics` on `metrics_listen`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmr_proto::pb;

use super::State;

/// Counters of the service.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub created: AtomicU64,
    pub create_failed: AtomicU64,
    pub deleted: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub denied: AtomicU64,
}

fn state_name(s: i32) -> &'static str {
    match pb::CloneState::try_from(s).unwrap_or(pb::CloneState::Unspecified) {
        pb::CloneState::Unspecified => "unspecified",
        pb::CloneState::Restoring => "restoring",
        pb::CloneState::Replaying => "replaying",
        pb::CloneState::Paused => "paused",
        pb::CloneState::Finished => "finished",
        pb::CloneState::Failed => "failed",
        pb::CloneState::Crashed => "crashed",
        pb::CloneState::Stopped => "stopped",
        pb::CloneState::Ready => "ready",
        pb::CloneState::Live => "live",
    }
}

/// The metrics text.
pub(crate) fn render(state: &State) -> String {
    let c = &state.counters;
    let mut out = String::new();
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    counter(
        &mut out,
        "replayer_clones_created_total",
        "Clones created.",
        c.created.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "replayer_clone_create_failures_total",
        "CreateClone calls that failed after authorization.",
        c.create_failed.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "replayer_clones_deleted_total",
        "Clones deleted.",
        c.deleted.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "replayer_unauthenticated_total",
        "Calls refused for a missing or unknown token.",
        c.unauthenticated.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "replayer_permission_denied_total",
        "Calls refused for another tenant's instance or clone.",
        c.denied.load(Ordering::Relaxed),
    );
    let clones: Vec<(String, pb::Clone)> = state
        .clones
        .lock()
        .expect("clones lock")
        .values()
        .map(|e| (e.tenant.clone(), e.runtime.info()))
        .collect();
    let _ = writeln!(out, "# HELP replayer_clones Clones that exist.\n# TYPE replayer_clones gauge\nreplayer_clones {}", clones.len());
    let gauges = [
        (
            "replayer_clone_events_delivered",
            "Recorded events delivered to the clone.",
        ),
        (
            "replayer_clone_replayed_seq",
            "Last recorded seq applied to the clone.",
        ),
        (
            "replayer_clone_divergences",
            "Divergences found in the clone.",
        ),
        ("replayer_clone_state", "1 for the clone's current state."),
    ];
    for (i, (name, help)) in gauges.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (tenant, cl) in &clones {
            let labels = format!(
                "clone=\"{}\",instance=\"{}\",tenant=\"{}\"",
                cl.clone_id, cl.instance_id, tenant
            );
            let _ = match i {
                0 => writeln!(out, "{name}{{{labels}}} {}", cl.delivered),
                1 => writeln!(out, "{name}{{{labels}}} {}", cl.replayed_seq),
                2 => writeln!(out, "{name}{{{labels}}} {}", cl.divergences),
                _ => writeln!(
                    out,
                    "{name}{{{labels},state=\"{}\"}} 1",
                    state_name(cl.state)
                ),
            };
        }
    }
    out
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub(crate) async fn serve(
    state: Arc<State>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = state.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || render(&state))
                    .await
                    .unwrap_or_default();
                ([("content-type", "text/plain; version=0.0.4")], body)
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
