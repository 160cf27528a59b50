"""Device dialects: how a family of firmware (EMQX commands, Kaa CEX) talks to the control plane.

Each dialect is one :class:`~server.dialects.bundle.DialectBundle` (its topic rules and decoders, ACL
grants, outbound route, lifecycle-action handlers, HTTP routes and store needs), and :data:`DIALECTS`
is the one list of them: the app builds the broker's rules and ACLs, the core's routes and handlers
and the HTTP routes by iterating it, and names no dialect. Adding a dialect means adding a bundle
and registering it here. Order matters twice: inbound rules are tried in list order (EMQX first,
the report hot path), and a thing's route is the first claiming dialect's, else the default one.
``broker_hooks`` holds only generic machinery and never imports ``server``.
"""

from server.dialects import emqx
from server.dialects.bundle import DialectBundle
from server.dialects.kaa import bundle as kaa

DIALECTS: tuple[DialectBundle, ...] = (emqx.BUNDLE, kaa.BUNDLE)
