# SPDX-License-Identifier: Apache-2.0
"""mapproxy-renderd's bundled renderer: renders MapProxy metatiles on request.

Run as ``/usr/bin/python3 mapproxy_worker.py [mapproxy.yaml]``; without an
argument the configuration path comes from the environment variable
MAPPROXY_CONFIG. Needs Python 3 and MapProxy (Debian: python3-mapproxy 1.15);
seed coverages from polygons (WKT, GeoJSON) need Shapely (python3-shapely).

``mapproxy_worker.py check [mapproxy.yaml]`` (mapproxy-renderd check-config)
loads the configuration exactly as a renderer does at start (and as
mapproxy-seed's jobs will), and with MAPPROXY_SEED_CONFIG set also that
seed.yaml with MapProxy's seed loader, building every seed and cleanup as
mapproxy-seed would; then exits: 0 with one line per cache on stdout, or 1
with MapProxy's own error message on stderr. What MapProxy's loaders only
warn about (an unknown key such as ``meta_sise`` or ``levles``, a deprecated
option) is reported on stdout too, one line each:
``warning: <file>: <MapProxy's message>``.

Protocol: newline-delimited JSON, one object per line, jobs on stdin and
replies on stdout. stdout carries nothing else; logs go to stderr.

* Start-up: the configuration is loaded once. On success exactly one line
  ``{"ready": true, "caches": {"<identifier>": {"meta_size": [mx, my]}, ...}}``
  is written, one entry per cache and grid, keyed by MapProxy's cache
  identifier (``<cache>_<grid>``, the ``cache_identifier`` MapProxy sends).
  Each entry also names the MapProxy cache and grid and describes the grid
  for the daemon's prefetch: ``"cache"``, ``"grid"``, ``"origin"`` ("nw" or
  "sw"), ``"grid_sizes"`` ([w, h] per level) and, only when they do not halve
  per level, ``"resolutions"``.
  meta_size is the metatile size in use: [1, 1] when the cache renders single
  tiles (e.g. its source cannot do metatiles). Tiles x//mx, y//my at the same
  z share a metatile. "xyz": "nw" | "sw" is added for caches whose grid is
  the XYZ web-mercator pyramid (EPSG:3857/900913, 256 px, resolution halving
  from one world tile at level 0; sw = rows counted from the south): the
  daemon accepts expiry lists (z/x/y) for them. If loading fails the reason goes to stderr and the
  process exits non-zero without a ready line.
* Job: ``{"id": "...", "command": "tile", "cache_identifier": "...",
  "tiles": [[x, y, z], ...], "refresh": true, "seed": false}`` with MapProxy-internal grid
  coordinates. For every coordinate the whole metatile containing it is
  rendered and stored. With "refresh" true or absent the render is forced:
  every tile of the metatile is rewritten, cached or not (MapProxy asks when
  any tile is missing or stale, and mapproxy-seed's refresh_before decision
  is not in the request). With "refresh": false a metatile is rendered only
  when one of its tiles is missing or stale (TileManager.is_cached) by the
  cache's own rules, or, with ``"refresh_before": <unix seconds>``, when one
  is not newer than that (as mapproxy-seed's refresh_before; a refresh_before
  in the cache's own configuration still takes precedence, as in MapProxy).
  refresh_before is ignored when "refresh" is true. With ``"only_cached":
  true`` (an expiry run's job) a metatile none of whose tiles is in the cache
  is not rendered (as mod_tile's render_expired): the reply says "skipped".
  With "seed" true (mapproxy-seed asked for the tile) the configuration is the
  one mapproxy-seed loads (seed_only sources render); otherwise the one
  MapProxy's web processes load (seed_only sources are blank).
  ``{"id": "...", "command": "ping"}`` is answered ok.
  ``{"id": "...", "command": "delete", "cache_identifier": ..., "tiles": [[x, y, z]]}``
  removes every tile of the metatile containing each coordinate from the
  cache (expiry lists' high zooms), then answers ok.
* Reply: exactly one line per job, after the tiles are stored:
  ``{"id": ..., "status": "ok"}`` (with ``"skipped": true`` when "refresh"
  was false and no metatile of the job needed a render), or
  ``{"id": ..., "status": "error", "error_message": "..."}``; when the
  source's upstream refused with 429 or 503 the error also has
  ``"upstream_status": 503`` (and ``"retry_after": <seconds>`` from its
  Retry-After), and ``"upstream_timeout": true`` when it timed out, so that
  the daemon backs off (docs/design.md §17).
  "ok" also when the source is legitimately blank (no sources, outside its
  coverage, a response that may not be cached): nothing is stored then and the
  reply lists the tiles that are not in the cache as ``"missing": [[x, y, z], ...]``.
  Unknown caches, bad coordinates, malformed lines and unknown commands get
  "error" (echoing the id when the line had one); the process keeps going.
  Empty lines are not jobs and get no reply.
* End of stdin: exit 0. SIGINT is ignored (the daemon owns the lifecycle;
  closing stdin or SIGTERM stops the process).

Planner mode: ``/usr/bin/python3 mapproxy_worker.py plan [mapproxy.yaml]``
(configuration as above). It enumerates what ``mapproxy-seed -f mapproxy.yaml
-s seed.yaml --seed NAME`` would render, or runs what ``--cleanup NAME`` would
remove, with MapProxy's own seed code: the configuration is loaded with
seed=True, seed.yaml with mapproxy.seed.config, and every SeedTask (one per
cache and grid) is walked by mapproxy.seed.seeder.TileWalker with the setup of
seed_task(); only the worker pool is ours, and it writes lines instead of
rendering.

* stdin: ONE JSON line, the spec: ``{"kind": "seed"|"cleanup"|"list",
  "seed_config": "/abs/seed.yaml", "name": "NAME"}`` (a seeds: or cleanups:
  entry) or ``"inline": {"cache": "c", "grids": [...], "levels": {"from": 0,
  "to": 12} | [2, 3], "coverage": "NAME" (from seed_config's coverages:) |
  "bbox": [...], "srs": "EPSG:4326", "refresh_before": {"days": 7}}``
  (cleanup: "remove_before" / "remove_all" instead of refresh_before; "name"
  is then only a label), and optionally ``"cursor": <value of an earlier
  cursor line>`` to resume a seed (a cleanup starts over: it is idempotent),
  and ``"resolved": <value of an earlier resolved line>``, which replaces
  seed_config, name and inline: the same walk as the run that wrote it.
* stdout, one JSON object per line (stdout carries nothing else):
  for a seed or cleanup without "resolved", ``{"resolved": {...}}`` first: the
  entry as MapProxy resolved it, self-contained (the entry and the coverages
  it names, copied; refresh_before / remove_before as absolute unix seconds),
  so that a resumed run walks the same tiles with the same refresh time even
  if seed.yaml changed or the relative time moved on; then
  ``{"tasks": [{"cache_identifier": "...", "levels": [...]}, ...]}``;
  then per metatile to render (the walker's is-cached filter already applied)
  ``{"cache_identifier": "...", "tile": [x, y, z], "progress": 0.42}`` plus
  ``"refresh_before": <unix seconds>`` when the seed has one; now and then
  ``{"cursor": {...}, "progress": 0.42}`` (resuming from it re-walks at most
  the current branch: MapProxy's SeedProgress identifier, plus the task index);
  for a cleanup ``{"removed": n, "progress": p}`` with n cumulative (caches
  MapProxy cleans by whole levels, e.g. MBTiles, do not say how many: n does
  not grow for them); for list ``{"seeds": [...], "cleanups": [...]}``; last
  ``{"done": true, "removed": n}``. progress runs 0..1 over all tasks,
  (i + p_i) / n. On a bad spec, seed.yaml or name: ``{"error": "..."}`` and
  exit 1. Lines are flushed one by one: a reader that stops reading blocks the
  walk (back-pressure). A cursor line comes before a metatile line whenever
  the walk's position (the SeedProgress identifier) has moved since the last
  cursor (at most every MAPPROXY_WORKER_CURSOR_EVERY metatiles, default 1),
  after 2 s of walking through cached tiles, and at the end of every task: a
  cursor covers the metatile lines before it, so the daemon can checkpoint
  whatever has been rendered, however far the walk runs ahead.

One job at a time, single-threaded: with renderd=True MapProxy reuses Mapnik
map objects, which assumes one thread per process.
"""

