"""Gemma-3's image encoder as one static-shape graph: SigLIP vision tower plus projector.

`Gemma3VisionEncoder(pixel_values [N, 3, H, W]) -> [N, mm_tokens_per_image, text_hidden]`
is transformers' `Gemma3Model.get_image_features`: a SigLIP vision transformer (patch
convolution, learned positions, pre-norm encoder layers with full bidirectional
attention, final LayerNorm; no pooling head) and the multi-modal projector (average
pooling of the patch grid to `mm_tokens_per_image` tokens, Gemma RMSNorm, a product into
the text model's width). Parameter names are the checkpoint's without its `model.`
prefix, so loading is renaming only (see `optimum_gemma3.weights`).

The operations and their order follow transformers 4.57's eager SigLIP; products go
through `layers.linear` with the program's ops profile, like the text decoder's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ImageTokens
from .layers import (
    GELU_TANH,
    Linear,
    RMSNorm,
    attention_scores,
    attention_values,
    bf16_attention_in_fp32,
    gelu_tanh,
)
from .ops import PLAIN, OpsProfile

# Vision attention runs this many queries at a time: a 4096-patch image's full score
# matrix would be 1 GiB per layer in fp32; a block of queries needs a quarter of that.
VISION_QUERY_BLOCK = 1024


@bf16_attention_in_fp32
def bidirectional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Unmasked softmax attention, `[N, H, S, D]` each, one block of queries at a time.

    As transformers' eager SigLIP attention: scaled scores, fp32 softmax cast back to the
    activation dtype, then the product with V. Each query's row is computed alone, so
    blocking changes nothing but the peak memory.
    """
    blocks = []
    for start in range(0, q.shape[2], VISION_QUERY_BLOCK):
        scores = attention_scores(q[:, :, start : start + VISION_QUERY_BLOCK], k) * scale
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        blocks.append(attention_values(probs, v))
    return torch.cat(blocks, dim=2)


class VisionEmbeddings(nn.Module):
    """Non-overlapping patches by a strided convolution, plus one learned vector per patch."""

    def __init__(self, config):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, config.patch_size
        )
        patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, config, ops: OpsProfile):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.scale = self.head_dim**-0.5
        self.ops = ops
        self.q_proj = Linear(hidden, hidden, ops=ops)
        self.k_proj = Linear(hidden, hidden, ops=ops)
        self.v_proj = Linear(hidden, hidden, ops=ops)
        self.out_proj = Linear(hidden, hidden, ops=ops)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = bidirectional_attention(q, k, v, self.scale, ops=self.ops)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


class VisionMLP(nn.Module):
    def __init__(self, config, ops: OpsProfile):
        super().__init__()
        if config.hidden_act != GELU_TANH:
            raise ValueError(
                f"SigLIP hidden_act={config.hidden_act!r}: Gemma-3's vision tower uses "
                f"{GELU_TANH!r}, the only activation these graphs implement."
            )
        self.ops = ops
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, ops=ops)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, ops=ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x), self.ops))


class VisionLayer(nn.Module):
    """Pre-norm block: LayerNorm, attention, residual; LayerNorm, MLP, residual."""

    def __init__(self, config, ops: OpsProfile):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config, ops)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config, ops)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.layer_norm1(h))
        return h + self.mlp(self.layer_norm2(h))


class VisionEncoderLayers(nn.Module):
    def __init__(self, config, ops: OpsProfile):
        super().__init__()
        self.layers = nn.ModuleList(
            VisionLayer(config, ops) for _ in range(config.num_hidden_layers)
        )


class VisionTransformer(nn.Module):
    """SigLIP's `vision_model`: embeddings, encoder layers, final LayerNorm."""

    def __init__(self, config, ops: OpsProfile):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoderLayers(config, ops)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.post_layernorm(h)


class VisionTower(nn.Module):
    """The checkpoint's `vision_tower` (a `SiglipVisionModel`): only its `vision_model`."""

    def __init__(self, config, ops: OpsProfile):
        super().__init__()
        self.vision_model = VisionTransformer(config, ops)


class MultiModalProjector(nn.Module):
    """Average-pool the patch grid to `mm_tokens_per_image` tokens, RMS-normalize them,
    project them to the text model's width."""

    def __init__(self, vision_config, text_hidden: int, tokens_per_image: int):
        super().__init__()
        self.patches_per_side = vision_config.image_size // vision_config.patch_size
        tokens_per_side = int(tokens_per_image**0.5)
        if tokens_per_side**2 != tokens_per_image or self.patches_per_side % tokens_per_side:
            raise ValueError(
                f"mm_tokens_per_image={tokens_per_image} must be a square whose side divides "
                f"the {self.patches_per_side}x{self.patches_per_side} patch grid."
            )
        self.kernel_size = self.patches_per_side // tokens_per_side
        self.mm_input_projection_weight = nn.Parameter(
            torch.zeros(vision_config.hidden_size, text_hidden)
        )
        self.mm_soft_emb_norm = RMSNorm(vision_config.hidden_size, vision_config.layer_norm_eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        images, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(
            images, width, self.patches_per_side, self.patches_per_side
        )
        pooled = F.avg_pool2d(grid.contiguous(), self.kernel_size, self.kernel_size)
        normed = self.mm_soft_emb_norm(pooled.flatten(2).transpose(1, 2))
        return torch.matmul(normed, self.mm_input_projection_weight).type_as(patches)


class Gemma3VisionEncoder(nn.Module):
    """Pixels to the text decoder's image features: `get_image_features` of transformers."""

    def __init__(self, config, dtype: torch.dtype = torch.float32, ops: OpsProfile = PLAIN):
        super().__init__()
        vision = config.vision_config
        self.image_tokens = ImageTokens.of(config)
        self.image_size = vision.image_size
        self.num_channels = vision.num_channels
        self.vision_tower = VisionTower(vision, ops)
        self.multi_modal_projector = MultiModalProjector(
            vision, config.get_text_config().hidden_size, self.image_tokens.per_image
        )
        self.to(dtype)

    @classmethod
    def skeleton(cls, config, dtype: torch.dtype, ops: OpsProfile = PLAIN) -> Gemma3VisionEncoder:
        """An encoder with uninitialized weights, built without initialization cost."""
        with torch.device("meta"):
            encoder = cls(config, dtype, ops)
        return encoder.to_empty(device="cpu")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_tower.vision_model(pixel_values))
