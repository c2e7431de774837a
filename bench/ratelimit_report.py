#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""bench/ratelimit.sh's report: the upstream's requests per second over time.

Usage: ratelimit_report.py BASE SVG [BENCHMARKS.md] DESCRIPTION

BASE has one directory per scenario (rate-2, rate-5, rate-20, 503-above-5), each with
hits.csv (unix_ns,status per upstream request), task.json and status.json. Prints a
Markdown table, draws SVG (one panel per scenario), and with a third argument replaces
the section between the bench/ratelimit.sh markers in that file (or appends it).
"""
import json
import os
import sys

import matplotlib
matplotlib.use('svg')
import matplotlib.pyplot as plt  # noqa: E402

SCENARIOS = [
    ('rate-2', 'rate 2', 2),
    ('rate-5', 'rate 5', 5),
    ('rate-20', 'rate 20', 20),
    ('503-above-5', 'no rate; upstream answers 503 above 5/s', 5),
]
BEGIN, END = '<!-- bench/ratelimit.sh: begin -->', '<!-- bench/ratelimit.sh: end -->'


def load(d):
    hits = []
    with open(os.path.join(d, 'hits.csv')) as f:
        for line in f:
            ns, status = line.strip().split(',')
            hits.append((int(ns), int(status)))
    hits.sort()
    doc = {}
    for name in ('task.json', 'status.json'):
        try:
            with open(os.path.join(d, name)) as f:
                doc[name] = json.load(f)
        except (OSError, ValueError):
            doc[name] = {}
    return hits, doc


def max_window(ts, w):
    best, j = 0, 0
    for i in range(len(ts)):
        while ts[i] - ts[j] >= w:
            j += 1
        best = max(best, i - j + 1)
    return best


def main():
    base, svg = sys.argv[1], sys.argv[2]
    out = sys.argv[3] if len(sys.argv) > 4 else ''
    desc = sys.argv[-1]
    rows = []
    fig, axes = plt.subplots(len(SCENARIOS), 1, figsize=(9, 2.2 * len(SCENARIOS)), sharex=True)
    for ax, (name, title, line) in zip(axes, SCENARIOS):
        hits, doc = load(os.path.join(base, name))
        if not hits:
            rows.append('| %s | 0 | | | | | | |' % title)
            continue
        t0 = hits[0][0]
        secs = int((hits[-1][0] - t0) / 1e9) + 1
        ok = [0] * secs
        refused = [0] * secs
        for ns, status in hits:
            s = int((ns - t0) / 1e9)
            (ok if status == 200 else refused)[s] += 1
        n503 = sum(refused)
        first503 = next((ns for ns, st in hits if st != 200), None)
        after = sum(1 for ns, st in hits if st != 200 and first503 is not None and ns - first503 > 1e9)
        oks = [ns for ns, st in hits if st == 200]
        span = (hits[-1][0] - t0) / 1e9
        task = doc['task.json'].get('task', {})
        st = doc['status.json']
        caches = (st.get('rate_limit') or st.get('stats', {}).get('rate_limit') or {}).get('caches', [])
        backoffs = sum(c.get('backoff_events', 0) for c in caches)
        eff = ', '.join('%.2f' % c['effective_rate'] for c in caches if c.get('effective_rate'))
        if task.get('effective_rate'):
            eff = 'task %.2f' % task['effective_rate'] + ('; cache ' + eff if eff else '')
        rows.append('| %s | %d | %d (%d later than 1 s after the first) | %.1f s | %.2f | %d | %d | %d | %s | %s |' % (
            title, len(hits), n503, after, span, len(oks) / span if span > 0 else 0,
            max(ok), max_window(oks, 2e9), backoffs, eff or 'unlimited', task.get('state', '?') + ', %d done' % task.get('done', 0)))
        xs = list(range(secs))
        ax.step(xs, ok, where='post', color='#05a', label='answered 200')
        if n503:
            ax.step(xs, refused, where='post', color='#c00', label='answered 503')
        ax.axhline(line, color='#888', linestyle='--', linewidth=1,
                   label=('upstream limit' if name.startswith('503') else 'rate') + ' %g/s' % line)
        ax.set_title(title, fontsize=10, loc='left')
        ax.set_ylabel('requests/s')
        ax.set_ylim(bottom=0)
        ax.legend(loc='upper right', fontsize=8)
    axes[-1].set_xlabel('seconds since the first upstream request')
    fig.suptitle('Requests per second at the upstream while the daemon seeds\n(%s)' % desc, fontsize=9)
    fig.tight_layout()
    plt.rcParams['svg.hashsalt'] = 'ratelimit'
    fig.savefig(svg, metadata={'Date': None})
    table = '\n'.join([
        '| scenario | upstream requests | 503 answers | span | 200s per second | most 200s in one second | most 200s in any 2 s | backoffs | effective rate at the end | task |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ] + rows)
    section = '\n'.join([
        BEGIN,
        '## Protecting the upstream (bench/ratelimit.sh)',
        '',
        'What a fragile upstream WMS sees while the daemon seeds with the bundled MapProxy worker (%s):' % desc,
        'requests per second over time for a task at `rate` 2, 5 and 20, and for a task without a rate',
        'against an upstream that answers 503 above 5 requests per second. Plot: [docs/ratelimit.svg](docs/ratelimit.svg).',
        '',
        table,
        '',
        'A rate is an upper bound: when the renderers cannot keep up, the upstream sees what they can do.',
        'Against the 503 upstream the daemon starts unlimited, halves from the rate it observed at the first',
        '503 (once per flight of jobs: a job started before the cut does not cut again), and stays below the',
        'upstream\'s limit afterwards; those 503s are retried by the task without counting as failures.',
        'Without background_rate the cache grows back by 10 % per minute, so within a minute it stays low.',
        END,
    ])
    print(section)
    if out:
        try:
            with open(out) as f:
                text = f.read()
        except OSError:
            text = ''
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text = text.rstrip('\n') + '\n\n' + section + '\n'
        with open(out, 'w') as f:
            f.write(text)


if __name__ == '__main__':
    main()
