"""`mllmeraser compare` (every method side by side on one model, with the report; on MLLMU-Bench or CLEAR data) and
`mllmeraser demo` (the main job: the testbed built or reused, then compare on it)."""

from __future__ import annotations

import time
from pathlib import Path

from .options import add_benchmark_arg, add_cache_args, add_erasure_arg, add_forget_ratios_arg, add_model_arg, \
    add_protocol_arg, benchmark, cache_dir, check_clear_protocol, model_options
from .testbed import add_preset_arg


def add_parsers(commands) -> None:
    from ..bench.compare import ALL_METHODS, CompareSettings

    compare_cmd = commands.add_parser("compare", help="vanilla, eraser (default and paper), refuse and prompt (no "
                                      "training) and the LoRA baselines, side by side")
    add_model_arg(compare_cmd)
    compare_cmd.add_argument("--data", required=True, help="MLLMU-Bench directory, or CLEAR directory (its configs: "
                             "fitted on forgetNN and retainNN, scored on its own splits; docs/clear_protocol.md)")
    add_benchmark_arg(compare_cmd)
    add_forget_ratios_arg(compare_cmd)
    methods = ALL_METHODS[1:]
    compare_cmd.add_argument("--methods", default=",".join(methods), help=f"comma-separated subset of {','.join(methods)}")
    compare_cmd.add_argument("--out", type=Path, default=Path("runs/compare"))
    compare_cmd.add_argument("--baseline-epochs", type=int, default=CompareSettings.baseline_epochs)
    compare_cmd.add_argument("--baseline-lrs", default=",".join(str(x) for x in CompareSettings.baseline_lrs))
    compare_cmd.add_argument("--batch-size", type=int, default=64)
    add_protocol_arg(compare_cmd, default=None)
    add_erasure_arg(compare_cmd)
    compare_cmd.add_argument("--attacks", dest="attack_suite", action="store_true",
                             help="also run the attack suite on vanilla and every method (report: Attacks)")
    add_cache_args(compare_cmd)
    compare_cmd.set_defaults(handler=run_compare)

    demo = commands.add_parser("demo", help="the main job: build/reuse the testbed, fit an eraser, before/after, report")
    demo.add_argument("--seed", type=int, default=0)
    add_preset_arg(demo)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--methods", default="eraser,eraser-paper",
                      help="add ga,graddiff,kl,npo,mmunlearner for the baselines (slower)")
    add_forget_ratios_arg(demo)
    add_erasure_arg(demo)
    add_model_arg(demo, required=False)
    add_cache_args(demo)
    demo.set_defaults(handler=run_demo)


def methods(text: str) -> tuple[str, ...]:
    """--methods as compare runs them: vanilla first, always."""
    return ("vanilla",) + tuple(m for m in text.split(",") if m and m != "vanilla")


def print_summary(summary: dict, out_dir: Path) -> None:
    from ..bench import report

    if "runs" in summary:  # several request sizes: a table each
        print(report.ratio_markdown(summary))
    else:
        print(report.markdown_table(summary))
        for line in report.summary_lines(summary):
            print(f"\n{line}")
    print(f"\nreport: {(out_dir / 'report.html').resolve()}")


def run_compare(args) -> int:
    from ..bench import attack_summary, compare

    chosen = benchmark(args)
    if chosen == "clear":
        check_clear_protocol(args)
    settings = compare.CompareSettings(forget_ratio=args.forget_ratio[0], methods=methods(args.methods),
                                       batch_size=args.batch_size, baseline_epochs=args.baseline_epochs,
                                       baseline_lrs=tuple(float(x) for x in args.baseline_lrs.split(",")),
                                       protocol=args.protocol or "testbed", benchmark=chosen, erasure=args.erasure,
                                       attacks=args.attack_suite, cache_dir=cache_dir(args), **model_options(args))
    summary = compare.run_compare_ratios(Path(args.model), Path(args.data), args.out, settings, args.forget_ratio)
    print_summary(summary, args.out)
    for run in summary.get("runs", [summary]):
        if "attacks" in run:
            print(attack_summary.format_summary(run["attacks"]))
    return 0


def run_demo(args) -> int:
    from ..bench import compare
    from ..testbed.preset_build import build

    started = time.perf_counter()
    directory = build(seed=args.seed, preset=args.preset)
    settings = compare.CompareSettings(forget_ratio=args.forget_ratio[0], methods=methods(args.methods),
                                       erasure=args.erasure, cache_dir=cache_dir(args), **model_options(args))
    summary = compare.run_compare_ratios(directory / "model", directory / "data", args.out, settings,
                                         args.forget_ratio)
    print_summary(summary, args.out)
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0
