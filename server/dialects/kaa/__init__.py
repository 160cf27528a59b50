"""The Kaa CEX dialect (KP1 command execution over MQTT and HTTP polling).

``topics`` (KP1 topics, decoders, the endpoint-token ACL), ``cex`` (command execution against the
core, the push route, the MQTT request handlers), ``http`` (KP1 polling) and ``bundle`` (the one
object that registers all of it: ``bundle.BUNDLE``).
"""
