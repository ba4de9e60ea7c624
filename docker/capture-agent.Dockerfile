# syntax=docker/dockerfile:1
# Build context: the repository root (docker build -f docker/capture-agent.Dockerfile .); the toolchain
# is the one the workspace is tested with.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config protobuf-compiler libcurl4-openssl-dev libssl-dev libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p capture-agent -p vhost-tap \
 && mkdir -p /out && cp target/release/capture-agent target/release/vhost-tap-blk target/release/vhost-tap-net /out/

# The agent runs QEMU and the vhost-tap backends next to it
# (`capture-agent run --backend-dir` defaults to the executable's directory).
# It runs as root inside the container with only the capabilities the chart
# lists (NET_ADMIN, SYS_RESOURCE), because it opens /dev/kvm, /dev/net/tun and
# creates TAP devices.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-system-x86 iproute2 ca-certificates libcurl4 libssl3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/capture-agent /out/vhost-tap-blk /out/vhost-tap-net /usr/local/bin/
COPY config/capture-agent.example.toml /etc/vmreplay/capture-agent.toml
ENTRYPOINT ["/usr/local/bin/capture-agent"]
CMD ["--help"]
