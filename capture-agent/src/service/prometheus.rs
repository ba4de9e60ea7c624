//! Prometheus `/metrics` (text exposition format 0.0.4) over axum.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `vmr_agent_events_shipped_total` | counter | instance, topic |
//! | `vmr_agent_bytes_shipped_total` | counter | instance, topic |
//! | `vmr_agent_spool_bytes` | gauge | instance, source |
//! | `vmr_agent_spool_oldest_unshipped_seconds` | gauge | instance, source |
//! | `vmr_agent_producer_errors_total` | counter | instance, source, kind (produce, delivery, broker, metadata) |
//! | `vmr_agent_registry_errors_total` | counter | instance, source |
//! | `vmr_agent_corrupt_frames_total` | counter | instance, source |
//! | `vmr_agent_shipper_up` | gauge | instance, source |
//! | `vmr_agent_instance_lag_events` | gauge | instance |
//! | `vmr_agent_instance_lag_seconds` | gauge | instance |
//! | `vmr_agent_last_seq_shipped` | gauge | instance |
//! | `vmr_agent_gaps_total` | counter | instance, source |
//! | `vmr_agent_backend_restarts_total` | counter | instance, device |
//! | `vmr_agent_backend_records_total` | counter | instance, device |
//! | `vmr_agent_backend_sink_errors_total` | counter | instance, device |
//! | `vmr_agent_backend_spool_full_total` | counter | instance, device |
//! | `vmr_agent_backend_spool_dropped_total` | counter | instance, device |
//! | `vmr_agent_backend_spool_blocked_seconds_total` | counter | instance, device |
//! | `vmr_agent_backend_spool_bound_hits_total` | counter | instance, device |
//! | `vmr_agent_sensor_samples_total` | counter | instance |
//! | `vmr_agent_instances` | gauge | state |
//! | `vmr_agent_launches_total` | counter | |
//! | `vmr_agent_rpc_errors_total` | counter | method, code |
//! | `vmr_agent_broker_reachable` | gauge | |
//! | `vmr_agent_broker_probe_failures_total` | counter | |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::host::Host;

/// A metric family being written.
struct Family<'a> {
    out: &'a mut String,
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Family<'_> {
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.out, " {v}");
    }
}

struct Writer {
    out: String,
    /// name -> (help, type, samples)
    fams: BTreeMap<&'static str, (&'static str, &'static str, Vec<String>)>,
}

