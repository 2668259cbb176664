"""The comparison report: results.json, results.md, PNG plots and one report.html that embeds them (laid out by
the jinja2 templates in templates/, shipped as package data). What the table and the plots show depends on the
benchmark the run measured (`View`: MLLMU-Bench's metrics, or CLEAR's)."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import atomic_write_bytes, atomic_write_text
from . import attack_scoring, attacks, omu
from .data import REPORT_SPLITS, VALIDATION_SPLIT

COLUMNS = [  # (header, split, metric key or aggregate)
    ("forget cls img", "forget", "classification_image"), ("forget cls txt", "forget", "classification_text"),
    ("forget cloze", "forget", "cloze"), ("forget R-L", "forget", "rougeL"), ("forget leak", "forget", "fact_leak"),
    ("test cls img", "test", "classification_image"), ("test leak", "test", "fact_leak"),
    ("retain cls", "retain", "classification"), ("retain cloze", "retain", "cloze"), ("retain R-L", "retain", "rougeL"),
    ("retain leak", "retain", "fact_leak"), ("real cls", "real", "classification"), ("real R-L", "real", "rougeL"),
    ("real leak", "real", "fact_leak"),  # leak: facts.py (of vanilla's answers that state the fact, the share kept)
    ("general cls", "general", "classification"), ("unknown refusal", "unknown", "refusal_rate"),
]
CLEAR_TASKS = (("forget", ""), ("forget", "facerec_"), ("retain", ""), ("retain", "facerec_"), ("real_faces", ""),
               ("real_world", ""))  # (split, metric prefix): each of CLEAR's six tasks (bench/clear.py)
CLEAR_COLUMNS = [(f"{split.replace('_', ' ')} {'name ' if prefix else ''}{short}", split, prefix + key)
                 for split, prefix in CLEAR_TASKS
                 for key, short in (("rougeL_recall", "R-L"), ("prob", "prob"), ("truth_ratio", "TR"))]
CLEAR_COLUMNS.append(("utility", "utility", "model_utility"))  # CLEAR's model utility (clear.score)
PLOTS = ("tradeoff_classification.png", "tradeoff_rougeL.png", "splits.png", "gate_scores.png", "omu.png")
OMU_COLUMNS = (("OMU FQ", "forget_quality"), ("OMU MU", "model_utility"), ("OMU HM", "hm"))  # omu.py's scores
RATIO_PLOT = "forget_ratios.png"  # a several-size run: every method over the request sizes
LEGEND = {"loc": "upper left", "bbox_to_anchor": (1.01, 1), "borderaxespad": 0, "fontsize": 6}  # outside the axes


@dataclass(frozen=True)
class View:
    """What a benchmark's report shows: the table's (header, split, metric) columns; the trade-off plots, forget
    against retain, as (metric, label, file); the per-split bar plot's (metric, label); whether the OMU plot has
    points to show; the plot over request sizes' (title, split or "omu", metric) panels."""

    columns: tuple
    tradeoffs: tuple
    bars: tuple
    omu_plot: bool
    ratio_panels: tuple


VIEWS = {
    "mllmu": View(tuple(COLUMNS),
                  (("classification", "classification accuracy", PLOTS[0]), ("rougeL", "ROUGE-L", PLOTS[1])),
                  ("classification", "classification accuracy (image and text averaged)"), True,
                  (("forget classification", "forget", "classification"),
                   ("retain classification", "retain", "classification"),
                   ("OMU forget quality", "omu", "forget_quality"), ("OMU model utility", "omu", "model_utility"))),
    # CLEAR: its own metrics; Open-MMUnlearning's CLEAR forget quality needs a retrained model (omu.clear_scores)
    "clear": View(tuple(CLEAR_COLUMNS),
                  (("facerec_rougeL_recall", "name ROUGE-L recall", "tradeoff_facerec_rougeL_recall.png"),
                   ("rougeL_recall", "caption ROUGE-L recall", "tradeoff_rougeL_recall.png")),
                  ("rougeL_recall", "caption ROUGE-L recall"), False,
                  (("forget name ROUGE-L recall", "forget", "facerec_rougeL_recall"),
                   ("retain name ROUGE-L recall", "retain", "facerec_rougeL_recall"),
                   ("forget caption ROUGE-L recall", "forget", "rougeL_recall"),
                   ("CLEAR model utility", "utility", "model_utility"))),
}


