#!/usr/bin/env bash
# The whole story on one machine, through `vmr`: record, crash, clone,
# reproduce.
#
#   1. install prerequisites and build (scripts/setup.sh, cached; cargo build);
#   2. start the local stack (vmr stack up): Tansu broker, topics, Schema
#      Registry, filesystem object store;
#   3. start the capture agent (capture-agent serve) and launch demo-linux
#      under it with periodic snapshots (vmr instance launch);
#   4. send ordinary traffic to the guest's vmr-kv-1 service on
#      192.168.77.2:7000 from a peer network namespace;
#   5. send the packet of death (a PUT whose key is longer than 200 bytes)
#      and show the crash (vmr instance watch, vmr events tail);
#   6. clone from the last snapshot before the crash and replay at 1x
#      (vmr replay start --watch), showing the clone crash after the same
#      event;
#   7. print a summary (events per topic, the snapshot used, the replay
#      time, the divergence report) and write the timeline picture
#      (vmr timeline: SVG and PNG).
#
# Each step says DONE, or NOT DONE with the reason (for example a service
# that refused it); nothing is claimed that did not happen. Exit status 0
# when every step was done, 3 when the story is incomplete, 1 on an error
# of the demo itself. Artifacts stay in $VMR_DEMO_DIR (default
# .stack/demo). Needs root (network namespaces).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$VMR_ROOT"

START_NS=$(date +%s%N)
elapsed() { echo "$(( ($(date +%s%N) - START_NS) / 1000000 ))" | awk '{printf "%.1fs", $1/1000}'; }
say() { printf '\n\033[1m[%s] %s\033[0m\n' "$(elapsed)" "$*"; }
DONE=()
NOT_DONE=()
done_step() { DONE+=("$1"); printf '    DONE: %s\n' "$1"; }
not_done() { NOT_DONE+=("$1: $2"); printf '    NOT DONE: %s (%s)\n' "$1" "$2"; }

[ "$(id -u)" -eq 0 ] || die "the demo needs root (network namespaces, TAP devices)"

DEMO="${VMR_DEMO_DIR:-$VMR_ROOT/.stack/demo}"
rm -rf "$DEMO" && mkdir -p "$DEMO"
# The demo's own ports, so it does not meet another stack on this host.
KPORT="${VMR_DEMO_KAFKA_PORT:-19192}"
RPORT="${VMR_DEMO_REGISTRY_PORT:-18181}"
APORT="${VMR_DEMO_AGENT_PORT:-50161}"
PPORT="${VMR_DEMO_REPLAYER_PORT:-7400}"
SNAP_EVERY="${VMR_DEMO_SNAPSHOT_SECS:-4}"
INSTANCE="demo-$(date +%s)"
NETNS="vmr-demo-$$"
TOKEN="demo-token-0123456789abcdef"
export VMR_DATA_DIR="$DEMO/data"
export VMR_BOOTSTRAP_SERVERS="127.0.0.1:$KPORT"
export VMR_REGISTRY_URL="http://127.0.0.1:$RPORT"
export VMR_OBJECT_STORE_URL="file://$DEMO/data/stack/objects"
export VMR_AGENT_URL="http://127.0.0.1:$APORT"
export VMR_REPLAYER_URL="http://127.0.0.1:$PPORT"
export VMR_TOKEN="$TOKEN"

say "1. prerequisites and build"
"$VMR_ROOT/scripts/setup.sh" >"$DEMO/setup.log" 2>&1 || die "scripts/setup.sh failed (see $DEMO/setup.log)"
BUILD_T0=$(date +%s)
BIN="${CARGO_TARGET_DIR:-$VMR_ROOT/target}/debug"
if [ "${VMR_DEMO_SKIP_BUILD:-0}" = 1 ]; then
    echo "    VMR_DEMO_SKIP_BUILD=1: using the binaries already in $BIN"
else
    cargo build --workspace --bins --quiet 2>"$DEMO/build.log" || die "cargo build failed (see $DEMO/build.log)"
fi
for b in vmr capture-agent replayer schema-registry vhost-tap-blk vhost-tap-net; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing: run cargo build --workspace --bins"
done
export VMR_BIN_DIR="$BIN"
VMR="$BIN/vmr"
echo "    built in $(( $(date +%s) - BUILD_T0 ))s; vmr is $VMR"
IMAGE_DIR="$("$VMR_ROOT/guest/linux/build.sh" 2>>"$DEMO/setup.log")" || die "guest/linux/build.sh failed"
"$VMR" image show demo-linux | sed 's/^/    /' | head -8
done_step "prerequisites, build, demo-linux image"

PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    ip netns del "$NETNS" 2>/dev/null
    "$VMR" -q stack down >/dev/null 2>&1
}
trap cleanup EXIT

say "2. the local stack"
"$VMR" stack up >"$DEMO/stack.env" 2>"$DEMO/stack.log" || { cat "$DEMO/stack.log"; die "vmr stack up failed"; }
"$VMR" stack status | sed 's/^/    /'
"$VMR" doctor 2>&1 | sed 's/^/    /' | tail -9
done_step "local stack (broker $VMR_BOOTSTRAP_SERVERS, registry $VMR_REGISTRY_URL, store $VMR_OBJECT_STORE_URL)"

say "3. the capture agent and demo-linux under it"
cat >"$DEMO/agent.toml" <<EOF
[endpoints]
bootstrap-servers = "$VMR_BOOTSTRAP_SERVERS"
registry-url = "$VMR_REGISTRY_URL"
object-store-url = "$VMR_OBJECT_STORE_URL"
event-partitions = 8

[agent]
listen = "127.0.0.1:$APORT"
metrics-listen = "127.0.0.1:$((APORT + 1))"
data-dir = "$DEMO/agent"
image-dirs = ["$(dirname "$IMAGE_DIR")"]
EOF
"$BIN/capture-agent" serve --config "$DEMO/agent.toml" >"$DEMO/agent.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$APORT") 2>/dev/null && break; sleep 0.1; done
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
LAUNCHED=0
SNAPSHOTS_ON=0
if "$VMR" instance launch demo-linux --id "$INSTANCE" --accel tcg --netns "$NETNS" \
        --snapshot-every "$SNAP_EVERY" >"$DEMO/launch.txt" 2>"$DEMO/launch.err"; then
    LAUNCHED=1; SNAPSHOTS_ON=1
else
    sed 's/^/    /' "$DEMO/launch.err"
    echo "    retrying without periodic snapshots"
    if "$VMR" instance launch demo-linux --id "$INSTANCE" --accel tcg --netns "$NETNS" \
            >"$DEMO/launch.txt" 2>"$DEMO/launch.err"; then
        LAUNCHED=1
        not_done "periodic snapshots" "the agent refused them: $(grep -m1 '^error' "$DEMO/launch.err")"
    fi
fi
if [ "$LAUNCHED" = 1 ]; then
    sed 's/^/    /' "$DEMO/launch.txt" | head -6
    done_step "launched $INSTANCE (demo-linux, QEMU/TCG) under the capture agent"
    [ "$SNAPSHOTS_ON" = 1 ] && echo "    periodic snapshots every ${SNAP_EVERY}s requested"
else
    sed 's/^/    /' "$DEMO/launch.err"
    not_done "launch" "$(grep -m1 '^error' "$DEMO/launch.err")"
fi

# The peer side of the guest's NIC.
PEER_OK=0
if [ "$LAUNCHED" = 1 ]; then
    for _ in $(seq 300); do ip -n "$NETNS" link show vmrtap0 >/dev/null 2>&1 && break; sleep 0.1; done
    if ip -n "$NETNS" link set vmrtap0 address 02:00:00:77:00:01 2>/dev/null &&
        ip -n "$NETNS" addr add 192.168.77.1/24 dev vmrtap0 && ip -n "$NETNS" link set vmrtap0 up; then
        PEER_OK=1
    else
        not_done "peer network" "no TAP vmrtap0 in $NETNS"
    fi
fi

kv() { # line [timeout]: one request to the guest's service from the peer namespace
    ip netns exec "$NETNS" python3 - "$1" "${2:-120}" <<'EOF'
import socket, sys, time
line, limit = sys.argv[1], float(sys.argv[2])
deadline = time.time() + limit
while True:
    try:
        s = socket.create_connection(("192.168.77.2", 7000), timeout=5)
        break
    except OSError as e:
        if time.time() > deadline:
            print(f"no connection: {e}"); sys.exit(2)
        time.sleep(0.5)
s.settimeout(20)
s.sendall((line + "\n").encode())
try:
    print(s.recv(4096).decode().strip() or "(connection closed, no answer)")
except OSError as e:
    print(f"(no answer: {e})")
EOF
}

