"""`mllmeraser eval`: MLLMU-Bench or CLEAR scores, optionally with an eraser attached."""

from __future__ import annotations

from pathlib import Path

from .options import add_benchmark_arg, add_eraser_args, add_forget_ratio_arg, add_model_arg, add_protocol_arg, \
    attached, benchmark, check_clear_protocol, load_eraser, load_model, write_results


def add_parsers(commands) -> None:
    from ..bench import clear
    from ..bench.data import REPORT_SPLITS, VALIDATION_SPLIT

    evaluate_cmd = commands.add_parser("eval", help="MLLMU-Bench evaluation (optionally with an eraser attached)")
    add_model_arg(evaluate_cmd)
    evaluate_cmd.add_argument("--data", required=True, help="MLLMU-Bench directory (forget_10/, retain_90/, Test_Set/, "
                              "...) or CLEAR directory (forget10_perturbed/, retain_perturbed/, real_faces/, ...)")
    add_benchmark_arg(evaluate_cmd)
    add_forget_ratio_arg(evaluate_cmd)
    evaluate_cmd.add_argument("--batch-size", type=int, default=64)
    add_eraser_args(evaluate_cmd)
    evaluate_cmd.add_argument("--json", type=Path, default=None, help="write {split: {metric: value}} here")
    evaluate_cmd.add_argument("--splits", default=None,
                              help=f"comma-separated subset of {','.join(REPORT_SPLITS + (VALIDATION_SPLIT,))} "
                              f"(CLEAR: of {','.join(clear.REPORT_SPLITS)})")
    add_protocol_arg(evaluate_cmd, default=None)
    evaluate_cmd.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    if benchmark(args) == "clear":
        return _eval_clear(args)
    from ..bench import evaluate
    from ..bench.data import REPORT_SPLITS

    protocol = args.protocol or "testbed"
    splits = tuple(args.splits.split(",")) if args.splits else REPORT_SPLITS
    eraser = load_eraser(args.eraser, args.alpha)  # a bad file is refused before a model is loaded
    model, processor = load_model(args)
    items = evaluate.report_items(args.data, args.forget_ratio, splits, protocol)
    answers: dict[str, list[str]] = {}
    with attached(model, eraser):
        results = evaluate.evaluate(model, processor, args.data, args.forget_ratio, items=items,
                                    batch_size=args.batch_size, protocol=protocol, answers_out=answers)
    if protocol == "testbed":  # the fact-leak rate beside ROUGE-L (bench/facts.py); with an eraser, against vanilla
        split_fact = evaluate.split_facts(items)
        vanilla = (evaluate.vanilla_fact_flags(model, processor, items, split_fact, args.batch_size)
                   if eraser is not None else None)
        evaluate.add_fact_metrics(results, split_fact, answers, vanilla)
    # What the gate turned on, per split (read on the testbed protocol's prompts, so reported with it only).
    if eraser is not None and eraser.prompt_gate is not None and protocol == "testbed":
        for split, scores in evaluate.gate_scores(model, processor, eraser, items, args.batch_size).items():
            results[split]["gate_fire_rate"] = evaluate.fire_rate(scores, eraser)
    write_results(results, evaluate.format_table(results, evaluate.HEADLINE), args.json)
    return 0


def _eval_clear(args) -> int:
    """eval on CLEAR data: its configs read and checked first, then its own metrics (bench/clear.py)."""
    from ..bench import clear, evaluate

    check_clear_protocol(args)
    splits = tuple(args.splits.split(",")) if args.splits else clear.REPORT_SPLITS
    eraser = load_eraser(args.eraser, args.alpha)
    tasks = clear.report_tasks(args.data, args.forget_ratio, splits)
    model, processor = load_model(args)
    with attached(model, eraser):
        results = clear.score(model, processor, tasks, args.batch_size)
    write_results(results, evaluate.format_table(results, clear.HEADLINE), args.json)
    return 0
