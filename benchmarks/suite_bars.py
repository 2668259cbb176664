"""The quality bars of the test suite against their measured values, per build of the `small` fixture.

The suite's `bar` fixture (tests/conftest.py) appends one JSON line per checked bar when MLLMERASER_BARS is set.
Run the suite on several builds (seeds, thread counts, CPU types), then print each bar's values side by side:

    for seed in 0 1 2; do MLLMERASER_TEST_SEED=$seed MLLMERASER_BARS=bars.jsonl python -m pytest; done
    MLLMERASER_TEST_THREADS=1 OMP_NUM_THREADS=1 MLLMERASER_BARS=bars.jsonl python -m pytest
    python benchmarks/suite_bars.py bars.jsonl [more.jsonl ...] [--markdown]

A bar is safe when its worst value over the builds still meets it, with room ("margin": how far the worst value
is from the bar, in the bar's direction).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def build_label(row: dict) -> str:
    cpu = "AMD" if "AMD" in row["cpu"] else "Intel" if "Intel" in row["cpu"] else row["cpu"][:12]
    return f"{cpu} s{row['seed']} t{row['threads']}"


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per bar: its bound, its value on each build (the last record wins), worst value and margin."""
    builds = sorted({build_label(r) for r in rows})
    values: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    bounds: dict[tuple[str, str], tuple] = {}
    for r in rows:
        key = (r["test"].split("::")[-1], r["bar"])
        values[key][build_label(r)] = r["value"]
        bounds[key] = (r["at_least"], r["at_most"])
    header = ["bar", "bound", *builds, "worst", "margin"]
    out = []
    for key in sorted(values, key=lambda k: (k[0], k[1])):
        at_least, at_most = bounds[key]
        measured = list(values[key].values())
        worst = min(measured) if at_least is not None else max(measured)
        margin = worst - at_least if at_least is not None else at_most - worst
        bound = f">= {at_least:g}" if at_least is not None else f"<= {at_most:g}"
        cells = [f"{values[key][b]:.3f}" if b in values[key] else "" for b in builds]
        out.append([key[1], bound, *cells, f"{worst:.3f}", f"{margin:+.3f}"])
    return header, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--markdown", action="store_true", help="a markdown table instead of aligned text")
    args = parser.parse_args()
    header, rows = table(load(args.logs))
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    missed = [r[0] for r in rows if r[-1].startswith("-")]
    print(f"\n{len(rows)} bars over {len(header) - 4} builds; missed on some build: {missed or 'none'}")


if __name__ == "__main__":
    main()
