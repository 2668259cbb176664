"""What an eraser's gate reads on questions, with nothing attached: a diagnostic of the gate (the attack suite's
gate fire rates, the adaptive attack's scores, the comparison's held-out AUROC).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import models
from .capture import capture
from .decoder_layers import find_decoder_layers
from .eraser import Eraser
from .inputs import PromptLike


def gate_scores(model, processor, eraser: Eraser, items: Sequence[PromptLike], batch_size: int = 64) -> torch.Tensor:
    """What the eraser's gate reads for each of `items`, [N, K] in item order, with nothing attached: a prompt
    gate's scores s_k (it fires where s_k > threshold_k), or a per-layer gate's value h_last . u_k at its first
    steered layer. Forwards stop at the layer the gate reads."""
    _, layers = find_decoder_layers(model, eraser.layers_path)
    gate = eraser.prompt_gate
    read = gate.layer if gate is not None else eraser.layer_indices[0]
    out = torch.empty(len(items), eraser.num_terms)
    for indices in models.batches(items, batch_size):
        batch = models.forward_inputs(model, models.encode_prompts(processor, [items[i] for i in indices]))
        last, pooled = capture(model, layers[: read + 1], read, gate.pooling if gate else "last", layers[0], **batch)
        out[indices] = (gate.scores(pooled) if gate is not None else last[:, read] @ eraser.u[:, 0].T).cpu()
    return out
