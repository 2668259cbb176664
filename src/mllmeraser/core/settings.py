"""A fit's settings: FitSettings, what every gate shares, holding the gate's own (one frozen dataclass per gate:
KnnGate, RidgeGate, PaperGate) and PGD's (PGDSettings).

Frozen dataclasses, checked when made (a bad value is a one-line UserInputError before any forward runs). The
decision layer may be a fraction of the decoder's depth: a fit resolves it first (`FitSettings.at_depth`), so the
model cache's key and the eraser's record hold the absolute layer. `steered_layers` says which decoder layers a
fit steers under them.

An eraser records the settings of each request's fit in its metadata (`FitSettings.record`: nested, the gate's
fields under "gate" with its name). Records written before the gates had their own dataclasses (artifact format 3
and before) are flat, every gate's fields beside the shared ones: `nested_record` reads them into the nested form.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from ..errors import UserInputError
from . import gating
from .decoder_layers import find_decoder_layers


def _check_max_fpr(max_fpr: float) -> None:
    if not 0.0 <= max_fpr < 1.0:
        raise UserInputError(None, f"max_fpr must be in [0, 1), got {max_fpr}")


@dataclass(frozen=True)
class KnnGate:
    """The default gate: a prompt gate whose score is a ratio test between the nearest forget and the nearest retained
    prompts (gating.fit_knn), its threshold calibrated on held-out prompts. Defaults chosen on the testbed's
    validation people only (README, "Selective erasure")."""

    name: ClassVar[str] = "knn"
    neighbours: int = 1  # similarities averaged over this many nearest forget (and retain) prompts
    max_fpr: float = 0.01  # the fraction of calibration prompts the threshold lets through
    # A floor under the calibrated threshold, tau >= log(min_ratio): the nearest forget prompt must be at least
    # min_ratio times nearer than the nearest retained one. Why: calibration only sees the validation people; where
    # all of them are far from the forget people (a small request: 3 people at 5% on the testbed), the quantile
    # falls to ~0 and a look-alike outside the validation people passes (7.9% of real-people prompts there).
    # 2 is the plain "twice as near" of a ratio test, set before measuring, not tuned.
    min_ratio: float = 2.0

    def __post_init__(self) -> None:
        _check_max_fpr(self.max_fpr)
        if self.min_ratio < 1.0:
            raise UserInputError(None, f"min_ratio must be >= 1, got {self.min_ratio}")
        if self.neighbours < 1:
            raise UserInputError(None, f"neighbours must be >= 1, got {self.neighbours}")


@dataclass(frozen=True)
class RidgeGate:
    """A linear prompt gate: ridge regression on the pooled prompt, forget towards 1 and retain towards 0
    (gating.fit_ridge), its threshold calibrated on held-out prompts."""

    name: ClassVar[str] = "ridge"
    beta: float = 16.0  # retain weight per sample relative to forget
    lam: float = 1e-5  # L2 penalty relative to the mean eigenvalue
    max_fpr: float = 0.01  # the fraction of calibration prompts the threshold lets through

    def __post_init__(self) -> None:
        _check_max_fpr(self.max_fpr)


@dataclass(frozen=True)
class PaperGate:
    """The paper's gate: per steered layer, g_l = h_last . u_l on the last prompt token's output, u_l solved in the
    null space of the retain questions' activations (steering.solve_gate_paper) and shaped by floor and cap
    (steering.shape_gate)."""

    name: ClassVar[str] = "paper"
    ratio: float = 0.3  # the fraction of retain eigen-directions kept as the null space
    gamma: float = 0.1  # ridge on the projected system
    floor: float = -math.inf  # below the floor the gate is 0
    cap: float = math.inf  # above the cap it is clipped
    normalise_gate: bool = False  # rescale u_l so the mean gate over forget inputs is 1


GATE_TYPES: dict[str, type] = {gate.name: gate for gate in (KnnGate, RidgeGate, PaperGate)}
GATES = tuple(GATE_TYPES)


@dataclass(frozen=True)
class PGDSettings:
    eps: float = 8 / 255  # L-inf budget in pixel units ([0, 1] images)
    step: float = 2 / 255
    steps: int = 10
    # Items per forward/backward pass. PGD's step is the sign of each item's own gradient, so splitting a batch
    # changes the peak memory (activations grow with it) and nothing else: each micro-batch's loss is divided by
    # the whole batch's answer-token count, so its gradient is the unsplit gradient's slice. None: 8 at scale
    # (without checkpointing, 32 image prompts of ~600 tokens hold ~90 GB of activations at 7B), the whole batch
    # on a small model, where splitting only costs time (see `resolved`).
    batch_size: int | None = None
    # Activation checkpointing for the PGD loop (where the model has transformers' checkpointable blocks): each
    # block keeps only its input and recomputes the rest in the backward, ~one extra forward a step for a
    # fraction of the memory. Switched on for the loop only; the model's own flags are restored afterwards.
    # None: on at scale, off on a small model (see `resolved`).
    checkpointing: bool | None = None
    # Early stop: before each step, an item whose mean answer-token NLL is at most stop_nll keeps its current
    # image and leaves the loop (PGD is there so the model recalls strongly; where it already does, more steps
    # buy nothing and cost a forward and a backward each). None: every item runs every step (the paper's PGD).
    # 0.1 nats is a mean answer-token probability of ~0.9, fixed before measuring anything with it; against the
    # paper's 10 steps it changes the testbed's direction by cosine >= 0.9995 per layer (README, "Scale").
    stop_nll: float | None = 0.1

    def __post_init__(self) -> None:
        if self.stop_nll is not None and not self.stop_nll >= 0:
            raise UserInputError(None, f"PGD stop_nll must be >= 0, got {self.stop_nll}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserInputError(None, f"PGD batch_size must be >= 1, got {self.batch_size}")
        if self.steps < 0:
            raise UserInputError(None, f"PGD steps must be >= 0, got {self.steps}")

    def resolved(self, model, batch: int) -> PGDSettings:
        """These settings with `batch_size` and `checkpointing` decided for `model` and a batch of `batch` items
        where they are None. At scale (a text decoder at least AT_SCALE_WIDTH wide: 7B models are 3,584-4,096)
        micro-batches of 8 under checkpointing: PGD's activations then take a quarter of the memory (measured on
        LLaVA-1.5-7B's shape, benchmarks/fit_memory.py). Below it, activations are small and splitting or
        recomputing only costs time (the small testbed's fit: 9.2 s against 3.0 s), so one batch, no
        checkpointing. Either way the images are the same (tests/test_fit_memory.py)."""
        at_scale = int(model.config.get_text_config().hidden_size) >= AT_SCALE_WIDTH
        return replace(self, batch_size=self.batch_size or (8 if at_scale else max(batch, 1)),
                       checkpointing=at_scale if self.checkpointing is None else self.checkpointing)


AT_SCALE_WIDTH = 1024
"""Text-decoder width from which PGD defaults to micro-batches under activation checkpointing."""


@dataclass(frozen=True)
class FitSettings:
    """What every gate shares, and the gate: KnnGate() (the default), RidgeGate() or PaperGate(), with its own
    settings. Defaults chosen on the testbed's validation people only (README, "Selective erasure")."""

    gate: KnnGate | RidgeGate | PaperGate = field(default_factory=KnnGate)
    # prompt gates: "mean" (attention-masked mean over the prompt), "last", "windows:W" (the means of W-token
    # windows at stride W // 2, scored each, the max deciding: gating.py, "segments"), or "embeddings:W" (W-token
    # windows at every start over the decoder's input embeddings, which no added prefix changes: gating.py)
    pooling: str = "mean"
    # prompt gates: the decoder layer whose output decides; steering from there on. An int is that layer; a float in
    # (0, 1) a fraction of the decoder's depth (gating.decision_layer_index: the layer nearest f * L), so one default
    # fits every depth: a quarter, layer 1 of the testbed's 4 (where the defaults were chosen) and 8 of a 30-layer
    # decoder (gating.DECISION_DEPTH says why). A fit resolves it first (`at_depth`): the model cache's key and the
    # eraser's record hold the absolute layer, so the default names the same entries as layer 1 on the testbed.
    decision_layer: int | float = gating.DECISION_DEPTH
    alpha: float = 1.0  # steering strength (positive erases: r points from recall to erasure)
    layers: tuple[int, ...] | None = None  # steered decoder layers; None: decision layer..L-1 (paper: 1..L-1)
    # prompt gates: both banks also hold each photo four times, one edge covered by a white band of this fraction
    # of the side (inputs.occluded_copies; 0: off). Why: writing over a photo (a caption, a name: the typographic
    # attack) moves its pooled feature away from the clean photo's, and the knn ratio test then finds no forget
    # prompt near; with covered copies in both banks a covered prompt is compared with covered prompts on both
    # sides. Off by default: a request's fit then runs 4 more forwards (to the decision layer) per forget photo and
    # the banks grow by 4 rows per photo, ~2x the fit time and ~4x the artifact on the testbed (README, Threat
    # model). 0.15, the value to turn it on with, was set before measuring; measured on the seed-2 testbed world.
    occlusion: float = 0.0
    mode: str = "prefill"
    pgd: PGDSettings = field(default_factory=PGDSettings)
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.gate, tuple(GATE_TYPES.values())):
            named = GATE_TYPES.get(self.gate) if isinstance(self.gate, str) else None
            hint = f" (for {self.gate!r}: gate={named.__name__}())" if named is not None else ""
            kinds = ", ".join(f"{gate.__name__}()" for gate in GATE_TYPES.values())
            raise UserInputError(None, f"gate must be one of {kinds}, got {self.gate!r}{hint}")
        try:
            gating.window_width(self.pooling)
        except ValueError as error:
            raise UserInputError(None, str(error)) from None
        gating.check_decision_layer(self.decision_layer)
        if not 0.0 <= self.occlusion < 0.5:
            raise UserInputError(None, f"occlusion must be in [0, 0.5), got {self.occlusion}")
        if not math.isfinite(self.alpha):  # the eraser would refuse it after the whole fit
            raise UserInputError(None, f"alpha must be finite, got {self.alpha}")

    def at_depth(self, num_layers: int) -> FitSettings:
        """These settings with `decision_layer` the absolute layer it names on a decoder of `num_layers` layers
        (gating.decision_layer_index; an absolute layer stays as it is, if the decoder has it). Every fit step
        reads resolved settings, so a fraction and the layer it names fit, cache and record alike."""
        return replace(self, decision_layer=gating.decision_layer_index(self.decision_layer, num_layers))

    def for_model(self, model, layers_path: str | None = None) -> FitSettings:
        """`at_depth` for `model`'s decoder (its layer list at `layers_path`, or the family's)."""
        _, layers = find_decoder_layers(model, layers_path)
        return self.at_depth(len(layers))

    def record(self) -> dict[str, Any]:
        """These settings as JSON-ready dicts, nested as the dataclasses are: the gate's fields under "gate", with
        its name (an eraser's metadata, a comparison's results)."""
        record = asdict(self)
        record["gate"] = {"name": self.gate.name, **record["gate"]}
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> FitSettings:
        """The settings a record holds: `record()`'s, or an older flat one (nested_record); a field it does not
        hold (an eraser's record leaves out alpha and the paper gate's floor and cap, which its header holds per
        term) takes its default."""
        record = nested_record(record)
        gate = dict(record["gate"])
        kind = GATE_TYPES[gate.pop("name")]
        shared = {f.name: record[f.name] for f in fields(cls) if f.name in record and f.name not in ("gate", "pgd")}
        if shared.get("layers") is not None:
            shared["layers"] = tuple(shared["layers"])
        return cls(gate=kind(**{f.name: gate[f.name] for f in fields(kind) if f.name in gate}),
                   pgd=PGDSettings(**record.get("pgd", {})), **shared)