def view(summary: dict) -> View:
    """The view of a run's benchmark (MLLMU-Bench's for a summary that names none)."""
    return VIEWS[summary.get("benchmark", "mllmu")]


def plots(summary: dict) -> tuple[str, ...]:
    """The plot files a run's report holds, in order (PLOTS on MLLMU-Bench)."""
    shown = view(summary)
    return tuple(f for _, _, f in shown.tradeoffs) + PLOTS[2:4] + (PLOTS[4:] if shown.omu_plot else ())


def gate_splits(summary: dict) -> tuple[str, ...]:
    """The gate table's columns and the gate plot's rows, in order: the report splits and the validation people."""
    return tuple(summary.get("splits", REPORT_SPLITS)) + (VALIDATION_SPLIT,)


def metric(metrics: dict[str, float] | None, key: str) -> float:
    """A metric, or the mean of its image and text variants when `key` names a family (classification)."""
    if not metrics:
        return math.nan
    if key in metrics:
        return metrics[key]
    values = [metrics[f"{key}_{m}"] for m in ("image", "text") if f"{key}_{m}" in metrics]
    return sum(values) / len(values) if values else math.nan


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    columns = view(summary).columns
    header = ["method"] + [c[0] for c in columns] + [c[0] for c in OMU_COLUMNS] + ["fit s", "peak MiB"]
    rows = []
    for m in summary["methods"]:
        cells = [m["name"]] + [_fmt(metric(m["results"].get(split), key)) for _, split, key in columns]
        cells += [_fmt((m.get("omu") or {}).get(key)) for _, key in OMU_COLUMNS]
        cells += [_fmt(m.get("fit_seconds"), 1), _fmt(m.get("peak_extra_mib"), 0)]
        rows.append(cells)
    return header, rows


def markdown_table(summary: dict) -> str:
    header, rows = table_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def gated_methods(summary: dict) -> list[dict]:
    """The methods with gate diagnostics (the erasers), in report order."""
    return [m for m in summary["methods"] if m.get("gate")]


def gate_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """One row per eraser: held-out AUROC, the fraction of prompts the gate turns on per split, the threshold."""
    splits = gate_splits(summary)
    header = ["method", "held-out AUROC"] + [f"fires on {s}" for s in splits] + ["threshold"]
    rows = []
    for m in gated_methods(summary):
        gate = m["gate"]
        fire = gate.get("fire_rate") or {}
        threshold = gate.get("threshold")
        cells = [m["name"], _fmt(gate.get("auroc"))] + [_fmt(fire.get(s)) for s in splits]
        cells.append("-" if threshold is None else ", ".join(f"{t:.4g}" for t in threshold))
        rows.append(cells)
    return header, rows


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot_tradeoff(summary: dict, key: str, label: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 4.8), dpi=110)
    for m in summary["methods"]:
        name = m["name"]
        point = (metric(m["results"].get("forget"), key), metric(m["results"].get("retain"), key))
        if m["curve"]:
            # one line per learning rate for a baseline (points are epochs), one line for an eraser (strengths)
            groups: dict = {}
            for p in m["curve"]:  # a baseline's grid point: its learning rate (and MMUnlearner's threshold)
                groups.setdefault((p.get("lr"), p.get("saliency_threshold")), []).append(p)
            colour = None
            for index, ((lr, threshold), points) in enumerate(groups.items()):
                xs = [metric(p.get("forget"), key) for p in points]
                ys = [metric(p.get("retain"), key) for p in points]
                legend = f"{name} (strength)" if lr is None else f"{name} lr={lr:g}" + (
                    "" if threshold is None else f" t={threshold:g}") + " (epochs)"
                style = "-" if lr is None else (":", "--", "-.", "-")[index % 4]
                line, = ax.plot(xs, ys, marker="o", ms=3, lw=1, alpha=0.6, label=legend, ls=style, color=colour)
                colour = line.get_color()
            ax.plot(*point, marker="*", ms=14, color=colour, mec="black")
        else:
            ax.plot(*point, marker="*", ms=14, color="black", label=name)
    ax.set_xlabel(f"forget {label} (lower is better)")
    ax.set_ylabel(f"retain {label} (higher is better)")
    ax.set_title(f"Forget vs retain: {label} (stars: chosen settings)")
    ax.grid(alpha=0.3)
    ax.legend(**LEGEND)
    _save(fig, path)


