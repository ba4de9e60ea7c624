#!/usr/bin/env python3
"""confluent-kafka's protobuf serde at its default settings against a registry.

A producer written the documented Confluent way: ProtobufSerializer with its
default configuration (auto.register.schemas, skip.known.types, the default
subject name strategies) serializes a message whose file imports another file
and a well-known type, a Producer sends the records, and a Consumer reads
them back through ProtobufDeserializer. The message classes are built at run
time from FileDescriptorProtos, so no protoc step is needed.

Then checks what the registry holds: the text form is stored, the serialized
form is served on request, and text and serialized registrations of one
schema share one id (in both orders). A second serializer with
skip.known.types=false registers the well-known import itself.

Usage: serde_roundtrip.py --registry URL --bootstrap HOST:PORT --topic T --wkt-topic T2

Prints one JSON object on the last line of stdout: {"ok": true, "checks":
[...], "ids": {...}, "records": N}. Any failed check raises, so the exit
status is non-zero.
"""

import argparse
import base64
import json
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition, OFFSET_BEGINNING
from confluent_kafka.schema_registry import Schema, SchemaReference, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

F = descriptor_pb2.FieldDescriptorProto
CHECKS = []


def check(name, condition, detail=""):
    if not condition:
        raise AssertionError(f"check failed: {name} {detail}")
    CHECKS.append(name)


def field(msg, name, number, ftype, label=F.LABEL_OPTIONAL, type_name=None, **kw):
    f = msg.field.add(name=name, number=number, type=ftype, label=label, **kw)
    if type_name:
        f.type_name = type_name
    return f


