# SPDX-License-Identifier: Apache-2.0
"""WSGI entry point for MapProxy talking to mapproxy-renderd over its Unix socket.

MapProxy 1.15 sends tile jobs to ``globals.renderd.address`` with the
``requests`` library, which speaks only TCP. Debian's python3-requests-unixsocket
adds the ``http+unix://`` scheme once its monkeypatch is in place, before
MapProxy is imported. Then, in mapproxy.yaml,

    globals:
      renderd:
        address: http+unix://%2Frun%2Fmapproxy-renderd.sock/

(the socket path percent-encoded, "/" as %2F) sends every job over the socket.
``http://`` addresses keep working, so the same script serves TCP setups too.
Seed with the daemon itself (``mapproxy-renderd seed NAME --wait``, seed_config in renderd.yaml),
which needs no second configuration; mapproxy-seed is a separate program
without this patch and needs a configuration with a TCP address.

The configuration path comes from the environment variable MAPPROXY_CONFIG,
default /etc/mapproxy/mapproxy.yaml. Under mod_wsgi, Apache's SetEnv does not
reach os.environ: edit the default below instead.

In production serve it with a real WSGI server: Apache with mod_wsgi
(libapache2-mod-wsgi-py3) or gunicorn; for a demo or a test
``/usr/bin/python3 examples/serve_wsgi.py examples/mapproxy_wsgi.py PORT``.
Needs: python3-mapproxy python3-requests python3-requests-unixsocket.
"""

import os

# MapProxy logs nothing below WARNING unless logging is configured, e.g. with
# MapProxy's log.ini (mapproxy-util create -t log-ini log.ini):
# from logging.config import fileConfig
# fileConfig('/etc/mapproxy/log.ini')

import requests_unixsocket

requests_unixsocket.monkeypatch()

from mapproxy.wsgiapp import make_wsgi_app  # noqa: E402  (after the monkeypatch)

application = make_wsgi_app(os.environ.get('MAPPROXY_CONFIG', '/etc/mapproxy/mapproxy.yaml'))
