"""The user-facing compiled Gemma-3 with its vision tower: images and text in, text out.

`Gemma3NeuronModelForImageTextToText` is the text model (`modeling`) of a multimodal
checkpoint exported for `image-text-to-text`: the same export, save, load, push and
`generate()`, plus `pixel_values` and `token_type_ids` as its `Gemma3Processor` makes them.
Prefill computes what transformers' `Gemma3ForConditionalGeneration` does: each image's
features (the vision program) replace its image tokens' embeddings, and the tokens of one
image attend to each other both ways; decoding is the text model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from ..constants import IMAGE_TASK
from ..graphs import text_config
from ..graphs.config import ImageTokens
from ..runtime.engine import Gemma3Runtime
from ..weights import resolve_checkpoint
from .modeling import Gemma3NeuronModelForCausalLM

# Images one prompt may hold by default (`max_num_images`), fewer where the longest
# prompt (`max_context_length`) has room for fewer.
DEFAULT_MAX_NUM_IMAGES = 4


class Gemma3NeuronModelForImageTextToText(Gemma3NeuronModelForCausalLM):
    """A compiled multimodal Gemma-3 (4b, 12b, 27b): vision program plus text decoder.

    Export with `from_pretrained(checkpoint, export=True, max_num_images=..., ...)` (the
    text model's options otherwise); use with `generate(**processor(...))` or
    `transformers.pipeline("image-text-to-text", model=model, processor=processor)`.
    """

    task = IMAGE_TASK

    def __init__(self, runtime: Gemma3Runtime):
        if not runtime.neuron_config.has_images:
            runtime.close()
            raise ValueError(
                f"{runtime.folder} was exported for text-generation (no vision program): "
                "load it with Gemma3NeuronModelForCausalLM, or export the multimodal "
                "checkpoint with task='image-text-to-text' to give it images."
            )
        super().__init__(runtime)
        self.image_tokens: ImageTokens = runtime.image_tokens

    @classmethod
    def get_neuron_config(
        cls,
        model_name_or_path: str | Path,
        config=None,
        token: str | bool | None = None,
        revision: str | None = None,
        max_num_images: int | None = None,
        **kwargs,
    ):
        """The text model's export config (same options) for a multimodal checkpoint, plus
        `max_num_images`: the most images one prompt may hold (default: 4, or as many as
        the longest prompt has room for)."""
        if config is None:
            config = AutoConfig.from_pretrained(
                resolve_checkpoint(model_name_or_path, revision, token)
            )
        image_tokens = ImageTokens.of(config)  # refuses a text-only checkpoint
        neuron_config = super().get_neuron_config(
            model_name_or_path, config=config, token=token, revision=revision, **kwargs
        )
        if max_num_images is None:
            room = neuron_config.max_context_length // image_tokens.per_image
            max_num_images = max(1, min(DEFAULT_MAX_NUM_IMAGES, room))
        neuron_config.max_num_images = max_num_images
        neuron_config.validate(text_config(config))
        return neuron_config

    def _prompt_inputs(self, input_ids: torch.Tensor, model_inputs: dict) -> tuple:
        """Encode `pixel_values`, place the features at the image tokens, and hand them and
        `token_type_ids` to the prefill (zeros where absent: transformers' rule without
        token types is causal)."""
        pixel_values = model_inputs.pop("pixel_values", None)
        token_type_ids = model_inputs.pop("token_type_ids", None)
        image_embeds = self.image_embeddings(input_ids, pixel_values)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)

        def prefill(ids, mask, embeds, types):
            return self.runtime.prefill(ids, mask, image_embeds=embeds, token_type_ids=types)

        return prefill, (image_embeds, token_type_ids)

    def image_embeddings(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """`[B, S, hidden]`: the features of `pixel_values`' images at the image-token
        positions of `input_ids` (images in the order their tokens appear, row by row, as
        transformers' `masked_scatter` places them), zeros elsewhere.

        Refuses image tokens without images, images without (or with too few or too many)
        image tokens, and rows holding more than `max_num_images` images.
        """
        is_image = input_ids == self.image_tokens.token_id
        per_image = self.image_tokens.per_image
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        found = int(is_image.sum())
        if found != num_images * per_image:
            given = "no pixel_values" if pixel_values is None else f"{num_images} images"
            raise ValueError(
                f"input_ids hold {found} image tokens, but {given} need "
                f"{num_images * per_image} ({per_image} per image): make the inputs with the "
                "model's processor from the same images, which writes each image's tokens."
            )
        per_row = is_image.sum(-1)
        limit = self.neuron_config.max_num_images
        if bool((per_row % per_image).any()) or int(per_row.max()) > limit * per_image:
            images = [count / per_image for count in per_row.tolist()]
            raise ValueError(
                f"Rows hold {images} images: each row takes whole images, at most "
                f"max_num_images={limit} (the export option): split the prompt, or "
                "re-export with a larger max_num_images."
            )
        hidden = self.config.get_text_config().hidden_size
        embeds = torch.zeros(*input_ids.shape, hidden, dtype=self.neuron_config.torch_dtype)
        if num_images:
            features = self.runtime.encode_images(pixel_values)
            embeds[is_image] = features.reshape(-1, hidden).to(embeds.dtype)
        return embeds
