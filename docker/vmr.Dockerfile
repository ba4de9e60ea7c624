# syntax=docker/dockerfile:1
# Build context: the repository root (docker build -f docker/vmr.Dockerfile .); the toolchain
# is the one the workspace is tested with.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config protobuf-compiler libcurl4-openssl-dev libssl-dev libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p vmr \
 && mkdir -p /out && cp target/release/vmr /out/

# The vmr command line, e.g. as a debugging pod with the chart's CLI ConfigMap
# mounted at /etc/vmreplay (VMR_CONFIG).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libcurl4 libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd -g 65532 vmreplay && useradd -u 65532 -g 65532 -M -s /usr/sbin/nologin vmreplay
COPY --from=build /out/vmr /usr/local/bin/
ENV VMR_CONFIG=/etc/vmreplay/vmreplay.toml
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/vmr"]
CMD ["--help"]
