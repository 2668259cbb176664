"""Tiny random-weight checkpoints of the real model families the harness drives, built fully offline.

Each builder constructs, seeded, a model of the family's REAL transformers class and its REAL processor
class (word-level `tokenizers` tokenizer wrapped in `PreTrainedTokenizerFast`, the family's special tokens,
a chat template with the family's semantics), saves both with `save_pretrained` into a directory, and
returns it, so `mllmeraser.core.models.load_model(directory)` loads it through AutoModelForImageTextToText /
AutoProcessor exactly as it would a downloaded checkpoint. Nothing is downloaded.

Families:
  * ``llava``: laid out like llava-hf/llava-1.5-7b-hf: `LlavaForConditionalGeneration` (CLIP vision tower,
    patch 14, vision_feature_layer -2, select strategy "default", Llama decoder), `LlavaProcessor` with
    `CLIPImageProcessor` (PIL backend) and LLaVA-1.5's chat template ("USER: <image>\\n... ASSISTANT:").
  * ``qwen2_5_vl``: `Qwen2_5_VLForConditionalGeneration` + `Qwen2_5_VLProcessor` with `Qwen2VLImageProcessor`
    (PIL backend, min/max pixels pinned to 56x56 -> 4 image tokens) and Qwen's ChatML template.
  * ``qwen2_vl``: the same for `Qwen2VLForConditionalGeneration` / `Qwen2VLProcessor`.

No video processor is built: transformers' video processors (Qwen2VLVideoProcessor, the base class too)
need torchvision, which is not installed, and the Qwen processors' __init__ refuses ``video_processor=None``
(its class check cannot resolve the video base class without torchvision). The library's processor quirk
for these families, `families.image_only_processor_class`, makes a same-named subclass whose __init__ has
no video_processor argument, so the processor is built and saved (processor_config.json names the real
class) exactly as an image-only checkpoint would be.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from mllmeraser.bench import prompts
from mllmeraser.core.families import image_only_processor_class
from mllmeraser.bench.items import QAItem

IMAGE_SIZE = 56  # the images the tests feed (LLaVA's processor resizes them to its 28x28 input)
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# ---- test items -----------------------------------------------------------------------------------------

NAMES = ["Alma Reyes", "Boris Tal", "Cora Vinh", "Dmitri Oyelaran", "Esme Kowalczyk", "Faro Lind"]
JOBS = ["baker", "pilot", "chemist", "sculptor", "lawyer", "farmer"]
CITIES = ["Lisbon", "Quito", "Oslo", "Hanoi", "Accra", "Perth"]


def make_image(seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """A seeded RGB image: a coloured background with a coloured block (distinct per seed)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    block = Image.new("RGB", (size // 2, size // 3), tuple(rng.randrange(256) for _ in range(3)))
    image.paste(block, (rng.randrange(size // 2), rng.randrange(size // 2)))
    return image


def make_items(start: int = 0, count: int = 4) -> list[QAItem]:
    """Per subject: an image generation question, a text cloze, an image and a text classification question.
    Question lengths differ between subjects, so batches are really left-padded."""
    items: list[QAItem] = []
    for index in range(start, start + count):
        name, job, city = NAMES[index % len(NAMES)], JOBS[index % len(JOBS)], CITIES[index % len(CITIES)]
        subject = f"subject-{index}"
        image = make_image(index)
        filler = " really" * (index % 3)
        options = {letter: JOBS[(index + k) % len(JOBS)] for k, letter in enumerate("ABCD")}
        items += [
            QAItem(subject, "generation", "image", f"What is the{filler} job of the person in the image ?",
                   f"The person is a{filler} good {job} in {city} .", None, image),
            QAItem(subject, "cloze", "text", f"{name} lives{filler} in the city of __ .", city),
            QAItem(subject, "classification", "image", f"What does this{filler} person do ?", "A", options, image),
            QAItem(subject, "classification", "text", f"What does {name} do{filler} ?", "A", options),
        ]
    return items


def corpus(items: Iterable[QAItem] = ()) -> list[str]:
    """Text the tokenizer's vocabulary is built from: the prompt strings, the chat templates' words, names."""
    texts = [prompts.CLASSIFICATION_SUFFIX, prompts.CLOZE_SUFFIX, prompts.GENERATION_SUFFIX, prompts.REFUSAL_ANSWER,
             "USER : ASSISTANT : system user assistant You are a helpful assistant .", "[Blank] A B C D :",
             " ".join(NAMES + JOBS + CITIES), "What is the really job of the person in the image ?",
             "lives in the city of What does this person do ? The person is a good in ."]
    texts += [f"{item.prompt} {item.answer}" for item in items]
    return texts


def _word_level(texts: Iterable[str], special_tokens: list[str], unk: str) -> Tokenizer:
    splitter = pre_tokenizers.Whitespace()
    words = sorted({piece for text in texts for piece, _ in splitter.pre_tokenize_str(text)} - set(special_tokens))
    vocab = {token: index for index, token in enumerate(special_tokens + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = splitter
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.add_special_tokens(special_tokens)
    return tokenizer


# ---- LLaVA-1.5 (llava-hf layout) ------------------------------------------------------------------------

# llava-hf/llava-1.5-7b-hf's chat template: role in upper case + ": ", the images first ("<image>\n" each),
# then the texts each followed by a space; the generation prompt is "ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_llava(directory: str | Path, seed: int = 0, texts: Iterable[str] | None = None, text_layers: int = 3) -> Path:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from mllmeraser.testbed.model import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, build_tokenizer

    directory = Path(directory)
    tokenizer = build_tokenizer(texts if texts is not None else corpus(make_items(0, 6)))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=512,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=4)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# ---- Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>", "<unk>"]
(QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END, QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE_PAD,
 QWEN_VIDEO_PAD, QWEN_UNK) = range(len(QWEN_SPECIAL_TOKENS))

# Qwen2-VL-Instruct's template (ChatML; a default system message; each image as
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to one pad per merged patch).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tokenizer(texts: Iterable[str]):
    from transformers import PreTrainedTokenizerFast

    tokenizer = _word_level(texts, QWEN_SPECIAL_TOKENS, "<unk>")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")  # Qwen adds no BOS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", padding_side="left")


def _build_qwen(directory: str | Path, seed: int, texts: Iterable[str] | None, version: str) -> Path:
    from transformers import Qwen2VLImageProcessor

    if version == "2.5":
        from transformers import (Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model,
                                  Qwen2_5_VLProcessor as Processor)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    else:
        from transformers import (Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model,
                                  Qwen2VLProcessor as Processor)
        vision = dict(depth=2, embed_dim=32, mlp_ratio=2, hidden_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)

    directory = Path(directory)
    tokenizer = build_qwen_tokenizer(texts if texts is not None else corpus(make_items(0, 6)))
    # PIL backend (no torchvision); every image becomes 56x56 -> a 4x4 patch grid -> 4 merged image tokens.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                            temporal_patch_size=2, image_mean=OPENAI_CLIP_MEAN,
                                            image_std=OPENAI_CLIP_STD)
    processor = image_only_processor_class(Processor)(image_processor=image_processor, tokenizer=tokenizer,
                                                      chat_template=QWEN_CHAT_TEMPLATE)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2 = 8
                bos_token_id=QWEN_ENDOFTEXT, eos_token_id=QWEN_IM_END, pad_token_id=QWEN_ENDOFTEXT)
    config = Config(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE_PAD,
                    video_token_id=QWEN_VIDEO_PAD, vision_start_token_id=QWEN_VISION_START,
                    vision_end_token_id=QWEN_VISION_END)
    torch.manual_seed(seed)
    model = Model(config).eval()
    model.generation_config.pad_token_id = QWEN_ENDOFTEXT
    model.generation_config.eos_token_id = [QWEN_IM_END, QWEN_ENDOFTEXT]
    model.generation_config.bos_token_id = QWEN_ENDOFTEXT
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_qwen2_5_vl(directory: str | Path, seed: int = 0, texts: Iterable[str] | None = None) -> Path:
    return _build_qwen(directory, seed, texts, "2.5")


def build_qwen2_vl(directory: str | Path, seed: int = 0, texts: Iterable[str] | None = None) -> Path:
    return _build_qwen(directory, seed, texts, "2")


BUILDERS: dict[str, Callable[..., Path]] = {
    "llava": build_llava,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen2_vl": build_qwen2_vl,
}
"""model_type -> builder(directory, seed=0, texts=None) -> directory."""


def random_llava(hidden_size: int = 64, seed: int = 0):
    """A bare random-weight LlavaForConditionalGeneration (no processor): 2 decoder layers of `hidden_size`,
    vocabulary 128 with the image token at 127. For tests of hooks and artifacts that feed token ids."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(vocab_size=128, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=127)
    return LlavaForConditionalGeneration(config).eval()
