"""Prompt caches an app keeps between turns, reusing them for resent conversations, and saving
them to disk.

A ``PromptCache`` is the list of target caches mlx-lm's functions take, plus the token ids it
stands for, so that a whole conversation sent again (as OpenAI-style clients do) only has its new
tokens fed: ``trim_to_common_prefix`` rolls the cache back to the longest common prefix. It also
records the model it was made for, so a cache saved with ``save_prompt_cache`` (mlx-lm's file
format) and loaded later is refused by another model instead of giving a wrong answer.
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache

from ..models.target import Target
from ..state import kept_for
from .cache import SlidingWindowCache
from .loop import draft_slack

DEFAULT_MAX_DRAFT_TOKENS = 16
# The model config fields a cache's K/V depend on (mlx-lm ``gemma4_text.ModelArgs`` names).
RECORDED_ARGS = (
    "model_type",
    "num_hidden_layers",
    "num_kv_shared_layers",
    "layer_types",
    "sliding_window",
    "head_dim",
    "global_head_dim",
    "num_key_value_heads",
    "num_global_key_value_heads",
    "attention_k_eq_v",
    "hidden_size",
    "vocab_size",
)
# No dots: mlx-lm unflattens the metadata keys at them.
TOKENS_KEY, MODEL_KEY = "mlx_gemma_mtp_tokens", "mlx_gemma_mtp_model"
WEIGHT_SAMPLE = 64  # leading entries of each weight array that the model's digest reads


class PromptCache(list):
    """The target's per-layer caches; ``tokens`` are the ids they hold, oldest first;
    ``made_for`` what ``model_record`` says of the model they were made for (``None``: not
    recorded)."""

    def __init__(
        self, caches: Sequence = (), tokens: Sequence[int] = (), made_for: dict | None = None
    ):
        super().__init__(caches)
        self.tokens = list(tokens)
        self.made_for = made_for

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)


def make_cache_for(target: Target, max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS) -> PromptCache:
    """An empty cache for ``target`` that drafts of up to ``max_draft_tokens`` can roll back."""
    caches = target.make_cache(draft_slack=draft_slack(max_draft_tokens))
    return PromptCache(caches, made_for=model_record(target))


def model_record(target: Target) -> dict:
    """The config fields the K/V depend on and a digest of the weights (names, dtypes, shapes
    and leading entries of every array: another checkpoint, dtype or quantization differs);
    made once per model."""
    return kept_for("model record", lambda: describe_model(target), target.model)


def describe_model(target: Target) -> dict:
    weights = tree_flatten(target.language_model.parameters())
    leading = [w.reshape(-1)[:WEIGHT_SAMPLE] for _, w in weights]
    mx.eval(leading)
    digest = hashlib.sha256()
    for (name, w), head in zip(weights, leading, strict=True):
        digest.update(f"{name}:{w.dtype}:{w.shape};".encode())
        digest.update(np.array(head.view(mx.uint8)).tobytes())
    record = {name: getattr(target.args, name, None) for name in RECORDED_ARGS}
    return {**record, "weights": digest.hexdigest()[:32]}


def record_differences(saved: dict, model: dict) -> list[str]:
    """What differs between a cache's model record and the model's, in words."""
    differences = []
    for name in RECORDED_ARGS:
        if saved.get(name) != model.get(name):
            differences.append(
                f"{name} is {saved.get(name)!r} in the cache but {model.get(name)!r} in the model"
            )
    if saved.get("weights") != model.get("weights"):
        differences.append(
            "the weights differ (another checkpoint, or this one loaded with another dtype or "
            "quantization)"
        )
    return differences


def check_prompt_cache(prompt_cache: list, target: Target) -> None:
    """The cache must be one of ours (mlx-lm's rotating cache cannot roll back drafts once it
    wraps), shaped for this target's layers, made for this model, and hold its tokens."""
    remedy = "make it with mlx_gemma_mtp.make_prompt_cache(model)"
    expected = target.make_cache()
    if len(prompt_cache) != len(expected):
        raise ValueError(
            f"prompt_cache has {len(prompt_cache)} layer caches but this model computes K/V in "
            f"{len(expected)} layers: it was not made for this model ({remedy})"
        )
    for i, (c, e) in enumerate(zip(prompt_cache, expected, strict=True)):
        check_layer_cache(i, c, e, target.backbone.layers[i].self_attn, remedy)
    record = getattr(prompt_cache, "made_for", None)
    differences = record_differences(record, model_record(target)) if record else []
    if differences:
        raise ValueError(
            "prompt_cache was made for another model: "
            + "; ".join(differences)
            + ". Use it with the model it was made (or saved) with, or make a new one with "
            "mlx_gemma_mtp.make_prompt_cache(model)"
        )
    if (
        isinstance(prompt_cache, PromptCache)
        and prompt_cache
        and (prompt_cache[0].offset != len(prompt_cache.tokens))
    ):
        raise ValueError(
            f"prompt_cache holds {prompt_cache[0].offset} positions but records "
            f"{len(prompt_cache.tokens)} tokens: it was changed outside mlx_gemma_mtp"
        )


