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

from .centroid_head import candidate_argmax

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
        if 0 < self.top_k < logprobs.shape[-1]:  # a candidate row may hold fewer tokens
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


def penalize_repeats(
    logits: mx.array, ids: mx.array, history: mx.array, penalty: float
) -> mx.array:
    """mlx-lm's repetition penalty on candidate logits ``[1, C]`` of token ``ids`` ``[1, C]``:
    the candidates that occur in ``history`` are penalised (the others are not in the row)."""
    seen = (ids.reshape(-1, 1) == history.reshape(1, -1)).any(axis=1)[None]
    return mx.where(seen, mx.where(logits < 0, logits * penalty, logits / penalty), logits)


def match_accept(drafts: mx.array, target_tokens: mx.array) -> mx.array:
    """Number of leading drafts equal to the target's own choices (``[k]`` vs ``[k+1]``)."""
    same = (drafts == target_tokens[: drafts.shape[0]]).astype(mx.int32)
    return mx.cumprod(same).sum()


def speculative_accept(
    drafts: mx.array,
    draft_logq: mx.array,
    q_row: Callable[[mx.array], mx.array],
    target_logprobs: mx.array,
    key: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Speculative sampling for ``k >= 1`` drafts drawn with log-probabilities ``draft_logq``
    ``[k]``, against ``exp(target_logprobs)`` ``[k+1, V]`` (float32). ``q_row(i)`` gives the
    drafter's probability row ``[V]`` of draft ``i`` (a lazy index); ``key``: the random key
    (None: MLX's global random state). Returns ``(n, tokens)``: ``n`` drafts are accepted and
    ``tokens[:n+1]`` are the emitted tokens."""
    k = drafts.shape[0]
    accept_key, draw_key = (None, None) if key is None else mx.random.split(key)
    p_draft = mx.exp(mx.take_along_axis(target_logprobs[:k], drafts[:, None], axis=-1)[:, 0])
    accept = mx.random.uniform(shape=(k,), key=accept_key) * mx.exp(draft_logq) < p_draft
    n = mx.cumprod(accept.astype(mx.int32)).sum()
    # One row is drawn from: the residual at the first rejection, or p itself (the bonus token);
    # building only that row keeps the per-row work of a round to the target's distribution.
    p = mx.exp(mx.take(target_logprobs, n, axis=0))
    residual = mx.maximum(p - q_row(mx.minimum(n, k - 1)) * (n < k), 0.0)
    # p == q up to rounding: rejection is (nearly) impossible there, but keep the row valid.
    residual = mx.where(residual.sum() > 0, residual, p)
    token_at_n = mx.random.categorical(mx.log(residual), key=draw_key)
    tokens = mx.where(mx.arange(k + 1) < n, mx.concatenate([drafts, drafts[:1]]), token_at_n)
    return n, tokens


def draft_probability_row(draft_dists: list, vocab_size: int) -> Callable[[mx.array], mx.array]:
    """``i -> q_i`` ``[V]``: the drafter's distribution at draft ``i`` as a vocabulary row,
    scattered from its candidates only here, for the one row the acceptance rule draws from."""
    logq = mx.concatenate([d["logq"] for d in draft_dists])
    if "ids" not in draft_dists[0]:
        return lambda i: mx.exp(mx.take(logq, i, axis=0))
    ids = mx.concatenate([d["ids"] for d in draft_dists])

    def row(i: mx.array) -> mx.array:
        q = mx.exp(mx.take(logq, i, axis=0))
        return mx.zeros((vocab_size,), q.dtype).at[mx.take(ids, i, axis=0)].add(q)

    return row


class TokenPolicy:
    """How tokens are picked from target and drafter logits, and how drafts are accepted.

    ``history_window``: how much of the token history the logits processors read. ``0``: none
    (no processors); ``W``: the last ``W`` tokens (mlx-lm's repetition penalty), which the engine
    keeps as a fixed-size lazy window on the device; ``None``: the whole history (custom
    processors), which the engine must know on the host before each round."""

    def __init__(
        self,
        sampler: Sampler | None = None,
        params: SamplingParams | None = None,
        logits_processors: list | None = None,
        history_window: int | None = None,
        repetition_penalty: float | None = None,
    ):
        if sampler is not None and params is not None and not params.greedy:
            raise ValueError("pass either a sampler or sampling parameters, not both")
        if params is not None and not params.greedy:
            self.params, self.sampler = params, params.make_sampler()
        else:
            self.params, self.sampler = None, sampler or greedy_sampler
        self.processors = list(logits_processors or [])
        self.history_window = history_window if self.processors else 0
        self.repetition_penalty = repetition_penalty
        self.custom_sampler = sampler is not None

    @property
    def speculative(self) -> bool:
        """True: speculative sampling; False: drafts must match the target's sampled tokens."""
        return self.params is not None

    @property
    def draft_signature(self) -> tuple:
        """What the draft step computes besides the models: policies alike draft alike."""
        return self.params, self.history_window, self.repetition_penalty, len(self.processors)

    @property
    def acceptance_rule(self) -> str:
        return "speculative" if self.speculative else "match"

    def target_logprobs(self, logits: mx.array, history: mx.array, drafts: list) -> mx.array:
        if self.processors:
            logits = process_rows(logits, history, drafts, self.processors)
        return log_softmax(logits)

    def draft(self, logits: mx.array, ids: mx.array | None, history, key) -> dict:
        """The drafted ``token`` ``[1]`` from draft ``logits`` ``[1, N]`` over token ``ids``
        ``[1, N]`` (None: the whole vocabulary, in order) and, when speculative, the drafter's
        distribution: ``logq`` over the same ``ids`` and ``logq_token``, the drawn token's."""
        if self.processors:
            if ids is None:
                logits = process_rows(logits, history, [], self.processors)
            else:  # only the repetition penalty comes with a candidate row (see history_window)
                logits = penalize_repeats(logits, ids, history, self.repetition_penalty)
        if not self.speculative:
            token = mx.argmax(logits, axis=-1) if ids is None else candidate_argmax(ids, logits)
            return {"token": token.astype(mx.int32)}
        logq = self.params.distribution(log_softmax(logits))
        index = mx.random.categorical(logq, key=key)[:, None]
        token = index if ids is None else mx.take_along_axis(ids, index, axis=-1)
        draft = {
            "token": token[:, 0].astype(mx.int32),
            "logq": logq,
            "logq_token": mx.take_along_axis(logq, index, axis=-1)[:, 0],
        }
        if ids is not None:
            draft["ids"] = ids
        return draft

    def accept(self, drafts: list, draft_dists: list, logprobs: mx.array, key=None):
        """``(n, tokens)`` for drafts ``[k]`` and target log-probabilities ``[k+1, V]``. Without
        drafts and ``key`` this is mlx-lm's sampler itself, so plain decoding draws exactly as
        mlx-lm does. With a ``key`` nothing draws from MLX's global random state, except a custom
        sampler (it takes no key)."""
        if not drafts:
            if key is None or self.params is None:
                return mx.array(0), self.sampler(logprobs)
            # The same work as mlx-lm's sampler, from the key.
            scaled = self.params.filter(logprobs) * (1.0 / self.params.temp)
            return mx.array(0), mx.random.categorical(scaled, key=key)
        drafts = mx.concatenate(drafts)
        if self.speculative:
            q_row = draft_probability_row(draft_dists, logprobs.shape[-1])
            draft_logq = mx.concatenate([d["logq_token"] for d in draft_dists])
            target = self.params.distribution(logprobs)
            return speculative_accept(drafts, draft_logq, q_row, target, key)
        tokens = self.sampler(logprobs)
        return match_accept(drafts, tokens), tokens
