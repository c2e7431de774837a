# SPDX-License-Identifier: Apache-2.0
"""Tests of mapproxy_renderd.ViewReporter (batching and bounds); run by TestModuleViewsPython.

python3 python/views_test.py [-v]  (MapProxy 1.15 must be importable: the module checks it.)
"""

import os
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mapproxy_renderd  # noqa: E402

# Polls below are bounded by this deadline; nothing asserts how long anything took.
DEADLINE = 30.0


def wait_until(cond, what):
    end = time.monotonic() + DEADLINE
    while not cond():
        if time.monotonic() > end:
            raise AssertionError('timed out waiting for ' + what)
        time.sleep(0.005)


class Recorder(object):
    """A send function that records what the reporter sent, from which thread, and when."""

    def __init__(self, fail=False):
        self.calls = []
        self.lock = threading.Lock()
        self.fail = fail

    def __call__(self, address, message):
        with self.lock:
            self.calls.append((time.monotonic(), threading.current_thread(), address, message))
        if self.fail:
            raise OSError('connection refused')

    def tiles(self):
        with self.lock:
            return sum(len(m['tiles']) for _, _, _, m in self.calls)


class ViewReporterTest(unittest.TestCase):

    def test_batches_of_at_most_256_from_the_reporter_thread(self):
        rec = Recorder()
        rep = mapproxy_renderd.ViewReporter(send=rec)
        rep.add('http://a/', 'osm_EPSG3857', [(x, 1, 10) for x in range(1000)])
        rep.add('http://a/', 'other_EPSG3857', [(1, 2, 3)])
        wait_until(lambda: rec.tiles() == 1001, 'all tiles sent')
        sizes = sorted(len(m['tiles']) for _, _, _, m in rec.calls)
        self.assertEqual(sizes, [1, 232, 256, 256, 256])
        for _, thread, address, m in rec.calls:
            self.assertIsNot(thread, threading.current_thread(), 'add() sent on the caller\'s thread')
            self.assertEqual(address, 'http://a/')
            self.assertEqual(m['command'], 'views')
        sent = [m['tiles'] for _, _, _, m in rec.calls if m['cache_identifier'] == 'osm_EPSG3857']
        self.assertEqual([t for batch in sent for t in batch], [[x, 1, 10] for x in range(1000)])
        self.assertEqual((rep.sent, rep.dropped), (1001, 0))

    def test_small_batches_at_most_every_interval(self):
        rec = Recorder()
        rep = mapproxy_renderd.ViewReporter(send=rec, every=0.1)
        for i in range(6):
            rep.add('http://a/', 'c', [(i, 0, 5)])
            wait_until(lambda: rec.tiles() == i + 1, 'tile %d sent' % i)
        times = [t for t, _, _, _ in rec.calls]
        gaps = [b - a for a, b in zip(times, times[1:])]
        # The thread waits a whole interval for a batch that is not full: never sooner.
        self.assertTrue(all(g >= 0.1 - 0.005 for g in gaps), gaps)

    def test_buffer_is_bounded(self):
        rec = Recorder()
        # The thread never sends: the batch never fills and the interval is an hour.
        rep = mapproxy_renderd.ViewReporter(send=rec, every=3600, batch=10 ** 9, buffer=4096)
        rep.add('http://a/', 'c', [(x, 0, 12) for x in range(3000)])
        rep.add('http://a/', 'd', [(x, 0, 12) for x in range(2000)])
        rep.add('http://a/', 'c', [(1, 1, 1)])
        self.assertEqual(rep._n, 4096)
        self.assertEqual(rep.dropped, 5001 - 4096)
        self.assertEqual(rec.calls, [])

    def test_daemon_down_costs_nothing(self):
        # A real send to a socket nobody listens on.
        sock = os.path.join(tempfile.mkdtemp(), 'none.sock')
        address = 'http+unix://%s/' % sock.replace('/', '%2F')
        rep = mapproxy_renderd.ViewReporter(retry=3600)
        rep.add(address, 'c', [(1, 2, 3), (4, 5, 6)])
        wait_until(lambda: rep.dropped == 2, 'the failed batch counted')
        rep.add(address, 'c', [(7, 8, 9)])
        self.assertEqual((rep.dropped, rep._n, rep.sent), (3, 0, 0))

    def test_hook_reports_served_tiles_of_renderd_caches(self):
        # A real MapProxy configuration: one cache through renderd, one without.
        d = tempfile.mkdtemp()
        conf = os.path.join(d, 'mapproxy.yaml')
        with open(conf, 'w') as f:
            f.write('''globals:
  cache: {base_dir: %(d)s/cache}
  renderd: {address: "http://127.0.0.1:9/"}
services: {tms: {}}
layers:
  - {name: r, title: r, sources: [rc]}
  - {name: n, title: n, sources: [nc]}
caches:
  rc: {grids: [GLOBAL_WEBMERCATOR], sources: [], format: image/png}
  nc: {grids: [GLOBAL_WEBMERCATOR], sources: [], format: image/png, disable_storage: true}
''' % {'d': d})
        from mapproxy.config.loader import load_configuration
        rec = Recorder()
        rep = mapproxy_renderd.ViewReporter(send=rec, every=0.01)
        mapproxy_renderd.enable_views(rep)
        try:
            cfg = load_configuration(conf)
            caches = cfg.caches
            rc = caches['rc'].caches()[0][2]
            nc = caches['nc'].caches()[0][2]
            # Tiles that exist in rc's cache are served without a render: a hit.
            for x in (0, 1):
                path = rc.cache.tile_location(mapproxy_renderd.Tile((x, 0, 1)), create_dir=True)
                with open(path, 'wb') as f:
                    f.write(b'\x89PNG\r\n\x1a\n')
            rc.load_tile_coords([(0, 0, 1), (1, 0, 1)])
            nc.load_tile_coords([(0, 0, 1)])
            wait_until(lambda: rec.tiles() == 2, 'the two hits reported')
            _, _, address, m = rec.calls[0]
            self.assertEqual(address, 'http://127.0.0.1:9/')
            self.assertEqual(m['cache_identifier'], rc.identifier)
            self.assertEqual(sorted(m['tiles']), [[0, 0, 1], [1, 0, 1]])
        finally:
            mapproxy_renderd.disable_views()


if __name__ == '__main__':
    unittest.main()
