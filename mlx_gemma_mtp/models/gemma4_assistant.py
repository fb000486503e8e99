"""Gemma 4 assistant (MTP drafter), after transformers' ``Gemma4AssistantForCausalLM``.

The drafter has no K/V cache of its own: every layer attends with queries only to the target's
shared K/V of its layer type, at one constant position for all draft steps.
"""

from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4_text
from mlx_lm.models.base import BaseModelArgs

from ..config import normalize_text_config
from .centroid_head import (
    candidate_argmax,
    centroid_candidates,
    full_vocab_lm_head,
    order_by_centroid,
    scatter_full_vocab,
)


@dataclass
class ModelArgs(BaseModelArgs):
    text_config: dict
    model_type: str = "gemma4_assistant"
    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True

    def __post_init__(self):
        text_config = normalize_text_config(self.text_config, "assistant config.json text_config")
        # Every drafter layer reads the target's K/V (transformers enforces this too).
        text_config["num_kv_shared_layers"] = text_config["num_hidden_layers"]
        self.text_args = gemma4_text.ModelArgs.from_dict(text_config)


class DraftOutput(NamedTuple):
    """One draft step. ``candidates`` is None for a plain lm_head (``logits`` cover the vocab)."""

    logits: mx.array
    candidates: mx.array | None
    hidden: mx.array

    def tokens(self) -> mx.array:
        if self.candidates is None:
            return mx.argmax(self.logits, axis=-1)
        return candidate_argmax(self.candidates, self.logits)


class MaskedEmbedding(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.centroid_intermediate_top_k
        self.centroids = nn.Linear(args.text_args.hidden_size, args.num_centroids, bias=False)
        self.token_ordering = mx.zeros((args.text_args.vocab_size,), dtype=mx.int32)


class AssistantBackbone(nn.Module):
    def __init__(self, args: gemma4_text.ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [gemma4_text.DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        text_args = args.text_args
        self.sliding_window = text_args.sliding_window
        self.vocab_size = text_args.vocab_size
        self.model = AssistantBackbone(text_args)
        self.pre_projection = nn.Linear(
            2 * args.backbone_hidden_size, text_args.hidden_size, bias=False
        )
        self.post_projection = nn.Linear(
            text_args.hidden_size, args.backbone_hidden_size, bias=False
        )
        if args.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(args)
        self.lm_head_centroid_ordered = False

    @property
    def layers(self):
        return self.model.layers

    def visible_kv(self, shared_kv: dict) -> dict:
        """What the drafter attends to: all target K/V before its position in full layers, the
        last ``sliding_window + 1`` entries in sliding layers (the reference assistant mask)."""
        keys, values = shared_kv["sliding_attention"]
        window = self.sliding_window + 1
        if keys.shape[2] > window:
            keys, values = keys[..., -window:, :], values[..., -window:, :]
        return {"full_attention": shared_kv["full_attention"], "sliding_attention": (keys, values)}

    def visibility_masks(self, shared_kv: dict, first_positions: dict, position) -> dict:
        """``visible_kv`` as masks over the K/V buffers ``shared_kv``, read before ``position`` is
        known on the host (``position`` may be a lazy ``mx.array``): entry ``i`` of a buffer holds
        position ``first_positions[type] + i``; sliding layers see only the last
        ``sliding_window + 1``."""
        masks = {}
        for layer_type, (keys, _) in shared_kv.items():
            key_position = first_positions[layer_type] + mx.arange(keys.shape[2])
            visible = key_position < position
            if layer_type == "sliding_attention":
                visible &= key_position >= position - (self.sliding_window + 1)
            masks[layer_type] = visible
        return masks

    def backbone(
        self, inputs_embeds: mx.array, shared_kv: dict, position, masks: dict | None = None
    ) -> mx.array:
        """Final-norm hidden state for ``[target embedding ; target hidden]`` inputs."""
        masks = masks or {}
        h = self.pre_projection(inputs_embeds)
        for layer in self.model.layers:
            kv, mask = shared_kv[layer.layer_type], masks.get(layer.layer_type)
            h, _, _ = layer(h, mask, None, shared_kv=kv, offset=position)
        return self.model.norm(h)

    def order_lm_head(self) -> None:
        """Store the tied lm_head in centroid order, so the selected centroids' vocab rows are
        contiguous blocks. Safe because the drafter never embeds inputs with ``embed_tokens``
        (its inputs are the target's embeddings); files on disk stay in vocab order."""
        if self.args.use_ordered_embeddings and not self.lm_head_centroid_ordered:
            order_by_centroid(self.model.embed_tokens, self.masked_embedding.token_ordering)
            self.lm_head_centroid_ordered = True

    def head(self, hidden: mx.array, full_vocab: bool = False) -> tuple[mx.array, mx.array | None]:
        embed = self.model.embed_tokens
        if not self.args.use_ordered_embeddings:
            return embed.as_linear(hidden), None
        me, ordered = self.masked_embedding, self.lm_head_centroid_ordered
        if full_vocab:
            return full_vocab_lm_head(hidden, embed, me.token_ordering if ordered else None), None
        candidates, logits = centroid_candidates(
            hidden, me.centroids, embed, me.token_ordering, me.top_k, centroid_ordered=ordered
        )
        return logits, candidates

    def __call__(
        self,
        inputs_embeds: mx.array,
        shared_kv: dict,
        position,
        full_vocab: bool = False,
        masks: dict | None = None,
    ) -> DraftOutput:
        """One draft step. ``shared_kv`` maps layer type to the target's ``(keys, values)``
        for positions ``< position``, in order; ``position`` may be an int or an ``mx.array``.
        With ``masks`` (from ``visibility_masks``) the K/V are buffers and the masks say which
        entries the drafter sees."""
        if masks is None:
            shared_kv = self.visible_kv(shared_kv)
        hidden = self.backbone(inputs_embeds, shared_kv, position, masks)
        logits, candidates = self.head(hidden, full_vocab)
        return DraftOutput(logits, candidates, self.post_projection(hidden))

    def full_vocab_logits(self, out: DraftOutput) -> mx.array:
        if out.candidates is None:
            return out.logits
        return scatter_full_vocab(out.candidates, out.logits, self.vocab_size)

    def sanitize(self, weights: dict) -> dict:
        sanitized = {}
        for key, value in weights.items():
            if key == "lm_head.weight" or "rotary_emb" in key:
                continue  # the lm_head is tied to model.embed_tokens
            if key.endswith("masked_embedding.token_ordering"):
                value = value.astype(mx.int32)
            sanitized[key] = value
        return sanitized

    @property
    def quant_predicate(self):
        def predicate(path, _):
            return not path.endswith("token_ordering")

        return predicate
