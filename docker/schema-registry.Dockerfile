# syntax=docker/dockerfile:1
# Build context: the repository root (docker build -f docker/schema-registry.Dockerfile .); the toolchain
# is the one the workspace is tested with.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config protobuf-compiler libcurl4-openssl-dev libssl-dev libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p schema-registry \
 && mkdir -p /out && cp target/release/schema-registry /out/

# The registry keeps its state in the _schemas topic and needs no privilege.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libcurl4 libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd -g 65532 vmreplay && useradd -u 65532 -g 65532 -M -s /usr/sbin/nologin vmreplay
COPY --from=build /out/schema-registry /usr/local/bin/
COPY schema-registry/registry.example.toml /etc/vmreplay/registry.toml
USER 65532:65532
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/schema-registry"]
CMD ["serve", "--config", "/etc/vmreplay/registry.toml"]
