"""The command-line interface: `fleetcmd serve`, the client commands and the admin commands."""
