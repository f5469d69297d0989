"""Random-weight Gemma-3 checkpoints with the shape of every size, small enough for seconds.

Each keeps what distinguishes its size (kv-head grouping, head_dim, RoPE scaling,
query_pre_attn_scalar, multimodal layout) and shrinks the rest; windows are 8 or 16 so
short prompts and generations go well past them.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

LINEAR_X8 = {"rope_type": "linear", "factor": 8.0}
COMMON = dict(
    max_position_embeddings=512,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
)

TEXT_SHAPES = {
    # 270m/1b: MQA (one kv head), head_dim 256 scaled down, no RoPE scaling.
    "270m": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=8,
        vocab_size=512,
    ),
    "1b": dict(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=16,
        vocab_size=512,
    ),
    # 4b/12b: GQA with linear x8 RoPE scaling on full layers; a 262208-like odd vocab.
    "4b": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=8,
        vocab_size=520,
        rope_scaling=LINEAR_X8,
        layer_types=["sliding_attention", "full_attention"] * 3,
    ),
    "12b": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        vocab_size=520,
        rope_scaling=LINEAR_X8,
    ),
    # 27b: head_dim 128 with query_pre_attn_scalar 168 (score scale != head_dim**-0.5).
    "27b": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        query_pre_attn_scalar=168,
        sliding_window=8,
        vocab_size=520,
        rope_scaling=LINEAR_X8,
    ),
}
# Not a Gemma-3 size: the 270m shape cut to the fewest layers that hold both kinds of
# attention, for tests that compile several programs to check the runtime, not a size.
# Kept out of TINY_CONFIGS, which the parity tests run one by one.
TWO_LAYERS = {
    "2-layer": dict(
        TEXT_SHAPES["270m"],
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
    )
}
# Multimodal `gemma3` checkpoints: text decoder under `text_config`, weights either as
# transformers 4.57 saves them (`model.language_model.*`) or as originally published
# (`language_model.model.*`).
MULTIMODAL = {"4b-multimodal": "saved", "4b-multimodal-original": "original"}
TINY_CONFIGS = (*TEXT_SHAPES, *MULTIMODAL)
# Multimodal checkpoints for image-text-to-text, with a processor: text shapes of 4b and
# 27b (linear RoPE scaling; 27b's query_pre_attn_scalar), a two-layer SigLIP tower and 16
# tokens per image, so an image's block (16) outruns the sliding window (8).
IMAGE_SIZE = 112
TOKENS_PER_IMAGE = 16
IMAGE_TOKENS = {"<image_soft_token>": 509, "<start_of_image>": 510, "<end_of_image>": 511}
VISION_CONFIGS = {"4b-vision": "4b", "27b-vision": "27b"}


def make_config(name: str):
    if name in TEXT_SHAPES or name in TWO_LAYERS:
        return Gemma3TextConfig(**COMMON, **{**TEXT_SHAPES, **TWO_LAYERS}[name])
    if name in VISION_CONFIGS:
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=14,
            vision_use_head=False,
        )
        return Gemma3Config(
            text_config=dict(**COMMON, **TEXT_SHAPES[VISION_CONFIGS[name]]),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=TOKENS_PER_IMAGE,
            boi_token_index=IMAGE_TOKENS["<start_of_image>"],
            eoi_token_index=IMAGE_TOKENS["<end_of_image>"],
            image_token_index=IMAGE_TOKENS["<image_soft_token>"],
        )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return Gemma3Config(
        text_config=dict(**COMMON, **TEXT_SHAPES["4b"]),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=510,
        eoi_token_index=511,
        image_token_index=509,
    )


def reference_class(config):
    return Gemma3ForConditionalGeneration if config.model_type == "gemma3" else Gemma3ForCausalLM


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights that make generations varied rather than one repeated token.

    Norm gains with std 1 make (1 + w) matter and keep the hidden states from collapsing
    onto one direction, which HF's default init (std 0.02, zero norms) does within a few
    tokens: a repeated token would hide window bugs.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = 1.0 if "norm" in name else 0.1 if "embed" in name else 0.15
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def save_random_checkpoint(name: str, folder: Path) -> Path:
    config = make_config(name)
    model = reference_class(config)(config).eval()
    randomize(model, seed=zlib.crc32(name.encode()))
    model.save_pretrained(folder)
    if name in VISION_CONFIGS:
        tiny_processor(config.get_text_config().vocab_size).save_pretrained(folder)
    if MULTIMODAL.get(name) == "original":
        _rename_to_original_layout(folder)
    return folder


def _rename_to_original_layout(folder: Path) -> None:
    """Rewrite tensor names the way the original multimodal Gemma-3 checkpoints had them."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("model.language_model."):
            key = "language_model.model." + key[len("model.language_model.") :]
        elif key.startswith("model."):
            key = key[len("model.") :]
        elif key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        renamed[key] = value.contiguous()
    save_file(renamed, path, metadata={"format": "pt"})


def load_reference(folder: Path, dtype: torch.dtype = torch.float32, attn: str = "eager"):
    """The transformers model of a checkpoint folder: the reference every test compares with."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    model = reference_class(config).from_pretrained(folder, dtype=dtype, attn_implementation=attn)
    return model.eval()


GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


# Gemma-3's chat template's shape for messages whose content is a list of images and texts.
GEMMA3_IMAGE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }} {% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int, with_images: bool = False):
    """A word-level tokenizer over a tiny model's vocabulary: token i >= 7 is the word `w<i>`.

    Gives the random models text in and text out (pipelines, streamers, stop strings),
    with Gemma-3's special ids: <pad> 0, <eos> 1, <bos> 2 and turn markers;
    `with_images`, also the image tokens of `IMAGE_TOKENS` as a `Gemma3Processor` needs
    them, padding on the left as the tokenizers of the Gemma-3 checkpoints do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 3, "<end_of_turn>": 4}
    roles = {"user": 5, "model": 6}
    vocab = {**specials, **roles, **{f"w{i}": i for i in range(7, vocab_size)}}
    extra = {}
    if with_images:
        vocab = {word: i for word, i in vocab.items() if i not in IMAGE_TOKENS.values()}
        vocab.update(IMAGE_TOKENS)
        names = ("image_token", "boi_token", "eoi_token")
        extra = {"extra_special_tokens": dict(zip(names, IMAGE_TOKENS, strict=True))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>", *(extra and IMAGE_TOKENS)],
        model_input_names=["input_ids", "attention_mask"],
        padding_side="left" if with_images else "right",
        **extra,
    )
    tokenizer.chat_template = GEMMA3_IMAGE_CHAT_TEMPLATE if with_images else GEMMA3_CHAT_TEMPLATE
    return tokenizer


def tiny_processor(vocab_size: int):
    """A `Gemma3Processor` for the tiny vision checkpoints: `IMAGE_SIZE` images, 16 tokens each."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    tokenizer = tiny_tokenizer(vocab_size, with_images=True)
    return Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_IMAGE_CHAT_TEMPLATE,
        image_seq_length=TOKENS_PER_IMAGE,
    )
