# fleetcmd: embedded MQTT broker + gRPC API + SQLite store, in one process.
#
#   docker build -t fleetcmd .
#   docker run -p 1883:1883 -p 50051:50051 -p 8080:8080 -v fleetcmd-data:/data fleetcmd
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user that owns the data volume; created before VOLUME so the ownership sticks.
RUN groupadd --system --gid 10001 fleetcmd \
 && useradd --system --uid 10001 --gid fleetcmd --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin fleetcmd \
 && mkdir -p /data \
 && chown fleetcmd:fleetcmd /data

# Only what the package needs (see .dockerignore); the dependencies are pinned in pyproject.toml.
COPY pyproject.toml README.md /tmp/fleetcmd/
COPY server /tmp/fleetcmd/server
COPY broker_hooks /tmp/fleetcmd/broker_hooks
RUN pip install --no-cache-dir /tmp/fleetcmd \
 && rm -rf /tmp/fleetcmd

ENV FLEETCMD_BIND=0.0.0.0 \
    FLEETCMD_MQTT_PORT=1883 \
    FLEETCMD_GRPC_PORT=50051 \
    FLEETCMD_HTTP_PORT=8080 \
    FLEETCMD_DATA_DIR=/data \
    FLEETCMD_LOG_LEVEL=INFO

VOLUME ["/data"]
WORKDIR /data
USER 10001:10001

# 1883 MQTT over TCP, 50051 gRPC, 8080 HTTP (Kaa polling, REST API, OpenAPI).
EXPOSE 1883 50051 8080

# GET /readyz (store writable, broker listening, gRPC serving) with bash's /dev/tcp: the slim image has
# no curl or wget, and a probe should not start a Python interpreter every 15 s. Exit 0 on HTTP 200,
# 1 otherwise or when unreachable (Docker reserves 2). Needs the plaintext HTTP listener: with
# FLEETCMD_HTTP_TLS or FLEETCMD_HTTP_PORT=-1, override the health check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "{ exec 3<>\"/dev/tcp/127.0.0.1/${FLEETCMD_HTTP_PORT:-8080}\" && printf 'GET /readyz HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n' >&3 && read -r -t 4 _ code _ <&3 && [ \"$code\" = 200 ]; } 2>/dev/null || exit 1"]

ENTRYPOINT ["fleetcmd"]
CMD ["serve"]