import json
import logging
import os
import signal
import sys
import time

log = logging.getLogger('mapproxy_worker')


def take_stdout():
    """Keep fd 1 for the protocol and point everything else at stderr.

    Returns a writable text stream on a duplicate of the original stdout.
    Afterwards fd 1 and sys.stdout both go to stderr, so stray print() calls
    and C libraries writing to fd 1 cannot corrupt the protocol.
    """
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, 'w', encoding='utf-8', newline='\n')


class Config(object):
    """One loaded MapProxy configuration and its tile managers by cache identifier."""

    def __init__(self, path, seed):
        from mapproxy.config.loader import load_configuration

        # renderd=True: we are renderd, render locally instead of POSTing.
        self.conf = load_configuration(path, seed=seed, renderd=True)
        self.managers = {}
        self.defaults = {}
        self.names = {}
        with self.conf:
            for name, cache_conf in self.conf.caches.items():
                for _grid, _extent, tm in cache_conf.caches():
                    self.managers[tm.identifier] = tm
                    self.names[tm.identifier] = name
                    self.defaults[tm.identifier] = (tm._expire_timestamp, tm._refresh_before)
        relocate_tile_locks(self.managers.values(), os.environ.get('MAPPROXY_RENDERD_LOCK_DIR'))


def relocate_tile_locks(managers, lock_dir):
    """Take the renderers' tile locks in lock_dir, a directory of the daemon's own.

    MapProxy's default lock directory, <cache_dir>/tile_locks, is shared with
    MapProxy's web processes: they create it (and their own renderd locks in
    it) with the WSGI server's umask, e.g. 022 under Apache, so renderers
    running as another user could not create their lock files there. The
    renderers' locks only exclude each other (MapProxy's web processes lock
    <id>_renderd-… names, never the renderers' <id>-…), and the daemon already
    hands each metatile to one renderer at a time, so a directory that only
    this daemon's renderers use loses no exclusion. Processes rendering
    without the daemon (mapproxy-seed without renderd, other MapProxy
    instances) keep MapProxy's own locking. Without lock_dir (a renderer run
    by hand), MapProxy's locking is left as it is."""
    if not lock_dir:
        return
    for tm in managers:
        locker = getattr(tm, 'locker', None)
        if locker is not None and hasattr(locker, 'lock_dir'):
            locker.lock_dir = lock_dir


