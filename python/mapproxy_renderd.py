# SPDX-License-Identifier: Apache-2.0
"""MapProxy 1.15 side of mapproxy-renderd: faster answers for live maps.

Enable it with one line in MapProxy's WSGI script, before make_wsgi_app:

    import mapproxy_renderd; mapproxy_renderd.enable()
    from mapproxy.wsgiapp import make_wsgi_app
    application = make_wsgi_app('/etc/mapproxy/mapproxy.yaml')

``mapproxy-renderd install-module`` writes this file into /usr/bin/python3's
site directory, on sys.path of every WSGI server running that python;
``install-module DIR`` into DIR, which the WSGI server must then have on
sys.path (mod_wsgi: python-path=DIR, gunicorn: --chdir DIR). What changes, for caches that
render through ``globals.renderd.address`` (every cache but those with
``disable_storage``):

* Live requests (priority 100) send ``wait_ms``. When the daemon answers
  ``pending`` (the render takes longer), the user gets a waiting image (a
  bundled "rendering..." tile, or ``waiting_image``) with
  ``Cache-Control: max-age=waiting_max_age`` (5 s); it is never stored and the
  render goes on, so a request a few seconds later gets the real tile. Without
  the module MapProxy waits for the render, however long it takes. Every
  request of a burst for one metatile (a map view asks for all its tiles at
  once, from one MapProxy process or several) gets its answer within its own
  wait_ms: MapProxy's per-metatile tile lock is tried, not waited for, so one
  request asks the daemon while the others watch the cache; the metatile is
  still rendered once.
* A tile that is in the cache but stale (the cache's ``refresh_before``) is
  served at once, with ``max-age=stale_max_age``, and the daemon is asked for
  a background re-render (``"background": true, "refresh": true``; repeated
  asks for one metatile within ``refresh_every`` seconds are not sent).
  Without the module MapProxy waits for the re-render. If the daemon cannot be
  reached, the stale tile is still served.
* ``http+unix://%2Frun%2Fmapproxy-renderd.sock/`` addresses work without
  requests_unixsocket; ``http://host:port/`` addresses too. MapProxy itself
  still needs python3-requests to load a renderd configuration.
* mapproxy-seed (priority 10) is unchanged: it waits for every render.
* enable_views() (a separate call) reports the tiles MapProxy served, hits
  and renders, to the daemon from a background thread (ViewReporter), for
  ``prefetch: {area: views}``. A request never waits for it.

The max-age applies to MapProxy's tile services (WMTS, TMS, KML), where one
request is one tile. A WMS GetMap that contains a waiting tile is sent with
``Cache-Control: no-cache, no-store``.

At import the module checks that MapProxy's classes look like 1.15's and
raises ImportError naming the difference otherwise. It never changes
MapProxy's files: enable() replaces attributes in memory, in the process that
calls it, as requests_unixsocket.monkeypatch() does.
"""

import functools
import hashlib
import http.client
import inspect
import json
import logging
import os
import socket
import threading
import time
import urllib.parse

log = logging.getLogger('mapproxy_renderd')

EXPECTED_MAPPROXY = '1.15'


