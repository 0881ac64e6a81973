# syntax=docker/dockerfile:1
#
# The sealcast binary in a distroless image: static, no shell, no package manager, runs as
# an unprivileged user. docs/OPERATIONS.md explains how to run it; docker-compose.yml runs
# it with Redis and a simulated fleet.
#
# It needs BuildKit (the RUN --mount cache lines): Docker 23 and later use it by default;
# with an older Docker, DOCKER_BUILDKIT=1 docker build ... .
#
#   docker build -t sealcast .
#   docker run --rm -p 127.0.0.1:1883:1883 -p 127.0.0.1:9883:9883 -v sealcast-data:/data sealcast
#
# In the container serve listens on every interface (SEALCAST_LISTEN, SEALCAST_HTTP below),
# so that published ports reach it; publish them on 127.0.0.1 as above unless other
# machines must reach the broker (then give it TLS: docs/OPERATIONS.md).
#
# Static on purpose: the only cgo candidate among the dependencies is DataDog/zstd, which
# cockroachdb/pebble (the embedded broker's session store) uses only in cgo builds; with
# CGO_ENABLED=0 pebble compresses with the pure-Go klauspost/compress zstd instead. Both
# read and write standard zstd blocks, and pebble's default compression is Snappy anyway,
# so a data directory moves freely between a cgo and a static build.

ARG GO_VERSION=1.26

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
# Modules first, so that editing the code does not re-download them.
COPY go.mod go.sum ./
# go.mod replaces mochi with the patched copy in third_party/mochi (docs/BROKER.md).
COPY third_party/mochi/go.mod third_party/mochi/go.sum ./third_party/mochi/
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/sealcast ./cmd/sealcast
# Mount points owned by the runtime user: a new named volume copies this ownership, so
# the server can write its data directory (and the simulator its state) without root.
RUN mkdir -p /out/data /out/sim && chmod 0700 /out/data /out/sim

# distroless/static: CA certificates (for rediss:// and ssl:// brokers), tzdata, and a
# passwd entry for "nonroot" (uid 65532); nothing else.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/sealcast /usr/local/bin/sealcast
COPY --from=build --chown=65532:65532 /out/data /data
COPY --from=build --chown=65532:65532 /out/sim /sim
USER 65532:65532
WORKDIR /data
VOLUME ["/data"]
# Inside the container every interface: the container's own network namespace is the
# boundary, and ports are published (or not) by whoever runs it.
ENV SEALCAST_LISTEN=0.0.0.0:1883 SEALCAST_TLS_LISTEN=0.0.0.0:8883 SEALCAST_HTTP=0.0.0.0:9883
# 1883 MQTT, 8883 MQTT over TLS (with -tls-cert and -tls-key), 9883 /metrics and /healthz.
EXPOSE 1883 8883 9883
# Asks serve's /healthz (the updater answers and the store is reachable). Only meaningful
# for the serve command on the default -http port; other commands are reported unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/sealcast", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/sealcast"]
CMD ["serve", "-data", "/data"]
