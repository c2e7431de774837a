# SPDX-License-Identifier: Apache-2.0
"""Serve a WSGI script on loopback with the standard library: a fixed pool of threads.

    /usr/bin/python3 serve_wsgi.py WSGI_FILE PORT [HOST]

WSGI_FILE is a Python file defining ``application`` (e.g. mapproxy_wsgi.py).
HOST defaults to 127.0.0.1. PORT 0 picks a free port. Once the socket is
bound, one line ``listening on http://HOST:PORT/`` goes to stdout, so a test
can read the real port and knows the server accepts connections; request logs
go to stderr. Runs until killed.

Connections are handled by SERVE_WSGI_THREADS (default 16) long-lived
threads; more wait in the listen backlog (128 connections), so a burst of
tile requests queues instead of losing SYNs. A thread per request (the
standard library's ThreadingMixIn) would cost MapProxy a cold start on every
request (a new thread gets a new malloc arena and empty thread-local state:
about 28 ms more per cold metatile) and a backlog of 5 drops SYNs under a
burst (1 s retransmit), which skews any measurement.

For tests, demos and benchmarks. In production serve MapProxy with a real
WSGI server: Apache with mod_wsgi (Debian: libapache2-mod-wsgi-py3) or
gunicorn (Debian: gunicorn), e.g.
``gunicorn --workers 4 --threads 8 --bind 127.0.0.1:8080 --chdir /etc/mapproxy mapproxy_wsgi:application``.
"""

import os
import queue
import runpy
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class PooledWSGIServer(WSGIServer):
    """A WSGIServer whose connections are handled by a fixed pool of threads."""

    allow_reuse_address = True
    request_queue_size = 128  # listen(2) backlog
    threads = 16

    def server_activate(self):
        super().server_activate()
        self._connections = queue.Queue()
        for i in range(self.threads):
            t = threading.Thread(target=self._work, name='wsgi-%d' % i, daemon=True)
            t.start()

    def process_request(self, request, client_address):
        # Called by serve_forever's thread: hand the connection to the pool.
        self._connections.put((request, client_address))

    def _work(self):
        while True:
            request, client_address = self._connections.get()
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)


def main(argv):
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    threads = int(os.environ.get('SERVE_WSGI_THREADS', '16'))
    if threads < 1:
        print('serve_wsgi: SERVE_WSGI_THREADS must be at least 1', file=sys.stderr)
        return 2
    PooledWSGIServer.threads = threads
    # As "python3 WSGI_FILE", mod_wsgi's python-path= or gunicorn --chdir: modules next to
    # the script (mapproxy_renderd.py from install-module DIR) can be imported.
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[1])))
    app = runpy.run_path(argv[1])['application']
    host = argv[3] if len(argv) == 4 else '127.0.0.1'
    server = make_server(host, int(argv[2]), app, PooledWSGIServer, WSGIRequestHandler)
    print('listening on http://%s:%d/' % server.server_address[:2], flush=True)
    print('serve_wsgi: %d threads, listen backlog %d' % (threads, server.request_queue_size),
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
