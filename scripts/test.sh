#!/usr/bin/env bash
# Runs vmreplay's whole test suite: installs prerequisites (scripts/setup.sh),
# builds every binary, then runs every test, including those that start real
# brokers, registries, QEMU and KVM guests, one at a time (the machine has few
# cores and the heavy tests are timing-sensitive). A test binary that runs
# past its bound fails with its threads' backtraces (scripts/test-runner.sh).
#
#   scripts/test.sh            everything
#   scripts/test.sh --unit     library unit tests only (no setup, nothing started)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$VMR_ROOT"

if [ "${1:-}" = "--unit" ]; then
    exec cargo test --workspace --lib
fi

"$VMR_ROOT/scripts/setup.sh"

log "building the workspace"
cargo build --workspace --bins --all-targets

log "tests (unit, broker, registry, QEMU, KVM)"
export VMR_BIN_DIR="${CARGO_TARGET_DIR:-$VMR_ROOT/target}/debug"
# Every test binary runs with a bound (scripts/test-runner.sh).
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$VMR_ROOT/scripts/test-runner.sh"
cargo test --workspace --no-fail-fast -- --test-threads=1

log "all tests passed"
