"""A model's text decoder layers: found at the family's path (families.FAMILIES) or a given dotted path, and what
a layer returns read and replaced.

Decoder layers in transformers v5 return a Tensor (the hidden states); older code returned a tuple whose
first element is the hidden states. Both are handled.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import UserInputError
from .families import FAMILIES


_OVERRIDE_HINT = "pass --layers-path with the dotted path to the text decoder's layer ModuleList"


def find_decoder_layers(model: nn.Module, path: str | None = None) -> tuple[list[str], list[nn.Module]]:
    """Dotted names and modules of the text decoder layers, from `path` or the family's (`families.FAMILIES`)."""
    if path is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            raise UserInputError(
                None, f"no known decoder-layer path for model_type {model_type!r}: {_OVERRIDE_HINT}"
            )
        path = FAMILIES[model_type].layers_path
    try:
        layer_list = model.get_submodule(path)
    except AttributeError as error:
        raise UserInputError(None, f"layers path {path!r} does not resolve ({error}): {_OVERRIDE_HINT}") from None
    if not isinstance(layer_list, nn.ModuleList) or len(layer_list) == 0:
        found = type(layer_list).__name__ if not isinstance(layer_list, nn.ModuleList) else "an empty ModuleList"
        raise UserInputError(None, f"layers path {path!r} is {found}, not a non-empty ModuleList: {_OVERRIDE_HINT}")
    return [f"{path}.{i}" for i in range(len(layer_list))], list(layer_list)


def hidden_states(output: Any) -> Tensor:
    """The hidden states [batch, seq, d] of a decoder layer's output: a Tensor (v5) or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find hidden states in a decoder layer output of type {type(output).__name__}")


def replace_hidden_states(output: Any, hidden: Tensor) -> Any:
    if isinstance(output, Tensor):
        return hidden
    return type(output)((hidden, *output[1:]))