def nested_record(record: Any) -> Any:
    """A fit record in this version's nested form. A flat one (artifact format 3 and before: the gate's name under
    "gate", every gate's fields beside the shared ones) is nested: the named gate's fields under "gate" with its
    name, the other gates' fields (which did not apply) left out. Anything else is returned as it is."""
    if not isinstance(record, dict) or not isinstance(record.get("gate"), str) or record["gate"] not in GATE_TYPES:
        return record
    kind = GATE_TYPES[record["gate"]]
    gate_fields = {f.name for gate in GATE_TYPES.values() for f in fields(gate)}
    nested = {"gate": {"name": kind.name, **{f.name: record[f.name] for f in fields(kind) if f.name in record}}}
    nested.update((key, value) for key, value in record.items() if key != "gate" and key not in gate_fields)
    return nested


def steered_layers(settings: FitSettings, num_layers: int) -> list[int]:
    """The decoder layers a fit steers, in the order given: settings.layers, or the decision layer..L-1 for a
    prompt gate, or the paper's 1..L-1."""
    paper = isinstance(settings.gate, PaperGate)
    first = 1 if paper else gating.decision_layer_index(settings.decision_layer, num_layers)
    steered = list(settings.layers) if settings.layers is not None else list(range(first, num_layers))
    if not steered or any(not first <= i < num_layers for i in steered) or len(set(steered)) != len(steered):
        raise UserInputError(None, f"--layers must name distinct decoder layers {first}..{num_layers - 1}, "
                                   f"got {steered}")
    return steered
