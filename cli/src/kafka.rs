//! The Kafka side: a bounded metadata request and consumers that read
//! assigned partitions.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};

use vmr_proto::config::KafkaSecurity;

use crate::error::{CliError, CliResult};

/// Partitions of each topic the broker reported.
pub type TopicPartitions = BTreeMap<String, i32>;

/// A consumer of `bootstrap` with the Kafka `security` settings that never
/// commits offsets and logs nothing.
pub fn consumer(bootstrap: &str, security: &KafkaSecurity) -> CliResult<BaseConsumer> {
    let mut c = ClientConfig::new();
    for (key, value) in security.client_properties() {
        c.set(key, value);
    }
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", "vmr-cli")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("socket.timeout.ms", "10000")
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("topic.metadata.refresh.interval.ms", "-1")
        .set("log_level", "0")
        .set_log_level(RDKafkaLogLevel::Emerg)
        .create()
        .map_err(|e| {
            CliError::usage(format!(
                "cannot create a Kafka client for {bootstrap:?}: {e}"
            ))
        })
}

/// The broker's topics and their partition counts, within `timeout`.
pub fn topics(c: &BaseConsumer, bootstrap: &str, timeout: Duration) -> CliResult<TopicPartitions> {
    let md = c.fetch_metadata(None, timeout).map_err(|e| {
        CliError::unavailable(format!(
            "the Kafka broker at {bootstrap} did not answer a metadata request within {}s: {e}",
            timeout.as_secs()
        ))
        .hint(
            "start the local stack with `vmr stack up`, or point --bootstrap-servers / \
             VMR_BOOTSTRAP_SERVERS at a running broker",
        )
    })?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}
