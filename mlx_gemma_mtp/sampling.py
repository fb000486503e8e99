"""Choosing tokens from logits, and accepting drafted tokens without changing the distribution.

Two acceptance rules, both lossless:

- ``match``: the target picks its token at every verified position with the plain sampler (argmax
  for greedy); drafts are accepted while they equal it. Works for any sampler.
- ``speculative``: for temperature > 0 with mlx-lm's sampling options, drafts are sampled from the
  drafter's distribution ``q`` and accepted with probability ``min(1, p(d) / q(d))``; on rejection
  the token is drawn from ``normalize(max(0, p - q))``; if all drafts pass, a bonus token comes from
  ``p``. ``p`` and ``q`` get the same filters mlx-lm's ``make_sampler`` applies, in float32.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_sampler,
)

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def log_softmax(logits: mx.array) -> mx.array:
    """mlx-lm's log-probabilities (same op, same dtype), so argmaxes agree bit for bit."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@dataclass(frozen=True)
class SamplingParams:
    """mlx-lm's ``make_sampler`` options (without XTC, whose coin flip has no distribution)."""

    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def make_sampler(self) -> Sampler:
        return make_sampler(
            self.temp, self.top_p, self.min_p, self.min_tokens_to_keep, top_k=self.top_k
        )

    def filter(self, logprobs: mx.array) -> mx.array:
        """The truncations ``make_sampler`` applies, in its order (excluded tokens get -inf)."""
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, self.min_tokens_to_keep)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs

    def distribution(self, logprobs: mx.array) -> mx.array:
        """Float32 log-probabilities of the sampler's draw: filters, then temperature."""
        scaled = self.filter(logprobs).astype(mx.float32) * (1.0 / self.temp)
        return log_softmax(scaled)


def process_rows(
    logits: mx.array, context: mx.array, tokens: Sequence[mx.array], processors
) -> mx.array:
    """Apply mlx-lm logits processors to ``logits`` rows ``[L, V]``: row ``i`` has seen
    ``context`` followed by ``tokens[:i]`` (the history mlx-lm would pass at that position)."""
    rows = []
    for i in range(logits.shape[0]):
        history = mx.concatenate([context, *tokens[:i]]) if i else context
        row = logits[i : i + 1]
        for processor in processors:
            row = processor(history, row)
        rows.append(row)
    return mx.concatenate(rows)


def match_accept(drafts: mx.array, target_tokens: mx.array) -> mx.array:
    """Number of leading drafts equal to the target's own choices (``[k]`` vs ``[k+1]``)."""
    same = (drafts == target_tokens[: drafts.shape[0]]).astype(mx.int32)
    return mx.cumprod(same).sum()


def speculative_accept(
    drafts: mx.array, draft_logprobs: mx.array, target_logprobs: mx.array
) -> tuple[mx.array, mx.array]:
    """Speculative sampling for ``k >= 1`` drafts drawn from ``exp(draft_logprobs)`` ``[k, V]``
    against ``exp(target_logprobs)`` ``[k+1, V]`` (float32). Returns ``(n, tokens)``: ``n`` drafts
    are accepted and ``tokens[:n+1]`` are the emitted tokens."""
    k = drafts.shape[0]
    p, q = mx.exp(target_logprobs), mx.exp(draft_logprobs)
    p_draft = mx.take_along_axis(p[:k], drafts[:, None], axis=-1)[:, 0]
    q_draft = mx.take_along_axis(q, drafts[:, None], axis=-1)[:, 0]
    accept = mx.random.uniform(shape=(k,)) * q_draft < p_draft
    n = mx.cumprod(accept.astype(mx.int32)).sum()
    residual = mx.maximum(p[:k] - q, 0.0)
    # p == q up to rounding: rejection is (nearly) impossible there, but keep the row valid.
    residual = mx.where(residual.sum(-1, keepdims=True) > 0, residual, p[:k])
    fallback = mx.random.categorical(mx.log(mx.concatenate([residual, p[k:]])))
    token_at_n = fallback[n]
    tokens = mx.where(mx.arange(k + 1) < n, mx.concatenate([drafts, drafts[:1]]), token_at_n)
    return n, tokens


class TokenPolicy:
    """How tokens are picked from target and drafter logits, and how drafts are accepted."""

    def __init__(
        self,
        sampler: Sampler | None = None,
        params: SamplingParams | None = None,
        logits_processors: list | None = None,
    ):
        if sampler is not None and params is not None and not params.greedy:
            raise ValueError("pass either a sampler or sampling parameters, not both")
        if params is not None and not params.greedy:
            self.params, self.sampler = params, params.make_sampler()
        else:
            self.params, self.sampler = None, sampler or greedy_sampler
        self.processors = list(logits_processors or [])

    @property
    def speculative(self) -> bool:
        """True: speculative sampling; False: drafts must match the target's sampled tokens."""
        return self.params is not None

    @property
    def needs_full_vocab_draft(self) -> bool:
        return self.speculative or bool(self.processors)

    def target_logprobs(self, logits: mx.array, context: mx.array, drafts: list) -> mx.array:
        if self.processors:
            logits = process_rows(logits, context, drafts, self.processors)
        return log_softmax(logits)

    def draft(self, logits: mx.array, context: mx.array, drafts: list):
        """Next draft token ``[1]`` and, when speculative, its distribution ``[1, V]``."""
        if self.processors:
            logits = process_rows(logits, mx.concatenate([context, *drafts]), [], self.processors)
        if not self.speculative:
            return mx.argmax(logits, axis=-1), None
        q = self.params.distribution(log_softmax(logits))
        return mx.random.categorical(q), q

    def accept(self, drafts: list, draft_dists: list, logprobs: mx.array):
        """``(n, tokens)`` for drafts ``[k]`` and target log-probabilities ``[k+1, V]``. Without
        drafts this is mlx-lm's sampler itself, so plain decoding draws exactly as mlx-lm does."""
        if not drafts:
            return mx.array(0), self.sampler(logprobs)
        drafts = mx.concatenate(drafts)
        if self.speculative:
            q = mx.concatenate(draft_dists)
            return speculative_accept(drafts, q, self.params.distribution(logprobs))
        tokens = self.sampler(logprobs)
        return match_accept(drafts, tokens), tokens