say "4. ordinary traffic"
TRAFFIC=0
if [ "$PEER_OK" = 1 ]; then
    echo "    waiting for the guest's service (QEMU/TCG boot takes a few seconds)"
    for i in 1 2 3 4 5 6; do
        reply=$(kv "PUT user$i {\"name\":\"user$i\",\"visits\":$((i * 7))}" 180)
        echo "    PUT user$i -> $reply"
        case "$reply" in OK*) TRAFFIC=$((TRAFFIC + 1)) ;; esac
        sleep 1
    done
    reply=$(kv "GET 2"); echo "    GET 2 -> $reply"
    [ "$TRAFFIC" -gt 0 ] && done_step "$TRAFFIC PUTs answered OK" || not_done "traffic" "the service did not answer"
fi

say "   snapshots before the packet of death"
if [ "$TRAFFIC" -gt 0 ]; then
    sleep "$SNAP_EVERY"
    if ! "$VMR" --json snapshot list "$INSTANCE" --agent >"$DEMO/snapshots.json" 2>"$DEMO/snapshots.err"; then
        echo "    the agent lists no snapshots: $(jq -r .error.message "$DEMO/snapshots.err" 2>/dev/null)"
    fi
    n=$(jq '.snapshots | length' "$DEMO/snapshots.json" 2>/dev/null || echo 0)
    if [ "${n:-0}" = 0 ]; then
        echo "    no periodic snapshot listed; taking one now (vmr snapshot take)"
        if "$VMR" snapshot take "$INSTANCE" >"$DEMO/take.txt" 2>"$DEMO/take.err"; then
            sed 's/^/    /' "$DEMO/take.txt"
        else
            sed 's/^/    /' "$DEMO/take.err"
        fi
    fi
    "$VMR" snapshot list "$INSTANCE" 2>&1 | sed 's/^/    /'
    n=$("$VMR" --json snapshot list "$INSTANCE" 2>/dev/null | jq '.snapshots | length' 2>/dev/null || echo 0)
    if [ "${n:-0}" -gt 0 ]; then
        done_step "$n snapshot(s) of $INSTANCE in the store"
    else
        not_done "snapshots" "no snapshot of $INSTANCE reached the store ($(grep -m1 '^error' "$DEMO/take.err" 2>/dev/null || echo 'none listed'))"
    fi
fi

say "5. the packet of death"
CRASHED=0
if [ "$TRAFFIC" -gt 0 ]; then
    KEY=$(printf 'k%.0s' $(seq 250))
    echo "    PUT with a ${#KEY}-byte key (the service's key buffer holds 200)"
    reply=$(kv "PUT $KEY boom" 30); echo "    -> $reply"
    timeout 90 "$VMR" instance watch "$INSTANCE" --until crash --timeout 80 2>&1 | sed 's/^/    /' | tail -5
    "$VMR" events tail --instance "$INSTANCE" --kind lifecycle 2>/dev/null | sed 's/^/    /' | tail -6
    if "$VMR" --json events tail --instance "$INSTANCE" --kind lifecycle 2>/dev/null |
            jq -e 'select(.lifecycle.kind == "crash")' >/dev/null; then
        CRASHED=1
        done_step "the original crashed; the crash is recorded in vmr.lifecycle.v1"
    else
        not_done "crash" "no crash event of $INSTANCE in vmr.lifecycle.v1"
    fi
fi
if [ "$LAUNCHED" = 1 ]; then
    "$VMR" instance stop "$INSTANCE" >"$DEMO/stop.txt" 2>&1 || sed 's/^/    /' "$DEMO/stop.txt"
fi

say "6. clone from the last snapshot before the crash, replay at 1x"
CLONE=""
REPLAY_S=""
NSNAP=$("$VMR" --json snapshot list "$INSTANCE" 2>/dev/null | jq '.snapshots | length' 2>/dev/null || echo 0)
if [ "$CRASHED" = 1 ] && [ "${NSNAP:-0}" -gt 0 ]; then
    CRASH_NS=$("$VMR" --json events tail --instance "$INSTANCE" --kind lifecycle 2>/dev/null |
        jq -r 'select(.lifecycle.kind == "crash") | .wall_time_ns' | head -1)
    KERNEL=$(awk -F'"' '/^kernel/ {print $2}' "$IMAGE_DIR/image.toml")
    CMDLINE=$(awk -F'"' '/^cmdline/ {print $2}' "$IMAGE_DIR/image.toml")
    cat >"$DEMO/replayer.toml" <<EOF
