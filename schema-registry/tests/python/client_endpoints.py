#!/usr/bin/env python3
"""confluent-kafka's SchemaRegistryClient over every endpoint it calls.

References and referencedby, normalize on register and lookup, soft and
permanent deletes of versions and subjects, deleted / deleted-only listings,
modes (READWRITE, READONLY, IMPORT with explicit ids, which the client has no
method for, so that one request is raw HTTP), contexts, configs and
compatibility checks.

Usage: client_endpoints.py --registry URL

Prints one JSON object on the last line of stdout: {"ok": true, "checks":
[...], "ids": {...}}. Any failed check raises, so the exit status is non-zero.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

from confluent_kafka.schema_registry import Schema, SchemaReference, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

CHECKS = []
URL = None


def check(name, condition, detail=""):
    if not condition:
        raise AssertionError(f"check failed: {name} {detail}")
    CHECKS.append(name)


def client():
    """A new client each time: the client caches lookups, versions and ids."""
    return SchemaRegistryClient({"url": URL})


def fails(name, expect, call):
    """Runs `call`, which must fail with (http status, error code) `expect`."""
    try:
        result = call()
    except SchemaRegistryError as e:
        got = (e.http_status_code, e.error_code)
        check(name, got == expect, f"got {got}: {e.error_message}")
        return e.error_message
    raise AssertionError(f"check failed: {name}: succeeded with {result!r}, expected {expect}")


def http(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, data=data, method=method,
                                 headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


COMMON = 'syntax = "proto3";\npackage ep;\nmessage Money {\n  int64 units = 1;\n  string currency = 2;\n}'
ORDER_V1 = ('syntax = "proto3";\npackage ep;\nimport "ep/common.proto";\n'
            'message Order {\n  string id = 1;\n  ep.Money total = 2;\n}')
ORDER_V2 = ('syntax = "proto3";\npackage ep;\nimport "ep/common.proto";\n'
            'message Order {\n  string id = 1;\n  ep.Money total = 2;\n  repeated string tags = 3;\n}')
# ORDER_V2 with other layout and comments.
ORDER_V2_MESSY = ('// orders\nsyntax="proto3"; package ep;   import "ep/common.proto";\n'
                  'message Order { string id = 1; /* money */ ep.Money total = 2;\n'
                  'repeated string tags = 3; }\n')
ORDER_V3_BAD = ('syntax = "proto3";\npackage ep;\nimport "ep/common.proto";\n'
                'message Order {\n  int64 id = 1;\n}')


def main():
    global URL
    p = argparse.ArgumentParser()
    p.add_argument("--registry", required=True)
    args = p.parse_args()
    URL = args.registry.rstrip("/")
    c = client()

    check("schema types", c.get_schema_types() == ["PROTOBUF"])
    check("contexts", client().get_contexts() == ["."])
    check("global mode starts READWRITE", c.get_global_mode() == "READWRITE")

    # References.
    common_id = c.register_schema("ep/common.proto", Schema(COMMON, "PROTOBUF"))
    refs = [SchemaReference("ep/common.proto", "ep/common.proto", 1)]
    order_v1 = c.register_schema("ep-order-value", Schema(ORDER_V1, "PROTOBUF", refs))
    check("a schema with a reference gets a new id", order_v1 != common_id)
    got = client().get_version("ep-order-value", 1)
    check("the version keeps its reference",
          [(r.name, r.subject, r.version) for r in got.schema.references]
          == [("ep/common.proto", "ep/common.proto", 1)])
    check("referencedby lists the referring id",
          client().get_referenced_by("ep/common.proto", 1) == [order_v1])
    check("referencedby latest", client().get_referenced_by("ep/common.proto") == [order_v1])
    fails("a reference to a missing version is refused", (422, 42201),
          lambda: client().register_schema(
              "ep-broken-value",
              Schema(ORDER_V1, "PROTOBUF", [SchemaReference("ep/common.proto", "ep/common.proto", 9)])))

    # Compatibility and config.
    check("default compatibility", client().get_compatibility() == "BACKWARD")
    check("compatible change passes",
          client().test_compatibility("ep-order-value", Schema(ORDER_V2, "PROTOBUF", refs)))
    check("incompatible change fails",
          not client().test_compatibility("ep-order-value", Schema(ORDER_V3_BAD, "PROTOBUF", refs)))
    check("all-versions check", client().test_compatibility_all_versions(
        "ep-order-value", Schema(ORDER_V2, "PROTOBUF", refs)))
    fails("registering the incompatible change is refused", (409, 409),
          lambda: client().register_schema("ep-order-value", Schema(ORDER_V3_BAD, "PROTOBUF", refs)))
    order_v2 = c.register_schema("ep-order-value", Schema(ORDER_V2, "PROTOBUF", refs))
    check("versions 1 and 2", client().get_versions("ep-order-value") == [1, 2])

    # normalize=true on register and lookup.
    again = client().register_schema("ep-order-value", Schema(ORDER_V2_MESSY, "PROTOBUF", refs),
                                     normalize_schemas=True)
    check("normalized re-registration gives the same id and no new version",
          again == order_v2 and client().get_versions("ep-order-value") == [1, 2])
    found = client().lookup_schema("ep-order-value", Schema(ORDER_V2_MESSY, "PROTOBUF", refs),
                                   normalize_schemas=True)
    check("normalized lookup", (found.schema_id, found.version) == (order_v2, 2))
    found = client().lookup_schema("ep-order-value", Schema(ORDER_V2_MESSY, "PROTOBUF", refs))
    check("lookup ignores layout and comments", (found.schema_id, found.version) == (order_v2, 2))
    norm_id = client().register_schema("ep-norm-value", Schema(ORDER_V2_MESSY, "PROTOBUF", refs),
                                       normalize_schemas=True)
    check("the same schema in another subject shares the id", norm_id == order_v2)
    messy_only = ORDER_V2_MESSY.replace("repeated string tags = 3;",
                                        "repeated string tags = 3; bool rush = 4;")
    norm_new = client().register_schema("ep-norm2-value", Schema(messy_only, "PROTOBUF", refs),
                                        normalize_schemas=True)
    stored = client().get_version("ep-norm2-value", 1).schema.schema_str
    check("normalize stores the canonical rendering",
          "//" not in stored and "/*" not in stored and "bool rush = 4;" in stored, stored)
    plain_new = client().register_schema("ep-plain-value", Schema(messy_only, "PROTOBUF", refs))
    check("without normalize the same schema still shares the id", plain_new == norm_new)

    # Soft and permanent deletes of versions.
    check("ids list their versions", [(v.subject, v.version) for v in
                                      client().get_schema_versions(order_v2)]
          == [("ep-norm-value", 1), ("ep-order-value", 2)])
    check("ids list their subjects",
          client().get_subjects_by_schema_id(order_v2) == ["ep-norm-value", "ep-order-value"])
    fails("permanent delete of a live version is refused", (404, 40407),
          lambda: client().delete_version("ep-order-value", 1, permanent=True))
    check("soft delete of version 1", client().delete_version("ep-order-value", 1) == 1)
    fails("a soft-deleted version is gone", (404, 40402),
          lambda: client().get_version("ep-order-value", 1))
    check("deleted=true still reads it",
          client().get_version("ep-order-value", 1, deleted=True).schema_id == order_v1)
    check("live versions", client().get_versions("ep-order-value") == [2])
    check("deleted=true versions", client().get_versions("ep-order-value", deleted=True) == [1, 2])
    check("deleted_only versions",
          client().get_versions("ep-order-value", deleted_only=True) == [1])
    fails("deleting it again says it was soft deleted", (404, 40406),
          lambda: client().delete_version("ep-order-value", 1))
    check("its id stays resolvable", "message Order" in client().get_schema(order_v1).schema_str)
    check("permanent delete of version 1",
          client().delete_version("ep-order-value", 1, permanent=True) == 1)
    check("gone from deleted listings too",
          client().get_versions("ep-order-value", deleted=True) == [2])
    fails("a version that never existed", (404, 40402),
          lambda: client().delete_version("ep-order-value", 7))
    fails("a subject that never existed", (404, 40401),
          lambda: client().delete_version("ep-nope-value", 1))

    # References block deletes.
    fails("a referenced subject cannot be deleted", (422, 42206),
          lambda: client().delete_subject("ep/common.proto"))
    fails("a referenced version cannot be deleted", (422, 42206),
          lambda: client().delete_version("ep/common.proto", 1))

    # Soft and permanent deletes of subjects.
    for s in ("ep-order-value", "ep-norm-value", "ep-norm2-value", "ep-plain-value"):
        deleted = client().delete_subject(s)
        check(f"soft delete of {s}", deleted == ([2] if s == "ep-order-value" else [1]))
    live = client().get_subjects()
    check("soft-deleted subjects are hidden", "ep-order-value" not in live
          and "ep/common.proto" in live, f"{live}")
    check("deleted=true lists them", "ep-order-value" in client().get_subjects(deleted=True))
    only = client().get_subjects(deleted_only=True)
    check("deleted_only lists only them",
          "ep-order-value" in only and "ep/common.proto" not in only, f"{only}")
    check("prefix filter", client().get_subjects(subject_prefix="ep/") == ["ep/common.proto"])
    check("references from deleted versions no longer count",
          client().get_referenced_by("ep/common.proto", 1) == [])
    check("the import can now be deleted", client().delete_subject("ep/common.proto") == [1])
    check("permanent delete of a subject",
          client().delete_subject("ep-order-value", permanent=True) == [2])
    check("permanently deleted subjects are gone",
          "ep-order-value" not in client().get_subjects(deleted=True))
    fails("permanent delete needs a soft delete first", (404, 40405),
          lambda: (client().register_schema("ep-live-value", Schema(COMMON, "PROTOBUF")),
                   client().delete_subject("ep-live-value", permanent=True)))

    # READONLY.
    ro = "ep-ro-value"
    c.register_schema(ro, Schema(COMMON, "PROTOBUF"))
    check("subject mode READONLY", client().update_mode(ro, "READONLY") == "READONLY")
    check("read it back", client().get_mode(ro) == "READONLY")
    fails("READONLY refuses registration", (422, 42205),
          lambda: client().register_schema(ro, Schema(COMMON + "\nmessage Extra {}", "PROTOBUF")))
    fails("READONLY refuses deletes", (422, 42205), lambda: client().delete_subject(ro))
    found = client().lookup_schema(ro, Schema(COMMON, "PROTOBUF"))
    check("READONLY still answers lookups", found.version == 1)
    check("delete the subject mode", client().delete_mode(ro) == "READONLY")
    fails("no subject mode left", (404, 40409), lambda: client().get_mode(ro))
    client().register_schema(ro, Schema(COMMON + "\nmessage Extra {}", "PROTOBUF"))
    check("writable again", client().get_versions(ro) == [1, 2])
    check("global READONLY", client().update_global_mode("READONLY") == "READONLY")
    fails("global READONLY refuses registration anywhere", (422, 42205),
          lambda: client().register_schema("ep-other-value", Schema(COMMON, "PROTOBUF")))
    check("global READWRITE", client().update_global_mode("READWRITE") == "READWRITE")
    fails("invalid mode", (422, 42204), lambda: client().update_global_mode("SIDEWAYS"))

    # IMPORT with explicit ids.
    imp = "ep-import-value"
    check("IMPORT on an empty subject", client().update_mode(imp, "IMPORT") == "IMPORT")
    imported_text = 'syntax = "proto3";\npackage imp;\nmessage Imported {\n  string a = 1;\n}'
    status, body = http("POST", f"/subjects/{imp}/versions",
                        {"schemaType": "PROTOBUF", "schema": imported_text, "id": 5000,
                         "version": 7})
    check("IMPORT registers with the given id", (status, body) == (200, {"id": 5000}),
          f"{status} {body}")
    v = client().get_version(imp, 7)
    check("at the given version", (v.schema_id, v.version) == (5000, 7))
    check("by id", client().get_schema(5000).schema_str == imported_text)
    status, body = http("POST", f"/subjects/{imp}/versions",
                        {"schemaType": "PROTOBUF", "schema": COMMON + "\nmessage Other {}",
                         "id": 5000})
    check("IMPORT refuses an id holding another schema",
          (status, body.get("error_code")) == (422, 42205), f"{status} {body}")
    fails("IMPORT needs an id", (422, 42205),
          lambda: client().register_schema(imp, Schema(COMMON + "\nmessage Nope {}", "PROTOBUF")))
    status, body = http("POST", "/subjects/ep-rw-value/versions",
                        {"schemaType": "PROTOBUF", "schema": COMMON, "id": 6000})
    check("explicit ids need IMPORT", (status, body.get("error_code")) == (422, 42205))
    fails("IMPORT on a subject with versions needs force", (422, 42205),
          lambda: client().update_mode(ro, "IMPORT"))
    check("force", client().update_mode(ro, "IMPORT", force=True) == "IMPORT")
    client().update_mode(ro, "READWRITE")
    fails("global IMPORT with subjects needs force", (422, 42205),
          lambda: client().update_global_mode("IMPORT"))
    client().update_mode(imp, "READWRITE")
    after = client().register_schema("ep-after-import-value",
                                     Schema('syntax = "proto3";\nmessage After {}', "PROTOBUF"))
    check("new ids follow imported ones", after == 5001, f"{after}")

    # Configs.
    check("subject config", client().set_compatibility("ep-ro-value", "FULL") == {"compatibility": "FULL"})
    check("read it", client().get_compatibility("ep-ro-value") == "FULL")
    check("config object", client().get_config("ep-ro-value").compatibility_level.value == "FULL")
    client().delete_config("ep-ro-value")
    fails("no subject config left", (404, 40408), lambda: client().get_compatibility("ep-ro-value"))

    print(json.dumps({
        "ok": True,
        "checks": CHECKS,
        "ids": {"common": common_id, "order_v1": order_v1, "order_v2": order_v2,
                "imported": 5000, "after_import": after},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