def check_layer_cache(i: int, layer_cache, expected, attention, remedy: str) -> None:
    """Layer ``i``'s cache: the kind, window and K/V shape the model's layer ``i`` needs."""
    kind, wanted = type(layer_cache).__name__, type(expected).__name__
    if type(layer_cache) is not type(expected) or not isinstance(
        layer_cache, (KVCache, SlidingWindowCache)
    ):
        raise ValueError(
            f"prompt_cache layer {i} is a {kind}, this model needs a {wanted} ({remedy})"
        )
    window = getattr(layer_cache, "window", None)
    if window != getattr(expected, "window", None):
        raise ValueError(
            f"prompt_cache layer {i} has a sliding window of {window}, this model's is "
            f"{expected.window} ({remedy})"
        )
    if layer_cache.keys is None:
        return
    held = (layer_cache.keys.shape[1], layer_cache.keys.shape[3], layer_cache.values.shape[3])
    needed = (attention.n_kv_heads, attention.head_dim, attention.head_dim)
    if held != needed:
        raise ValueError(
            f"prompt_cache layer {i} holds K/V of {held[0]} heads with head dims "
            f"{held[1]}/{held[2]}, this model's layer {i} has {needed[0]} heads of head_dim "
            f"{needed[1]} ({remedy})"
        )


def save_prompt_cache(
    file_name: str | Path, cache: PromptCache, metadata: dict[str, str] | None = None
) -> None:
    """Save ``cache`` (from ``make_prompt_cache``, after any number of turns) in mlx-lm's format:
    a ``.safetensors`` file of the layer caches' states, with ``metadata`` (strings) and the
    tokens and model record ``load_prompt_cache`` needs to check it against a model."""
    check_file_name(file_name)
    if not isinstance(cache, PromptCache) or cache.made_for is None:
        raise ValueError(
            "save_prompt_cache needs a cache from mlx_gemma_mtp.make_prompt_cache(model) (or "
            "load_prompt_cache): it records the tokens and the model the file is checked against"
        )
    if cache and cache[0].offset != len(cache.tokens):
        raise ValueError(
            f"the cache holds {cache[0].offset} positions but records {len(cache.tokens)} tokens"
        )
    metadata = dict(metadata or {})
    for key in (TOKENS_KEY, MODEL_KEY):
        if key in metadata:
            raise ValueError(f"metadata key {key!r} is reserved for mlx_gemma_mtp")
    metadata[TOKENS_KEY] = json.dumps(cache.tokens)
    metadata[MODEL_KEY] = json.dumps(cache.made_for)
    mlx_cache.save_prompt_cache(str(file_name), list(cache), metadata)


def load_prompt_cache(
    file_name: str | Path, return_metadata: bool = False
) -> PromptCache | tuple[PromptCache, dict[str, str]]:
    """A cache saved by ``save_prompt_cache`` (and its metadata, if ``return_metadata``). It is
    checked against the model when it is used: another model, or one loaded with another dtype
    or quantization, is refused with what differs."""
    check_file_name(file_name)
    if not Path(file_name).is_file():
        raise FileNotFoundError(f"{file_name}: no such prompt cache file")
    caches, metadata = mlx_cache.load_prompt_cache(str(file_name), return_metadata=True)
    if TOKENS_KEY not in metadata or MODEL_KEY not in metadata:
        raise ValueError(
            f"{file_name} was not saved by mlx_gemma_mtp.save_prompt_cache: it records no "
            "tokens or model, so it cannot be checked against a model"
        )
    tokens, made_for = json.loads(metadata.pop(TOKENS_KEY)), json.loads(metadata.pop(MODEL_KEY))
    cache = PromptCache(caches, tokens, made_for)
    return (cache, metadata) if return_metadata else cache


def check_file_name(file_name: str | Path) -> None:
    if not str(file_name).endswith(".safetensors"):
        raise ValueError(
            f"prompt cache file names end in .safetensors (MLX would add it), got {file_name}"
        )


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def can_trim(layer_cache, n: int) -> bool:
    """Whether ``layer_cache.trim(n)`` keeps every entry a later query needs."""
    if isinstance(layer_cache, SlidingWindowCache):
        after = layer_cache.offset - n
        return layer_cache.length - n >= min(after, layer_cache.window + 1)
    return layer_cache.is_trimmable()


def trim_to_common_prefix(
    prompt_cache: PromptCache, tokens: Sequence[int], keep_at_most: int | None = None
) -> list[int]:
    """Roll ``prompt_cache`` back to the longest common prefix of its tokens and ``tokens`` (a
    whole conversation), leaving at least one token to feed (and keeping at most
    ``keep_at_most``), and return the tokens to feed.

    Sliding-window caches can roll back only about their slack beyond the window; past that the
    cache is emptied and everything is fed again (slower, never wrong)."""
    tokens = list(tokens)
    keep = min(common_prefix_length(prompt_cache.tokens, tokens), len(tokens) - 1)
    if keep_at_most is not None:
        keep = min(keep, keep_at_most)
    drop = len(prompt_cache.tokens) - keep
    if not all(can_trim(c, drop) for c in prompt_cache):
        empty_prompt_cache(prompt_cache)
        return tokens
    for c in prompt_cache:
        c.trim(min(drop, c.offset))
    del prompt_cache.tokens[keep:]
    return tokens[keep:]


def empty_prompt_cache(prompt_cache: list) -> None:
    """Make every layer's cache a new empty one of the same kind (and forget the tokens)."""
    for i, c in enumerate(prompt_cache):
        if isinstance(c, SlidingWindowCache):
            prompt_cache[i] = SlidingWindowCache(c.window, c.retain - c.window - 1)
        else:
            prompt_cache[i] = KVCache()
    if isinstance(prompt_cache, PromptCache):
        prompt_cache.tokens.clear()
