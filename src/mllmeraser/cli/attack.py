"""`mllmeraser attack`: the attack suite, vanilla and an eraser (and the references that train nothing) under
each attack, on MLLMU-Bench or CLEAR data."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError
from .options import add_benchmark_arg, add_eraser_args, add_forget_ratio_arg, add_model_arg, benchmark, load_eraser, \
    load_model, write_results

TASKS = ("classification", "cloze", "generation")
COUNTED_METRICS = {"classification": "classification", "cloze": "cloze", "rougeL": "generation"}  # -> its task


def add_parsers(commands) -> None:
    from ..bench.attacks import BY_NAME

    attack = commands.add_parser("attack", help="the attack suite: vanilla and an eraser under each attack")
    add_model_arg(attack)
    attack.add_argument("--data", required=True, help="MLLMU-Bench directory, or CLEAR directory (the attacks that "
                        "apply to its caption and name questions, scored by its ROUGE-L recall; docs/clear_protocol.md)")
    add_benchmark_arg(attack)
    add_forget_ratio_arg(attack)
    add_eraser_args(attack)
    attack.add_argument("--attacks", default=None, help="comma-separated subset of "
                        f"{','.join(BY_NAME)} (default: all)")
    attack.add_argument("--tasks", help="comma-separated subset of classification,cloze,generation: attack only "
                        "those questions (classification,cloze skips the 50-token answers; the bars read classification)")
    attack.add_argument("--count-by", choices=COUNTED_METRICS, default="classification",
                        help="the metric the verdicts read: an attack counts where vanilla's forget score on it is "
                        ">= 0.8, and the eraser's bar is <= 0.2 on it (cloze: for a model that knows its facts but "
                        "not the A-D format, as the pretrained testbed; MLLMU-Bench data only)")
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
    # The adaptive attack's defaults are bench.adaptive.Budget's (None here: that module loads torch).
    attack.add_argument("--adaptive", action="store_true", help="instead of the suite: a white-box attacker searches "
                        "for benign sentences that switch the eraser's prompt gate off (docs/threat_model.md)")
    attack.add_argument("--adaptive-budget", type=int, default=None,
                        help="gate evaluations per prompt (default 200)")
    attack.add_argument("--adaptive-sentences", type=int, default=None,
                        help="sentences added per prompt at most (default 4)")
    attack.add_argument("--adaptive-tokens", type=int, default=None,
                        help="tokens added per prompt at most (default 64)")
    attack.add_argument("--adaptive-prompts", type=int, default=20, help="forget prompts attacked (0: all)")
    attack.set_defaults(handler=run_attack)


def run_attack(args) -> int:
    from ..bench import answering, attack_scoring, attack_set, attack_suite, attack_summary, attacks

    if benchmark(args) == "clear":
        if args.count_by != "classification":
            raise UserInputError(None, "--count-by is for MLLMU-Bench data: CLEAR's attacks count by name recall")
        return run_clear(args)
    names = tuple(args.attacks.split(",")) if args.attacks else None
    unknown = [n for n in names or () if n not in attacks.BY_NAME]
    if unknown:
        raise UserInputError(None, f"unknown attack(s) {unknown}; choose from {list(attacks.BY_NAME)}")
    tasks = tuple(args.tasks.split(",")) if args.tasks else None
    if tasks and set(tasks) - set(TASKS):
        raise UserInputError(None, f"--tasks takes classification, cloze and generation, got {args.tasks!r}")
    if tasks and COUNTED_METRICS[args.count_by] not in tasks:
        raise UserInputError(None, f"--count-by {args.count_by} reads {COUNTED_METRICS[args.count_by]} questions, "
                             f"which --tasks {args.tasks} leaves out")
    paraphrases = attack_set.read_paraphrases(args.paraphrases) if args.paraphrases else None
    eraser = load_eraser(args.eraser, args.alpha)
    if args.adaptive:
        if args.count_by != "classification":
            raise UserInputError(None, "--count-by is the suite's: --adaptive reports how many prompts evade the gate")
        return run_adaptive(args, eraser, tasks)
    model, processor = load_model(args)
    references = (reference_methods(eraser, processor, answering.forget_system_prompt(args.data, args.forget_ratio))
                  if args.references else None)
    summary = attack_suite.run_suite(model, processor, args.data, args.forget_ratio,
                                     {"eraser": eraser} if eraser is not None else None, names,
                                     args.retain_people or None, args.batch_size, args.white_box, paraphrases,
                                     references=references, tasks=tasks,
                                     scoring=attack_scoring.mllmu_scoring(args.count_by))
    write_results(summary, attack_summary.format_summary(summary), args.json)
    return 0


def run_adaptive(args, eraser, tasks: tuple[str, ...] | None) -> int:
    """`attack --adaptive`: the white-box search for benign sentences that switch the gate off (bench/adaptive.py)."""
    from ..bench import adaptive

    if eraser is None or eraser.prompt_gate is None:
        raise UserInputError(None, "--adaptive needs --eraser FILE with a prompt gate (the attack searches against it)")
    default = adaptive.Budget()
    budget = adaptive.Budget(default.evaluations if args.adaptive_budget is None else args.adaptive_budget,
                             default.sentences if args.adaptive_sentences is None else args.adaptive_sentences,
                             default.tokens if args.adaptive_tokens is None else args.adaptive_tokens)
    model, processor = load_model(args)
    result = adaptive.run_attack(model, processor, eraser, args.data, args.forget_ratio, budget,
                                 args.adaptive_prompts or None, tasks or adaptive.DEFAULT_TASKS, args.batch_size)
    write_results(result, adaptive.format_summary(result), args.json)
    return 0


# What the suite cannot do on CLEAR, and why (each a one-line error where asked for).
CLEAR_REFUSED = {
    "white_box": "--white-box reads classification option letters (the probe) and never-seen people (membership "
                 "inference, Unknown_Set); CLEAR has neither",
    "tasks": "--tasks picks MLLMU-Bench's classification, cloze and generation questions; CLEAR asks generation "
             "questions only (captions and names)",
    "adaptive": "--adaptive searches MLLMU-Bench's forget prompts; it is not implemented on CLEAR",
}


def run_clear(args) -> int:
    """The attack suite on CLEAR (bench/clear_attacks.py): its configs read and the attacks checked before the model
    loads; the attacks that do not apply are listed with their reasons."""
    from ..bench import answering, attack_set, attack_suite, attack_summary, clear, clear_attacks

    for option, reason in CLEAR_REFUSED.items():
        if getattr(args, option):
            raise UserInputError(None, f"not on CLEAR data: {reason}")
    names = tuple(args.attacks.split(",")) if args.attacks else None
    paraphrases = attack_set.read_paraphrases(args.paraphrases) if args.paraphrases else None
    eraser = load_eraser(args.eraser, args.alpha)
    attacked = clear_attacks.attack_set(args.data, args.forget_ratio, names, args.retain_people or None, paraphrases)
    prompt = answering.system_prompt(clear.forget_names(args.data, args.forget_ratio))
    model, processor = load_model(args)
    references = reference_methods(eraser, processor, prompt) if args.references else None
    summary = attack_suite.run_attacked(model, processor, attacked, {"eraser": eraser} if eraser is not None else None,
                                        references, args.batch_size, scoring=clear_attacks.SCORING)
    summary["skipped"] = {} if names else dict(clear_attacks.SKIPPED)  # named attacks: the user's choice
    write_results(summary, attack_summary.format_summary(summary), args.json)
    return 0


def reference_methods(eraser, processor, system_prompt: str) -> dict:
    """{name: answering method}: refuse where there is a prompt-gated eraser to take the gate from, and prompt
    (`system_prompt` leading every question)."""
    from ..bench import answering
    refuse = ({"refuse": answering.Refusing(eraser, processor)}
              if eraser is not None and eraser.prompt_gate is not None else {})
    return {**refuse, "prompt": answering.SystemPrompted(system_prompt)}