def _plot_omu(summary: dict, path: Path) -> None:
    """Each method's Open-MMUnlearning forget quality against its model utility, beside their published
    LLaVA-7B points (hollow) for scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=110)
    for index, m in enumerate(summary["methods"]):
        scores = m.get("omu") or {}
        ax.plot(scores.get("forget_quality", math.nan), scores.get("model_utility", math.nan), marker="o", ms=8,
                ls="none", color=f"C{index % 10}", label=m["name"])
    for name, (fq, mu) in omu.REFERENCE.items():
        ax.plot(fq, mu, marker="s", ms=8, ls="none", mfc="none", color="0.4")
        ax.annotate(f"{name} (theirs)", (fq, mu), textcoords="offset points", xytext=(5, 4), fontsize=7, color="0.3")
    ax.set_xlabel("forget quality: mean of 1 - forget metrics (higher: forgot more)")
    ax.set_ylabel("model utility: retain and real metrics (higher: kept more)")
    ax.set_title(f"Open-MMUnlearning scores, forget {summary['forget_ratio']}% "
                 f"(hollow: their LLaVA-7B, {omu.REFERENCE_FORGET_RATIO}%)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(**LEGEND)
    _save(fig, path)


def _plot_splits(summary: dict, path: Path) -> None:
    plt = _pyplot()
    key, label = view(summary).bars
    methods = summary["methods"]
    splits = [s for s in summary.get("splits", REPORT_SPLITS)
              if any(math.isfinite(metric(m["results"].get(s), key)) for m in methods)]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    for index, m in enumerate(methods):
        values = [metric(m["results"].get(s), key) for s in splits]
        ax.bar([i + index * width for i in range(len(splits))], [0 if math.isnan(v) else v for v in values],
               width, label=m["name"])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(splits))], splits)
    ax.set_ylabel(label.split(" (")[0])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Per-split {label}")
    ax.legend(**{**LEGEND, "fontsize": 7})
    _save(fig, path)


def _plot_gate(summary: dict, path: Path) -> None:
    """Per eraser, the distribution of its gate score on each split (box and points, one row per split) and
    its threshold(s): a prompt whose score lies right of the line turns the steering on."""
    plt = _pyplot()
    methods = gated_methods(summary)
    if not methods:
        fig, ax = plt.subplots(figsize=(6, 1.2), dpi=110)
        ax.axis("off")
        ax.text(0.5, 0.5, "no eraser in this run: no gate to show", ha="center", va="center")
        _save(fig, path)
        return
    ordered = gate_splits(summary)
    fig, axes = plt.subplots(len(methods), 1, figsize=(9, 0.45 * len(ordered) * len(methods) + 1.0),
                             dpi=110, squeeze=False)
    for ax, m in zip(axes[:, 0], methods):
        gate = m["gate"]
        scores = gate.get("scores") or {}
        fire = gate.get("fire_rate") or {}
        splits = [s for s in ordered if s in scores] + [s for s in scores if s not in ordered]
        data = [_finite(scores[s]) for s in splits]
        rows = list(range(len(splits)))[::-1]  # the first split on top
        shown = [(d, r) for d, r in zip(data, rows) if d]
        if shown:
            ax.boxplot([d for d, _ in shown], positions=[r for _, r in shown], vert=False, widths=0.6,
                       showfliers=False, medianprops={"color": "black"}, boxprops={"color": "0.4"},
                       whiskerprops={"color": "0.4"}, capprops={"color": "0.4"})
        for index, (values, row) in enumerate(zip(data, rows)):
            jitter = [row + 0.25 * (((i * 0.6180339887) % 1.0) - 0.5) for i in range(len(values))]
            ax.scatter(values, jitter, s=5, alpha=0.5, color=f"C{index % 10}", linewidths=0, zorder=3)
        labels = []
        for split, values in zip(splits, data):
            rate = fire.get(split)
            labels.append(f"{split} (n={len(values)}" + ("" if rate is None else f", fires {rate:.0%}") + ")")
        ax.set_yticks(rows, labels, fontsize=7)
        ax.set_ylim(-0.7, len(splits) - 0.3)
        for k, tau in enumerate(_finite(gate.get("threshold") or [])):
            ax.axvline(tau, color="crimson", ls="--", lw=1.2, label="threshold" if k == 0 else None)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(**LEGEND)
        auroc = gate.get("auroc")
        ax.set_title(f"{m['name']}: gate score per split (held-out AUROC {_fmt(auroc)}"
                     + ("; per-layer gate, no prompt threshold" if gate.get("threshold") is None else "") + ")",
                     fontsize=9)
        ax.set_xlabel("gate score (max over the gate's terms)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


ATTACK_PLOT = "attacks.png"


def attack_headline(suite: dict) -> tuple[str, str]:
    """(metric, label) the attack bars read: classification on MLLMU-Bench, the name's ROUGE-L recall on CLEAR."""
    return suite.get("headline", "classification"), suite.get("label", "cls")


