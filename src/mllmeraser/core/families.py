"""The model families mllmeraser knows: one registry, keyed by `config.model_type`.

For each family: where its text decoder keeps its layers (what the hooks steer; vision towers never are),
whether `models.load_model` loads it (the multimodal checkpoints the harness drives end to end), and the
processor quirk it needs. Text-only decoders (llama, qwen2, mistral) can be hooked, e.g. inside a model
built by hand, but are not loaded: `load_model` reads image-text-to-text checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    layers_path: str  # dotted path of the text decoder's layer ModuleList
    loadable: bool  # models.load_model accepts a checkpoint of this family
    # The processor class to rebuild without its video processor when torchvision is missing (see
    # image_only_processor_class); None where AutoProcessor needs no help.
    image_only_processor: str | None = None


FAMILIES: dict[str, Family] = {
    "llava": Family("model.language_model.layers", loadable=True),
    "qwen2_vl": Family("model.language_model.layers", loadable=True, image_only_processor="Qwen2VLProcessor"),
    "qwen2_5_vl": Family("model.language_model.layers", loadable=True, image_only_processor="Qwen2_5_VLProcessor"),
    "llama": Family("model.layers", loadable=False),
    "qwen2": Family("model.layers", loadable=False),
    "mistral": Family("model.layers", loadable=False),
}
"""Layer paths verified in tests/test_hooks.py on tiny instances of the transformers 5 classes; the loadable
families in tests/test_families.py on tiny checkpoints saved and loaded offline."""

LOADABLE: tuple[str, ...] = tuple(name for name, family in FAMILIES.items() if family.loadable)


def image_only_processor_class(base: type) -> type:
    """`base` without its video processor. transformers' video processors all need torchvision (not a
    dependency of ours), so without it AutoProcessor cannot build a Qwen-VL processor at all, although images
    never touch the video processor. ProcessorMixin reads a processor's sub-processors (what it loads, checks
    and saves) from its __init__ signature, so an __init__ without `video_processor` drops that part. Same
    class name, so a saved processor_config.json still names the real class."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__})
