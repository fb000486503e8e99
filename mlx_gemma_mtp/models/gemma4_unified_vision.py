"""The 12B's encoder-free image embedder in MLX, with transformers 5.23.0's numbers and the
checkpoint's weight names.

``VisionEmbedder`` (``vision_embedder.*`` in the checkpoint; transformers' ``embed_vision`` minus
its last projection): layer norm over each raw model patch, a dense projection, layer norm, the
factorized 2-D position embedding (one table row per x and per y), layer norm. The projection into
the text model (``embed_vision.embedding_projection``) is ``gemma4_vision.MultimodalEmbedder``,
as for the other Gemma 4 models. No attention: each patch is one soft token on its own.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

LAYER_NORM_EPS = 1e-5  # transformers builds these as torch.nn.LayerNorm(dims): its default eps


@dataclass
class UnifiedVisionArgs(BaseModelArgs):
    """transformers' ``Gemma4UnifiedVisionConfig`` fields, with its defaults."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    @property
    def patch_dims(self) -> int:
        return (self.patch_size * self.pooling_kernel_size) ** 2 * 3


class VisionEmbedder(nn.Module):
    """[N, (k·p)²·3] model patches in [0, 1] at [N, 2] (x, y) positions to [N, mm_embed_dim]
    soft tokens (before ``embed_vision``)."""

    def __init__(self, args: UnifiedVisionArgs):
        super().__init__()
        dims = args.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(args.patch_dims, eps=LAYER_NORM_EPS)
        self.patch_dense = nn.Linear(args.patch_dims, dims)
        self.patch_ln2 = nn.LayerNorm(dims, eps=LAYER_NORM_EPS)
        self.pos_embedding = mx.zeros((args.mm_posemb_size, 2, dims))
        self.pos_norm = nn.LayerNorm(dims, eps=LAYER_NORM_EPS)

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        x = patches.astype(self.patch_dense.weight.dtype)
        hidden = self.patch_ln2(self.patch_dense(self.patch_ln1(x)))
        table = self.pos_embedding
        return self.pos_norm(hidden + (table[positions[:, 0], 0] + table[positions[:, 1], 1]))