def attack_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The attack table: per attack, each method's recovered forget headline (classification; CLEAR: the name's
    ROUGE-L recall) and its retain headline (vanilla first); attacks vanilla no longer answers under are marked,
    as they do not count."""
    suite = summary.get("attacks")
    if not suite:
        return [], []
    key, label = attack_headline(suite)
    results = suite["attacks"]
    methods = list(results)
    header = ["attack"] + [f"{m} {split} {label}" for m in methods for split in ("forget", "retain")]
    rows = []
    for name, vanilla in results["vanilla"].items():
        counted = vanilla["forget"].get(key, 0.0) >= attack_scoring.COUNTED_FROM
        row = [name + ("" if counted else " (not counted)")]
        for m in methods:
            row += [_fmt(results[m][name][s].get(key)) for s in ("forget", "retain")]
        rows.append(row)
    return header, rows


def mixed_people_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The mixed-people case, one row per method: how often each part's fact is in the answer to the message
    holding both, and how often the forget part is withheld while the retain part is given."""
    suite = summary.get("attacks")
    results = (suite or {}).get("attacks", {})
    if not any(attacks.MIXED_PEOPLE in r for r in results.values()):
        return [], []
    header = ["method", "forget part given (lower is better)", "retain part given (higher is better)",
              "forget withheld, retain given", "n"]
    rows = []
    for method, per_attack in results.items():
        mixed = per_attack.get(attacks.MIXED_PEOPLE)
        if mixed is None:
            continue
        rows.append([method, _fmt(mixed["forget"].get("cloze")), _fmt(mixed["retain"].get("cloze")),
                     _fmt(mixed["both"]["withheld_and_kept"]), str(int(mixed["both"]["n"]))])
    return header, rows


