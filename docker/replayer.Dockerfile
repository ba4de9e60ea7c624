# syntax=docker/dockerfile:1
# Build context: the repository root (docker build -f docker/replayer.Dockerfile .); the toolchain
# is the one the workspace is tested with.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config protobuf-compiler libcurl4-openssl-dev libssl-dev libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p replayer -p vhost-tap \
 && mkdir -p /out && cp target/release/replayer target/release/vhost-tap-blk target/release/vhost-tap-net /out/

# The replayer boots clones (KVM) and starts vhost-tap-blk and vhost-tap-net
# from its own directory, each clone in its own network namespace (iproute2's
# `ip netns`). Snapshots of the qemu driver are restored by QEMU
# (qemu-system-x86_64 on PATH), those of the microvm driver in-process. It
# needs /dev/kvm, /dev/net/tun, NET_ADMIN and SYS_ADMIN (network namespaces),
# so it runs as root in the container with the capabilities the chart lists.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-system-x86 iproute2 ca-certificates libcurl4 libssl3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/replayer /out/vhost-tap-blk /out/vhost-tap-net /usr/local/bin/
EXPOSE 7300 7301
# gRPC on --listen (or the config's `listen`), metrics on `metrics_listen`.
ENTRYPOINT ["/usr/local/bin/replayer"]
CMD ["--config", "/etc/vmreplay/replayer.toml"]
