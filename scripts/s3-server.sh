#!/usr/bin/env bash
# Installs the S3-compatible server the snapshot tests run against: s3s-fs
# from crates.io (an S3 API over a local directory), built once and cached
# under ~/.cache/vmreplay/s3s-fs-<version>/bin/s3s-fs. A second run returns at
# once. Prints the binary's path on stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# 0.14.1 is the newest release that builds with rustc 1.95 (0.16 and later
# need rustc 1.96).
S3S_FS_VERSION="${S3S_FS_VERSION:-0.14.1}"
S3S_FS_DIR="$VMR_CACHE/s3s-fs-$S3S_FS_VERSION"
S3S_FS_BIN="$S3S_FS_DIR/bin/s3s-fs"

if [ ! -x "$S3S_FS_BIN" ]; then
    log "building the s3s-fs $S3S_FS_VERSION S3 server (once; a few minutes on 2 cores)"
    mkdir -p "$S3S_FS_DIR"
    cargo install s3s-fs --version "$S3S_FS_VERSION" --features binary --locked --root "$S3S_FS_DIR"
fi
log "S3 server: $S3S_FS_BIN"
echo "$S3S_FS_BIN"
