"""``python -m server``: the same as the ``fleetcmd`` console script."""

import sys

from server.cli.main import main

sys.exit(main())