def _check_mapproxy():
    """Return the list of ways this MapProxy differs from what the module replaces."""
    problems = []
    try:
        from mapproxy.cache import renderd
        from mapproxy.cache import tile
        from mapproxy import response, wsgiapp
        from mapproxy.image import ImageSource  # noqa: F401
        from mapproxy.source import SourceError  # noqa: F401
        from mapproxy.util import lock
    except ImportError as e:
        return ['cannot import a MapProxy module: %s' % e]

    def params(func):
        return list(inspect.signature(func).parameters)

    cls = getattr(renderd, 'RenderdTileCreator', None)
    if cls is None:
        problems.append('mapproxy.cache.renderd.RenderdTileCreator is missing')
    else:
        want = ['self', 'renderd_address', 'tile_mgr', 'dimensions', 'priority', 'tile_locker']
        if params(cls.__init__) != want:
            problems.append('RenderdTileCreator.__init__ takes %s, want %s' % (params(cls.__init__), want))
        for name in ('_create_single_tile', '_create_meta_tile', '_send_tile_request', 'is_cached'):
            if not callable(getattr(cls, name, None)):
                problems.append('RenderdTileCreator.%s is missing' % name)
    want = ['self', 'tile_mgr', 'dimensions', 'image_merger', 'bulk_meta_tiles']
    if params(tile.TileCreator.__init__) != want:
        problems.append('TileCreator.__init__ takes %s, want %s' % (params(tile.TileCreator.__init__), want))
    want = ['self', 'lock_file', 'timeout']
    if params(lock.FileLock.__init__)[:3] != want or not hasattr(lock, 'LockTimeout'):
        problems.append('FileLock.__init__ takes %s, want %s first' % (params(lock.FileLock.__init__), want))
    if not hasattr(tile, 'Tile'):
        problems.append('mapproxy.cache.tile.Tile is missing')
    want = ['self', 'timestamp', 'etag_data', 'max_age', 'no_cache']
    if params(response.Response.cache_headers) != want:
        problems.append('Response.cache_headers takes %s, want %s' % (params(response.Response.cache_headers), want))
    if not callable(getattr(wsgiapp.MapProxyApp, '__call__', None)):
        problems.append('mapproxy.wsgiapp.MapProxyApp is not callable')
    return problems


_problems = _check_mapproxy()
if _problems:
    try:
        from mapproxy.version import version as _mp_version
    except Exception:
        _mp_version = 'unknown'
    raise ImportError(
        'mapproxy_renderd: MapProxy %s does not look like MapProxy %s, which this module was '
        'written for: %s. Nothing was changed; remove "mapproxy_renderd.enable()" from the WSGI '
        'script or install a mapproxy_renderd.py that matches this MapProxy.'
        % (_mp_version, EXPECTED_MAPPROXY, '; '.join(_problems)))

from mapproxy import response as _response  # noqa: E402
from mapproxy import wsgiapp as _wsgiapp  # noqa: E402
from mapproxy.cache import renderd as _renderd  # noqa: E402
from mapproxy.cache.tile import Tile  # noqa: E402
from mapproxy.client.log import log_request  # noqa: E402
from mapproxy.image import ImageSource  # noqa: E402
from mapproxy.image.opts import ImageOptions  # noqa: E402
from mapproxy.source import SourceError  # noqa: E402
from mapproxy.util.lock import FileLock, LockTimeout  # noqa: E402

# How often a request that found its metatile's lock taken looks at the cache (and the lock).
_LOCK_POLL = 0.02

# The settings enable() was called with.
_settings = {}
# Per request thread: the max-age this response may have at most (set by the tile creator,
# applied by Response.cache_headers, reset when MapProxy's app starts a request).
_local = threading.local()
_original = {}


def enable(wait_ms=1000, waiting_max_age=5, stale_max_age=5, waiting_image=None,
           refresh_every=30.0, live_priority_from=50):
    """Make MapProxy's renderd client use mapproxy-renderd's live helpers.

    wait_ms: how long a live request waits for a render before the waiting
    image is served. waiting_max_age, stale_max_age: Cache-Control max-age
    (seconds) of the waiting image and of a stale tile. waiting_image: a PNG
    file of the tile size to serve while waiting (default: a generated grey
    "rendering..." tile). refresh_every: seconds in which one metatile is
    asked for a background refresh at most once per process.
    live_priority_from: requests with a priority below this (mapproxy-seed's
    10) wait for the render as before. Call it before make_wsgi_app; calling
    it again changes the settings.
    """
    if not isinstance(wait_ms, int) or wait_ms < 0:
        raise ValueError('mapproxy_renderd.enable: wait_ms must be a non-negative integer')
    for name, v in (('waiting_max_age', waiting_max_age), ('stale_max_age', stale_max_age)):
        if not isinstance(v, int) or v < 0:
            raise ValueError('mapproxy_renderd.enable: %s must be a non-negative integer' % name)
    _settings.update(wait_ms=wait_ms, waiting_max_age=waiting_max_age, stale_max_age=stale_max_age,
                     waiting_image=waiting_image, refresh_every=float(refresh_every),
                     live_priority_from=live_priority_from)
    if _original:
        return
    _original['creator'] = _renderd.RenderdTileCreator
    _original['cache_headers'] = _response.Response.cache_headers
    _original['app_call'] = _wsgiapp.MapProxyApp.__call__
    # The loader imports RenderdTileCreator from this module when it builds the caches.
    _renderd.RenderdTileCreator = LiveRenderdTileCreator
    _response.Response.cache_headers = _cache_headers
    _wsgiapp.MapProxyApp.__call__ = _app_call