class Worker(object):
    """Renders jobs with the configuration MapProxy itself would use for them.

    Jobs marked "seed" (a mapproxy-seed request asked for the tile) use the
    configuration loaded with seed=True, where seed_only sources are real
    sources; all other jobs use the one loaded as MapProxy's web processes load
    it (seed_only sources give blank tiles, nothing is stored). With
    globals.renderd.address set, mapproxy-seed hands every tile to renderd, so
    this process is the only one that can fill a cache whose source is
    seed_only. The seed configuration is loaded on the first seed job.
    """

    def __init__(self, config_path):
        self.path = config_path
        self.live = Config(config_path, seed=False)
        self.seed = None
        self.managers = self.live.managers

    def config_for(self, seed):
        if not seed:
            return self.live
        if self.seed is None:
            self.seed = Config(self.path, seed=True)
        return self.seed

    def caches(self):
        result = {}
        for ident, tm in sorted(self.managers.items()):
            if tm.meta_grid is not None:
                meta_size = [int(n) for n in tm.meta_grid.meta_size]
            else:
                meta_size = [1, 1]
            entry = dict(meta_size=meta_size, cache=self.live.names[ident],
                         **grid_details(tm.grid))
            xyz = xyz_origin(tm.grid)
            if xyz:
                entry['xyz'] = xyz
            result[ident] = entry
        return result

    def handle(self, job):
        """Run one parsed job; return the reply fields (without id)."""
        command = job.get('command')
        if command == 'ping':
            return {'status': 'ok'}
        if command not in ('tile', 'delete'):
            return error('unknown command %s' % json.dumps(command))
        seed = job.get('seed', False)
        if not isinstance(seed, bool):
            return error('"seed" must be true or false')
        ident = job.get('cache_identifier')
        if not isinstance(ident, str) or ident not in self.managers:
            return error('unknown cache %s' % json.dumps(ident))
        conf = self.config_for(seed)
        tm = conf.managers[ident]
        coords, msg = parse_tiles(job.get('tiles'), tm.grid)
        if msg:
            return error(msg)
        if command == 'delete':
            return self.delete(tm, coords)
        refresh = job.get('refresh', True)
        if not isinstance(refresh, bool):
            return error('"refresh" must be true or false')
        refresh_before = job.get('refresh_before')
        if refresh_before is not None and (
                not isinstance(refresh_before, (int, float)) or isinstance(refresh_before, bool)):
            return error('"refresh_before" must be a number (unix seconds)')
        only_cached = job.get('only_cached', False)
        if not isinstance(only_cached, bool):
            return error('"only_cached" must be true or false')
        return self.render(conf, tm, coords, refresh, refresh_before, only_cached)

    def render(self, conf, tm, coords, refresh, refresh_before=None, only_cached=False):
        from mapproxy.cache.tile import Tile
        from mapproxy.config import local_base_config
        from mapproxy.source import SourceError

        if refresh:
            # Every existing tile counts as stale (old renderd did the same),
            # and the cache's own refresh_before must not take precedence.
            tm._expire_timestamp, tm._refresh_before = 2**32, {}
        else:
            tm._expire_timestamp, tm._refresh_before = conf.defaults[tm.identifier]
            if refresh_before is not None:
                # What mapproxy-seed's seed_task() does with a seed's
                # refresh_before: it replaces the expire timestamp, while a
                # refresh_before in the cache's own configuration still wins
                # (TileManager.expire_timestamp), in the walker as here.
                tm._expire_timestamp = refresh_before

        # Group coordinates by metatile, keeping order.
        metatiles = {}
        for coord in coords:
            if tm.meta_grid is not None:
                members = [t for t in tm.meta_grid.meta_tile(coord).tiles if t is not None]
            else:
                members = [coord]
            metatiles.setdefault(members[0], (coord, members))

        missing = []
        skipped = 0
        try:
            with local_base_config(conf.conf.base_config), tm.session():
                creator = tm.creator()
                for coord, members in metatiles.values():
                    if only_cached and not any(tm.cache.is_cached(Tile(c)) for c in members):
                        # An expiry run's metatile that was never cached (mod_tile's
                        # render_expired): nobody viewed it, nothing to bring up to date.
                        skipped += 1
                        continue
                    if not refresh and all(tm.is_cached(Tile(c)) for c in members):
                        # Nothing missing or stale: no render, and no lock.
                        skipped += 1
                        continue
                    # create_tiles renders the whole metatile containing coord
                    # unless all its tiles are cached and fresh (never, when
                    # forced); it checks again under the metatile's lock. One
                    # coordinate per call: no creator threads.
                    creator.create_tiles([Tile(coord)])
                    missing.extend(c for c in members if not tm.cache.is_cached(Tile(c)))
        except SourceError as e:
            return upstream_error(error(str(e) or type(e).__name__), e)
        except Exception as e:
            log.exception('rendering %s %s failed', tm.identifier, coords)
            return upstream_error(error('%s: %s' % (type(e).__name__, e)), e)
        reply = {'status': 'ok'}
        if skipped == len(metatiles):
            reply['skipped'] = True
        if missing:
            reply['missing'] = [list(c) for c in missing]
        return reply


    def delete(self, tm, coords):
        """Remove every tile of the metatiles containing coords from the cache.

        MapProxy renders them again when they are next requested (an expiry
        list's high zooms: cheaper to drop than to re-render ahead)."""
        members = []
        for coord in coords:
            if tm.meta_grid is not None:
                members.extend(t for t in tm.meta_grid.meta_tile(coord).tiles if t is not None)
            else:
                members.append(coord)
        try:
            with tm.session():
                tm.remove_tile_coords(members)
        except Exception as e:
            log.exception('deleting %s %s failed', tm.identifier, coords)
            return error('%s: %s' % (type(e).__name__, e))
        return {'status': 'ok'}


def grid_details(grid):
    """What the daemon's prefetch needs to know of a grid (its ready line).

    origin: "nw" or "sw" (MapProxy's internal y counts from that corner);
    grid_sizes: [w, h] in tiles per level; resolutions only when they do not
    halve from one level to the next (the daemon assumes halving otherwise).
    """
    details = {
        'grid': grid.name,
        'origin': 'nw' if grid.origin == 'ul' else 'sw',
        'grid_sizes': [[int(w), int(h)] for w, h in grid.grid_sizes],
    }
    res = list(grid.resolutions)
    if any(abs(a / b - 2.0) > 1e-9 for a, b in zip(res, res[1:])):
        details['resolutions'] = res
    return details


WEBMERCATOR_HALF = 20037508.342789244


def xyz_origin(grid):
    """'nw' or 'sw' when grid is the XYZ web-mercator pyramid, else None.

    That is EPSG:3857 (or 900913), 256 px tiles, the whole world in one tile
    at level 0 and the resolution halving per level (docs/design.md §11): expiry
    lists (osm2pgsql's z/x/y) then name its tiles, rows flipped when the
    grid's origin is the south-west corner."""
    try:
        if grid.srs.srs_code not in ('EPSG:3857', 'EPSG:900913'):
            return None
        if tuple(grid.tile_size) != (256, 256):
            return None
        if any(abs(a - b) > 1 for a, b in zip(grid.bbox, (-WEBMERCATOR_HALF,) * 2 + (WEBMERCATOR_HALF,) * 2)):
            return None
        res0 = 2 * WEBMERCATOR_HALF / 256
        for level in range(grid.levels):
            if abs(grid.resolution(level) - res0 / 2 ** level) > 1e-6 * res0 / 2 ** level:
                return None
    except Exception:
        return None
    return 'nw' if grid.flipped_y_axis else 'sw'


