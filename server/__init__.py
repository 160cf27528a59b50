"""fleetcmd control plane: lifecycle, store, gRPC surface, CLI and settings."""

__version__ = "0.1.0"
