//! Per-host agent that runs recorded instances, produces their events and
//! snapshots them.
//!
//! This crate holds the agent's capture path to Kafka and its host sensors:
//!
//! - [`shipper`]: ships one [`source::RecordSource`] (a device's vhost-tap
//!   spool, or the agent's own event log) to the event topics, exactly once,
//!   committing to the source only what the broker acknowledged.
//! - [`source`]: the record-source trait and its implementation over a
//!   vhost-tap rolling spool.
//! - [`events`]: lifecycle and sensor events the agent generates, numbered
//!   from the instance's sequence file and made durable in a spool of their
//!   own before they are shipped.
//! - [`sensors`]: hwmon, thermal, power-supply and pressure readings as
//!   `EnvSample`s, periodic and threshold-triggered.
//! - [`supervisor`]: one vhost-tap backend process per device, restarted
//!   with backoff when it exits.
//! - [`instance`]: a recorded instance: the supervised backends, a shipper
//!   per spool, the event log with the driver's lifecycle events, the guest.
//! - [`record`]: the durable record of a launched instance, from which a
//!   restarted agent re-attaches to its guest and backends.
//! - [`config`]: the TOML configuration.
//! - [`metrics`]: the shipper's counters.
//! - [`service`]: the gRPC service and the snapshot engine's seam,
//!   [`service::SnapshotControl`].
//!
//! One shipper runs per spool:
//!
//! ```no_run
//! use std::sync::Arc;
//! use capture_agent::config::AgentConfig;
//! use capture_agent::metrics::ShipperMetrics;
//! use capture_agent::shipper::{Shipper, ShipperHandle, ShipperOptions};
//! use capture_agent::source::SpoolSource;
//!
//! let cfg = AgentConfig::default();
//! let dir = std::path::Path::new("/var/lib/vmreplay/vm-1/vda.spool");
//! let opts = ShipperOptions::for_spool(
//!     dir,
//!     "vm-1".parse().unwrap(),
//!     cfg.endpoints.clone(),
//!     cfg.shipper.clone(),
//! );
//! let source = SpoolSource::open(dir).unwrap();
//! let shipper = Shipper::new(opts, source, Arc::new(ShipperMetrics::default())).unwrap();
//! let handle = ShipperHandle::spawn(shipper).unwrap();
//! // ... later:
//! println!("{:?}", handle.metrics().snapshot());
//! handle.stop();
//! ```

pub mod config;
pub mod events;
pub mod instance;
pub mod metrics;
pub mod record;
pub mod sensors;
pub mod service;
pub mod shipper;
pub mod snapshot;
pub mod source;
pub mod supervisor;