def parse_tiles(tiles, grid):
    """Return (list of (x, y, z) tuples, None) or (None, error message)."""
    if not isinstance(tiles, list) or not tiles:
        return None, '"tiles" must be a non-empty list of [x, y, z]'
    coords = []
    for t in tiles:
        if (not isinstance(t, list) or len(t) != 3
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in t)):
            return None, 'bad tile %s: want [x, y, z] with integers' % json.dumps(t)
        coord = tuple(t)
        if grid.limit_tile(coord) is None:
            return None, 'tile %s outside of grid %s' % (json.dumps(t), grid.name)
        coords.append(coord)
    return coords, None


def error(message):
    return {'status': 'error', 'error_message': message}


def upstream_error(reply, exc):
    """Add what exc says about the upstream to an error reply (docs/design.md §17).

    MapProxy's sources turn an HTTPClientError (with response_code) into a
    SourceError raised while handling it, and HTTPClient raises the
    HTTPClientError while handling urllib's HTTPError (with the response's
    headers) or the timeout: the chain of __cause__/__context__ keeps them.
    A 429 or 503 gives "upstream_status" (and "retry_after" in seconds from a
    Retry-After in seconds); a timeout gives "upstream_timeout": true.
    """
    import socket
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, 'response_code', None) or getattr(e, 'code', None)
        if code in (429, 503) and 'upstream_status' not in reply:
            reply['upstream_status'] = code
        headers = getattr(e, 'headers', None)
        if code in (429, 503) and headers is not None and 'retry_after' not in reply:
            try:
                value = headers.get('Retry-After')
                if value is not None and 0 <= float(value) <= 3600:
                    reply['retry_after'] = float(value)
            except (TypeError, ValueError):
                pass  # an HTTP date: the daemon's own backoff applies
        if (isinstance(e, (socket.timeout, TimeoutError))
                or isinstance(getattr(e, 'reason', None), (socket.timeout, TimeoutError))):
            reply['upstream_timeout'] = True
        e = e.__cause__ or e.__context__
    return reply


def serve(worker, lines, out):
    """Answer every job line from lines (bytes) on out; return at EOF."""
    for line in lines:
        if not line.strip():
            continue
        job_id = None
        try:
            job = json.loads(line.decode('utf-8'))
        except UnicodeDecodeError:
            reply = error('invalid JSON: not UTF-8')
        except ValueError as e:
            reply = error('invalid JSON: %s' % e)
        else:
            if isinstance(job, dict):
                job_id = job.get('id')
                start = time.monotonic()
                try:
                    reply = worker.handle(job)
                except Exception as e:  # a bug here must not take the renderer down
                    log.exception('job %r failed', job_id)
                    reply = error('%s: %s' % (type(e).__name__, e))
                log.debug('job %s %s %s: %s in %.3f s', job_id, job.get('cache_identifier'),
                          job.get('tiles'), reply['status'], time.monotonic() - start)
            else:
                reply = error('a job must be a JSON object')
        out.write(json.dumps(dict(id=job_id, **reply)) + '\n')
        out.flush()


def check(args):
    """The check mode: load the configuration as a renderer would; report, exit."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format='%(levelname)s %(name)s: %(message)s')
    path = args[0] if args else os.environ.get('MAPPROXY_CONFIG')
    if not path:
        print('mapproxy_worker check: no configuration: pass a path or set MAPPROXY_CONFIG',
              file=sys.stderr)
        return 2
    warned = WarningCollector()
    try:
        worker = Worker(path)
        seed_conf = worker.config_for(seed=True)  # what the first seed job loads
    except Exception as e:
        print('%s: %s: %s' % (path, type(e).__name__, e), file=sys.stderr)
        return 1
    finally:
        warnings = warned.take()
    caches = worker.caches()
    print('%s: MapProxy %s loaded it: %d caches' % (path, mapproxy_version(), len(caches)))
    for ident, c in caches.items():
        print('  %s (metatile %dx%d) of cache %s' % (ident, c['meta_size'][0], c['meta_size'][1], c['cache']))
    for w in warnings:
        print('warning: %s: %s' % (path, w))
    for where, address in renderd_addresses(worker.live.conf):
        if address.startswith('http+unix://'):
            print(UNIX_ADDRESS_WARNING % (where, address))

    seed_path = os.environ.get('MAPPROXY_SEED_CONFIG')
    if seed_path:
        from mapproxy.seed.config import load_seed_tasks_conf
        try:
            with seed_conf.conf:
                tasks = load_seed_tasks_conf(seed_path, seed_conf.conf)
                seeds, cleanups = tasks.seeds(), tasks.cleanups()
        except Exception as e:
            print('%s: %s: %s' % (seed_path, type(e).__name__, e), file=sys.stderr)
            return 1
        finally:
            warnings = warned.take()
        print('%s: %d seed tasks (%s), %d cleanup tasks (%s)' % (
            seed_path, len(seeds), ', '.join(sorted(set(t.md['name'] for t in seeds))) or '-',
            len(cleanups), ', '.join(sorted(set(t.md['name'] for t in cleanups))) or '-'))
        for w in warnings:
            print('warning: %s: %s' % (seed_path, w))
    return 0


class WarningCollector(logging.Handler):
    """Collects what MapProxy logs at WARNING or above (its loaders report unknown keys
    that way and go on) and what it passes to warnings.warn (deprecated options)."""

    def __init__(self):
        logging.Handler.__init__(self, logging.WARNING)
        self.messages = []
        logging.captureWarnings(True)
        logging.getLogger().addHandler(self)

    def emit(self, record):
        msg = record.getMessage().strip()
        if record.name == 'py.warnings':  # "file:line: Category: text" and the source line
            msg = msg.splitlines()[0].split(': ', 2)[-1] if msg else msg
        if msg and msg not in self.messages:  # both loads of mapproxy.yaml warn alike
            self.messages.append(msg)

    def take(self):
        """The messages since the last take, once each, in order."""
        msgs, self.messages = self.messages, []
        return msgs


UNIX_ADDRESS_WARNING = (
    'warning: %s renderd.address is %s: MapProxy\'s requests library speaks only TCP, so only '
    'processes that extend it reach this address: a WSGI script that calls '
    'requests_unixsocket.monkeypatch() before make_wsgi_app (examples/mapproxy_wsgi.py) or '
    'that loads the MapProxy-side module (mapproxy-renderd install-module). mapproxy-seed, '
    'mapproxy-util serve-develop and WSGI scripts without either fail with "Error while '
    'communicating with renderd: invalid JSON"; seed with `mapproxy-renderd seed`, or give '
    'those clients a configuration with the TCP address (http://127.0.0.1:8111/).')


def renderd_addresses(conf):
    """(where, address) for globals.renderd.address and every cache's own renderd.address."""
    found = []
    address = conf.globals.get_value('renderd.address')
    if isinstance(address, str):
        found.append(('globals:', address))
    for name, cache_conf in sorted(conf.caches.items()):
        local = (cache_conf.conf.get('renderd') or {}).get('address')
        if isinstance(local, str):
            found.append(('caches.%s:' % name, local))
    return found


