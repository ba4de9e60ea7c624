#!/usr/bin/env python3
"""Render helm/vmreplay with the Helm engine (helm-python-sdk embeds Helm's
Go library), lint it, check that values.schema.json refuses bad values,
validate every object against the Kubernetes API schemas, and run the real
binaries' configuration checks on the rendered configs.

Usage: test_chart.py --bin-dir target/debug
Exit status 0 when every check passed; the failures are printed otherwise.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib

try:
    import yaml
    import kubernetes_validate
    from helm_python.chart import Chart, lint
    from helm_python.errors import HelmError
except ImportError as e:  # a missing tool is a failure that names the fix
    print(f"missing Python package ({e}); install: pip install -r helm/tests/requirements.txt")
    sys.exit(2)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "vmreplay")
KUBE_VERSION = "1.30.0"
# CRDs the Kubernetes schemas do not hold; their objects are checked by shape.
CRD_KINDS = {"ServiceMonitor"}

TOKENS = [{"token": "tenant-a-token-0000001", "tenant": "default"}]
VALUE_SETS = {
    "default": {},
    "external-registry": {
        "schemaRegistry": {"externalUrl": "http://karapace.kafka.svc:8081"},
        "topics": {"create": True},
        "kafka": {"securityProtocol": "SASL_SSL",
                  "sasl": {"existingSecret": "kafka-user"},
                  "tls": {"caSecret": "kafka-ca"}},
        "replayer": {"tokens": TOKENS, "antiAffinity": "hard"},
        "agent": {"hugepages": {"enabled": True, "size": "1Gi"},
                  "deviceResources": {"devices.kubevirt.io/kvm": 1}},
    },
    "netpol-servicemonitor": {
        "networkPolicy": {"enabled": True},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "topics": {"create": True},
        "replayer": {"tokens": TOKENS},
    },
}
BAD_VALUES = [
    ("mistyped", {"replayer": {"replicas": "two"}}),
    ("unknown key", {"replayer": {"replica": 2}}),
    ("unknown top-level key", {"agnet": {"enabled": True}}),
    ("bad enum", {"agent": {"shipper": {"compression": "gzip"}}}),
    ("short token", {"replayer": {"tokens": [{"token": "short", "tenant": "x"}]}}),
]

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def objects(rendered):
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                yield path, doc


def subcommand_flags(binary, sub):
    """The long flags the binary's --help lists for a subcommand (None: the
    top), and those its usage line requires (outside [OPTIONS])."""
    argv = [binary] + ([sub] if sub else []) + ["--help"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return None, None
    usage = next((l for l in out.stdout.splitlines() if l.startswith("Usage:")), "")
    required = set(re.findall(r"(--[a-z][a-z0-9-]*) <", re.sub(r"\[[^]]*\]", "", usage)))
    return set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout)), required


def check_args(binary, args, what):
    """Every subcommand and flag of a rendered command line exists in the binary."""
    sub = args[0] if args and not args[0].startswith("-") else None
    flags, required = subcommand_flags(binary, sub)
    check(flags is not None, f"{what}: `{os.path.basename(binary)} {sub or ''}` exists")
    if flags is None:
        return
    for r in sorted(required):
        check(r in args, f"{what}: required flag {r} is given")
    for a in args:
        if a.startswith("--"):
            check(a.split("=")[0] in flags, f"{what}: flag {a} is accepted")


def run_check(argv, what):
    env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    ok = out.returncode == 0
    check(ok, f"{what}: {' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv))}")
    if not ok:
        print(out.stdout + out.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    bins = {b: os.path.join(ap.parse_args().bin_dir, b)
            for b in ("capture-agent", "replayer", "schema-registry")}
    for b, p in bins.items():
        if not os.access(p, os.X_OK):
            print(f"missing binary {p}; build it: cargo build -p {b}")
            return 2

    chart = Chart.load(CHART)
    registry_keys = set(tomllib.load(open(os.path.join(ROOT, "schema-registry", "registry.example.toml"), "rb")))

    for name, values in VALUE_SETS.items():
        print(f"== value set {name}")
        report = lint(CHART, values, strict=True, kube_version="v" + KUBE_VERSION)
        bad = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        check(not bad, f"{name}: helm lint --strict ({bad})")
        rendered = chart.render(values, name="vmr", namespace="vmreplay", is_install=True)
        objs = list(objects(rendered))
        kinds = sorted({o["kind"] for _, o in objs})
        print(f"     {len(objs)} objects: {', '.join(kinds)}")
        for path, o in objs:
            ident = f"{o['kind']}/{o['metadata']['name']}"
            labels = o["metadata"].get("labels", {})
            check(labels.get("app.kubernetes.io/instance") == "vmr" and "app.kubernetes.io/name" in labels,
                  f"{name}: {ident} has the app.kubernetes.io labels")
            if o["kind"] in CRD_KINDS:
                check(o["apiVersion"] == "monitoring.coreos.com/v1" and o["spec"]["endpoints"][0]["port"] == "metrics",
                      f"{name}: {ident} (CRD) has the metrics endpoint")
                continue
            try:
                kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
                check(True, f"{name}: {ident} validates against Kubernetes {KUBE_VERSION}")
            except kubernetes_validate.ValidationError as e:
                check(False, f"{name}: {ident} validates against Kubernetes {KUBE_VERSION}: {e}")
        by = {(o["kind"], o["metadata"]["name"].removeprefix("vmr-vmreplay-")): o for _, o in objs}
        ext = bool(values.get("schemaRegistry", {}).get("externalUrl"))
        check((("Deployment", "schema-registry") in by) != ext,
              f"{name}: our registry is deployed only without an external one")
        if values.get("networkPolicy", {}).get("enabled"):
            check(("NetworkPolicy", "replayer") in by, f"{name}: NetworkPolicy rendered")
        if values.get("serviceMonitor", {}).get("enabled"):
            check(("ServiceMonitor", "replayer") in by, f"{name}: ServiceMonitor rendered")
        ds = by[("DaemonSet", "capture-agent")]["spec"]["template"]["spec"]
        sc = ds["containers"][0]["securityContext"]
        check(sc.get("privileged") is False and sc["capabilities"]["drop"] == ["ALL"],
              f"{name}: agent is unprivileged with capabilities listed")
        paths = {v["hostPath"]["path"] for v in ds["volumes"] if "hostPath" in v}
        check({"/dev/kvm", "/dev/net/tun"} <= paths, f"{name}: agent mounts /dev/kvm and /dev/net/tun")

        with tempfile.TemporaryDirectory() as d:
            def write(fname, text):
                p = os.path.join(d, fname)
                open(p, "w").write(text)
                return p
            agent_cfg = write("capture-agent.toml", by[("ConfigMap", "capture-agent")]["data"]["capture-agent.toml"])
            run_check([bins["capture-agent"], "--check-config", agent_cfg], f"{name}: agent config")
            check_args(bins["capture-agent"], ds["containers"][0]["args"], f"{name}: agent command line")
            cli_cfg = write("vmreplay.toml", by[("ConfigMap", "cli")]["data"]["vmreplay.toml"])
            # The CLI reads the services' format; its [endpoints] table is the agent's.
            run_check([bins["capture-agent"], "--check-config", cli_cfg], f"{name}: vmr config")
            rp_cfg = write("replayer.toml", by[("Secret", "replayer")]["stringData"]["replayer.toml"])
            rp = by[("Deployment", "replayer")]["spec"]["template"]["spec"]["containers"][0]
            # The rendered command line, with the mounted config at its local path.
            local = [rp_cfg if a == "/etc/vmreplay/replayer.toml" else a for a in rp["args"]]
            run_check([bins["replayer"]] + local + ["--check-config"], f"{name}: replayer config")
            check_args(bins["replayer"], rp["args"], f"{name}: replayer command line")
            if not ext:
                text = by[("ConfigMap", "schema-registry")]["data"]["registry.toml"]
                keys = set(tomllib.loads(text))
                # schema-registry has no --check-config: its keys are compared with the example's.
                check(keys <= registry_keys, f"{name}: registry config keys {sorted(keys - registry_keys)} all known")
                reg = by[("Deployment", "schema-registry")]["spec"]["template"]["spec"]["containers"][0]
                check_args(bins["schema-registry"], reg["args"], f"{name}: registry command line")

    print("== the command-line check catches drift")
    before = len(failures)
    check_args(bins["capture-agent"], ["run", "--config", "x", "--no-such-flag"], "probe (expected FAIL)")
    check_args(bins["replayer"], ["--no-such-flag"], "probe (expected FAIL)")
    caught = len(failures) - before
    del failures[before:]
    check(caught >= 5, f"an unknown flag and missing required flags are reported ({caught} findings)")

    print("== schema refuses bad values")
    for what, values in BAD_VALUES:
        try:
            chart.validate_schema(values)
            check(False, f"schema refuses {what} {values}")
        except HelmError as e:
            check(True, f"schema refuses {what}: {' '.join(str(e).split())[:160]}")
        try:
            chart.render(values, name="vmr", namespace="vmreplay", is_install=True)
            check(False, f"render refuses {what}")
        except HelmError:
            check(True, f"render refuses {what}")

    print(f"== {len(failures)} failure(s)")
    for f in failures:
        print("FAIL " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
