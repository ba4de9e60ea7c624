#!/usr/bin/env bash
# Builds vhost-tap and the benchmark in release mode and runs the
# vhost-user-blk benchmark (about two minutes). Extra arguments go to
# vmr-bench-blk (see `vmr-bench-blk --help`), e.g. --rounds 1 --seconds 1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release -p vhost-tap -p vmr-bench --bins
exec "$CARGO_TARGET_DIR/release/vmr-bench-blk" "$@"
