# syntax=docker/dockerfile:1
# A Harness node for a GPU machine (fly.toml deploys it; README "Deploy to Fly.io").
#
# Two stages: the build stage installs libtorch with the project's own
# libtorch/install and builds the release binary; the run stage is a slim Debian
# holding the binary and only the libraries it loads (scripts/runtime-files lays
# them out; tests/deploy.rs runs `harness gpu-check` from exactly that set).
#
# Which torch build, and the NVIDIA driver each needs on the host:
#   (default)                                                    PyPI's torch 2.11.0+cu130, CUDA 13.0: driver >= 580
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   CUDA 12.8: driver >= 570
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126   CUDA 12.6: driver >= 560
# (`harness gpu-check` on the machine says whether the pairing works.)

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TORCH_INDEX_URL=""
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ENV HARNESS_LIBTORCH_CACHE=/opt/libtorch \
    HARNESS_TORCH_INDEX_URL=${TORCH_INDEX_URL} \
    HARNESS_SKIP_TOOLS=1
# libtorch first, in a layer of its own: it changes only with the pin.
COPY libtorch/install libtorch/install
RUN libtorch/install
COPY Cargo.toml Cargo.lock build.rs ./
COPY client client
COPY src src
COPY benches benches
COPY scripts/runtime-files scripts/runtime-files
RUN LIBTORCH="$(libtorch/install)" cargo build --release --locked --bin harness \
 && scripts/runtime-files target/release/harness /runtime

FROM debian:bookworm-slim AS run
# ca-certificates: the Hub over TLS from other tools in the image (the binary
# carries its own roots). libstdc++, libgcc_s and glibc are in the base image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group harness \
 && mkdir -p /data && chown harness:harness /data
COPY --from=build /runtime/ /
COPY scripts/docker-entrypoint /usr/local/bin/docker-entrypoint
ENV HARNESS_CACHE_DIR=/data/cache \
    HARNESS_HTTP_ADDR=[::]:8080 \
    HARNESS_CLUSTER_ADDR=[::]:9000 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME /data
EXPOSE 8080 9000
# The node drains on SIGTERM (at most 30 s, then 10 s to stop): give it 45 s
# (`docker stop -t 45`; fly.toml's kill_timeout).
STOPSIGNAL SIGTERM
# Liveness only: readiness waits for the first download (fly.toml's checks).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /health/live HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
# The entrypoint gives the volume to the harness user, then runs as that user.
ENTRYPOINT ["docker-entrypoint"]
CMD ["harness", "serve"]
