# SPDX-License-Identifier: Apache-2.0
"""Plot the trace benchmark: z+1 tiles ready against renders (× no prefetch).

    /usr/bin/python3 bench/trace/plot.py RESULTS.json OUT.svg [TITLE]

RESULTS.json is what `trace -json` writes (one or more runs: a list, or a list of lists).
"""
import json
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def main(src, out, title='next-zoom prefetch on the browsing trace'):
    with open(src) as f:
        runs = json.load(f)
    if runs and isinstance(runs[0], dict):
        runs = [runs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axvspan(0, 1.5, ymin=0.6, ymax=1.0, color='#3a8', alpha=0.12, label='goal: >= 60 % at <= 1.5x')
    markers = {'no prefetch': 'o', 'all, levels 1': 's', 'centre, levels 1': 'D'}
    for i, run in enumerate(runs):
        for r in run:
            x = r['RendersVsNone']
            y = 100.0 * r['ZoomInReady'] / max(r['ZoomInTiles'], 1)
            views = r['Mode'].startswith('views')
            ax.scatter([x], [y], marker=markers.get(r['Mode'], '^'),
                       color='#05a' if views else '#a60', s=40, zorder=3)
            if i == 0:
                ax.annotate(r['Mode'], (x, y), textcoords='offset points', xytext=(6, 4), fontsize=8)
    ax.set_xlabel('renders (x no prefetch)')
    ax.set_ylabel('z+1 tiles ready when the view is asked (%)')
    ax.set_xlim(left=0.8)
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format='svg' if out.endswith('.svg') else 'png', metadata={'Date': None} if out.endswith('.svg') else None)


if __name__ == '__main__':
    main(*sys.argv[1:])