def disable():
    """Undo enable() (for tests): configurations loaded afterwards use MapProxy's own client."""
    if not _original:
        return
    _renderd.RenderdTileCreator = _original.pop('creator')
    _response.Response.cache_headers = _original.pop('cache_headers')
    _wsgiapp.MapProxyApp.__call__ = _original.pop('app_call')


def _app_call(self, environ, start_response):
    _local.max_age = None
    try:
        return _original['app_call'](self, environ, start_response)
    finally:
        _local.max_age = None


def _cache_headers(self, timestamp=None, etag_data=None, max_age=None, no_cache=False):
    limit = getattr(_local, 'max_age', None)
    if limit is not None and not no_cache:
        if max_age is None or max_age > limit:
            max_age = limit
        if not timestamp and not etag_data:
            etag_data = ('mapproxy-renderd', time.time())
    return _original['cache_headers'](self, timestamp, etag_data, max_age, no_cache)


def _limit_max_age(seconds):
    cur = getattr(_local, 'max_age', None)
    _local.max_age = seconds if cur is None else min(cur, seconds)


class _Pending(Exception):
    """The daemon answered pending: the render goes on without us."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=None):
        http.client.HTTPConnection.__init__(self, 'localhost', timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.timeout is not None:
                sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _connection(address):
    """Return (connection, request path) for a renderd address."""
    if address.startswith('http+unix://'):
        rest = address[len('http+unix://'):]
        host, _, path = rest.partition('/')
        return _UnixHTTPConnection(urllib.parse.unquote(host)), '/' + path
    u = urllib.parse.urlsplit(address)
    if u.scheme != 'http' or not u.hostname:
        raise SourceError('Error while communicating with renderd: unsupported address %r '
                          '(want http://host:port/ or http+unix://%%2Fpath%%2Fto.sock/)' % address)
    path = u.path or '/'
    if u.query:
        path += '?' + u.query
    return http.client.HTTPConnection(u.hostname, u.port or 80), path


def post(address, message):
    """POST one request to the daemon and return its JSON reply (a dict)."""
    conn, path = _connection(address)
    try:
        conn.request('POST', path, body=json.dumps(message).encode('ascii'),
                      headers={'Content-Type': 'application/json'})
        resp = conn.getresponse()
        body = resp.read()
    except OSError as e:
        raise SourceError('Error while communicating with renderd: %s' % e)
    except http.client.HTTPException as e:
        raise SourceError('Error while communicating with renderd: %s: %s' % (type(e).__name__, e))
    finally:
        conn.close()
    try:
        result = json.loads(body.decode('utf-8'))
    except ValueError:
        raise SourceError('Error while communicating with renderd: invalid JSON')
    if not isinstance(result, dict) or 'status' not in result:
        raise SourceError('Error while communicating with renderd: reply without a status')
    return result


_waiting_cache = {}
_waiting_lock = threading.Lock()


def waiting_image(size):
    """The waiting tile of the given size, as a non-cacheable ImageSource."""
    path = _settings.get('waiting_image')
    with _waiting_lock:
        img = _waiting_cache.get((path, size))
        if img is None:
            img = _load_waiting(path, size)
            _waiting_cache[(path, size)] = img
    return ImageSource(img.copy(), size=size, cacheable=False,
                       image_opts=ImageOptions(format='image/png', transparent=True))


def _load_waiting(path, size):
    from PIL import Image, ImageDraw
    if path:
        img = Image.open(path)
        img.load()
        if img.size != tuple(size):
            img = img.resize(tuple(size))
        return img.convert('RGBA')
    img = Image.new('RGBA', tuple(size), (235, 235, 235, 160))
    draw = ImageDraw.Draw(img)
    text = 'rendering...'
    left, top, right, bottom = draw.textbbox((0, 0), text)
    draw.text(((size[0] - (right - left)) // 2, (size[1] - (bottom - top)) // 2), text, fill=(90, 90, 90, 255))
    return img


_refreshed = {}
_refreshed_lock = threading.Lock()


def _should_refresh(key):
    """Whether to ask for a refresh of key now (at most once per refresh_every)."""
    now = time.monotonic()
    every = _settings.get('refresh_every', 30.0)
    with _refreshed_lock:
        last = _refreshed.get(key)
        if last is not None and now - last < every:
            return False
        if len(_refreshed) > 10000:
            for k in [k for k, t in _refreshed.items() if now - t >= every]:
                del _refreshed[k]
        _refreshed[key] = now
        return True


class LiveRenderdTileCreator(_renderd.RenderdTileCreator):
    """RenderdTileCreator with wait_ms, a waiting image and stale-while-refresh."""

    def _live(self):
        return self.priority >= _settings.get('live_priority_from', 50)

    def _create_single_tile(self, tile):
        if not self._live():
            return _original['creator']._create_single_tile(self, tile)
        return self._create_live([tile], tile)

    def _create_meta_tile(self, meta_tile):
        if not self._live():
            return _original['creator']._create_meta_tile(self, meta_tile)
        tiles = [Tile(coord) for coord in meta_tile.tiles]
        return self._create_live(tiles, Tile(meta_tile.main_tile_coord))

    def _create_live(self, tiles, main_tile):
        present = [t for t in tiles if t.coord is not None]
        if present and all(self.cache.is_cached(t) for t in present):
            # Every tile exists; some are stale (MapProxy asked): serve them now, refresh later.
            self._ask_refresh(main_tile.coord)
            self.cache.load_tiles(tiles)
            _limit_max_age(_settings['stale_max_age'])
            return tiles
        # MapProxy's tile lock (one per metatile, a file lock shared by every process on this
        # cache) still makes sure that one request at a time asks for the render and that
        # nobody asks for a metatile that was rendered meanwhile. But it is only tried, never
        # waited for: the holder is asking the daemon for this very metatile, so its render is
        # in flight, and queueing behind the holder would make each request of a burst wait
        # its own wait_ms in turn (the 16 tiles of a 4x4 metatile: 1, 2, ... 16 s). A request
        # that finds the lock taken watches the cache until its own wait_ms is up instead, and
        # takes the lock (asking the daemon with what is left of its wait_ms) once it is free.
        deadline = time.monotonic() + _settings['wait_ms'] / 1000.0
        while True:
            lock = self._try_lock(main_tile)
            if lock is not None:
                try:
                    if not all(self.is_cached(t) for t in present):
                        left = max(0, int((deadline - time.monotonic()) * 1000))
                        self._create_renderd_tile(main_tile.coord, wait_ms=left)
                except _Pending:
                    return self._waiting(tiles)
                finally:
                    lock.unlock()
                break
            if all(self.is_cached(t) for t in present):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return self._waiting(tiles)
            time.sleep(min(_LOCK_POLL, left))
        self.cache.load_tiles(tiles)
        return tiles

    def _try_lock(self, tile):
        """Take MapProxy's tile lock for tile if it is free: the held lock, or None."""
        lock = self.tile_locker(tile)
        if isinstance(lock, FileLock):
            lock.timeout = 0  # one attempt: FileLock.lock raises LockTimeout at once
            try:
                lock.lock()
            except LockTimeout:
                return None
            return lock
        lock.lock()  # a DummyLock (locking disabled)
        return lock

    def _waiting(self, tiles):
        _limit_max_age(_settings['waiting_max_age'])
        for t in tiles:
            if t.coord is not None:
                t.source = waiting_image(self.grid.tile_size)
        return tiles

    def _ask_refresh(self, coord):
        if not _should_refresh((self.tile_mgr.identifier, tuple(coord))):
            return
        try:
            result = self._send_tile_request(self.tile_mgr.identifier, [coord],
                                             background=True, refresh=True)
        except SourceError as e:
            log.warning('stale tile served; refresh request failed: %s', e)
            return
        if result.get('status') not in ('queued', 'ok'):
            log.warning('stale tile served; refresh request answered %s: %s',
                        result.get('status'), result.get('error_message', ''))

    def _create_renderd_tile(self, tile_coord, wait_ms=None):
        start_time = time.time()
        result = self._send_tile_request(self.tile_mgr.identifier, [tile_coord], wait_ms=wait_ms)
        duration = time.time() - start_time
        address = '%s:%s:%r' % (self.renderd_address, self.tile_mgr.identifier, tile_coord)
        status = result.get('status')
        if status == 'error':
            log_request(address, 500, None, duration=duration, method='RENDERD')
            raise SourceError('Error from renderd: %s' % result.get('error_message', 'unknown error from renderd'))
        if status == 'pending':
            log_request(address, 202, None, duration=duration, method='RENDERD')
            raise _Pending()
        if status != 'ok':
            # lock, busy, shutting_down, …: the daemon maps them to error for MapProxy's
            # own client; say what it was instead of serving an empty tile.
            log_request(address, 503, None, duration=duration, method='RENDERD')
            raise SourceError('Error from renderd: %s %s' % (status, result.get('error_message', '')))
        log_request(address, 200, None, duration=duration, method='RENDERD')

    def _send_tile_request(self, cache_identifier, tile_coords, background=False, refresh=False, wait_ms=None):
        coords = [tuple(c) for c in tile_coords]
        # The same id as MapProxy's own client, so that daemons behind a hash balancer agree.
        identifier = hashlib.sha1(str((cache_identifier, coords)).encode('ascii')).hexdigest()
        message = {
            'command': 'tile',
            'id': identifier,
            'tiles': [list(c) for c in coords],
            'cache_identifier': cache_identifier,
            'priority': self.priority,
        }
        if background:
            message['background'] = True
            message['refresh'] = refresh
        elif self._live():
            message['wait_ms'] = _settings['wait_ms'] if wait_ms is None else wait_ms
        return post(self.renderd_address, message)


