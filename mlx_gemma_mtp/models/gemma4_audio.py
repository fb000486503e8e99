"""The Gemma 4 audio encoder (E2B/E4B) in MLX, with transformers 5.23.0's weight names and numbers.

A conformer: two stride-2 convolutions over the log-mel frames, then layers of (half-step feed
forward, local self-attention with relative positions, light causal convolution, feed forward).
transformers computes the local attention in blocks of ``attention_chunk_size`` queries over
overlapping key windows; here it is one masked attention over the whole clip with the same band
(fewer than ``attention_context_left - 1`` keys back, ``attention_context_right`` ahead) and the
same relative-position term: the same numbers, for clips of a few hundred frames.
"""

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from .gemma4_vision import ClippableLinear, RMSNorm


@dataclass
class AudioArgs(BaseModelArgs):
    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    subsampling_conv_channels: list = field(default_factory=lambda: [128, 32])
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @property
    def context_size(self) -> int:
        return (
            self.attention_chunk_size
            + self.attention_context_left
            - 1
            + self.attention_context_right
        )


def clip(x: mx.array, bound: float) -> mx.array:
    bound = min(bound, float(mx.finfo(x.dtype).max))
    return mx.clip(x, -bound, bound)


class SubsampleLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x = x * mask[:, :, None, None]
        return nn.relu(self.norm(self.conv(x.astype(self.conv.weight.dtype)))), mask[:, ::2]


