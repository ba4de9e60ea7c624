#!/usr/bin/env python3
"""Render helm/vmreplay with the Helm engine (helm-python-sdk embeds Helm's
Go library), lint it, check that values.schema.json refuses bad values,
validate every object against the Kubernetes API schemas, and run the real
binaries' configuration checks on the rendered configs and command lines.

The Kafka security settings are checked the way a pod would see them: the
files of the Secret volumes are created at the rendered mount paths (under a
temporary root), the Secret-backed environment variables are set, and each
binary's --check-config must accept the result; with the CA file or the user
name taken away it must refuse it and say why. No broker is involved.

Usage: test_chart.py --bin-dir target/debug
Exit status 0 when every check passed; the failures are printed otherwise.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

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
                  "tls": {"caSecret": "kafka-ca", "clientCertSecret": "kafka-client"}},
        "replayer": {"tokens": TOKENS, "antiAffinity": "hard",
                     "images": [{"name": "demo-linux", "kernel": "/var/lib/vmreplay/images/demo-linux/bzImage",
                                 "initrd": "/var/lib/vmreplay/images/demo-linux/initrd.cpio.gz",
                                 "cmdline": "console=ttyS0", "memoryMib": 256, "vcpus": 2,
                                 "qemuDevices": ["pvpanic"], "servicePort": 8080,
                                 "nics": [{"name": "net0", "mac": "52:54:00:77:00:02",
                                           "ip": "192.168.77.2/24", "peer": "192.168.77.1"}]}]},
        "agent": {"hugepages": {"enabled": True, "size": "1Gi"},
                  "tolerations": [{"key": "vmreplay.io/vm-host", "operator": "Exists", "effect": "NoSchedule"}],
                  "deviceResources": {"devices.kubevirt.io/kvm": 1}},
    },
    "netpol-servicemonitor": {
        "networkPolicy": {"enabled": True,
                          "replayerFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}}]},
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "topics": {"create": True},
        "kafka": {"securityProtocol": "SASL_SSL",
                  "sasl": {"mechanism": "SCRAM-SHA-256", "existingSecret": "kafka-user",
                           "usernameKey": "user", "passwordKey": "pass"},
                  "tls": {"caSecret": "kafka-ca", "caKey": "ca.pem"}},
        "replayer": {"tokens": TOKENS},
    },
    "mtls": {
        "agent": {"mode": "run"},
        "kafka": {"securityProtocol": "SSL",
                  "tls": {"caSecret": "kafka-ca", "clientCertSecret": "kafka-client"}},
    },
    "sasl-plaintext": {
        "kafka": {"securityProtocol": "SASL_PLAINTEXT",
                  "sasl": {"mechanism": "PLAIN", "existingSecret": "kafka-user"}},
    },
}
BAD_VALUES = [
    ("mistyped", {"replayer": {"replicas": "two"}}),
    ("unknown key", {"replayer": {"replica": 2}}),
    ("unknown top-level key", {"agnet": {"enabled": True}}),
    ("bad enum", {"agent": {"shipper": {"compression": "gzip"}}}),
    ("short token", {"replayer": {"tokens": [{"token": "short", "tenant": "x"}]}}),
    ("unknown Kafka protocol", {"kafka": {"securityProtocol": "TLS"}}),
    ("unknown SASL mechanism", {"kafka": {"securityProtocol": "SASL_SSL",
                                          "sasl": {"mechanism": "GSSAPI", "existingSecret": "s"}}}),
    ("SASL without a Secret", {"kafka": {"securityProtocol": "SASL_SSL"}}),
    ("unknown TLS key", {"kafka": {"tls": {"caFile": "/ca.crt"}}}),
    ("unknown agent mode", {"agent": {"mode": "daemon"}}),
    ("mistyped toleration key", {"agent": {"tolerations": [{"key": "k", "effects": "NoSchedule"}]}}),
    ("unknown NetworkPolicy peer key", {"networkPolicy": {"replayerFrom": [{"podSelectr": {}}]}}),
    ("pull Secret without a name", {"imagePullSecrets": [{"nmae": "regcred"}]}),
    ("lower-case capability", {"replayer": {"capabilities": ["net_admin"]}}),
]
# The topics and policies of the design's Kafka layout: name,
# cleanup.policy, partitions (None: kafka.eventPartitions), extra configs.
TOPICS = [
    ("vmr.block.v1", "delete", None, ["max.message.bytes=8388608"]),
    ("vmr.net.v1", "delete", None, []),
    ("vmr.env.v1", "delete", None, []),
    ("vmr.lifecycle.v1", "delete", None, []),
    ("vmr.snapshots.v1", "compact", None, []),
    ("_schemas", "compact", 1, []),
]
# Where the chart mounts the Kafka security Secrets.
KAFKA_MOUNTS = "/etc/vmreplay-kafka/"

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


def run_check(argv, what, env=None, expect_error=None, secrets=()):
    """Runs a configuration check; it must pass, or with `expect_error` fail
    with a message that contains it. No secret value may appear in its output."""
    env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0", **(env or {}))
    for k in ("VMR_KAFKA_SASL_USERNAME", "VMR_KAFKA_SASL_PASSWORD"):
        if k not in (env or {}) and k in os.environ:
            del env[k]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    text = out.stdout + out.stderr
    shown = ' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv))
    if expect_error is None:
        ok = out.returncode == 0
        check(ok, f"{what}: {shown}")
    else:
        ok = out.returncode != 0 and expect_error in text and "panicked" not in text
        check(ok, f"{what}: refused with \"{expect_error}\": {shown}")
    if not ok:
        print(text)
    leaked = [s for s in secrets if s in text]
    check(not leaked, f"{what}: no secret value in the output")


def pod_secrets(pod, container, root):
    """Creates under `root` the files the pod's Secret volumes put at the
    container's mount paths, and returns the environment the container gets
    (Secret references get a made-up value) and the secret values made up."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    secrets = []
    for m in container.get("volumeMounts", []):
        sec = vols[m["name"]].get("secret")
        if not sec or not m["name"].startswith("kafka-"):
            continue  # the replayer's own config Secret is written by the caller
        check("items" in sec, f"{container['name']}: Secret volume {m['name']} lists the keys it mounts")
        for item in sec.get("items", []):
            path = root + os.path.join(m["mountPath"], item["path"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            value = f"{sec['secretName']}.{item['key']}-value-0123"
            secrets.append(value)
            with open(path, "w") as f:
                f.write(value + "\n")
    env = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            env[e["name"]] = f"{ref['name']}.{ref['key']}-env-0123"
        elif "value" in e:
            env[e["name"]] = e["value"]
    return env, [s for s in secrets if ".password" in s or ".pass" in s or ".tls.key" in s]


def kafka_checks(argv_for, text, pod, container, d, what, values):
    """Runs the binary's check on a rendered config (`text`) that names
    Kafka security files under KAFKA_MOUNTS, with the pod's Secrets in
    place; then without the CA file and without the SASL user name."""
    root = os.path.join(d, "root-" + container["name"])
    env, secrets = pod_secrets(pod, container, root)
    local = text.replace(KAFKA_MOUNTS, root + KAFKA_MOUNTS)
    cfg = os.path.join(d, container["name"] + ".toml")
    with open(cfg, "w") as f:
        f.write(local)
    argv = argv_for(cfg)
    run_check(argv, what, env=env, secrets=secrets)
    k = {**{"securityProtocol": "PLAINTEXT", "tls": {}}, **values.get("kafka", {})}
    proto = k["securityProtocol"]
    named = re.findall(r'"(' + re.escape(root + KAFKA_MOUNTS) + r'[^"]+)"', local)
    check(all(os.path.isfile(p) for p in named),
          f"{what}: every Kafka file the config names is mounted from a Secret ({len(named)} files)")
    if proto.endswith("SSL") and k["tls"].get("caSecret"):
        ca = os.path.join(root + KAFKA_MOUNTS, "ca", k["tls"].get("caKey", "ca.crt"))
        os.rename(ca, ca + ".gone")
        run_check(argv, what + " without the CA file", env=env,
                  expect_error=f"ssl-ca-file {ca} cannot be read", secrets=secrets)
        os.rename(ca + ".gone", ca)
    if proto.startswith("SASL_"):
        no_user = {n: v for n, v in env.items() if n != "VMR_KAFKA_SASL_USERNAME"}
        run_check(argv, what + " without the SASL user name", env=no_user,
                  expect_error=f"Kafka security protocol {proto} needs a user name", secrets=secrets)


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
        agent = ds["containers"][0]
        toml_text = by[("ConfigMap", "capture-agent")]["data"]["capture-agent.toml"]
        if values.get("agent", {}).get("mode", "serve") == "serve":
            check(agent["args"][0] == "serve", f"{name}: agent runs `capture-agent serve`")
            listen = re.search(r'^listen = "0\.0\.0\.0:(\d+)"$', toml_text, re.M)
            port = agent["readinessProbe"]["grpc"]["port"]
            check(listen is not None and int(listen.group(1)) == port == agent["livenessProbe"]["grpc"]["port"]
                  and {"name": "grpc", "containerPort": port, "protocol": "TCP"} in agent["ports"],
                  f"{name}: agent probes and port {port} are the gRPC port of [agent] listen")
            check(("Service", "capture-agent") in by
                  and by[("Service", "capture-agent")]["spec"]["clusterIP"] == "None",
                  f"{name}: headless Service for the agents")
            if values.get("networkPolicy", {}).get("enabled"):
                check(("NetworkPolicy", "capture-agent") in by, f"{name}: agent NetworkPolicy rendered")
            if values.get("serviceMonitor", {}).get("enabled"):
                check(("ServiceMonitor", "capture-agent") in by, f"{name}: agent ServiceMonitor rendered")
        else:
            check(agent["args"][0] == "run" and "readinessProbe" not in agent
                  and "[agent]" not in toml_text and ("Service", "capture-agent") not in by,
                  f"{name}: agent runs `capture-agent run` (one instance, no API, no probes)")
        rpc = by[("Deployment", "replayer")]["spec"]["template"]["spec"]
        rsc = rpc["containers"][0]["securityContext"]
        check(rsc.get("privileged") is False and rsc["capabilities"]["drop"] == ["ALL"]
              and {"NET_ADMIN", "SYS_ADMIN"} <= set(rsc["capabilities"]["add"])
              and {"name": "netns", "mountPath": "/run/netns"} in rpc["containers"][0]["volumeMounts"],
              f"{name}: replayer is unprivileged with NET_ADMIN, SYS_ADMIN and a writable /run/netns (ip netns)")
        job = by.get(("Job", "topics"))
        check((job is not None) == bool(values.get("topics", {}).get("create")),
              f"{name}: topic job rendered only with topics.create")
        if job is not None:
            check(job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade",
                  f"{name}: topic job is a pre-install/pre-upgrade hook")
            script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
            parts = int(values.get("kafka", {}).get("eventPartitions", 8))
            for topic, policy, n, extra in TOPICS:
                line = next((l for l in script.splitlines()
                             if re.match(r"\s*create --topic " + re.escape(topic) + " ", l)), None)
                if topic == "_schemas" and ext:
                    check(line is None, f"{name}: the external registry's _schemas is not created")
                    continue
                want = [f"--partitions {n or parts} ", f"--config cleanup.policy={policy}"] + \
                       [f"--config {e}" for e in extra]
                check(line is not None and all(w in line for w in want),
                      f"{name}: topic job creates {topic} ({policy}, {n or parts} partitions {extra})")
        paths = {v["hostPath"]["path"] for v in ds["volumes"] if "hostPath" in v}
        check({"/dev/kvm", "/dev/net/tun"} <= paths, f"{name}: agent mounts /dev/kvm and /dev/net/tun")

        for path, text in sorted(rendered.items()):
            floats = re.findall(r"\b\d\.\d+e\+\d+\b", text)
            check(not floats, f"{name}: {os.path.basename(path)} renders no number in float notation {floats}")

        with tempfile.TemporaryDirectory() as d:
            def write(fname, text):
                p = os.path.join(d, fname)
                open(p, "w").write(text)
                return p
            agent_pod = by[("DaemonSet", "capture-agent")]["spec"]["template"]["spec"]
            agent_text = by[("ConfigMap", "capture-agent")]["data"]["capture-agent.toml"]
            kafka_checks(lambda cfg: [bins["capture-agent"], "--check-config", cfg], agent_text,
                         agent_pod, ds["containers"][0], d, f"{name}: agent config", values)
            check_args(bins["capture-agent"], ds["containers"][0]["args"], f"{name}: agent command line")
            # The CLI reads the services' format; its [endpoints] table is the agent's.
            # On an operator's machine the Secrets sit where the agent pods mount them.
            cli_text = by[("ConfigMap", "cli")]["data"]["vmreplay.toml"]
            kafka_checks(lambda cfg: [bins["capture-agent"], "--check-config", cfg], cli_text,
                         agent_pod, dict(ds["containers"][0], name="cli"), d, f"{name}: vmr config", values)
            rp_pod = by[("Deployment", "replayer")]["spec"]["template"]["spec"]
            rp = rp_pod["containers"][0]
            rp_text = by[("Secret", "replayer")]["stringData"]["replayer.toml"]
            # The rendered command line, with the mounted config at its local path.
            kafka_checks(lambda cfg: [bins["replayer"]] + [cfg if a == "/etc/vmreplay/replayer.toml" else a
                                                         for a in rp["args"]] + ["--check-config"],
                         rp_text, rp_pod, rp, d, f"{name}: replayer config", values)
            check_args(bins["replayer"], rp["args"], f"{name}: replayer command line")
            if not ext:
                reg_pod = by[("Deployment", "schema-registry")]["spec"]["template"]["spec"]
                reg = reg_pod["containers"][0]
                reg_text = by[("ConfigMap", "schema-registry")]["data"]["registry.toml"]
                kafka_checks(lambda cfg: [bins["schema-registry"]] + [cfg if a == "/etc/vmreplay/registry.toml" else a
                                                                for a in reg["args"]] + ["--check-config"],
                             reg_text, reg_pod, reg, d, f"{name}: registry config", values)
                check_args(bins["schema-registry"], reg["args"], f"{name}: registry command line")

    print("== the Dockerfiles' commands and the configs they ship")
    for df in sorted(glob.glob(os.path.join(ROOT, "docker", "*.Dockerfile"))):
        fname, text = os.path.basename(df), open(df).read()
        ep = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
        cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
        check(ep is not None and cmd is not None, f"{fname}: has an ENTRYPOINT and a CMD")
        if ep is None or cmd is None:
            continue
        binary, args = os.path.basename(json.loads(ep.group(1))[0]), json.loads(cmd.group(1))
        copies = {dst: os.path.join(ROOT, src)
                  for src, dst in re.findall(r"^COPY (?!--from)(\S+) (\S+)$", text, re.M)
                  if dst.startswith("/etc/")}
        if binary not in bins:
            check(args == ["--help"], f"{fname}: {binary} (not checked here) only prints its help")
            continue
        if args != ["--help"]:
            check_args(bins[binary], args, f"{fname}: CMD")
            if all(a in copies for a in args if a.startswith("/etc/")):
                run_check([bins[binary]] + [copies.get(a, a) for a in args] + ["--check-config"],
                          f"{fname}: CMD with the config the image ships")
            else:
                print(f"     {fname}: CMD names a config the image does not ship (the chart mounts it)")
        for dst, src in copies.items():
            if binary == "capture-agent":
                run_check([bins[binary], "--check-config", src], f"{fname}: shipped {dst}")

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
