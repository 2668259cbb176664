"""The attack suite's results as text: a markdown table (forget and retain scores per attack and method), the
mixed-people lines, the gate fire rates, the verdicts and the white-box scores.
"""

from __future__ import annotations

import math

from typing import Sequence

from .attack_scoring import COUNTED_FROM, FORGET_BAR, METRICS, RETAIN_BAR, SHORT
from .attacks import MIXED_PEOPLE


def format_table(results: dict[str, dict], metrics: Sequence[str] = METRICS, headline: str = "classification",
                 label: str = "cls") -> str:
    """Markdown: one row per attack; each of `metrics` on forget and the `headline` (named `label`) on retain,
    per method; vanilla first."""
    methods = list(results)
    vanilla = results[methods[0]]
    head = ["attack", "n forget", "n retain"]
    for m in methods:
        head += [f"{m} forget {SHORT.get(k, k)}" for k in metrics] + [f"{m} retain {label}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(value):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    for name, splits in vanilla.items():
        row = [name + ("" if splits["forget"].get(headline, 0) >= COUNTED_FROM else " (not counted)"),
               str(int(splits["forget"]["n"])), str(int(splits["retain"]["n"]))]
        for m in methods:
            r = results[m][name]
            row += [cell(r["forget"].get(k)) for k in metrics] + [cell(r["retain"].get(headline))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def mixed_people_line(name: str, result: dict) -> str:
    """One method's mixed-people scores: each part's fact in the answer, and the forget part withheld with the
    retain part kept in the same answer."""
    return (f"{MIXED_PEOPLE} {name}: forget part given {result['forget'].get('cloze', math.nan):.3f}, retain part "
            f"given {result['retain'].get('cloze', math.nan):.3f}, forget withheld and retain given "
            f"{result['both']['withheld_and_kept']:.3f} (n {int(result['both']['n'])})")


def format_summary(summary: dict) -> str:
    headline, label = summary.get("headline", "classification"), summary.get("label", "cls")
    lines = [format_table(summary["attacks"], summary.get("metrics", METRICS), headline, label)]
    lines += [mixed_people_line(name, result[MIXED_PEOPLE]) for name, result in summary["attacks"].items()
              if MIXED_PEOPLE in result]
    for name, rates in summary.get("gate_fire_rate", {}).items():
        lines.append(f"{name} gate fires on (forget / retain): "
                     + ", ".join(f"{a} {r['forget']:.2f}/{r['retain']:.2f}" for a, r in rates.items()))
    for name, rows in summary["verdicts"].items():
        counted = {a: r for a, r in rows.items() if r["counted"]}
        missed = [a for a, r in counted.items() if not r["forget_met"]]
        retain_missed = [a for a, r in rows.items() if r["retain_met"] is False]
        worst, value = summary["worst"][name]
        lines.append(f"{name}: {len(counted)} of {len(rows)} attacks counted (vanilla forget {label} >= "
                     f"{COUNTED_FROM}); forget {label} <= {FORGET_BAR} met on {len(counted) - len(missed)}"
                     + (f", missed on {', '.join(missed)}" if missed else "")
                     + f"; retain >= {RETAIN_BAR}x vanilla missed on {', '.join(retain_missed) or 'none'}; "
                     f"worst counted attack: {worst} ({value:.3f})")
    lines += [f"not run on this benchmark: {name} ({reason})" for name, reason in summary.get("skipped", {}).items()]
    for name, wb in summary.get("white_box", {}).items():
        probe = ", ".join(f"{k} {v:.3f}" for k, v in wb["probe"].items())
        mia = ", ".join(f"{k} {v:.3f}" for k, v in wb["membership"].items())
        lines.append(f"white-box {name}: probe accuracy ({probe}); membership ({mia})")
    return "\n".join(lines)
