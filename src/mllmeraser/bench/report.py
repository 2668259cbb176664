"""The comparison report: results.json, results.md, PNG plots and one report.html that embeds them."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..errors import atomic_write_bytes, atomic_write_text
from .data import REPORT_SPLITS
COLUMNS = [  # (header, split, metric key or aggregate)
    ("forget cls img", "forget", "classification_image"), ("forget cls txt", "forget", "classification_text"),
    ("forget cloze", "forget", "cloze"), ("forget R-L", "forget", "rougeL"),
    ("test cls img", "test", "classification_image"),
    ("retain cls", "retain", "classification"), ("retain cloze", "retain", "cloze"), ("retain R-L", "retain", "rougeL"),
    ("real cls", "real", "classification"), ("real R-L", "real", "rougeL"),
    ("general cls", "general", "classification"), ("unknown refusal", "unknown", "refusal_rate"),
]
PLOTS = ("tradeoff_classification.png", "tradeoff_rougeL.png", "splits.png")


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


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method"] + [c[0] for c in COLUMNS] + ["fit s", "peak MiB", "gen. overhead"]
    rows = []
    for m in summary["methods"]:
        cells = [m["name"]] + [_fmt(metric(m["results"].get(split), key)) for _, split, key in COLUMNS]
        overhead = m.get("generation_overhead")
        cells += [_fmt(m.get("fit_seconds"), 1), _fmt(m.get("peak_extra_mib"), 0),
                  "-" if overhead is None else f"{(overhead - 1) * 100:+.1f}%"]
        rows.append(cells)
    return header, rows


def markdown_table(summary: dict) -> str:
    header, rows = table_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _plot_tradeoff(summary: dict, key: str, label: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    for m in summary["methods"]:
        name = m["name"]
        point = (metric(m["results"].get("forget"), key), metric(m["results"].get("retain"), key))
        if m["curve"]:
            # one line per learning rate for a baseline (points are epochs), one line for an eraser (strengths)
            groups: dict = {}
            for p in m["curve"]:
                groups.setdefault(p.get("lr"), []).append(p)
            colour = None
            for index, (lr, points) in enumerate(groups.items()):
                xs = [metric(p.get("forget"), key) for p in points]
                ys = [metric(p.get("retain"), key) for p in points]
                legend = f"{name} (strength)" if lr is None else f"{name} lr={lr:g} (epochs)"
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
    ax.legend(fontsize=6, loc="lower left", ncol=2)
    fig.tight_layout()
    _save(fig, path)


def _plot_splits(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in REPORT_SPLITS[:-1] if any(s in m["results"] for m in summary["methods"])]
    methods = summary["methods"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for index, m in enumerate(methods):
        values = [metric(m["results"].get(s), "classification") for s in splits]
        ax.bar([i + index * width for i in range(len(splits))], [0 if math.isnan(v) else v for v in values],
               width, label=m["name"])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(splits))], splits)
    ax.set_ylabel("classification accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Per-split classification accuracy (image and text averaged)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import io
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# A report that says so when one of its own images did not load (and lets a headless browser test read it).
_IMAGE_CHECK = """<script>
window.addEventListener('load', function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = loaded + '/' + images.length;
  if (loaded < images.length) {
    var warning = document.createElement('p');
    warning.className = 'warning';
    warning.textContent = (images.length - loaded) + ' image(s) failed to load: keep the PNG files beside report.html.';
    document.body.insertBefore(warning, document.body.firstChild);
  }
});
</script>"""


def render_html(summary: dict) -> str:
    header, rows = table_rows(summary)
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    table += "</table>"
    settings = "".join(f"<li><b>{html.escape(m['name'])}</b>: <code>{html.escape(json.dumps(_short_settings(m)))}</code></li>"
                       for m in summary["methods"] if m.get("settings"))
    images = "".join(f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>' for name in PLOTS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mllmeraser: unlearning comparison</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em}} img{{max-width:560px}} .warning{{color:#b00;font-weight:bold}}</style>
</head><body>
<h1>Unlearning comparison</h1>
<p>Model <code>{html.escape(summary['model'])}</code>, data <code>{html.escape(summary['data'])}</code>,
forget ratio {summary['forget_ratio']}%. {_selection_text(summary)} Fit time, peak extra memory and generation
overhead are measured in this run.</p>
{table}
<h2>Plots</h2>
{images}
<h2>Chosen settings</h2><ul>{settings}</ul>
{_IMAGE_CHECK}
</body></html>
"""


def _selection_text(summary: dict) -> str:
    rule = (f"the strongest setting keeping its classification accuracy at or above {summary['retain_keep']:.2f} x "
            f"vanilla ({summary['vanilla_retain_val_classification']:.3f})")
    if summary.get("eraser_strength") == "fitted":
        return (f"Erasers are shown at the strength they were fitted with (their curves show the others); baselines at "
                f"the setting chosen on the retain validation hold-out only: {rule}.")
    return f"Settings were chosen on the retain validation hold-out only: {rule}."


def _short_settings(m: dict) -> dict:
    keep = ("solver", "alpha", "fitted_alpha", "ratio", "gamma", "beta", "lam", "method", "lr", "epochs", "grid_seconds")
    return {k: v for k, v in m["settings"].items() if k in keep}


def write_report(summary: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out_dir / "results.md", markdown_table(summary) + "\n")
    _plot_tradeoff(summary, "classification", "classification accuracy", out_dir / PLOTS[0])
    _plot_tradeoff(summary, "rougeL", "ROUGE-L", out_dir / PLOTS[1])
    _plot_splits(summary, out_dir / PLOTS[2])
    atomic_write_text(out_dir / "report.html", render_html(summary))
    return out_dir / "report.html"
