"""The operator console: static files (``static/``) served at ``/`` by :mod:`server.api.http_console`.

Plain ES modules, HTML and CSS with no build step: what is in ``static/`` is what the browser runs.
"""