def build_files():
    """demo/common.proto and demo/reading.proto, as protoc would describe them."""
    common = descriptor_pb2.FileDescriptorProto(
        name="demo/common.proto", package="demo", syntax="proto3")
    loc = common.message_type.add(name="Location")
    field(loc, "lat", 1, F.TYPE_DOUBLE)
    field(loc, "lon", 2, F.TYPE_DOUBLE)

    reading = descriptor_pb2.FileDescriptorProto(
        name="demo/reading.proto", package="demo", syntax="proto3",
        dependency=["demo/common.proto", "google/protobuf/timestamp.proto"])
    m = reading.message_type.add(name="Reading")
    field(m, "sensor", 1, F.TYPE_STRING)
    field(m, "where", 2, F.TYPE_MESSAGE, type_name=".demo.Location")
    field(m, "at", 3, F.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp")
    field(m, "values", 4, F.TYPE_DOUBLE, label=F.LABEL_REPEATED)
    field(m, "labels", 5, F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
          type_name=".demo.Reading.LabelsEntry")
    field(m, "unit", 6, F.TYPE_ENUM, type_name=".demo.Reading.Unit")
    maybe = field(m, "maybe", 7, F.TYPE_INT32, proto3_optional=True)
    maybe.oneof_index = 0
    m.oneof_decl.add(name="_maybe")
    entry = m.nested_type.add(name="LabelsEntry")
    entry.options.map_entry = True
    field(entry, "key", 1, F.TYPE_STRING)
    field(entry, "value", 2, F.TYPE_STRING)
    unit = m.enum_type.add(name="Unit")
    unit.value.add(name="UNIT_UNSPECIFIED", number=0)
    unit.value.add(name="UNIT_CELSIUS", number=1)
    return common, reading


def build_classes(common, reading):
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(common.SerializeToString())
    pool.AddSerializedFile(reading.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("demo.Reading"))


def make(Reading, i):
    r = Reading(sensor=f"s-{i}", values=[i * 0.5, -1.25], unit=1)
    r.where.lat = 48.1 + i
    r.where.lon = 11.5
    r.at.seconds = 1_700_000_000 + i
    r.at.nanos = i
    r.labels["room"] = f"r{i}"
    if i % 2 == 0:
        r.maybe = -i
    return r


def produce(bootstrap, topic, serializer, messages):
    errors = []
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    framed = []
    for i, msg in enumerate(messages):
        value = serializer(msg, SerializationContext(topic, MessageField.VALUE))
        framed.append(value)
        producer.produce(topic, key=f"k{i}".encode(), value=value, partition=0,
                         on_delivery=lambda err, _m: err and errors.append(str(err)))
    remaining = producer.flush(30)
    check("producer delivered every record", remaining == 0 and not errors,
          f"remaining={remaining} errors={errors}")
    return framed


def consume(bootstrap, topic, deserializer, count):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "serde-roundtrip",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out = []
    deadline = time.monotonic() + 60
    try:
        while len(out) < count and time.monotonic() < deadline:
            m = consumer.poll(1.0)
            if m is None:
                continue
            if m.error():
                raise RuntimeError(f"consumer error: {m.error()}")
            out.append(deserializer(m.value(), SerializationContext(topic, MessageField.VALUE)))
    finally:
        consumer.close()
    check(f"consumer read {count} records from {topic}", len(out) == count, f"got {len(out)}")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--registry", required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--wkt-topic", required=True)
    p.add_argument("--records", type=int, default=5)
    args = p.parse_args()

    client = SchemaRegistryClient({"url": args.registry})
    common, reading = build_files()
    Reading = build_classes(common, reading)
    messages = [make(Reading, i) for i in range(args.records)]

    # Default settings: auto-registration of the message and its import.
    serializer = ProtobufSerializer(Reading, client)
    framed = produce(args.bootstrap, args.topic, serializer, messages)
    ids = {int.from_bytes(v[1:5], "big") for v in framed}
    check("every record carries one schema id", len(ids) == 1 and all(v[0] == 0 for v in framed))
    reading_id = ids.pop()
    check("message index [0] is the single byte 0", all(v[5] == 0 for v in framed))

    deserializer = ProtobufDeserializer(Reading, None, client)
    decoded = consume(args.bootstrap, args.topic, deserializer, len(messages))
    check("ProtobufDeserializer returns what was sent", decoded == messages)
    check("proto3 optional presence survives",
          [d.HasField("maybe") for d in decoded] == [i % 2 == 0 for i in range(len(messages))])

    # What the registry holds, read with new clients (the client caches
    # registrations, lookups and ids).
    def fresh():
        return SchemaRegistryClient({"url": args.registry})

    subject = f"{args.topic}-value"
    subjects = fresh().get_subjects()
    check("the import and the value subject are registered",
          "demo/common.proto" in subjects and subject in subjects, f"{subjects}")
    check("no subject for the well-known import by default",
          "google/protobuf/timestamp.proto" not in subjects)
    latest = fresh().get_latest_version(subject)
    text = latest.schema.schema_str
    check("the registry stores the text form", "message Reading" in text
          and 'import "demo/common.proto";' in text
          and 'import "google/protobuf/timestamp.proto";' in text, text)
    check("the latest version has the serializer's id", latest.schema_id == reading_id)
    refs = [(r.name, r.subject, r.version) for r in latest.schema.references]
    check("references name the import only",
          refs == [("demo/common.proto", "demo/common.proto", 1)], f"{refs}")
    ser = fresh().get_version(subject, latest.version, False, "serialized").schema.schema_str
    fdp = descriptor_pb2.FileDescriptorProto.FromString(base64.standard_b64decode(ser))
    check("format=serialized returns the descriptor",
          [m.name for m in fdp.message_type] == ["Reading"]
          and list(fdp.dependency) == ["demo/common.proto", "google/protobuf/timestamp.proto"])
    by_id = fresh().get_schema(reading_id, None, "serialized")
    check("GET /schemas/ids/{id}?format=serialized is the same descriptor",
          by_id.schema_str == ser)

    ref_list = [SchemaReference("demo/common.proto", "demo/common.proto", 1)]
    as_text = fresh().register_schema("text-form-value", Schema(text, "PROTOBUF", ref_list))
    check("registering the stored text elsewhere gives the same id", as_text == reading_id,
          f"{as_text} vs {reading_id}")
    serialized_b64 = base64.standard_b64encode(reading.SerializeToString()).decode()
    as_ser = fresh().register_schema("serialized-form-value",
                                   Schema(serialized_b64, "PROTOBUF", ref_list))
    check("registering the client's serialized form gives the same id", as_ser == reading_id)
    found_text = fresh().lookup_schema(subject, Schema(text, "PROTOBUF", ref_list))
    found_ser = fresh().lookup_schema(
        subject, Schema(serialized_b64, "PROTOBUF", ref_list))
    check("lookup finds the version in either form",
          (found_text.schema_id, found_text.version) == (reading_id, latest.version)
          and (found_ser.schema_id, found_ser.version) == (reading_id, latest.version))

    # The other order: text first, then the serialized descriptor.
    ping_text = 'syntax = "proto3";\npackage demo;\n\n// A ping.\nmessage Ping {\n  string who = 1;\n  int64 at = 2;\n}\n'
    ping = descriptor_pb2.FileDescriptorProto(name="demo/ping.proto", package="demo",
                                              syntax="proto3")
    pm = ping.message_type.add(name="Ping")
    field(pm, "who", 1, F.TYPE_STRING)
    field(pm, "at", 2, F.TYPE_INT64)
    ping_id = fresh().register_schema("ping-text-value", Schema(ping_text, "PROTOBUF"))
    ping_ser_id = fresh().register_schema(
        "ping-serialized-value",
        Schema(base64.standard_b64encode(ping.SerializeToString()).decode(), "PROTOBUF"))
    check("text then serialized: one id", ping_id == ping_ser_id, f"{ping_id} vs {ping_ser_id}")
    stored = fresh().get_version("ping-text-value", 1).schema.schema_str
    check("text registrations keep their text", stored == ping_text.strip(), stored)
    try:
        fresh().register_schema("bad-value", Schema(base64.standard_b64encode(b"\x08").decode(),
                                                  "PROTOBUF"))
        check("a non-descriptor is refused", False)
    except SchemaRegistryError as e:
        check("a non-descriptor is refused with 422/42201",
              (e.http_status_code, e.error_code) == (422, 42201), f"{e}")

    # skip.known.types=false: the serializer registers the well-known file too.
    wkt_serializer = ProtobufSerializer(Reading, SchemaRegistryClient({"url": args.registry}),
                                        {"skip.known.types": False})
    wkt_framed = produce(args.bootstrap, args.wkt_topic, wkt_serializer, messages[:2])
    wkt_id = int.from_bytes(wkt_framed[0][1:5], "big")
    wkt = SchemaRegistryClient({"url": args.registry})
    check("the well-known import gets its own subject",
          "google/protobuf/timestamp.proto" in wkt.get_subjects())
    wkt_refs = sorted(r.name for r in wkt.get_latest_version(f"{args.wkt_topic}-value")
                      .schema.references)
    check("and is referenced",
          wkt_refs == ["demo/common.proto", "google/protobuf/timestamp.proto"], f"{wkt_refs}")
    wkt_decoded = consume(args.bootstrap, args.wkt_topic,
                          ProtobufDeserializer(Reading, None, wkt), 2)
    check("records framed with the registered well-known import decode", wkt_decoded == messages[:2])
    ts_text = wkt.get_latest_version("google/protobuf/timestamp.proto").schema.schema_str
    check("the registered well-known file is stored as text",
          "message Timestamp" in ts_text and "package google.protobuf;" in ts_text, ts_text)

    print(json.dumps({
        "ok": True,
        "checks": CHECKS,
        "records": len(messages),
        "ids": {"reading": reading_id, "ping": ping_id, "reading_wkt": wkt_id,
                "text_form": as_text, "serialized_form": as_ser},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
