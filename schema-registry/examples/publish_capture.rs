//! Publishes capture files (length-prefixed `vmr.v1.Event` frames, as written by
//! vhost-tap's file sink) to their Kafka topics in the Confluent wire format:
//! keyed by instance id, on the instance's murmur2 partition, with the schema
//! ids of the registry's `<topic>-value` subjects.
//!
//! ```sh
//! cargo run -p schema-registry --example publish_capture -- \
//!     --bootstrap 127.0.0.1:19092 --registry http://127.0.0.1:18081 vda.events net0.events
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use schema_registry::client::RegistryClient;
use schema_registry::codec;
use vmr_proto::framing::open_capture;
use vmr_proto::Event;

#[derive(Parser)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "VMR_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:19092")]
    bootstrap: String,
    /// Schema Registry base URL.
    #[arg(
        long,
        env = "VMR_REGISTRY_URL",
        default_value = "http://127.0.0.1:18081"
    )]
    registry: String,
    /// Partitions of each event topic.
    #[arg(long, env = "VMR_EVENT_PARTITIONS", default_value_t = 8)]
    partitions: i32,
    /// Capture files (or rolling capture directories) to publish.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = RegistryClient::new(&args.registry)?;
    let registered = client
        .register_vmr_schemas()
        .await
        .context("registering the event schemas")?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", "8388608")
        .create()
        .context("creating the Kafka producer")?;

    let mut per_topic: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut buf = Vec::new();
    for path in &args.files {
        // A capture file or a rolling spool directory.
        let reader = open_capture(path).with_context(|| format!("opening {}", path.display()))?;
        for (n, record) in reader.enumerate() {
            let raw = record.with_context(|| format!("{}: frame {n}", path.display()))?;
            // Validate before publishing: a poison record is reported, not sent.
            let event = Event::try_from(raw.clone())
                .with_context(|| format!("{}: frame {n} is not a valid event", path.display()))?;
            let topic = event.topic();
            let Some(schema) = registered.iter().find(|t| t.topic == topic) else {
                bail!("no schema registered for {topic}");
            };
            buf.clear();
            codec::encode_message(schema.id as u32, &schema.message_indexes, &raw, &mut buf);
            let key = event.instance.as_str();
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(key)
                        .partition(event.instance.partition(args.partitions))
                        .payload(&buf),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .with_context(|| format!("producing seq {} to {topic}", event.seq))?;
            *per_topic.entry(topic).or_default() += 1;
        }
    }
    for (topic, n) in &per_topic {
        println!("{topic}\t{n} events");
    }
    Ok(())
}