class SubsampleConvProjection(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        first, second = args.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, first, args.rms_norm_eps)
        self.layer1 = SubsampleLayer(first, second, args.rms_norm_eps)
        self.input_proj_linear = nn.Linear((first // 4) * second, args.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x, mask = self.layer0(features[..., None], mask)  # [B, T, F, 1]: time by mel, NHWC
        x, mask = self.layer1(x, mask)
        b, t = x.shape[:2]
        # transformers flattens (frequency, channel) in that order
        return self.input_proj_linear(x.reshape(b, t, -1)), mask


class Attention(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        h, clipped = args.hidden_size, args.use_clipped_linears
        self.num_heads = args.num_attention_heads
        self.head_dim = h // self.num_heads
        self.args = args
        self.q_proj = ClippableLinear(h, h, clipped)
        self.k_proj = ClippableLinear(h, h, clipped)
        self.v_proj = ClippableLinear(h, h, clipped)
        self.post = ClippableLinear(h, h, clipped)
        self.relative_k_proj = nn.Linear(h, h, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))

    def relative_positions(self) -> mx.array:
        """[distances, hidden] sinusoids ([sin, cos]) of distances ``context // 2`` .. 0."""
        h = self.args.hidden_size
        num = h // 2
        increment = math.log(10000.0) / max(num - 1, 1)
        inv_timescales = mx.exp(mx.arange(num, dtype=mx.float32) * -increment)
        distances = mx.arange(self.args.context_size // 2, -1, -1, dtype=mx.float32)
        scaled = distances[:, None] * inv_timescales[None]
        return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1)

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        b, t, _ = x.shape
        heads, d, args = self.num_heads, self.head_dim, self.args
        q_scale = d**-0.5 / math.log(2) * nn.softplus(self.per_dim_scale)
        q = (self.q_proj(x).astype(mx.float32).reshape(b, t, heads, d) * q_scale).transpose(
            0, 2, 1, 3
        )
        k_scale = math.log(1 + math.e) / math.log(2)
        k = (self.k_proj(x).astype(mx.float32).reshape(b, t, heads, d) * k_scale).transpose(
            0, 2, 1, 3
        )
        v = self.v_proj(x).astype(mx.float32).reshape(b, t, heads, d).transpose(0, 2, 1, 3)
        relative = self.relative_k_proj(self.relative_positions().astype(x.dtype))
        relative = relative.astype(mx.float32).reshape(-1, heads, d).transpose(1, 2, 0)
        content = q @ k.transpose(0, 1, 3, 2)  # [B, heads, T, T]
        by_distance = q @ relative  # [B, heads, T, rows]: row r is distance context // 2 - r
        past = args.attention_context_left - 1
        query_pos, key_pos = mx.arange(t)[:, None], mx.arange(t)[None]
        # transformers' relative shift: key k of query q reads row k - q + past
        row = key_pos - query_pos + past
        rows = by_distance.shape[-1]
        in_rows = (row >= 0) & (row < rows)
        index = mx.broadcast_to(mx.clip(row, 0, rows - 1), (b, heads, t, t))
        position = mx.where(in_rows, mx.take_along_axis(by_distance, index, axis=-1), 0.0)
        cap = args.attention_logit_cap
        logits = mx.tanh((content + position) / cap) * cap
        # transformers' sliding_window_mask_function((context_left - 1, context_right))
        distance = query_pos - key_pos
        band = ((distance >= 0) & (distance < past)) | (
            (distance < 0) & (-distance < args.attention_context_right)
        )
        allowed = band & valid[:, None, None, :]
        logits = mx.where(allowed, logits, args.attention_invalid_logits_value)
        out = mx.softmax(logits, axis=-1, precise=True) @ v
        return self.post(out.transpose(0, 2, 1, 3).reshape(b, t, -1).astype(x.dtype))


class FeedForward(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        h, clipped = args.hidden_size, args.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(h, 4 * h, clipped)
        self.ffw_layer_2 = ClippableLinear(4 * h, h, clipped)
        self.pre_layer_norm = RMSNorm(h, 1e-6)
        self.post_layer_norm = RMSNorm(h, 1e-6)
        self.args = args

    def __call__(self, x: mx.array) -> mx.array:
        bound = self.args.gradient_clipping
        y = self.pre_layer_norm(clip(x, bound))
        y = self.ffw_layer_2(nn.silu(self.ffw_layer_1(y)))
        return x + self.post_layer_norm(clip(y, bound)) * self.args.residual_weight


class LightConv1d(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        h, clipped = args.hidden_size, args.use_clipped_linears
        self.linear_start = ClippableLinear(h, 2 * h, clipped)
        self.linear_end = ClippableLinear(h, h, clipped)
        self.depthwise_conv1d = nn.Conv1d(h, h, args.conv_kernel_size, groups=h, bias=False)
        self.pre_layer_norm = RMSNorm(h, args.rms_norm_eps)
        self.conv_norm = RMSNorm(h, args.rms_norm_eps)
        self.args = args

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear_start(self.pre_layer_norm(x))
        y = y[..., : y.shape[-1] // 2] * mx.sigmoid(y[..., y.shape[-1] // 2 :])
        y = mx.pad(y, [(0, 0), (self.args.conv_kernel_size - 1, 0), (0, 0)])  # causal
        y = self.depthwise_conv1d(y)
        y = self.conv_norm(clip(y, self.args.gradient_clipping))
        return x + self.linear_end(nn.silu(y))


class ConformerLayer(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        h = args.hidden_size
        self.feed_forward1 = FeedForward(args)
        self.feed_forward2 = FeedForward(args)
        self.self_attn = Attention(args)
        self.lconv1d = LightConv1d(args)
        self.norm_pre_attn = RMSNorm(h, 1e-6)
        self.norm_post_attn = RMSNorm(h, 1e-6)
        self.norm_out = RMSNorm(h, 1e-6)
        self.bound = args.gradient_clipping

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        x = self.feed_forward1(x)
        y = self.self_attn(self.norm_pre_attn(clip(x, self.bound)), valid)
        x = x + self.norm_post_attn(clip(y, self.bound))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(clip(x, self.bound))


class AudioTower(nn.Module):
    """``audio_tower``: [B, frames, mel] log-mel features and their [B, frames] mask to
    ([B, T, output_proj_dims] soft tokens, [B, T] mask of the real ones)."""

    def __init__(self, args: AudioArgs):
        super().__init__()
        self.subsample_conv_projection = SubsampleConvProjection(args)
        self.layers = [ConformerLayer(args) for _ in range(args.num_hidden_layers)]
        self.output_proj = nn.Linear(args.hidden_size, args.output_proj_dims)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x, mask = self.subsample_conv_projection(features, mask.astype(features.dtype))
        valid = mask > 0
        for layer in self.layers:
            x = layer(x, valid)
        return self.output_proj(x), valid
