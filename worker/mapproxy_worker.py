"""mapproxy-renderd's bundled renderer: renders MapProxy metatiles on request.

Run as ``/usr/bin/python3 mapproxy_worker.py [mapproxy.yaml]``; without an
argument the configuration path comes from the environment variable
MAPPROXY_CONFIG. Needs Python 3 and MapProxy (Debian: python3-mapproxy 1.15).

``mapproxy_worker.py check [mapproxy.yaml]`` (mapproxy-renderd check-config)
loads the configuration exactly as a renderer does at start (and as
mapproxy-seed's jobs will), and with MAPPROXY_SEED_CONFIG set also that
seed.yaml with MapProxy's seed loader, building every seed and cleanup as
mapproxy-seed would; then exits: 0 with one line per cache on stdout, or 1
with MapProxy's own error message on stderr.

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
  z share a metatile. If loading fails the reason goes to stderr and the
  process exits non-zero without a ready line.
* Job: ``{"id": "...", "command": "tile", "cache_identifier": "...",
  "tiles": [[x, y, z], ...], "refresh": true, "seed": false}`` with MapProxy-internal grid
  coordinates. For every coordinate the whole metatile containing it is
  rendered and stored. With "refresh" true or absent the render is forced:
  every tile of the metatile is rewritten, cached or not (MapProxy asks when
  any tile is missing or stale, and mapproxy-seed's refresh_before decision
  is not in the request). With "refresh": false a metatile is rendered only
  when one of its tiles is missing or stale by the cache's own rules.
  With "seed" true (mapproxy-seed asked for the tile) the configuration is the
  one mapproxy-seed loads (seed_only sources render); otherwise the one
  MapProxy's web processes load (seed_only sources are blank).
  ``{"id": "...", "command": "ping"}`` is answered ok.
* Reply: exactly one line per job, after the tiles are stored:
  ``{"id": ..., "status": "ok"}``, or
  ``{"id": ..., "status": "error", "error_message": "..."}``.
  "ok" also when the source is legitimately blank (no sources, outside its
  coverage, a response that may not be cached): nothing is stored then and the
  reply lists the tiles that are not in the cache as ``"missing": [[x, y, z], ...]``.
  Unknown caches, bad coordinates, malformed lines and unknown commands get
  "error" (echoing the id when the line had one); the process keeps going.
  Empty lines are not jobs and get no reply.
* End of stdin: exit 0. SIGINT is ignored (the daemon owns the lifecycle;
  closing stdin or SIGTERM stops the process).

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
            result[ident] = dict(meta_size=meta_size, cache=self.live.names[ident],
                                 **grid_details(tm.grid))
        return result

    def handle(self, job):
        """Run one parsed job; return the reply fields (without id)."""
        command = job.get('command')
        if command == 'ping':
            return {'status': 'ok'}
        if command != 'tile':
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
        refresh = job.get('refresh', True)
        if not isinstance(refresh, bool):
            return error('"refresh" must be true or false')
        return self.render(conf, tm, coords, refresh)

    def render(self, conf, tm, coords, refresh):
        from mapproxy.cache.tile import Tile
        from mapproxy.config import local_base_config
        from mapproxy.source import SourceError

        if refresh:
            # Every existing tile counts as stale (old renderd did the same),
            # and the cache's own refresh_before must not take precedence.
            tm._expire_timestamp, tm._refresh_before = 2**32, {}
        else:
            tm._expire_timestamp, tm._refresh_before = conf.defaults[tm.identifier]

        # Group coordinates by metatile, keeping order.
        metatiles = {}
        for coord in coords:
            if tm.meta_grid is not None:
                members = [t for t in tm.meta_grid.meta_tile(coord).tiles if t is not None]
            else:
                members = [coord]
            metatiles.setdefault(members[0], (coord, members))

        missing = []
        try:
            with local_base_config(conf.conf.base_config), tm.session():
                creator = tm.creator()
                for coord, members in metatiles.values():
                    # create_tiles renders the whole metatile containing coord
                    # unless all its tiles are cached and fresh (never, when
                    # forced). One coordinate per call: no creator threads.
                    creator.create_tiles([Tile(coord)])
                    missing.extend(c for c in members if not tm.cache.is_cached(Tile(c)))
        except SourceError as e:
            return error(str(e) or type(e).__name__)
        except Exception as e:
            log.exception('rendering %s %s failed', tm.identifier, coords)
            return error('%s: %s' % (type(e).__name__, e))
        reply = {'status': 'ok'}
        if missing:
            reply['missing'] = [list(c) for c in missing]
        return reply


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
    try:
        worker = Worker(path)
        seed_conf = worker.config_for(seed=True)  # what the first seed job loads
    except Exception as e:
        print('%s: %s: %s' % (path, type(e).__name__, e), file=sys.stderr)
        return 1
    caches = worker.caches()
    print('%s: MapProxy %s loaded it: %d caches' % (path, mapproxy_version(), len(caches)))
    for ident, c in caches.items():
        print('  %s (metatile %dx%d)' % (ident, c['meta_size'][0], c['meta_size'][1]))

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
        print('%s: %d seed tasks (%s), %d cleanup tasks (%s)' % (
            seed_path, len(seeds), ', '.join(sorted(set(t.md['name'] for t in seeds))) or '-',
            len(cleanups), ', '.join(sorted(set(t.md['name'] for t in cleanups))) or '-'))
    return 0


def mapproxy_version():
    try:
        from mapproxy.version import version
        return version
    except Exception:
        return '(unknown version)'


def main(argv):
    if len(argv) > 1 and argv[1] == 'check':
        return check(argv[2:])
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
