#!/usr/bin/env bash
# The main job, end to end, on a fresh machine:
#   1. install prerequisites and build everything (scripts/setup.sh, cargo build);
#   2. start the local stack: Tansu broker, vmr.* topics, Schema Registry, schemas;
#   3. boot the Linux guest under QEMU with its disk and NIC served by vhost-tap,
#      recording every block request and frame while the guest writes, reads,
#      fsyncs and talks to a peer in its own network namespace;
#   4. publish the recording to Kafka in the Confluent wire format, keyed and
#      partitioned per instance;
#   5. decode it with a stock Confluent consumer (examples/analytics_consumer.py);
#   6. stop everything. Artifacts stay in $VMR_DEMO_DIR (default .stack/demo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$VMR_ROOT"

"$VMR_ROOT/scripts/setup.sh"
log "building vmreplay"
cargo build --workspace --bins
cargo build -p schema-registry --example publish_capture
BIN="${CARGO_TARGET_DIR:-$VMR_ROOT/target}/debug"
export VMR_BIN_DIR="$BIN"

DEMO="${VMR_DEMO_DIR:-$VMR_ROOT/.stack/demo}"
IMAGE_DIR="$("$VMR_ROOT/guest/linux/build.sh")"
INSTANCE="demo-$(date +%s)"
NETNS="vmr-demo-$$"
rm -rf "$DEMO" && mkdir -p "$DEMO"

PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    ip netns del "$NETNS" 2>/dev/null
    "$VMR_ROOT/scripts/stack.sh" down
}
trap cleanup EXIT

eval "$("$VMR_ROOT/scripts/stack.sh" up)"

log "starting vhost-tap backends for instance $INSTANCE"
truncate -s 256M "$DEMO/disk.raw"
as_root ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
"$BIN/vhost-tap-blk" --socket "$DEMO/vda.sock" --image "$DEMO/disk.raw" \
    --instance-id "$INSTANCE" --device vda --capture "$DEMO/vda.events" \
    --seq-file "$DEMO/seq" >"$DEMO/vhost-tap-blk.log" 2>&1 &
PIDS+=($!)
RUST_LOG=${VMR_NET_LOG:-info} "$BIN/vhost-tap-net" --socket "$DEMO/net0.sock" --tap vmrdemo0 --netns "$NETNS" \
    --instance-id "$INSTANCE" --device net0 --capture "$DEMO/net0.events" \
    --seq-file "$DEMO/seq" >"$DEMO/vhost-tap-net.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    [ -S "$DEMO/vda.sock" ] && [ -S "$DEMO/net0.sock" ] && ip -n "$NETNS" link show vmrdemo0 >/dev/null 2>&1 && break
    sleep 0.1
done
ip -n "$NETNS" addr add 192.168.77.1/24 dev vmrdemo0
ip -n "$NETNS" link set vmrdemo0 up

log "starting the peer (TCP line echo on 192.168.77.1:7777)"
ip netns exec "$NETNS" python3 -c '
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"vmr-echo:" + line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("192.168.77.1", 7777), H).serve_forever()
' >"$DEMO/peer.log" 2>&1 &
PIDS+=($!)

log "booting the Linux guest under QEMU (TCG); serial console in $DEMO/serial.log"
timeout 300 qemu-system-x86_64 -accel tcg -machine q35 -m 512M -smp 1 -nographic -no-reboot \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -kernel "$IMAGE_DIR/vmlinuz" -initrd "$IMAGE_DIR/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet vmr.workload=demo vmr.token=$INSTANCE" \
    -chardev socket,id=vda,path="$DEMO/vda.sock" -device vhost-user-blk-pci,chardev=vda \
    -chardev socket,id=net0,path="$DEMO/net0.sock" -netdev vhost-user,id=net0,chardev=net0 \
    -device virtio-net-pci,netdev=net0,vectors=0,mac=52:54:00:12:34:56 \
    -serial "file:$DEMO/serial.log" -monitor none </dev/null || true
grep -E '^VMR-' "$DEMO/serial.log" | tr -d '\r' >&2 || true
grep -q 'VMR-DONE ok=2 fail=0' "$DEMO/serial.log" || die "the guest workload did not finish cleanly (see $DEMO/serial.log)"

# Let the backends' sink threads flush, then stop them.
kill "${PIDS[0]}" "${PIDS[1]}"
wait "${PIDS[0]}" "${PIDS[1]}" 2>/dev/null || true

log "publishing the recording to Kafka"
"$BIN/examples/publish_capture" --bootstrap "$VMR_BOOTSTRAP_SERVERS" \
    --registry "$VMR_REGISTRY_URL" "$DEMO/vda.events" "$DEMO/net0.events"

log "decoding it with confluent-kafka's ProtobufDeserializer"
mkdir -p "$DEMO/pb2"
protoc -I "$VMR_ROOT/proto/proto" --python_out="$DEMO/pb2" vmr/v1/event.proto
for topic in vmr.block.v1 vmr.net.v1; do
    python3 "$VMR_ROOT/examples/analytics_consumer.py" --bootstrap "$VMR_BOOTSTRAP_SERVERS" \
        --registry "$VMR_REGISTRY_URL" --topic "$topic" --from-beginning \
        --pb2-dir "$DEMO/pb2" --timeout 10 >"$DEMO/$topic.jsonl"
    echo "$topic: $(wc -l <"$DEMO/$topic.jsonl") events decoded; first:" >&2
    head -c 400 "$DEMO/$topic.jsonl" >&2; echo >&2
done
log "demo complete; artifacts in $DEMO"
