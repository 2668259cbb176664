"""Open-MMUnlearning's yardsticks, forget quality and model utility, on our MLLMU-Bench results.

Open-MMUnlearning (github.com/JunkaiChen1/Open-MMunlearning) evaluates MLLMU-Bench on four splits and files each
metric by role: `forget` is the forget side; `retain_shared` and `retain_celebrity` (our `retain` and `real`) the
retain side; `test` stands apart (generalisation). Its MLLMU evaluator writes the per-split metrics only; the two
scores its tables report are aggregates of them, which we compute as

    forget quality  FQ = mean over the forget split's task metrics of (1 - metric)            (higher: forgot more)
    model utility   MU = mean over retain and real of the mean of each split's task metrics   (higher: kept more)
    aggregate       HM = 2 FQ MU / (FQ + MU)          (the harmonic mean, the repository's `hm_aggregate` rule)

with the task metrics those of MLLMU-Bench's own tables: classification accuracy, cloze (fill-in-the-blank)
accuracy and generation ROUGE-L, each on image+text and on text-only questions. Where ours must approximate:
our `retain` and `real` leave out the validation people (they choose settings; under `--protocol mllmu` too),
their evaluation runs MLLMU-Bench's few-shot prompts (ours: `--protocol mllmu` does, `testbed` does not), and the
testbed's people and model are not LLaVA-7B's, so the reference values below place a run, they do not bound it.

On CLEAR (`clear_scores`) their CLEAREvaluator reports CLEAR's own two scores instead: model utility, the harmonic
mean of Prob., ROUGE-L recall and truth ratio on retain, retain face recognition, real faces and real world (no
chrF++, as here: clear.score's `utility`), and forget quality, a KS test between this model's forget truth ratios
and those of a model trained without the forget people. There is no such model here, so FQ (and HM) are NaN.
"""

from __future__ import annotations

import math

FORGET_SIDE = ("forget",)
UTILITY_SIDE = ("retain", "real")
TASK_METRICS = ("classification_image", "classification_text", "cloze_image", "cloze_text", "rougeL_image",
                "rougeL_text")
# Their published LLaVA-1.5-7B scores on MLLMU-Bench, 10% forget: (forget quality, model utility).
REFERENCE_FORGET_RATIO = 10
REFERENCE = {"GD": (0.781, 0.400), "MIP-Editor": (0.717, 0.451), "retain-only": (0.696, 0.444)}


def task_mean(metrics: dict[str, float] | None) -> float:
    """The mean of the task metrics a split has (NaN where it has none)."""
    values = [metrics[k] for k in TASK_METRICS if metrics and k in metrics and math.isfinite(metrics[k])]
    return sum(values) / len(values) if values else math.nan


def forget_quality(results: dict[str, dict[str, float]]) -> float:
    """FQ = mean over the forget split's task metrics of (1 - metric)."""
    means = [task_mean(results.get(split)) for split in FORGET_SIDE]
    means = [m for m in means if math.isfinite(m)]
    return 1.0 - sum(means) / len(means) if means else math.nan


def model_utility(results: dict[str, dict[str, float]]) -> float:
    """MU = mean over the retain-side splits present of each split's task mean (each split weighs the same, as
    retain_shared and retain_celebrity do in their tables)."""
    means = [task_mean(results.get(split)) for split in UTILITY_SIDE if split in results]
    means = [m for m in means if math.isfinite(m)]
    return sum(means) / len(means) if means else math.nan


def harmonic_mean(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return 0.0 if math.isfinite(a) and math.isfinite(b) else math.nan
    return 2 * a * b / (a + b)


def scores(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"forget_quality", "model_utility", "hm"} of one method's {split: metrics}."""
    fq, mu = forget_quality(results), model_utility(results)
    return {"forget_quality": fq, "model_utility": mu, "hm": harmonic_mean(fq, mu)}


def clear_scores(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """On CLEAR: model utility is CLEAR's (clear.score's `utility` split); forget quality needs a reference model
    trained without the forget people (a KS test against its truth ratios), which there is not: NaN, as the HM."""
    mu = (results.get("utility") or {}).get("model_utility", math.nan)
    return {"forget_quality": math.nan, "model_utility": mu, "hm": math.nan}