def _plot_attacks(summary: dict, path: Path) -> None:
    plt = _pyplot()
    results = summary["attacks"]["attacks"]
    key, label = attack_headline(summary["attacks"])
    names, methods = list(results["vanilla"]), list(results)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(12, 4.2), dpi=110)
    for index, m in enumerate(methods):
        values = [results[m][n]["forget"].get(key, math.nan) for n in names]
        ax.bar([i + index * width for i in range(len(names))], [0 if math.isnan(v) else v for v in values],
               width, label=m)
    ax.axhline(attack_scoring.FORGET_BAR, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"forget {label} under attack")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Recovered forget {label} per attack (dashed: the {attack_scoring.FORGET_BAR:.2f} bar)")
    ax.legend(**{**LEGEND, "fontsize": 7})
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import io
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")  # legends sit outside the axes: keep them in the PNG
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# ---- report.html: every cell computed here, laid out by the templates in templates/ ---------------------------

@functools.cache
def _templates():
    """The report templates, shipped with the package (templates/*.html.j2). Every value is HTML-escaped as it
    is written into the page (autoescape); jinja2 is imported on first use, where a report is written."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("mllmeraser.bench", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _omu_context(summary: dict) -> dict:
    references = "; ".join(f"{name} {fq:.3f} / {mu:.3f}" for name, (fq, mu) in omu.REFERENCE.items())
    return {"forget_ratio": omu.REFERENCE_FORGET_RATIO, "references": references,
            "clear": summary.get("benchmark") == "clear"}


def _answer_names(summary: dict) -> list[str]:
    """The answer columns: vanilla, then the methods in report order, then any others the examples carry."""
    present: list[str] = []
    for example in summary.get("examples") or []:
        present += [name for name in example.get("answers", {}) if name not in present]
    order = ["vanilla"] + [m["name"] for m in summary["methods"] if m["name"] != "vanilla"]
    return [n for n in order if n in present] + [n for n in present if n not in order]


def _examples_context(summary: dict) -> dict:
    """The before/after table: one row per example (its portrait, split, question and every method's answer)."""
    names = _answer_names(summary)
    rows = [{"image": e["image"], "alt": f"{e['split']} person {e.get('subject', '')}", "split": e["split"],
             "question": e["question"], "answers": [e.get("answers", {}).get(n, "-") for n in names]}
            for e in summary.get("examples") or []]
    return {"header": ["portrait", "split", "question", *names], "rows": rows}


def _gate_context(summary: dict) -> dict:
    header, rows = gate_rows(summary)
    return {"header": header, "rows": rows, "negatives": ", ".join((VALIDATION_SPLIT, "real", "general", "unknown"))}


def _attacks_context(summary: dict) -> dict:
    header, rows = attack_rows(summary)
    mixed_header, mixed_rows = mixed_people_rows(summary)
    suite = summary.get("attacks") or {}
    skipped = "; ".join(f"{name} ({reason})" for name, reason in (suite.get("skipped") or {}).items())
    return {"header": header, "rows": rows, "mixed_header": mixed_header, "mixed_rows": mixed_rows,
            "plot": ATTACK_PLOT, "counted_from": f"{attack_scoring.COUNTED_FROM:.2f}",
            "metric": attack_headline(suite)[1], "forget_bar": f"{attack_scoring.FORGET_BAR:.2f}",
            "retain_bar": f"{attack_scoring.RETAIN_BAR:.2f}", "skipped": skipped}


def render_html(summary: dict) -> str:
    header, rows = table_rows(summary)
    chosen = [(m["name"], json.dumps(_short_settings(m))) for m in summary["methods"] if m.get("settings")]
    return _templates().get_template("report.html.j2").render(
        summary=summary, header=header, rows=rows, selection=_selection_text(summary),
        request_fit=request_fit_line(summary), dominance=dominance_line(summary), omu=_omu_context(summary), examples=_examples_context(summary),
        gate=_gate_context(summary), attacks=_attacks_context(summary), plots=plots(summary), chosen=chosen)


def request_fit_line(summary: dict) -> str | None:
    """One sentence: the eraser's fit for this request (model cache warm) against the fastest baseline's fit."""
    fit = summary.get("request_fit")
    if not fit:
        return None
    cache_note = (f"the model cache was {fit['model_cache']} in {fit['model_cache_seconds']:.2f} s, once per model"
                  if fit.get("model_cache") else "")
    return (f"Request fit: eraser {fit['eraser_seconds']:.2f} s (forget set only; {cache_note}) against the fastest "
            f"baseline fit, {fit['fastest_baseline']} {fit['baseline_seconds']:.2f} s: {fit['ratio']:.3f}x.")


def dominance(summary: dict, key: str, eraser: str = "eraser") -> dict[str, dict] | None:
    """Per baseline (a method whose curve is a training grid: points with a learning rate), how its grid points
    stand against `eraser`'s chosen point on (forget `key`, lower better; retain `key`, higher better): "points",
    "dominated" (the eraser at least as good on both and better on one), "equal" (the same point), and the others'
    (forget, retain) in "undominated". None where the run has no such eraser or no baseline."""
    chosen = next((m for m in summary["methods"] if m["name"] == eraser), None)
    if chosen is None:
        return None
    e_forget, e_retain = metric(chosen["results"].get("forget"), key), metric(chosen["results"].get("retain"), key)
    out = {}
    for m in summary["methods"]:
        grid = [p for p in m.get("curve") or [] if p.get("lr") is not None]
        if not grid or m["name"] == eraser:
            continue
        row = {"points": len(grid), "dominated": 0, "equal": 0, "undominated": []}
        for p in grid:
            forget, retain = metric(p.get("forget"), key), metric(p.get("retain"), key)
            if e_forget <= forget and e_retain >= retain:
                row["dominated" if (e_forget, e_retain) != (forget, retain) else "equal"] += 1
            else:
                row["undominated"].append((forget, retain))
        out[m["name"]] = row
    return out or None


def dominance_line(summary: dict, eraser: str = "eraser") -> str | None:
    """One sentence: how many of each baseline's grid points the eraser's chosen point dominates on the report's
    first trade-off (forget against retain), and, for the others, by how much they keep more or forget more."""
    key, label, _ = view(summary).tradeoffs[0]
    rows = dominance(summary, key, eraser)
    if not rows:
        return None
    chosen = next(m for m in summary["methods"] if m["name"] == eraser)
    point = (metric(chosen["results"].get("forget"), key), metric(chosen["results"].get("retain"), key))
    parts = []
    for name, row in rows.items():
        text = f"{name} {row['dominated']} of {row['points']}" + (f" ({row['equal']} equal)" if row["equal"] else "")
        if row["undominated"]:
            forgets = [f for f, _ in row["undominated"]]
            retain_gain = [r - point[1] for _, r in row["undominated"] if r > point[1]]
            text += (f" (the other {len(row['undominated'])}: forget {min(forgets):.3f}-{max(forgets):.3f}"
                     + (f", retain up to {max(retain_gain):.3f} higher" if retain_gain else "") + ")")
        parts.append(text)
    averaged = "; image and text averaged" if view(summary) is VIEWS["mllmu"] else ""
    return (f"Dominance on {label} (forget lower, retain higher{averaged}): the {eraser}'s point "
            f"({point[0]:.3f}, {point[1]:.3f}) dominates " + "; ".join(parts) + " grid points.")


def summary_lines(summary: dict) -> list[str]:
    """The sentences under a run's table: the request fit and the dominance check, where the run has them."""
    return [line for line in (request_fit_line(summary), dominance_line(summary)) if line]


def _selection_text(summary: dict) -> str:
    rule = summary.get("validation_rule") or {"metric": "validation classification accuracy",
                                              "people": "held-out retain and real people, never reported"}
    vanilla = summary.get("vanilla_validation", summary.get("vanilla_validation_classification"))
    return (f"Every method's setting was chosen by one rule, on the validation people only ({rule['people']}): the "
            f"strongest setting whose {rule['metric']} stays at or above {summary['retain_keep']:.2f} x vanilla's "
            f"({vanilla:.3f}); the erasers' prompt gates are calibrated on the same people.")


def _short_settings(m: dict) -> dict:
    keep = ("gate", "pooling", "decision_layer", "alpha", "fitted_alpha", "method", "lr", "epochs", "grid_seconds",
            "saliency_threshold", "mask_kept", "refusal", "gate_from", "system_prompt")
    return {k: v for k, v in m["settings"].items() if k in keep}


def write_report(summary: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out_dir / "results.md", markdown_table(summary) + "\n"
                      + "".join(f"\n{line}\n" for line in summary_lines(summary)))
    shown = view(summary)
    for key, label, name in shown.tradeoffs:
        _plot_tradeoff(summary, key, label, out_dir / name)
    _plot_splits(summary, out_dir / PLOTS[2])
    _plot_gate(summary, out_dir / PLOTS[3])
    if shown.omu_plot:
        _plot_omu(summary, out_dir / PLOTS[4])
    if summary.get("attacks"):
        _plot_attacks(summary, out_dir / ATTACK_PLOT)
    atomic_write_text(out_dir / "report.html", render_html(summary))
    return out_dir / "report.html"


# ---- several request sizes in one run ------------------------------------------------------------------------

def ratio_dir(ratio: int) -> str:
    """Where one request size's own run lies under a several-size run's directory."""
    return f"forget_{ratio}"


def ratio_markdown(combined: dict) -> str:
    """One table per request size, each under its heading (and with its request-fit line)."""
    parts = []
    for run in combined["runs"]:
        parts.append(f"## forget {run['forget_ratio']}%\n\n{markdown_table(run)}\n"
                     + "".join(f"\n{line}\n" for line in summary_lines(run)))
    return "\n".join(parts)


def panel_value(m: dict, split: str, key: str) -> float:
    """A method's value in a ratio panel: a split's metric, or (split "omu") one of its OMU scores."""
    return (m.get("omu") or {}).get(key, math.nan) if split == "omu" else metric(m["results"].get(split), key)


def _plot_ratios(combined: dict, path: Path) -> None:
    """Every method over the request sizes, in the benchmark's panels (MLLMU-Bench: forget and retain
    classification, OMU forget quality and utility; CLEAR: the name's and the caption's ROUGE-L recall, its model
    utility)."""
    panels = view(combined).ratio_panels
    plt = _pyplot()
    names: list[str] = []
    for run in combined["runs"]:
        names += [m["name"] for m in run["methods"] if m["name"] not in names]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (title, split, key) in zip(axes[0], panels):
        for index, name in enumerate(names):
            points = [(run["forget_ratio"], panel_value(m, split, key)) for run in combined["runs"]
                      for m in run["methods"] if m["name"] == name]
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=4, color=f"C{index % 10}",
                    label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("forget ratio (%)", fontsize=8)
        ax.set_xticks(combined["forget_ratios"])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(**LEGEND)
    fig.tight_layout()
    _save(fig, path)


def render_ratio_html(combined: dict) -> str:
    runs = []
    for run in combined["runs"]:
        header, rows = table_rows(run)
        runs.append({"forget_ratio": run["forget_ratio"], "selection": _selection_text(run), "header": header,
                     "rows": rows, "link": f"{ratio_dir(run['forget_ratio'])}/report.html",
                     "request_fit": request_fit_line(run), "dominance": dominance_line(run)})
    return _templates().get_template("ratio_report.html.j2").render(
        combined=combined, ratios=", ".join(f"{r}%" for r in combined["forget_ratios"]), plot=RATIO_PLOT,
        runs=runs, omu=_omu_context(combined))


def write_ratio_report(combined: dict, out_dir: Path) -> Path:
    """A several-size run's own files beside the sizes' directories: results.json, results.md, the plot over
    the sizes and report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(combined, indent=2))
    atomic_write_text(out_dir / "results.md", ratio_markdown(combined))
    _plot_ratios(combined, out_dir / RATIO_PLOT)
    atomic_write_text(out_dir / "report.html", render_ratio_html(combined))
    return out_dir / "report.html"
