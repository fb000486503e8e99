"""The Gemma 4 image encoder in MLX, with transformers 5.23.0's weight names and numbers.

``VisionTower``: the SigLIP-like encoder of ``gemma4`` (E2B/E4B, 26B, 31B): patch projection with
learned 2-D position embeddings, bidirectional encoder layers with axial RoPE, average pooling of
``pooling_kernel_size``² patches per soft token. ``MultimodalEmbedder`` (``embed_vision``)
projects soft tokens into the text model's space.

One image at a time, padding patches already dropped: padding is masked out of attention and
pooling in transformers, so the numbers are the same.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs


@dataclass
class VisionArgs(BaseModelArgs):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_theta": 100.0})


class ClippableLinear(nn.Module):
    """A bias-free linear layer whose input and output may be clamped to checkpoint ranges."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            self.input_min = mx.array(-float("inf"))
            self.input_max = mx.array(float("inf"))
            self.output_min = mx.array(-float("inf"))
            self.output_max = mx.array(float("inf"))
        self.clipped = clipped

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min, self.input_max)
        return mx.clip(self.linear(x), self.output_min, self.output_max)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.get("weight"), self.eps)


def axial_rope(x: mx.array, positions: mx.array, base: float) -> mx.array:
    """RoPE over the first half of the head dimension from x positions and over the second half
    from y positions (rotate-half layout in each half). ``x``: [N, heads, D]; ``positions``:
    [N, 2]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (mx.arange(0, half, 2, dtype=mx.float32) / half))
    parts = []
    for axis in range(2):
        angles = positions[:, axis, None].astype(mx.float32) * inv_freq  # [N, half / 2]
        angles = mx.concatenate([angles, angles], axis=-1)[:, None, :]
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        part = x[..., axis * half : (axis + 1) * half]
        first, second = part[..., : half // 2], part[..., half // 2 :]
        rotated = mx.concatenate([-second, first], axis=-1)
        parts.append(part * cos + rotated * sin)
    return mx.concatenate(parts, axis=-1)


class Attention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        self.base = args.rope_parameters.get("rope_theta", 100.0)
        h, d, clip = args.hidden_size, args.head_dim, args.use_clipped_linears
        self.q_proj = ClippableLinear(h, self.num_heads * d, clip)
        self.k_proj = ClippableLinear(h, self.num_kv_heads * d, clip)
        self.v_proj = ClippableLinear(h, self.num_kv_heads * d, clip)
        self.o_proj = ClippableLinear(self.num_heads * d, h, clip)
        self.q_norm = RMSNorm(d, args.rms_norm_eps)
        self.k_norm = RMSNorm(d, args.rms_norm_eps)
        self.v_norm = RMSNorm(d, args.rms_norm_eps, with_scale=False)

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        n = x.shape[0]
        q = self.q_norm(self.q_proj(x).reshape(n, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(n, self.num_kv_heads, self.head_dim))
        v = self.v_norm(self.v_proj(x).reshape(n, self.num_kv_heads, self.head_dim))
        q, k = axial_rope(q, positions, self.base), axial_rope(k, positions, self.base)
        q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.o_proj(out[0].transpose(1, 0, 2).reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        h, i, clip = args.hidden_size, args.intermediate_size, args.use_clipped_linears
        self.gate_proj = ClippableLinear(h, i, clip)
        self.up_proj = ClippableLinear(h, i, clip)
        self.down_proj = ClippableLinear(i, h, clip)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        norm = lambda: RMSNorm(args.hidden_size, args.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Encoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        # Pixels arrive in [0, 1]; the model maps them to [-1, 1] itself.
        hidden = self.input_proj((2 * (patches - 0.5)).astype(self.input_proj.weight.dtype))
        table = self.position_embedding_table
        return hidden + table[0][positions[:, 0]] + table[1][positions[:, 1]]


class VisionTower(nn.Module):
    """``vision_tower`` of a ``gemma4`` checkpoint: [N, 3·p²] patches at [N, 2] (x, y) patch
    positions to [N / k², hidden] soft tokens (before ``embed_vision``)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = Encoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        hidden = self.patch_embedder(patches, positions)
        for layer in self.encoder.layers:
            hidden = layer(hidden, positions)
        pooled = pool(hidden, positions, self.args.pooling_kernel_size)
        pooled = pooled.astype(mx.float32) * self.args.hidden_size**0.5
        if self.args.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(hidden.dtype)


def pool(hidden: mx.array, positions: mx.array, k: int) -> mx.array:
    """Average of each ``k`` × ``k`` block of patches, blocks in row-major order."""
    if k == 1:
        return hidden
    cells = positions // k
    columns = (positions[:, 0].max() + 1) // k
    index = cells[:, 0] + columns * cells[:, 1]
    num_out = hidden.shape[0] // (k * k)
    weights = (index[None, :] == mx.arange(num_out)[:, None]).astype(mx.float32) / (k * k)
    return (weights @ hidden.astype(mx.float32)).astype(hidden.dtype)


class MultimodalEmbedder(nn.Module):
    """``embed_vision`` / ``embed_audio``: scale-free RMS norm, then a projection to the text
    model's hidden size."""

    def __init__(self, in_dims: int, text_hidden: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(in_dims, eps, with_scale=False)
        self.embedding_projection = nn.Linear(in_dims, text_hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        x = x.astype(self.embedding_projection.weight.dtype)
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
