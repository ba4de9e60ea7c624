#!/usr/bin/env bash
# Installs everything vmreplay needs on a fresh Debian 12 machine, idempotently:
# system packages, the Rust toolchain's components, the Tansu broker (built once
# and cached under ~/.cache/vmreplay), Python packages for the analytics example,
# and the guest images. A second run takes seconds.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

APT_PACKAGES=(
    build-essential cmake pkg-config protobuf-compiler libcurl4-openssl-dev
    # librdkafka is built with OpenSSL (Kafka TLS, SASL SCRAM); openssl makes test certificates.
    libssl-dev openssl
    qemu-system-x86 qemu-utils acpica-tools gdb
    busybox-static cpio iproute2 jq curl strace time python3
    # The fonts `vmr timeline` renders its PNG labels with.
    fonts-dejavu-core
    chromium chromium-driver
    # bindgen (userfaultfd-sys, for vhost-tap's postcopy support) loads libclang.
    libclang-dev
)

missing_packages() {
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
}
# Twice at most: installing one package can remove another that conflicts
# with it (a backported qemu-utils goes when Debian's qemu-system-x86 comes),
# which the second pass puts back in the matching version.
missing_packages
for pass in 1 2; do
    [ ${#missing[@]} -gt 0 ] || break
    log "installing system packages: ${missing[*]}"
    [ "$pass" = 2 ] || as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    missing_packages
done
[ ${#missing[@]} -eq 0 ] || die "system packages still missing after installing them: ${missing[*]}"

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs)"
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt

if [ ! -x "$VMR_TANSU" ]; then
    log "building the Tansu $TANSU_VERSION broker (once; about 15 minutes on 2 cores)"
    mkdir -p "$TANSU_DIR"
    cargo install tansu --version "$TANSU_VERSION" --features libsql --locked --root "$TANSU_DIR"
fi
log "broker: $("$VMR_TANSU" --version 2>/dev/null || echo "$VMR_TANSU")"
"$VMR_ROOT/scripts/s3-server.sh" >&2  # s3s-fs, the S3-compatible server of the snapshot tests

PIP_PACKAGES=("confluent-kafka[protobuf,schemaregistry]==2.16.1")
if ! python3 -c 'import confluent_kafka.schema_registry.protobuf, google.protobuf' 2>/dev/null; then
    log "installing Python packages for the analytics example"
    python3 -m pip install -q "${PIP_PACKAGES[@]}"
fi
python3 -c 'import selenium' 2>/dev/null || python3 -m pip install -q "selenium==4.51.0"  # the web console's browser test
python3 -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null || python3 -m pip install -q -r "$VMR_ROOT/helm/tests/requirements.txt"  # the Helm chart test

if [ -x "$VMR_ROOT/guest/linux/build.sh" ]; then
    log "building the Linux guest image (cached)"
    "$VMR_ROOT/guest/linux/build.sh" >&2
fi
if [ -f "$VMR_ROOT/guest/test-guest/Makefile" ]; then
    log "building the freestanding test guest"
    make -s -C "$VMR_ROOT/guest/test-guest" >&2
fi
log "setup complete"
