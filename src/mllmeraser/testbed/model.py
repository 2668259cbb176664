"""The testbed's model: a real `LlavaForConditionalGeneration` (CLIP vision tower, projector, Llama
decoder) at a tiny size, with a word-level tokenizer trained by `tokenizers` on the testbed corpus and a
`LlavaProcessor` whose chat template is LLaVA-1.5's. Saved with `save_pretrained`, it loads through
`AutoModelForImageTextToText` / `AutoProcessor` like any checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from . import render

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(5)
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (render.SIZE // PATCH_SIZE) ** 2
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as llava-hf's template renders it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    vision_hidden: int = 128
    vision_layers: int = 3
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 384


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the corpus's words and punctuation (decoding re-joins punctuation)."""
    splitter = pre_tokenizers.Whitespace()
    words = sorted({piece for text in texts for piece, _ in splitter.pre_tokenize_str(text)} - set(SPECIAL_TOKENS))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = splitter
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="left")


def image_processor() -> CLIPImageProcessor:
    """The CLIP (PIL) preprocessing of the testbed's 32x32 images; every preset shares it."""
    return CLIPImageProcessor(
        size={"shortest_edge": render.SIZE}, crop_size={"height": render.SIZE, "width": render.SIZE},
        image_mean=IMAGE_MEAN, image_std=IMAGE_STD, do_convert_rgb=True)


def build_processor(tokenizer, chat_template: str = CHAT_TEMPLATE) -> LlavaProcessor:
    return LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template)


def vision_config(size: ModelSize = ModelSize()) -> CLIPVisionConfig:
    """The small CLIP tower (16 patches of a 32x32 image); the pretrained preset puts the same tower in front of
    SmolLM2."""
    return CLIPVisionConfig(hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
                            num_hidden_layers=size.vision_layers, num_attention_heads=4,
                            image_size=render.SIZE, patch_size=PATCH_SIZE)


def build_model(vocab_size: int, size: ModelSize = ModelSize()) -> LlavaForConditionalGeneration:
    vision = vision_config(size)
    text = LlamaConfig(hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
                       num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
                       num_key_value_heads=size.text_heads, vocab_size=vocab_size, max_position_embeddings=256,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model


def size_dict(size: ModelSize) -> dict:
    return asdict(size)