def mapproxy_version():
    try:
        from mapproxy.version import version
        return version
    except Exception:
        return '(unknown version)'


# ---------------------------------------------------------------------------
# Planner mode: enumerate a seed's metatiles or run a cleanup with MapProxy's
# own seed code (mapproxy.seed.config and mapproxy.seed.seeder).

class PlanError(Exception):
    """A bad spec, seed.yaml or MapProxy configuration: reported as {"error": ...}."""


class PlanOutput(object):
    """Writes protocol lines. Every line is flushed at once: the daemon applies
    back-pressure by not reading, so a full pipe simply blocks the walker."""

    def __init__(self, out):
        self.out = out

    def line(self, obj):
        self.raw(json.dumps(obj) + '\n')

    def raw(self, text):
        """Write one preformatted line (with its newline)."""
        self.out.write(text)
        self.out.flush()


class PlanWalk(object):
    """State shared by the worker pool and progress logger of every task of one plan run."""

    CURSOR_EVERY_TILES = 1
    CURSOR_EVERY_S = 2.0

    def __init__(self, out, n_tasks):
        every = os.environ.get('MAPPROXY_WORKER_CURSOR_EVERY')  # tests: cursor lines more often
        if every:
            self.CURSOR_EVERY_TILES = int(every)
        self.out = out
        self.n = max(n_tasks, 1)
        self.index = 0          # the task being walked
        self.ident = None
        self.ident_json = 'null'
        self.refresh_json = ''    # ', "refresh_before": <seconds>' when the seed has one
        self.since_cursor = 0
        self.last_cursor = time.monotonic()
        self.last_levels = None   # the identifier of the last cursor line
        self.removed = 0

    def overall(self, task_progress):
        p = (self.index + min(max(task_progress, 0.0), 1.0)) / self.n
        return round(min(p, 1.0), 6)

    def cursor(self, seed_progress):
        levels = seed_progress.current_progress_identifier()
        if levels is not None:
            levels = [list(l) for l in levels]
        if levels == []:
            # Between two top-level subtrees, with the top-level tiles themselves still to
            # come: resuming from [] would skip the whole walk (SeedProgress.can_skip).
            return
        self.out.line({'cursor': {'task': self.index, 'cache_identifier': self.ident, 'levels': levels},
                       'progress': self.overall(seed_progress.progress)})
        self.since_cursor = 0
        self.last_cursor = time.monotonic()
        self.last_levels = levels

    def cursor_before_tile(self, seed_progress):
        """A cursor line before the next metatile line when the walk has moved on:
        the identifier here is at or before that metatile, so resuming from it
        walks that metatile again, never skips it."""
        if self.since_cursor < self.CURSOR_EVERY_TILES and \
                time.monotonic() - self.last_cursor < self.CURSOR_EVERY_S:
            return
        levels = seed_progress.current_progress_identifier()
        if levels is not None:
            levels = [list(l) for l in levels]
        if levels != self.last_levels:
            self.cursor(seed_progress)


class PlanSeedPool(object):
    """Stands in for MapProxy's TileWorkerPool: instead of rendering, every
    metatile the TileWalker hands over (already filtered by its is-cached
    check) becomes one protocol line."""

    def __init__(self, walk):
        self.walk = walk

    def process(self, tiles, progress):
        w = self.walk
        # work_on_metatiles=False (rescale_tiles) hands over the uncached tiles
        # of one metatile: the renderer renders that metatile once.
        tile = next((t for t in tiles if t is not None), None)
        if tile is not None:
            w.cursor_before_tile(progress)
            # The hot path: formatted by hand, the same JSON json.dumps would give.
            w.out.raw('{"cache_identifier": %s, "tile": [%d, %d, %d], "progress": %r%s}\n' % (
                w.ident_json, tile[0], tile[1], tile[2], w.overall(progress.progress), w.refresh_json))
            w.since_cursor += 1

    def stop(self, force=False):
        pass


class PlanCleanupPool(object):
    """Stands in for TileWorkerPool with TileCleanupWorker, in this process:
    removes the tiles the walker found stale and counts them."""

    def __init__(self, walk, task):
        self.walk = walk
        self.tm = task.tile_manager

    def process(self, tiles, progress):
        with self.tm.session():
            self.tm.remove_tile_coords(tiles)
        self.walk.removed += len(tiles)
        self.walk.out.line({'removed': self.walk.removed, 'progress': self.walk.overall(progress.progress)})

    def stop(self, force=False):
        pass


