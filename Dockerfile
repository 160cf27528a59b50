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

# Standard gRPC health checking (grpc.health.v1): exit 0 when SERVING, 1 otherwise or when unreachable.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; ch = grpc.insecure_channel('127.0.0.1:' + os.environ.get('FLEETCMD_GRPC_PORT', '50051')); r = hg.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

ENTRYPOINT ["fleetcmd"]
CMD ["serve"]