impl Writer {
    fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        v: impl std::fmt::Display,
    ) {
        let mut line = String::new();
        Family { out: &mut line }.sample(name, labels, v);
        self.fams
            .entry(name)
            .or_insert_with(|| (help, kind, Vec::new()))
            .2
            .push(line);
    }

    fn finish(mut self) -> String {
        for (name, (help, kind, lines)) in &self.fams {
            let _ = writeln!(self.out, "# HELP {name} {help}");
            let _ = writeln!(self.out, "# TYPE {name} {kind}");
            for l in lines {
                self.out.push_str(l);
            }
        }
        self.out
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The exposition text of every metric (blocking: reads spools and asks
/// the backends' control sockets).
pub fn render(host: &Host) -> String {
    let mut w = Writer {
        out: String::new(),
        fams: BTreeMap::new(),
    };
    let c = host.counters();
    w.add(
        "vmr_agent_launches_total",
        "counter",
        "Instances launched.",
        &[],
        c.launches.load(Ordering::Relaxed),
    );
    w.add(
        "vmr_agent_broker_reachable",
        "gauge",
        "1 if the last broker probe (at start, before each launch) succeeded.",
        &[],
        c.broker_reachable.load(Ordering::Relaxed),
    );
    w.add(
        "vmr_agent_broker_probe_failures_total",
        "counter",
        "Broker probes that failed.",
        &[],
        c.broker_probe_failures.load(Ordering::Relaxed),
    );
    for ((method, code), n) in c.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        w.add(
            "vmr_agent_rpc_errors_total",
            "counter",
            "gRPC calls answered with an error, by method and status code.",
            &[("method", method), ("code", code)],
            n,
        );
    }
    let mut states: BTreeMap<&'static str, u64> = BTreeMap::new();
    let now = now_ns();
    for e in host.entries() {
        *states.entry(e.state().as_str_name()).or_default() += 1;
        let Some(i) = e.instance() else { continue };
        let id = e.id().to_string();
        let id = id.as_str();
        let mut per_topic: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
        let (mut lag, mut lag_age, mut shipped) = (0u64, 0f64, 0u64);
        for s in i.spools() {
            let src = s.source.as_str();
            let m = &s.shipper;
            let l = [("instance", id), ("source", src)];
            w.add(
                "vmr_agent_spool_bytes",
                "gauge",
                "Bytes of a spool's files.",
                &l,
                s.spool_bytes,
            );
            let age = s
                .oldest_unshipped_wall_ns
                .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1e9);
            lag_age = lag_age.max(age);
            w.add(
                "vmr_agent_spool_oldest_unshipped_seconds",
                "gauge",
                "Age of the oldest record in a spool not yet committed as shipped (0: none).",
                &l,
                age,
            );
            for (kind, v) in [
                ("produce", m.produce_errors),
                ("delivery", m.delivery_errors),
                ("broker", m.broker_errors),
                ("metadata", m.metadata_errors),
            ] {
                w.add(
                    "vmr_agent_producer_errors_total",
                    "counter",
                    "Kafka producer and broker errors of a shipper, by kind.",
                    &[("instance", id), ("source", src), ("kind", kind)],
                    v,
                );
            }
            w.add(
                "vmr_agent_registry_errors_total",
                "counter",
                "Failed Schema Registry requests (unreachable or refused).",
                &l,
                m.registry_errors,
            );
            w.add(
                "vmr_agent_corrupt_frames_total",
                "counter",
                "Damaged spool frames detected and skipped.",
                &l,
                m.corrupt_frames,
            );
            w.add(
                "vmr_agent_shipper_up",
                "gauge",
                "1 while a shipper is connected and shipping.",
                &l,
                m.up,
            );
            lag += m.in_flight;
            shipped = shipped.max(m.acked_seq);
            for (t, n, b) in i
                .shipper_metrics_full(src)
                .map(|m| m.per_topic.snapshot())
                .unwrap_or_default()
            {
                let e = per_topic.entry(t).or_default();
                e.0 += n;
                e.1 += b;
            }
            if src == "agent" {
                let ec = i.events().counters();
                w.add(
                    "vmr_agent_gaps_total",
                    "counter",
                    "GAP events recorded, by source (device backend or agent).",
                    &l,
                    ec.gaps.load(Ordering::Relaxed),
                );
                w.add(
                    "vmr_agent_sensor_samples_total",
                    "counter",
                    "Host sensor samples recorded.",
                    &[("instance", id)],
                    ec.env_samples.load(Ordering::Relaxed),
                );
                continue;
            }
            if i.is_stopped() {
                continue;
            }
            if let Some(bm) = i.backend_metrics(src) {
                let d = [("instance", id), ("device", src)];
                let g = |k: &str| bm[k].as_u64().unwrap_or(0);
                w.add(
                    "vmr_agent_gaps_total",
                    "counter",
                    "GAP events recorded, by source (device backend or agent).",
                    &l,
                    g("gaps"),
                );
                for (name, help, key) in [
                    (
                        "vmr_agent_backend_records_total",
                        "Records a device backend handed to its capture.",
                        "recorded",
                    ),
                    (
                        "vmr_agent_backend_sink_errors_total",
                        "Spool writes or syncs of a backend that failed (each becomes a GAP).",
                        "sink_errors",
                    ),
                    (
                        "vmr_agent_backend_spool_full_total",
                        "Times a backend found its spool full.",
                        "spool_full",
                    ),
                    (
                        "vmr_agent_backend_spool_dropped_total",
                        "Records a backend dropped (with a GAP) because its spool was full.",
                        "spool_dropped",
                    ),
                    (
                        "vmr_agent_backend_spool_bound_hits_total",
                        "Times a backend waited the block bound for a full spool, then dropped.",
                        "spool_bound_hits",
                    ),
                ] {
                    w.add(name, "counter", help, &d, g(key));
                }
                w.add(
                    "vmr_agent_backend_spool_blocked_seconds_total",
                    "counter",
                    "Time a backend's capture waited for a full spool.",
                    &d,
                    g("spool_blocked_ms") as f64 / 1000.0,
                );
            }
        }
        for b in i.backends() {
            w.add(
                "vmr_agent_backend_restarts_total",
                "counter",
                "Restarts of a device backend by the supervisor.",
                &[("instance", id), ("device", &b.device)],
                b.restarts,
            );
        }
        for (t, (n, b)) in per_topic {
            let l = [("instance", id), ("topic", t)];
            w.add(
                "vmr_agent_events_shipped_total",
                "counter",
                "Events the broker acknowledged, by topic.",
                &l,
                n,
            );
            w.add(
                "vmr_agent_bytes_shipped_total",
                "counter",
                "Value bytes the broker acknowledged, by topic.",
                &l,
                b,
            );
        }
        w.add(
            "vmr_agent_instance_lag_events",
            "gauge",
            "Events of an instance read from its spools and not yet acknowledged.",
            &[("instance", id)],
            lag,
        );
        w.add(
            "vmr_agent_instance_lag_seconds",
            "gauge",
            "Age of an instance's oldest record not yet shipped.",
            &[("instance", id)],
            lag_age,
        );
        w.add(
            "vmr_agent_last_seq_shipped",
            "gauge",
            "Highest seq of an instance the broker acknowledged.",
            &[("instance", id)],
            shipped,
        );
    }
    for (s, n) in states {
        w.add(
            "vmr_agent_instances",
            "gauge",
            "Instances of this agent, by state.",
            &[("state", s)],
            n,
        );
    }
    w.finish()
}

async fn metrics(State(host): State<Arc<Host>>) -> impl IntoResponse {
    let text = tokio::task::spawn_blocking(move || render(&host))
        .await
        .unwrap_or_else(|e| format!("# rendering failed: {e}\n"));
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// Serves `/metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    host: Arc<Host>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(host);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
