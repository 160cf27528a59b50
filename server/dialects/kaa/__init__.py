"""The Kaa CEX dialect (KP1 command execution over MQTT and HTTP polling)."""