# Views (the daemon's views command): the tiles MapProxy served, cache hits and renders, so
# that the daemon's prefetch (prefetch.area: views) knows where users look even where
# MapProxy never asks it to render. Kept apart from the tile creator above: one hook on
# TileManager.load_tile_coords and a reporter thread.

VIEWS_EVERY = 0.1      # seconds: a batch goes out at most this often ...
VIEWS_BATCH = 256      # ... or as soon as this many tiles wait
VIEWS_BUFFER = 4096    # tiles waiting at most; more are dropped (and counted)
VIEWS_RETRY = 5.0      # seconds without reporting after the daemon could not be reached
VIEWS_TIMEOUT = 1.0    # seconds one batch may take to send


class ViewReporter(object):
    """Reports served tiles to the daemon from a background thread, fire and forget.

    add() never waits for the daemon: it appends to a buffer of at most `buffer` tiles
    (beyond it tiles are dropped and counted in `dropped`) and returns. The thread sends a
    batch per (address, cache) at most every `every` seconds, or as soon as `batch` tiles
    wait, in views commands of at most `batch` tiles. When the daemon cannot be reached, the
    batch is dropped and add() drops everything for `retry` seconds, so a daemon that is down
    costs a request one lock and a clock read. The thread is a daemon thread started on the
    first add() in each process (after a fork, the child starts its own).
    """

    def __init__(self, every=VIEWS_EVERY, batch=VIEWS_BATCH, buffer=VIEWS_BUFFER,
                 retry=VIEWS_RETRY, send=None):
        self.every, self.batch, self.buffer, self.retry = every, batch, buffer, retry
        self._send = send or _send_views
        self._cond = threading.Condition(threading.Lock())
        self._pending = {}   # (address, cache identifier) -> [[x, y, z], ...]
        self._n = 0
        self._down_until = 0.0
        self._pid = None
        self._thread = None
        self.sent = 0        # tiles the daemon took
        self.dropped = 0     # tiles dropped: buffer full, daemon down
        self.batches = 0     # views commands sent

    def add(self, address, cache, coords):
        """Queue the tile coordinates (x, y, z) served from cache for a report."""
        now = time.monotonic()
        with self._cond:
            if os.getpid() != self._pid:
                self._pid, self._thread = os.getpid(), None
                self._pending, self._n = {}, 0
            if now < self._down_until:
                self.dropped += len(coords)
                return
            room = self.buffer - self._n
            if room < len(coords):
                self.dropped += len(coords) - max(room, 0)
                coords = coords[:max(room, 0)]
            if not coords:
                return
            self._pending.setdefault((address, cache), []).extend([list(c) for c in coords])
            self._n += len(coords)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name='mapproxy_renderd views',
                                                daemon=True)
                self._thread.start()
            if self._n >= self.batch:
                self._cond.notify()

    def _run(self):
        pid = os.getpid()
        while True:
            with self._cond:
                deadline = time.monotonic() + self.every
                while self._n < self.batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._pid != pid:
                    return
                pending, self._pending, self._n = self._pending, {}, 0
            for (address, cache), tiles in pending.items():
                for i in range(0, len(tiles), self.batch):
                    chunk = tiles[i:i + self.batch]
                    try:
                        self._send(address, {'command': 'views', 'cache_identifier': cache, 'tiles': chunk})
                    except Exception as e:  # noqa: BLE001 - a hint; never let the thread die
                        log.debug('views not reported (%s); next try in %ss', e, self.retry)
                        with self._cond:
                            self._down_until = time.monotonic() + self.retry
                            self.dropped += len(tiles) - i
                        break
                    with self._cond:
                        self.sent += len(chunk)
                        self.batches += 1
                else:
                    continue
                break


