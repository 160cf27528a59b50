"""The operator surfaces: gRPC (``fleetcmd.v1``), REST, OpenAPI and metrics, all standing on ``server.core``."""
