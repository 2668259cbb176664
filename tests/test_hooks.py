"""mllmeraser.core.hooks on tiny random-weight transformers models: layer lookup, capture, steering, removal."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from mllmeraser.errors import UserInputError
from tiny_families import random_llava
from mllmeraser.core.families import FAMILIES
from mllmeraser.core.attachment import ATTACHED_MARKER
from mllmeraser.core.capture import capture_last_token
from mllmeraser.core.decoder_layers import find_decoder_layers
from mllmeraser.core.layer_steering import attach_steering
from mllmeraser.core.steering import shape_gate

TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3]}


def tiny_llava() -> LlavaForConditionalGeneration:
    return random_llava()


def tiny_qwen2_vl() -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(0)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2)
    config = Qwen2VLConfig(text_config={**TEXT, "rope_scaling": MROPE}, vision_config=vision)
    return Qwen2VLForConditionalGeneration(config).eval()


def tiny_qwen2_5_vl() -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=14,
                  spatial_merge_size=2, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config={**TEXT, "rope_scaling": MROPE}, vision_config=vision)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_text(config_class, model_class):
    def build():
        torch.manual_seed(0)
        return model_class(config_class(**TEXT)).eval()

    return build


BUILDERS = {
    "llava": tiny_llava,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "llama": tiny_text(LlamaConfig, LlamaForCausalLM),
    "qwen2": tiny_text(Qwen2Config, Qwen2ForCausalLM),
    "mistral": tiny_text(MistralConfig, MistralForCausalLM),
}


@pytest.fixture(scope="module")
def llava() -> LlavaForConditionalGeneration:
    return tiny_llava()


def random_terms(k: int, num_layers: int, d: int = 64, scale: float = 1.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(k, num_layers, d, generator=generator) * scale
    r = torch.randn(k, num_layers, d, generator=generator)
    return u, r


def attach_random(model, layers, alpha=10.0, mode="prefill", k=1, floor=-math.inf, cap=math.inf):
    u, r = random_terms(k, len(layers), scale=5.0)
    return attach_steering(model, layers, u, r, [alpha] * k, [floor] * k, [cap] * k, mode=mode)


PROMPT_A = torch.tensor([[5, 17, 33, 9, 41, 77, 12]])
PROMPT_B = torch.tensor([[8, 60, 23, 90]])


def left_padded_batch() -> dict[str, torch.Tensor]:
    pad = torch.zeros(1, 3, dtype=torch.long)
    input_ids = torch.cat([PROMPT_A, torch.cat([pad, PROMPT_B], dim=1)])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def hook_ids(layers) -> list[list[int]]:
    """Ids of the forward hooks on each layer (transformers 5 adds its own output-capturing hooks lazily)."""
    return [list(layer._forward_hooks) for layer in layers]


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, input_ids, **kwargs):
    return model.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **kwargs)


# ---- finding the decoder layers -----------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_find_decoder_layers_returns_the_text_decoder(family):
    model = BUILDERS[family]()
    assert model.config.model_type == family
    names, layers = find_decoder_layers(model)
    text_layers = model.get_decoder().layers  # the text decoder, never the vision tower
    assert len(layers) == len(text_layers) == 2
    assert all(a is b for a, b in zip(layers, text_layers))
    assert names == [f"{FAMILIES[family].layers_path}.{i}" for i in range(2)]
    assert all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)


def test_find_decoder_layers_override_and_bad_paths(llava):
    names, layers = find_decoder_layers(llava, "model.vision_tower.encoder.layers")  # an explicit choice wins
    assert names[0] == "model.vision_tower.encoder.layers.0" and layers[0] is llava.model.vision_tower.encoder.layers[0]
    for bad_path in ("model.text_model.layers", "model.language_model.norm"):
        with pytest.raises(UserInputError, match="--layers-path"):
            find_decoder_layers(llava, bad_path)
    mystery = nn.Module()
    mystery.config = types.SimpleNamespace(model_type="mystery")
    mystery.layers = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(UserInputError, match="model_type 'mystery'.*--layers-path"):
        find_decoder_layers(mystery)
    assert find_decoder_layers(mystery, "layers")[0] == ["layers.0"]
    mystery.layers = nn.ModuleList()
    with pytest.raises(UserInputError, match="empty"):
        find_decoder_layers(mystery, "layers")


# ---- capturing ------------------------------------------------------------------------------------------


def test_capture_last_token_matches_hidden_states_and_removes_hooks(llava):
    _, layers = find_decoder_layers(llava)
    batch = left_padded_batch()
    with torch.no_grad():
        hidden = llava(**batch, output_hidden_states=True).hidden_states
    before = hook_ids(layers)
    acts = capture_last_token(llava, layers, **batch)
    assert acts.shape == (2, 2, 64) and acts.dtype == torch.float32
    assert torch.equal(acts[:, 0], hidden[1][:, -1])  # block 0's output; the last entry is after the final norm
    assert hook_ids(layers) == before
    alone = capture_last_token(llava, layers, input_ids=PROMPT_B)
    torch.testing.assert_close(acts[1], alone[0], rtol=0, atol=1e-5)  # left padding: last position is the prompt's


# ---- steering -------------------------------------------------------------------------------------------


def full_output_of(model, layer, **inputs) -> torch.Tensor:
    outputs = []
    hook = layer.register_forward_hook(lambda module, args, output: outputs.append(output.clone()))
    try:
        logits(model, **inputs)
    finally:
        hook.remove()
    return outputs[0]


def test_patched_output_is_original_plus_gated_terms(llava):
    _, layers = find_decoder_layers(llava)
    last = layers[-1]
    original = full_output_of(llava, last, input_ids=PROMPT_A)
    u, r = random_terms(2, 1, scale=5.0, seed=3)
    alpha, floor, cap = [2.0, -0.5], [-math.inf, 0.0], [math.inf, 0.1]
    with attach_steering(llava, [last], u, r, alpha, floor, cap):
        steered = full_output_of(llava, last, input_ids=PROMPT_A)
    gates = shape_gate(original[:, -1] @ u[:, 0].T, torch.tensor(floor), torch.tensor(cap))  # [1, K]
    expected = original + ((gates * torch.tensor(alpha)) @ r[:, 0])[:, None, :]
    torch.testing.assert_close(steered, expected, rtol=0, atol=1e-6)
    assert not torch.equal(steered, original)


def test_hidden_states_output_includes_the_steering(llava):
    _, layers = find_decoder_layers(llava)
    logits(llava, input_ids=PROMPT_A, output_hidden_states=True)  # transformers installs its hooks first
    with attach_random(llava, layers[:1]):
        steered = full_output_of(llava, layers[0], input_ids=PROMPT_A)
        with torch.no_grad():
            hidden = llava(input_ids=PROMPT_A, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[1], steered)


def test_attach_then_remove_restores_logits_bit_for_bit(llava):
    _, layers = find_decoder_layers(llava)
    vanilla = logits(llava, input_ids=PROMPT_A)
    before = hook_ids(layers)
    handle = attach_random(llava, layers)
    assert handle.attached and getattr(llava, ATTACHED_MARKER) is handle
    assert not torch.equal(logits(llava, input_ids=PROMPT_A), vanilla)
    handle.remove()
    handle.remove()  # idempotent
    assert not hasattr(llava, ATTACHED_MARKER) and hook_ids(layers) == before
    assert torch.equal(logits(llava, input_ids=PROMPT_A), vanilla)
    with pytest.raises(ZeroDivisionError), attach_random(llava, layers):
        raise ZeroDivisionError  # the context manager removes the hooks on errors too
    assert torch.equal(logits(llava, input_ids=PROMPT_A), vanilla)


def test_attaching_twice_raises(llava):
    _, layers = find_decoder_layers(llava)
    with attach_random(llava, layers):
        with pytest.raises(RuntimeError, match="already attached"):
            attach_random(llava, layers)
    attach_random(llava, layers).remove()  # free again after removal


def test_left_padded_batch_equals_each_prompt_alone(llava):
    _, layers = find_decoder_layers(llava)
    batch = left_padded_batch()
    with attach_random(llava, layers, k=2):
        batched = logits(llava, **batch)[:, -1]
        alone = torch.cat([logits(llava, input_ids=p)[:, -1] for p in (PROMPT_A, PROMPT_B)])
        batched_tokens = greedy(llava, **batch).sequences[:, -5:]
        alone_tokens = torch.cat([greedy(llava, p).sequences[:, -5:] for p in (PROMPT_A, PROMPT_B)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    assert torch.equal(batched_tokens, alone_tokens)


def test_generate_with_kv_cache(llava):
    _, layers = find_decoder_layers(llava)
    vanilla = greedy(llava, PROMPT_A)
    with attach_random(llava, layers, alpha=0.0):
        zero = greedy(llava, PROMPT_A)
    assert torch.equal(zero.sequences, vanilla.sequences)
    assert all(torch.equal(a, b) for a, b in zip(zero.scores, vanilla.scores))
    with attach_random(llava, layers, alpha=10.0):
        steered = greedy(llava, PROMPT_A)
    assert not torch.equal(steered.sequences, vanilla.sequences)


def decode_step_logits(model, layers, mode):
    """Logits of one decode step after a steered prefill: with the hooks kept, and with them removed."""
    handle = attach_random(model, layers, mode=mode)
    try:
        with torch.no_grad():
            prefill = model(input_ids=PROMPT_A, use_cache=True)
            next_token = prefill.logits[:, -1:].argmax(-1)
            cache = prefill.past_key_values
            kept = model(input_ids=next_token, past_key_values=copy.deepcopy(cache)).logits
            handle.remove()
            removed = model(input_ids=next_token, past_key_values=cache).logits
    finally:
        handle.remove()
    return kept, removed


def test_prefill_mode_leaves_decode_steps_and_all_mode_steers_them(llava):
    _, layers = find_decoder_layers(llava)
    kept, removed = decode_step_logits(llava, layers, "prefill")
    assert torch.equal(kept, removed)  # the decode step sees the steering only through the cache
    kept, removed = decode_step_logits(llava, layers, "all")
    assert not torch.allclose(kept, removed)
    with attach_random(llava, layers, mode="prefill"):
        prefill_only = greedy(llava, PROMPT_A)
    with attach_random(llava, layers, mode="all"):
        every_step = greedy(llava, PROMPT_A)
    assert torch.equal(prefill_only.scores[0], every_step.scores[0])  # same prefill
    assert not torch.allclose(prefill_only.scores[1], every_step.scores[1])


def test_steering_keeps_the_hidden_dtype():
    model = BUILDERS["llama"]().to(torch.bfloat16)
    _, layers = find_decoder_layers(model)
    with attach_random(model, layers):
        output = full_output_of(model, layers[0], input_ids=PROMPT_A)
        assert output.dtype == torch.bfloat16
        assert torch.isfinite(logits(model, input_ids=PROMPT_A)).all()


def test_attach_validates_its_arguments(llava):
    _, layers = find_decoder_layers(llava)
    u, r = random_terms(1, 2)
    with pytest.raises(ValueError, match="mode"):
        attach_steering(llava, layers, u, r, [1.0], [-math.inf], [math.inf], mode="decode")
    with pytest.raises(ValueError, match=r"\[K, 1, d\]"):
        attach_steering(llava, layers[:1], u, r, [1.0], [-math.inf], [math.inf])
    assert not hasattr(llava, ATTACHED_MARKER)


def test_per_device_copies_are_made_once_per_device():
    """devices.on_device, behind every per-device cache the hooks and gates read (the meta device stands in
    for a second one: a copy there is made without memory)."""
    from mllmeraser.core.devices import on_device

    source, made, copies = torch.arange(3.0), [], {}

    def make(device: torch.device) -> torch.Tensor:
        made.append(device)
        return source.to(device)

    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert on_device(copies, cpu, make) is source  # already there: no copy
    assert on_device(copies, meta, make).is_meta
    assert on_device(copies, cpu, make) is source and on_device(copies, meta, make) is copies[meta]
    assert made == [cpu, meta]


def test_the_last_real_position_is_read_from_the_mask_on_either_padding_side():
    from mllmeraser.core.gating import last_real_positions

    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]])
    assert last_real_positions(mask, 5, 4).tolist() == [2, 4, 4, 3]
    assert last_real_positions(mask.bool(), 3, 4).tolist() == [2, 2, 2, 1]  # the first 3 columns only
    assert last_real_positions(mask.float(), 5, 4, "meta").is_meta
    assert last_real_positions(None, 5, 2).tolist() == [4, 4]
