#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Helpers of the deployment test (inside the container, as root).

  tiles.py background N ZOOM OUT.json   send N background tile requests (whole 4x4
                                        metatiles at ZOOM first) over the daemon's Unix
                                        socket; exit 1 unless every one is answered queued
  tiles.py missing IN.json              print how many of the tiles are not in the cache
                                        (MapProxy's own is_cached, /etc/mapproxy/mapproxy.yaml)
  tiles.py task KIND                    print the state of the newest task of KIND
"""
import json
import socket
import sys

SOCK = '/run/mapproxy-renderd.sock'
CACHE = 'osm_cache_GLOBAL_WEBMERCATOR'


def background(n, zoom, out):
    tiles = []
    per_row = 2 ** zoom // 4
    for m in range(per_row * per_row):
        mx, my = m % per_row, m // per_row
        for dy in range(4):
            for dx in range(4):
                tiles.append([mx * 4 + dx, my * 4 + dy, zoom])
    tiles = tiles[:n]
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(120)
    s.connect(SOCK)
    body = ''.join(json.dumps({'command': 'tile', 'id': str(i), 'cache_identifier': CACHE,
                               'tiles': [t], 'background': True}) + '\n'
                   for i, t in enumerate(tiles))
    s.sendall(body.encode())
    s.shutdown(socket.SHUT_WR)
    f = s.makefile('r')
    statuses = {}
    for line in f:
        reply = json.loads(line)
        statuses[reply.get('status')] = statuses.get(reply.get('status'), 0) + 1
        if reply.get('status') != 'queued':
            print('not queued:', line.strip(), file=sys.stderr)
    print('replies:', statuses)
    with open(out, 'w') as fp:
        json.dump(tiles, fp)
    return 0 if statuses == {'queued': len(tiles)} else 1


def missing(path):
    from mapproxy.config.loader import load_configuration
    from mapproxy.cache.tile import Tile
    with open(path) as fp:
        tiles = json.load(fp)
    conf = load_configuration('/etc/mapproxy/mapproxy.yaml', renderd=True)
    with conf:
        for _grid, _extent, tm in conf.caches['osm_cache'].caches():
            if tm.identifier == CACHE:
                print(sum(1 for t in tiles if not tm.cache.is_cached(Tile(tuple(t)))))
                return 0
    print('no cache', CACHE, file=sys.stderr)
    return 1


def task(kind):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(SOCK)
    s.sendall(b'{"command":"tasks"}\n')
    reply = json.loads(s.makefile('r').readline())
    tasks = [t for t in reply.get('tasks', []) if t.get('kind') == kind]
    if not tasks:
        print('none')
    else:
        t = max(tasks, key=lambda t: int(t['task_id'].lstrip('t') or 0))
        print(t['state'], 'done=%s failed=%s' % (t.get('done'), t.get('failed')))
    return 0


if __name__ == '__main__':
    cmd = sys.argv[1]
    if cmd == 'background':
        sys.exit(background(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    if cmd == 'missing':
        sys.exit(missing(sys.argv[2]))
    if cmd == 'task':
        sys.exit(task(sys.argv[2]))
    sys.exit('unknown command %s' % cmd)
