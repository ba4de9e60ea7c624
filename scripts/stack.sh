#!/usr/bin/env bash
# The local vmreplay stack: a Tansu broker (Kafka protocol, sqlite storage) on
# 127.0.0.1, every vmr.* topic, the Schema Registry, and the registered event
# schemas.
#
#   scripts/stack.sh up       start (or reuse) the stack; prints its addresses
#   scripts/stack.sh down     stop it; data stays in the data directory
#   scripts/stack.sh status   show what runs
#   scripts/stack.sh env      print the addresses as shell exports
#
# Environment: VMR_STACK_DIR (data and logs, default .stack/ in the checkout),
# VMR_KAFKA_PORT (default 19092), VMR_REGISTRY_PORT (default 18081),
# VMR_EVENT_PARTITIONS (default 8), VMR_BIN_DIR (where the workspace binaries
# are, default target/debug).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STACK_DIR="${VMR_STACK_DIR:-$VMR_ROOT/.stack}"
KAFKA_PORT="${VMR_KAFKA_PORT:-19092}"
REGISTRY_PORT="${VMR_REGISTRY_PORT:-18081}"
PARTITIONS="${VMR_EVENT_PARTITIONS:-8}"
BIN_DIR="${VMR_BIN_DIR:-${CARGO_TARGET_DIR:-$VMR_ROOT/target}/debug}"
BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
REGISTRY_URL="http://127.0.0.1:$REGISTRY_PORT"

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_port() { # name port seconds
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
        sleep 0.1
    done
    die "$1 did not start listening on port $2 within $3 s (see $STACK_DIR/*.log)"
}

create_topic() { # name partitions config...
    local name=$1 parts=$2; shift 2
    local args=()
    for c in "$@"; do args+=(--config "$c"); done
    if "$VMR_TANSU" topic list --broker "tcp://$BOOTSTRAP" 2>/dev/null | grep -q "\"name\":\"$name\""; then
        return 0
    fi
    "$VMR_TANSU" topic create --broker "tcp://$BOOTSTRAP" --partitions "$parts" "${args[@]}" "$name" >/dev/null
    log "created topic $name ($parts partitions${*:+; $*})"
}

up() {
    [ -x "$VMR_TANSU" ] || die "Tansu not found at $VMR_TANSU; run scripts/setup.sh"
    [ -x "$BIN_DIR/schema-registry" ] || die "schema-registry not built in $BIN_DIR; run cargo build --workspace --bins"
    mkdir -p "$STACK_DIR/broker"
    if ! pid_alive "$STACK_DIR/broker.pid"; then
        log "starting the broker on $BOOTSTRAP (data in $STACK_DIR/broker)"
        (cd "$STACK_DIR/broker" && exec "$VMR_TANSU" broker \
            --listener-url "tcp://$BOOTSTRAP" \
            --advertised-listener-url "tcp://$BOOTSTRAP" \
            --storage-engine "sqlite://tansu.db") >"$STACK_DIR/broker.log" 2>&1 &
        echo $! >"$STACK_DIR/broker.pid"
        wait_port broker "$KAFKA_PORT" 30
    fi
    for t in vmr.block.v1 vmr.net.v1 vmr.env.v1 vmr.lifecycle.v1; do
        extra=()
        [ "$t" = vmr.block.v1 ] && extra=(max.message.bytes=8388608)
        create_topic "$t" "$PARTITIONS" cleanup.policy=delete "${extra[@]}"
    done
    create_topic vmr.snapshots.v1 "$PARTITIONS" cleanup.policy=compact
    create_topic _schemas 1 cleanup.policy=compact
    if ! pid_alive "$STACK_DIR/registry.pid"; then
        log "starting the schema registry on $REGISTRY_URL"
        "$BIN_DIR/schema-registry" serve --bootstrap-servers "$BOOTSTRAP" \
            --listen "127.0.0.1:$REGISTRY_PORT" >"$STACK_DIR/registry.log" 2>&1 &
        echo $! >"$STACK_DIR/registry.pid"
        wait_port registry "$REGISTRY_PORT" 60
    fi
    log "registering the event schemas"
    "$BIN_DIR/schema-registry" register --registry "$REGISTRY_URL" >&2
    env_exports
}

down() {
    for svc in registry broker; do
        if pid_alive "$STACK_DIR/$svc.pid"; then
            pid=$(cat "$STACK_DIR/$svc.pid")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            log "stopped $svc"
        fi
        rm -f "$STACK_DIR/$svc.pid"
    done
}

status() {
    for svc in broker registry; do
        if pid_alive "$STACK_DIR/$svc.pid"; then
            echo "$svc: running (pid $(cat "$STACK_DIR/$svc.pid"))"
        else
            echo "$svc: stopped"
        fi
    done
}

env_exports() {
    echo "export VMR_BOOTSTRAP_SERVERS=$BOOTSTRAP"
    echo "export VMR_REGISTRY_URL=$REGISTRY_URL"
    echo "export VMR_OBJECT_STORE_URL=file://$STACK_DIR/objects"
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
env) env_exports ;;
*) die "usage: $0 up|down|status|env" ;;
esac
