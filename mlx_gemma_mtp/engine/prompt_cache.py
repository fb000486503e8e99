"""Prompt caches an app keeps between turns, and reusing them for resent conversations.

A ``PromptCache`` is the list of target caches mlx-lm's functions take, plus the token ids it
stands for, so that a whole conversation sent again (as OpenAI-style clients do) only has its new
tokens fed: ``trim_to_common_prefix`` rolls the cache back to the longest common prefix.
"""

from collections.abc import Sequence

from mlx_lm.models.cache import KVCache

from ..models.target import Target
from .cache import SlidingWindowCache
from .loop import draft_slack

DEFAULT_MAX_DRAFT_TOKENS = 16


class PromptCache(list):
    """The target's per-layer caches; ``tokens`` are the ids they hold, oldest first."""

    def __init__(self, caches: Sequence = (), tokens: Sequence[int] = ()):
        super().__init__(caches)
        self.tokens = list(tokens)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)


def make_cache_for(target: Target, max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS) -> PromptCache:
    """An empty cache for ``target`` that drafts of up to ``max_draft_tokens`` can roll back."""
    return PromptCache(target.make_cache(draft_slack=draft_slack(max_draft_tokens)))


def check_prompt_cache(prompt_cache: list, target: Target) -> None:
    """The cache must be one of ours for this target (mlx-lm's rotating cache cannot roll back
    drafts once it wraps)."""
    expected = target.make_cache()
    kinds_match = len(prompt_cache) == len(expected) and all(
        type(c) is type(e) and isinstance(c, (KVCache, SlidingWindowCache))
        for c, e in zip(prompt_cache, expected, strict=True)
    )
    if not kinds_match:
        raise ValueError(
            "prompt_cache was not made for this model: make it with "
            "mlx_gemma_mtp.make_prompt_cache(model, draft_model)"
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
        keep, drop = 0, len(prompt_cache.tokens)
        for i, c in enumerate(prompt_cache):
            if isinstance(c, SlidingWindowCache):
                prompt_cache[i] = SlidingWindowCache(c.window, c.retain - c.window - 1)
    for c in prompt_cache:
        c.trim(min(drop, c.offset))
    del prompt_cache.tokens[keep:]
    return tokens[keep:]
