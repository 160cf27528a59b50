"""Generated gRPC and protobuf modules for fleetcmd.v1 (see scripts/genproto.py)."""
