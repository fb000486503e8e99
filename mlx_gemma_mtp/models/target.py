"""What MTP needs from an mlx-lm Gemma 4 target, without forking mlx-lm's model code.

One forward returns the logits and the final hidden state the drafter consumes; the shared K/V the
drafter reads are the target's own cache entries of its last non-shared layer of each type.
"""

import weakref
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gemma4_text import logit_softcap

from ..engine.cache import make_target_cache


class TargetOutput(NamedTuple):
    logits: mx.array
    hidden: mx.array


class Target:
    """Wraps an mlx-lm ``gemma4`` or ``gemma4_text`` model. ``hold=False``: the wrapper does not
    keep the model alive (the package's wrapper of a caller's mlx-lm model)."""

    def __init__(self, model: nn.Module, hold: bool = True):
        self._held, self._model = (model if hold else None), weakref.ref(model)
        self.backbone = self.language_model.model
        self.args = self.language_model.args
        args = self.args
        num_cached = args.num_hidden_layers - args.num_kv_shared_layers
        # The drafter reads, per layer type, the K/V of the target's last layer that computes them.
        self.shared_kv_layers = {
            layer_type: max(i for i in range(num_cached) if args.layer_types[i] == layer_type)
            for layer_type in set(args.layer_types[:num_cached])
        }

    @property
    def model(self) -> nn.Module:
        return self._model()

    @property
    def language_model(self) -> nn.Module:
        model = self.model
        return getattr(model, "language_model", model)

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    def make_cache(self, draft_slack: int = 16) -> list:
        """One trimmable, position-ordered cache per K/V-computing layer; sliding layers keep
        ``draft_slack`` entries beyond ``window + 1`` (see ``SlidingWindowCache``)."""
        return make_target_cache(self.args, draft_slack)

    def embed(self, tokens: mx.array) -> mx.array:
        """Scaled token embedding, as the target's first layer sees it."""
        return self.backbone.embed_tokens(tokens) * self.backbone.embed_scale

    def logits(self, hidden: mx.array) -> mx.array:
        lm = self.language_model
        if lm.tie_word_embeddings:
            out = self.backbone.embed_tokens.as_linear(hidden)
        else:
            out = lm.lm_head(hidden)
        if lm.final_logit_softcapping is not None:
            out = logit_softcap(lm.final_logit_softcapping, out)
        return out

    def __call__(self, inputs: mx.array, cache: list) -> TargetOutput:
        hidden = self.backbone(inputs, cache=cache)
        return TargetOutput(self.logits(hidden), hidden)

    def shared_kv(self, cache: list) -> dict:
        """Per layer type, the cached ``(keys, values)`` in position order."""
        return {t: ordered_kv(cache[i]) for t, i in self.shared_kv_layers.items()}

    def shared_kv_buffers(self, cache: list) -> tuple[dict, dict]:
        """Per layer type, the whole ``(keys, values)`` buffers of ``make_cache()`` caches (their
        shapes change only when a buffer grows, so a compiled draft step is rarely retraced) and
        the position of each buffer's first entry. Entries past the newest are stale or zero."""
        shared_kv, first_positions = {}, {}
        for layer_type, i in self.shared_kv_layers.items():
            c = cache[i]
            held = getattr(c, "length", c.offset)  # a KVCache holds every position from 0
            shared_kv[layer_type] = (c.keys, c.values)
            first_positions[layer_type] = c.offset - held
        return shared_kv, first_positions


def ordered_kv(layer_cache) -> tuple[mx.array, mx.array]:
    if hasattr(layer_cache, "ordered_kv"):
        return layer_cache.ordered_kv()
    if type(layer_cache).__name__ == "RotatingKVCache":
        raise TypeError(
            "mlx-lm's RotatingKVCache loses position order once it wraps; "
            "use Target.make_cache() or a cache with ordered_kv()"
        )
    keys, values = layer_cache.state[:2]
    return keys[..., : layer_cache.offset, :], values[..., : layer_cache.offset, :]
