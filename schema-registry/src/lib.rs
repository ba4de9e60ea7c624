//! Confluent-compatible Schema Registry persisted in Kafka, its client and the wire-format codec
