"""`mllmeraser fit` (an eraser for a forget request, its settings' flags generated from FitSettings) and
`mllmeraser cache` (the model caches fits share)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import UserInputError
from .flags import Flag, add_settings_flags, settings_from_args
from .options import add_cache_args, add_forget_ratio_arg, add_model_arg, cache_dir, load_model


def decision_layer_arg(value: str | int | float) -> int | float:
    """--decision-layer's value: "1" an absolute layer (int), "0.25" a fraction of depth (float); checked by
    gating.check_decision_layer. Parsed here, not by argparse's type=, so a bad value is one line (exit 2)."""
    from ..core import gating

    if not isinstance(value, str):  # the default
        return gating.check_decision_layer(value)
    for number in (int, float):
        try:
            return gating.check_decision_layer(number(value))
        except ValueError:
            continue  # not this kind of number
    return gating.check_decision_layer(value)  # neither: the one-line error, naming the flag


def fit_flags() -> dict[str, Flag]:
    """What FitSettings' fields do not say about their flags, by argument dest. A function, not a constant: the
    choices are read from the core, which the parser imports only when it is built."""
    from ..core.attachment import STEERING_MODES
    from ..core.settings import FitSettings, PGDSettings

    return {
        "gate": Flag(help="knn (default) or ridge: one decision per prompt; paper: the paper's per-layer "
                     "null-space gate (each reads the flags of its own settings below)"),
        "pooling": Flag(help="prompt gates' input: mean, last, windows:W (segments of W tokens, the max decides) "
                             "or embeddings:W (W-token windows of the decoder's input embeddings, every start)"),
        "decision_layer": Flag(convert=decision_layer_arg, help="prompt gates: the decoder layer whose output "
                               "decides, steering from there on: an index (0, 1, ...) or a fraction of the decoder's "
                               "depth in (0, 1), the layer nearest it (default "
                               f"{FitSettings.decision_layer}: layer 1 of the testbed's 4, 8 of a 30-layer decoder)"),
        "neighbours": Flag(help="knn: similarities averaged over this many nearest forget (and retain) prompts"),
        "max_fpr": Flag(help="prompt gates: the fraction of calibration prompts the threshold lets through"),
        "min_ratio": Flag(help="knn: fire only where the nearest forget prompt is at least this many times nearer "
                          "than the nearest retained one (a floor under the calibrated threshold)"),
        "ratio": Flag(help="paper gate: the fraction of retain eigen-directions kept as the null space"),
        "gamma": Flag(help="paper gate: ridge on the projected system"),
        "beta": Flag(help="ridge gate: retain weight per sample relative to forget"),
        "lam": Flag(help="ridge gate: L2 penalty relative to the mean eigenvalue"),
        "alpha": Flag(help="steering strength (positive erases)"),
        "layers": Flag(metavar="L1,L2,...", help="comma-separated decoder layer indices "
                       "(default: the decision layer to the last; paper: 1..L-1)"),
        "floor": Flag(help="paper gate: below the floor the gate is 0"),
        "cap": Flag(help="paper gate: above the cap the gate is clipped"),
        "normalise_gate": Flag(help="paper gate: rescale it so its mean over the forget inputs is 1"),
        "occlusion": Flag(help="prompt gates: the gate's banks also hold each photo with one edge covered by a "
                          "white band of this fraction of the side, one copy per edge, against text written over "
                          "photos (default 0: off; 0.15 measured in docs/threat_model.md)"),
        "mode": Flag(choices=STEERING_MODES, help="steer the prompt's pass only (prefill, default) or every step"),
        "pgd_eps": Flag(scale=255, help="PGD's L-inf budget, in /255 units"),
        "pgd_step": Flag(scale=255, help="PGD's step, in /255 units"),
        "pgd_steps": Flag(help="PGD steps"),
        "pgd_batch_size": Flag(help="image prompts per PGD forward/backward; peak memory grows with it, results do "
                               "not (default: 8 for a decoder of width >= 1024, else the fit's batch)"),
        "pgd_checkpointing": Flag(help="recompute activations in PGD's backward (a quarter of the memory for ~1.1x "
                                  "the time; default: on for a decoder of width >= 1024, else off)"),
        "pgd_stop_nll": Flag(help="an item leaves PGD once its mean answer-token NLL is at most this ('none': every "
                             f"item runs every step, the paper's PGD; default {PGDSettings.stop_nll})"),
        "batch_size": Flag(help="prompts per forward pass while fitting"),
    }


def add_parsers(commands) -> None:
    from ..bench.data import ERASURE_SPLIT
    from ..core.settings import FitSettings

    fit = commands.add_parser("fit", help="fit an eraser for a forget request")
    add_model_arg(fit)
    fit.add_argument("--data", default=None, help="MLLMU-Bench directory that split names refer to")
    fit.add_argument("--forget", required=True, help="split name (forget_10), split dir/parquet, or JSONL")
    fit.add_argument("--retain", default=None, help="split name (retain_90), split dir/parquet, or JSONL "
                     "(default: the retain split under --data less its validation part, plus General_Train)")
    fit.add_argument("--erasure", default=None, help=f"questions the model refuses (default: {ERASURE_SPLIT} under --data)")
    fit.add_argument("--out", required=True, type=Path, help="eraser file (.safetensors)")
    fit.add_argument("--calibration", default=None, help="held-out questions about people outside forget and retain, "
                     "on which the gate's threshold is calibrated (default: the validation people under --data; "
                     "without --data: the retain questions, each left out of the gate in turn)")
    add_settings_flags(fit, FitSettings, fit_flags())
    fit.add_argument("--layers-path", default=None, help="dotted path of the decoder layer list (overrides the family's)")
    add_cache_args(fit)
    add_forget_ratio_arg(fit)
    fit.set_defaults(handler=run_fit)

    cache_cmd = commands.add_parser("cache", help="list (or --clear) the model caches fits share")
    cache_cmd.add_argument("--cache-dir", type=Path, default=None,
                           help="the cache directory (default $MLLMERASER_CACHE/fits, else ~/.cache/mllmeraser/fits)")
    cache_cmd.add_argument("--clear", action="store_true", help="delete every entry")
    cache_cmd.set_defaults(handler=run_cache)


def fit_settings(args: argparse.Namespace):
    """The FitSettings the fit flags name."""
    from ..core.settings import FitSettings

    return settings_from_args(FitSettings, args, fit_flags())


def run_fit(args) -> int:
    from ..bench import clear, data
    from ..core import cache, distributed
    from ..core.eraser_fitter import fit_eraser

    args.device = distributed.init_from_env(args.device, args.device_map)  # torchrun: join the group, a GPU per rank
    settings = fit_settings(args)
    if args.data is not None and clear.is_clear_layout(args.data):  # its configs are SPECs; its defaults are not there
        for flag, value in (("--retain", args.retain), ("--calibration", args.calibration)):
            if value is None:
                raise UserInputError(args.data, f"CLEAR data has no MLLMU-Bench retain split or validation people: "
                                                f"pass {flag} SPEC (e.g. --retain retain90, a CLEAR config)")
    model, processor = load_model(args)
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
    print(f"fitted eraser ({settings.gate.name} gate, {len(eraser.layer_indices)} layers, alpha {settings.alpha}) "
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


def run_cache(args) -> int:
    from ..core import cache

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
