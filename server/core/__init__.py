"""The control plane: the execution lifecycle and its pure decisions, the outbox, TTLs, events, things and keys."""