class PlanProgressLog(object):
    """The progress_logger the TileWalker calls while it descends: gives cursor
    lines during long stretches where every tile is already cached."""

    progress_store = None

    def __init__(self, walk, seed):
        self.walk = walk
        self.seed = seed

    def log_progress(self, progress, level, bbox, tiles):
        if self.seed and time.monotonic() - self.walk.last_cursor >= self.walk.CURSOR_EVERY_S:
            self.walk.cursor(progress)

    def log_step(self, progress):
        pass

    def log_message(self, msg):
        log.info('%s', msg)


def read_spec(stream):
    line = stream.readline()
    if not line.strip():
        raise PlanError('no spec: want one JSON line on stdin')
    try:
        spec = json.loads(line.decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as e:
        raise PlanError('invalid spec: %s' % e)
    if not isinstance(spec, dict):
        raise PlanError('invalid spec: want a JSON object')
    return spec


def load_seed_yaml(path, mapproxy_conf):
    """MapProxy's own loader, with the validation messages in the error."""
    from mapproxy.seed.config import load_seed_tasks_conf
    from mapproxy.seed.spec import validate_seed_conf
    from mapproxy.util.yaml import load_yaml_file, YAMLError

    try:
        raw = load_yaml_file(path)
    except (OSError, YAMLError) as e:
        raise PlanError('seed_config %s: %s' % (path, e))
    if not isinstance(raw, dict):
        raise PlanError('seed_config %s: not a YAML mapping' % path)
    if 'views' not in raw:
        errors, informal_only = validate_seed_conf(raw)
        if not informal_only:
            raise PlanError('seed_config %s: invalid configuration: %s' % (path, '; '.join(errors)))
    return raw, load_seed_tasks_conf(path, mapproxy_conf)


INLINE_NAME = 'inline'
INLINE_BBOX_COVERAGE = '__renderd_inline_bbox__'


def inline_seed_conf(kind, inline, raw_seed_conf, mapproxy_conf):
    """Build the in-memory seed.yaml for an inline seed or cleanup (one entry
    named "inline") and load it with MapProxy's SeedingConfiguration."""
    from mapproxy.seed.config import SeedingConfiguration
    from mapproxy.seed.spec import validate_seed_conf

    if not isinstance(inline, dict):
        raise PlanError('"inline" must be an object')
    allowed = {'cache', 'grids', 'levels', 'coverage', 'bbox', 'srs'}
    allowed |= {'refresh_before'} if kind == 'seed' else {'remove_before', 'remove_all'}
    unknown = sorted(set(inline) - allowed)
    if unknown:
        raise PlanError('inline %s: unknown field %s' % (kind, ', '.join(unknown)))
    cache = inline.get('cache')
    if not isinstance(cache, str) or not cache:
        raise PlanError('inline %s: "cache" must name a cache' % kind)
    entry = {'caches': [cache]}
    for key in ('grids', 'levels', 'refresh_before', 'remove_before', 'remove_all'):
        if inline.get(key) is not None:
            entry[key] = inline[key]
    coverages = dict((raw_seed_conf or {}).get('coverages') or {})
    coverage, bbox = inline.get('coverage'), inline.get('bbox')
    if coverage is not None and bbox is not None:
        raise PlanError('inline %s: give "coverage" or "bbox", not both' % kind)
    if coverage is not None:
        if not isinstance(coverage, str) or coverage not in coverages:
            raise PlanError('inline %s: unknown coverage %s; seed_config has: %s' % (
                kind, json.dumps(coverage), ', '.join(sorted(coverages)) or 'none'))
        entry['coverages'] = [coverage]
    elif bbox is not None:
        coverages[INLINE_BBOX_COVERAGE] = {'bbox': bbox, 'srs': inline.get('srs') or 'EPSG:4326'}
        entry['coverages'] = [INLINE_BBOX_COVERAGE]
    elif inline.get('srs') is not None:
        raise PlanError('inline %s: "srs" needs "bbox"' % kind)
    conf = {'coverages': coverages, ('seeds' if kind == 'seed' else 'cleanups'): {INLINE_NAME: entry}}
    errors, informal_only = validate_seed_conf(conf)
    if not informal_only:
        raise PlanError('inline %s: %s' % (kind, '; '.join(errors)))
    return SeedingConfiguration(conf, mapproxy_conf=mapproxy_conf)


def check_spec(spec):
    """Reject what is wrong with the spec itself, before MapProxy is loaded."""
    kind = spec.get('kind')
    if kind not in ('seed', 'cleanup', 'list'):
        raise PlanError('"kind" must be "seed", "cleanup" or "list", got %s' % json.dumps(kind))
    path = spec.get('seed_config')
    if path is not None and (not isinstance(path, str) or not path):
        raise PlanError('"seed_config" must be a path')
    if kind == 'list':
        if not path:
            raise PlanError('list needs "seed_config"')
        return
    if spec.get('resolved') is not None:
        return  # resolved_tasks checks it
    name, inline = spec.get('name'), spec.get('inline')
    if name is None and inline is None:
        raise PlanError('%s: give "name" or "inline"' % kind)
    if inline is None:
        if not isinstance(name, str) or not name:
            raise PlanError('"name" must be a string')
        if not path:
            raise PlanError('%s %s: no "seed_config"' % (kind, name))


def plan_tasks(spec, mapproxy_conf):
    """Return (kind, tasks, resolved) for a seed or cleanup spec, or (kind, names,
    None) for list; check_spec(spec) has passed. resolved is the value of the
    resolved line (None when the spec was resolved already or seed.yaml has the
    legacy views: form)."""
    kind, path = spec['kind'], spec.get('seed_config')
    if spec.get('resolved') is not None:
        return kind, resolved_tasks(kind, spec['resolved'], mapproxy_conf), None
    raw = seed_conf = None
    if path:
        raw, seed_conf = load_seed_yaml(path, mapproxy_conf)
    if kind == 'list':
        return kind, {'seeds': sorted(seed_conf.seed_tasks_names()),
                      'cleanups': sorted(seed_conf.cleanup_tasks_names())}, None
    name, inline = spec.get('name'), spec.get('inline')
    if inline is not None:
        # With "inline", "name" is only the daemon's label for the task.
        seed_conf = inline_seed_conf(kind, inline, raw, mapproxy_conf)
        name = INLINE_NAME
    else:
        names = seed_conf.seed_tasks_names() if kind == 'seed' else seed_conf.cleanup_tasks_names()
        if name not in names:
            raise PlanError('unknown %s %s; %s has: %s' % (
                kind, json.dumps(name), path, ', '.join(sorted(names)) or 'none'))
    if not hasattr(seed_conf, 'conf') or 'views' in seed_conf.conf:
        if kind == 'seed':
            return kind, seed_conf.seeds([name]), None
        return kind, seed_conf.cleanups([name]), None
    resolved = resolve_entry(kind, name, seed_conf.conf)
    return kind, build_tasks(kind, resolved, seed_conf), resolved


def resolve_entry(kind, name, conf):
    """The resolved line's value before its times: the entry and the coverages it
    names, copied out of the seed configuration (json round trip: plain data)."""
    section = 'seeds' if kind == 'seed' else 'cleanups'
    entry = plain(conf[section][name])
    all_coverages = conf.get('coverages') or {}
    coverages = dict((c, all_coverages[c]) for c in entry.get('coverages') or [] if c in all_coverages)
    return {'name': name, 'conf': plain({'coverages': coverages, section: {name: entry}})}


def plain(value):
    """value as JSON data; YAML timestamps become the ISO form MapProxy parses."""
    def default(o):
        if hasattr(o, 'isoformat'):
            return o.isoformat()
        raise TypeError('%s is not JSON data' % type(o).__name__)
    return json.loads(json.dumps(value, default=default))


def build_tasks(kind, resolved, seeding_conf):
    """MapProxy's seeds()/cleanups() for the one entry of resolved, with its
    times: taken from resolved when it has them, else computed now (as MapProxy
    does) and written into resolved."""
    from mapproxy.seed.config import SeedConfiguration, CleanupConfiguration

    name = resolved['name']
    if kind == 'seed':
        sc = SeedConfiguration(name, seeding_conf.conf['seeds'][name], seeding_conf)
        if 'refresh_before' in resolved:
            sc.refresh_timestamp = resolved['refresh_before']
        else:
            resolved['refresh_before'] = sc.refresh_timestamp
        return list(sc.seed_tasks())
    cc = CleanupConfiguration(name, seeding_conf.conf['cleanups'][name], seeding_conf)
    if 'remove_before' in resolved:
        if resolved.get('remove_before_is_start'):
            # No remove_before: MapProxy removes what is older than the run's start
            # (init_time), and tells that case apart by identity.
            cc.init_time = resolved['remove_before']
            cc.remove_timestamp = cc.init_time
        else:
            cc.remove_timestamp = resolved['remove_before']
    else:
        resolved['remove_before'] = cc.remove_timestamp
        resolved['remove_before_is_start'] = cc.remove_timestamp is cc.init_time
    return list(cc.cleanup_tasks())


def resolved_tasks(kind, resolved, mapproxy_conf):
    """The tasks of an earlier resolved line's value."""
    from mapproxy.seed.config import SeedingConfiguration

    if not isinstance(resolved, dict) or not isinstance(resolved.get('name'), str) or \
            not isinstance(resolved.get('conf'), dict):
        raise PlanError('invalid "resolved": want the value of a resolved line')
    section = 'seeds' if kind == 'seed' else 'cleanups'
    if resolved['name'] not in (resolved['conf'].get(section) or {}):
        raise PlanError('"resolved" has no %s entry %s' % (kind, json.dumps(resolved['name'])))
    return build_tasks(kind, resolved, SeedingConfiguration(resolved['conf'], mapproxy_conf=mapproxy_conf))


def parse_cursor(cursor, tasks):
    """Return (first task index, SeedProgress identifier) from a cursor line's value."""
    if cursor is None:
        return 0, None
    if not isinstance(cursor, dict) or not isinstance(cursor.get('task'), int):
        raise PlanError('invalid cursor %s' % json.dumps(cursor))
    index, levels = cursor['task'], cursor.get('levels')
    if not 0 <= index <= len(tasks):
        raise PlanError('cursor task %d outside 0..%d' % (index, len(tasks)))
    want = tasks[index].tile_manager.identifier if index < len(tasks) else None
    if cursor.get('cache_identifier') != want:
        raise PlanError('cursor is for %s, task %d of this seed is %s' % (
            cursor.get('cache_identifier'), index, want or 'past the end'))
    if levels is not None:
        if not isinstance(levels, list) or not all(
                isinstance(l, list) and len(l) == 2 and all(isinstance(n, int) for n in l) for l in levels):
            raise PlanError('invalid cursor levels %s' % json.dumps(levels))
        # SeedProgress compares (i, subtiles) tuples.
        levels = [tuple(l) for l in levels]
    return index, levels


def plan_seed(tasks, first, old_levels, out):
    """Walk every SeedTask as mapproxy.seed.seeder.seed_task does, emitting metatiles,
    from task index first and its SeedProgress identifier old_levels on."""
    from mapproxy.seed.seeder import TileWalker, SeedProgress

    walk = PlanWalk(out, len(tasks))
    for i, task in enumerate(tasks):
        walk.index, walk.ident = i, task.tile_manager.identifier
        if i < first:
            continue
        seed_progress = SeedProgress(old_progress_identifier=old_levels if i == first else None)
        # The setup of seed_task(), minus the worker processes.
        if task.coverage is False:
            continue
        if task.refresh_timestamp is not None:
            task.tile_manager._expire_timestamp = task.refresh_timestamp
        task.tile_manager.minimize_meta_requests = False
        walk.ident_json = json.dumps(walk.ident)
        walk.refresh_json = ''
        if task.refresh_timestamp is not None:
            walk.refresh_json = ', "refresh_before": %s' % json.dumps(task.refresh_timestamp)
        walker = TileWalker(task, PlanSeedPool(walk), handle_uncached=True, handle_stale=False,
                            skip_geoms_for_last_levels=0, progress_logger=PlanProgressLog(walk, True),
                            seed_progress=seed_progress,
                            work_on_metatiles=not task.tile_manager.rescale_tiles)
        walker.walk()
        task.tile_manager.cleanup()
        # The next task starts from scratch: a cursor here resumes there.
        walk.index, walk.ident = i + 1, tasks[i + 1].tile_manager.identifier if i + 1 < len(tasks) else None
        walk.out.line({'cursor': {'task': i + 1, 'cache_identifier': walk.ident, 'levels': None},
                       'progress': walk.overall(0.0)})
        walk.since_cursor, walk.last_cursor, walk.last_levels = 0, time.monotonic(), None
    out.line({'done': True, 'removed': 0})


def plan_cleanup(tasks, out):
    """Run mapproxy.seed.cleanup.cleanup() in this process, counting removed tiles."""
    from mapproxy.seed.seeder import TileWalker
    from mapproxy.util.fs import cleanup_directory

    walk = PlanWalk(out, len(tasks))
    for i, task in enumerate(tasks):
        walk.index, walk.ident = i, task.tile_manager.identifier
        if task.coverage is False:
            continue
        cache = task.tile_manager.cache
        if task.complete_extent and callable(getattr(cache, 'level_location', None)):
            # simple_cleanup(), with a file handler that counts what it removes.
            def remove(filename):
                os.remove(filename)
                walk.removed += 1
            for j, level in enumerate(task.levels):
                cleanup_directory(cache.level_location(level), task.remove_timestamp,
                                  file_handler=remove, remove_empty_dirs=True)
                out.line({'removed': walk.removed, 'progress': walk.overall((j + 1) / len(task.levels))})
        elif task.complete_extent and callable(getattr(cache, 'remove_level_tiles_before', None)):
            # cache_cleanup(): the cache removes whole levels and does not say how many tiles.
            for j, level in enumerate(task.levels):
                cache.remove_level_tiles_before(level, task.remove_timestamp)
                task.tile_manager.cleanup()
                out.line({'removed': walk.removed, 'progress': walk.overall((j + 1) / len(task.levels))})
        else:
            # tilewalker_cleanup(), with the removal in this process.
            task.tile_manager._expire_timestamp = task.remove_timestamp
            task.tile_manager.minimize_meta_requests = False
            walker = TileWalker(task, PlanCleanupPool(walk, task), handle_stale=True,
                                work_on_metatiles=False, progress_logger=PlanProgressLog(walk, False),
                                skip_geoms_for_last_levels=0)
            walker.walk()
        task.tile_manager.cleanup()
        out.line({'removed': walk.removed, 'progress': walk.overall(1.0)})
    out.line({'done': True, 'removed': walk.removed})


def plan_main(argv):
    """``mapproxy_worker.py plan [mapproxy.yaml]``: see the module docstring."""
    out = PlanOutput(take_stdout())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    level = os.environ.get('MAPPROXY_WORKER_LOG_LEVEL', 'WARNING').upper()
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level, logging.WARNING),
                        format='%(levelname)s %(name)s: %(message)s')
    try:
        try:
            path = argv[2] if len(argv) > 2 else os.environ.get('MAPPROXY_CONFIG')
            if not path:
                raise PlanError('no configuration: pass a path or set MAPPROXY_CONFIG')
            spec = read_spec(sys.stdin.buffer)
            check_spec(spec)
            from mapproxy.config.loader import load_configuration, ConfigurationError
            try:
                # renderd=True: the planner never creates tiles, and it then
                # needs no requests library for a renderd.address.
                mapproxy_conf = load_configuration(path, seed=True, renderd=True)
            except Exception as e:
                raise PlanError('cannot load %s: %s: %s' % (path, type(e).__name__, e))
            with mapproxy_conf:
                try:
                    kind, tasks, resolved = plan_tasks(spec, mapproxy_conf)
                except ConfigurationError as e:
                    raise PlanError(str(e))
                if kind == 'list':
                    out.line(tasks)
                    out.line({'done': True, 'removed': 0})
                    return 0
                if kind == 'seed':
                    first, old_levels = parse_cursor(spec.get('cursor'), tasks)
                if resolved is not None:
                    out.line({'resolved': resolved})
                out.line({'tasks': [{'cache_identifier': t.tile_manager.identifier,
                                     'levels': list(t.levels)} for t in tasks]})
                if kind == 'seed':
                    plan_seed(tasks, first, old_levels, out)
                else:
                    plan_cleanup(tasks, out)
        except PlanError as e:
            out.line({'error': str(e)})
            return 1
        except BrokenPipeError:
            raise
        except Exception as e:
            log.exception('planning failed')
            out.line({'error': '%s: %s' % (type(e).__name__, e)})
            return 1
    except BrokenPipeError:
        return 1
    return 0


def main(argv):
    if len(argv) > 1 and argv[1] == 'check':
        return check(argv[2:])
    if len(argv) > 1 and argv[1] == 'plan':
        return plan_main(argv)
    out = take_stdout()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    level = os.environ.get('MAPPROXY_WORKER_LOG_LEVEL', 'WARNING').upper()
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level, logging.WARNING),
                        format='%(levelname)s %(name)s: %(message)s')

    path = argv[1] if len(argv) > 1 else os.environ.get('MAPPROXY_CONFIG')
    if not path:
        print('mapproxy_worker: no configuration: pass a path or set MAPPROXY_CONFIG',
              file=sys.stderr)
        return 2
    try:
        worker = Worker(path)
    except Exception as e:
        print('mapproxy_worker: cannot load %s: %s: %s' % (path, type(e).__name__, e),
              file=sys.stderr)
        return 1

    try:
        out.write(json.dumps({'ready': True, 'caches': worker.caches()}) + '\n')
        out.flush()
        serve(worker, sys.stdin.buffer, out)
    except BrokenPipeError:
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