def _send_views(address, message):
    conn, path = _connection(address)
    conn.timeout = VIEWS_TIMEOUT
    try:
        conn.request('POST', path, body=json.dumps(message).encode('ascii'),
                     headers={'Content-Type': 'application/json'})
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()


_views = {}


def enable_views(reporter=None):
    """Report the tiles MapProxy serves to the daemon (views command). Call it once in the
    WSGI script, next to enable(); it applies to caches that render through renderd at a live
    priority (live_priority_from, 50). reporter: a ViewReporter (tests)."""
    from mapproxy.cache.tile import TileManager
    _views['reporter'] = reporter or ViewReporter()
    if 'load' not in _views:
        _views['load'] = TileManager.load_tile_coords
        TileManager.load_tile_coords = _load_tile_coords_reporting
    return _views['reporter']


def disable_views():
    """Undo enable_views() (for tests)."""
    from mapproxy.cache.tile import TileManager
    if 'load' in _views:
        TileManager.load_tile_coords = _views.pop('load')
    _views.pop('reporter', None)


def _load_tile_coords_reporting(self, tile_coords, dimensions=None, with_metadata=False):
    tiles = _views['load'](self, tile_coords, dimensions=dimensions, with_metadata=with_metadata)
    reporter = _views.get('reporter')
    if reporter is not None:
        try:
            target = _views_target(self)
            if target:
                coords = [t.coord for t in tiles.tiles if t.coord is not None and t.source is not None]
                if coords:
                    reporter.add(target[0], target[1], coords)
        except Exception as e:  # noqa: BLE001 - reporting must never fail a request
            log.debug('views: %s', e)
    return tiles


def _views_target(mgr):
    """(renderd address, cache identifier) when mgr renders through renderd at a live priority."""
    target = getattr(mgr, '_mapproxy_renderd_views', None)
    if target is None:
        target = False
        creator = mgr.tile_creator_class
        if isinstance(creator, functools.partial) and isinstance(creator.func, type) \
                and issubclass(creator.func, _original.get('creator', _renderd.RenderdTileCreator)) \
                and creator.args:
            priority = creator.keywords.get('priority', 100)
            if priority >= _settings.get('live_priority_from', 50):
                target = (creator.args[0], mgr.identifier)
        mgr._mapproxy_renderd_views = target
    return target
