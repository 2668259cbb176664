"""What a SteeringHandle keeps between forwards: a KV cache is continued with the decisions of the prompt that
filled it (never the last prompt the handle saw), a cache the handle never filled is refused, and capture builds
no KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from mllmeraser.core.capture import capture
from mllmeraser.core.decoder_layers import find_decoder_layers
from mllmeraser.core.layer_steering import attach_steering
from test_hooks import PROMPT_A, PROMPT_B, attach_random, random_terms
from tiny_families import random_llava


@pytest.fixture(scope="module")
def llava():
    return random_llava()


def step(model, cache) -> torch.Tensor:
    """Logits of one decode step (token 3) on `cache`."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([[3]]), past_key_values=cache).logits


def prefill(model, prompt):
    with torch.no_grad():
        return model(input_ids=prompt, use_cache=True).past_key_values


def test_capture_builds_no_kv_cache(llava):
    _, layers = find_decoder_layers(llava)
    seen = []
    hook = llava.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("use_cache")),
                                           with_kwargs=True)
    try:
        capture(llava, layers, 0, input_ids=PROMPT_A)
        capture(llava, layers, 0, input_ids=PROMPT_A, use_cache=True)  # a caller's use_cache is overridden
    finally:
        hook.remove()
    assert seen == [False, False]


def test_interleaved_decode_steps_keep_their_own_prompt_s_decisions(llava):
    """mode "all" steers decode steps with the prompt's per-layer gate values: prompt A's, even after B's prefill."""
    _, layers = find_decoder_layers(llava)
    with attach_random(llava, layers, mode="all"):
        alone = step(llava, prefill(llava, PROMPT_A))
    with attach_random(llava, layers, mode="all") as handle:
        cache_a = prefill(llava, PROMPT_A)
        gates_a = dict(handle.prompt.layer_gates)
        cache_b = prefill(llava, PROMPT_B)
        assert not torch.equal(handle.prompt.layer_gates[0], gates_a[0])  # B's gate values differ from A's
        interleaved = step(llava, cache_a)
        assert torch.equal(handle.prompt.layer_gates[0], gates_a[0])
        step(llava, cache_b)
        second = step(llava, cache_a)  # a second step on A after one on B
    assert torch.equal(interleaved, alone)
    with attach_random(llava, layers, mode="all"):
        cache = prefill(llava, PROMPT_A)
        step(llava, cache)
        two_steps = step(llava, cache)
    assert torch.equal(second, two_steps)


@pytest.mark.parametrize("mode", ["prefill", "all"])
def test_a_cache_the_handle_never_filled_is_refused(llava, mode):
    _, layers = find_decoder_layers(llava)
    unsteered = prefill(llava, PROMPT_A)  # built before attaching: its prompt's decisions were never taken
    with attach_random(llava, layers, mode=mode):
        prefill(llava, PROMPT_B)  # a prompt the handle knows: not the one that filled `unsteered`
        with pytest.raises(RuntimeError, match="KV cache that no forward under this eraser's attachment filled"):
            step(llava, unsteered)
    with attach_random(llava, layers, mode=mode):
        earlier = prefill(llava, PROMPT_A)
    u, r = random_terms(1, len(layers), scale=5.0, seed=1)
    with attach_steering(llava, layers, u, r, [10.0], [-math.inf], [math.inf], mode=mode):  # another attachment
        with pytest.raises(RuntimeError, match="gate decisions of its prompt are unknown"):
            step(llava, earlier)
    step(llava, earlier)  # with nothing attached, the model is the model's own business