listen = "127.0.0.1:$PPORT"
work_dir = "$DEMO/replayer"
[kafka]
bootstrap_servers = "$VMR_BOOTSTRAP_SERVERS"
[store]
url = "$VMR_OBJECT_STORE_URL"
[[images]]
name = "demo-linux"
kernel = "$IMAGE_DIR/$KERNEL"
cmdline = "$CMDLINE"
memory_mib = 256
nics = [{ name = "net0", mac = "52:54:00:77:00:02" }]
[[tokens]]
token = "$TOKEN"
tenant = "demo"
[[tenants]]
name = "demo"
instance_prefix = "demo-"
EOF
    "$BIN/replayer" --config "$DEMO/replayer.toml" --check-config | sed 's/^/    /'
    "$BIN/replayer" --config "$DEMO/replayer.toml" >"$DEMO/replayer.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PPORT") 2>/dev/null && break; sleep 0.1; done
    R0=$(date +%s%N)
    "$VMR" replay start "$INSTANCE" --at "$CRASH_NS" --speed 1 --watch --log "$DEMO/replay.jsonl" \
        --timeout 600 >"$DEMO/replay.txt" 2>"$DEMO/replay.err"
    rc=$?
    REPLAY_S=$(echo "$(( ($(date +%s%N) - R0) / 1000000 ))" | awk '{printf "%.1f", $1/1000}')
    sed 's/^/    /' "$DEMO/replay.txt" "$DEMO/replay.err" | tail -12
    CLONE=$(jq -r 'select(.clone != null) | .clone.clone_id' "$DEMO/replay.jsonl" 2>/dev/null | head -1)
    STATE=$(jq -r 'select(.clone != null) | .clone.state' "$DEMO/replay.jsonl" 2>/dev/null | tail -1)
    if [ "$rc" = 0 ] && [ "$STATE" = crashed ]; then
        done_step "clone $CLONE crashed during the replay ($REPLAY_S s)"
    else
        not_done "replay" "vmr replay start exited $rc, clone state ${STATE:-none}: $(grep -m1 '^error' "$DEMO/replay.err")"
    fi
else
    not_done "clone and replay" "needs the original's crash and a snapshot before it (crash recorded: $CRASHED, snapshots: ${NSNAP:-0})"
fi

say "7. summary and timeline"
TL_ARGS=(--instance "$INSTANCE" -o "$DEMO/timeline.svg")
[ -n "$CLONE" ] && TL_ARGS+=(--replay "$CLONE" --replay-log "$DEMO/replay.jsonl")
if "$VMR" --json timeline "${TL_ARGS[@]}" >"$DEMO/timeline.json" 2>"$DEMO/timeline.err"; then
    done_step "timeline written: $DEMO/timeline.svg, $DEMO/timeline.png"
else
    sed 's/^/    /' "$DEMO/timeline.err"
    not_done "timeline" "$(grep -m1 'error' "$DEMO/timeline.err")"
fi
echo
echo "  instance:          $INSTANCE"
if [ -s "$DEMO/timeline.json" ]; then
    jq -r '.events_per_topic | to_entries[] | "  events in \(.key):  \(.value)"' "$DEMO/timeline.json"
    jq -r '"  original crash:    " + (if .crash_original then "seq \(.crash_original.seq), after input seq \(.crash_original.after_input_seq) (\(.crash_original.detail | .[0:60])...)" else "none recorded" end)' "$DEMO/timeline.json"
fi
if [ -n "$CLONE" ]; then
    "$VMR" --json replay report "$CLONE" >"$DEMO/report.json" 2>/dev/null
    jq -r '"  snapshot used:     \(.clone.snapshot_id) (seq at cut \(.clone.seq_at_cut))",
           "  clone:             \(.clone.clone_id): \(.clone.state) at seq \(.clone.replayed_seq), \(.clone.delivered) events delivered",
           "  divergences:       \(.divergences | length)"' "$DEMO/report.json"
    jq -r '.divergences[] | "    seq \(.seq) \(.device) \(.kind): \(.description)"' "$DEMO/report.json" | head -10
    jq -r 'if .crash_clone then "  clone crash:       after input seq \(.crash_clone.seq) (the original: after input seq \(.crash_original.after_input_seq // "-"))" else empty end' "$DEMO/timeline.json"
    echo "  replay time:       ${REPLAY_S}s (vmr replay start to the end of the watch)"
fi
echo "  demo time:         $(elapsed)"
echo "  artifacts:         $DEMO"
echo
if [ ${#NOT_DONE[@]} -eq 0 ]; then
    echo "demo complete: ${#DONE[@]} steps done"
    exit 0
fi
echo "demo incomplete: ${#DONE[@]} steps done, ${#NOT_DONE[@]} not done:"
for s in "${NOT_DONE[@]}"; do echo "  - $s"; done
exit 3
