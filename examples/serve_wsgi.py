"""Serve a WSGI script on loopback with the standard library, one thread per request.

    /usr/bin/python3 serve_wsgi.py WSGI_FILE PORT [HOST]

WSGI_FILE is a Python file defining ``application`` (e.g. mapproxy_wsgi.py).
HOST defaults to 127.0.0.1. PORT 0 picks a free port. Once the socket is
bound, one line ``listening on http://HOST:PORT/`` goes to stdout, so a test
can read the real port and knows the server accepts connections; request logs
go to stderr. Runs until killed. For tests and demos, not for production.
"""

import runpy
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv):
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    app = runpy.run_path(argv[1])['application']
    host = argv[3] if len(argv) == 4 else '127.0.0.1'
    server = make_server(host, int(argv[2]), app, ThreadingWSGIServer, WSGIRequestHandler)
    print('listening on http://%s:%d/' % server.server_address[:2], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
