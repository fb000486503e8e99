"""Choosing tokens from logits, and accepting drafted tokens without changing the output.

Drafts are accepted while they equal the target's own choice at their position (``match``), so
every emitted token is the target's choice. Greedy: the argmax. A custom ``sampler``: its draw
over the verified rows. mlx-lm's sampling options (temperature, top-p, min-p, top-k): *coupled*
sampling, Gumbel-max with noise that belongs to the output position. The token at sequence
position ``j`` is ``argmax(filtered logits / temp + g_j)``, where ``g_j[v]`` is Gumbel noise
hashed from the generation's seed, ``j`` and the token id ``v``; the drafter proposes
``argmax(its logits / temp + g_j)`` with the same noise. The target's draw at ``j`` does not
depend on how many drafts a round had, or whether there was a drafter at all, so with a seed the
output is the same for every draft schedule and every cost table, and equal to plain decoding
with the same seed; drafting only changes the speed.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p, greedy_sampler

from ..models.centroid_head import candidate_argmax

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

    @property
    def filters(self) -> tuple[bool, bool, bool, bool]:
        """Which filters apply (top-p, min-p, min-p's tokens to keep, top-k): what the graph of
        a filtered row depends on. Their values are array inputs (``values``), so a compiled
        step serves every value."""
        keep_min = self.min_tokens_to_keep > 1
        return (0 < self.top_p < 1.0, self.min_p != 0.0, keep_min, self.top_k > 0)

    def values(self) -> mx.array:
        """``[1 / temp, top_p, min_p, min_tokens_to_keep, top_k]`` as a float32 array."""
        inverse_temp = 1.0 / self.temp if self.temp else 0.0
        values = [inverse_temp, self.top_p, self.min_p, self.min_tokens_to_keep, self.top_k]
        return mx.array(values, mx.float32)

    def distribution(self, logprobs: mx.array) -> mx.array:
        """Float32 log-probabilities of the draw: the filters, then the temperature."""
        scaled = filter_rows(logprobs, self.filters, self.values()).astype(mx.float32)
        return log_softmax(scaled * (1.0 / self.temp))


def make_sampler_params(sampler: Sampler) -> SamplingParams | None:
    """The options of a sampler made by mlx-lm's ``make_sampler``, read from its closure (the
    names of its parameters), so that it can sample coupled; ``None`` for any other sampler and
    for XTC, whose coin flip has no distribution."""
    if sampler is greedy_sampler:
        return SamplingParams()
    made_by = (getattr(sampler, "__module__", None), getattr(sampler, "__qualname__", None))
    if made_by != ("mlx_lm.sample_utils", "make_sampler.<locals>.sampler"):
        return None
    options = closure_values(sampler)
    for method in options.pop("sampling_methods", ()):
        options.update(closure_values(method))
    names = {"temp", "top_p", "min_p", "min_tokens_to_keep", "top_k"}
    return SamplingParams(**options) if set(options) <= names else None


def closure_values(function) -> dict:
    names, cells = function.__code__.co_freevars, function.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(names, cells, strict=True)}


def kth_largest(logprobs: mx.array, k: mx.array) -> mx.array:
    """Per row, the ``k``-th largest entry (``k`` >= 1, an array), as ``[..., 1]``."""
    size = logprobs.shape[-1]
    index = mx.clip(size - k.astype(mx.int32), 0, size - 1)
    index = mx.broadcast_to(index, (*logprobs.shape[:-1], 1))
    return mx.take_along_axis(mx.sort(logprobs, axis=-1), index, axis=-1)


def filter_rows(logprobs: mx.array, filters: tuple, values: mx.array) -> mx.array:
    """mlx-lm's truncations in ``make_sampler``'s order (excluded tokens get -inf), with the
    values from ``SamplingParams.values``: top-p as mlx-lm computes it; min-p relative to the
    top token (keeping at least ``min_tokens_to_keep``); top-k keeping every token tied with
    the ``k``-th."""
    top_p, min_p, keep_min, top_k = filters
    if top_p:
        logprobs = apply_top_p(logprobs, values[1])
    if min_p:
        floor = logprobs.max(axis=-1, keepdims=True) + mx.log(values[2])
        if keep_min:
            floor = mx.minimum(floor, kth_largest(logprobs, values[3]))
        logprobs = mx.where(logprobs < floor, -mx.inf, logprobs)
    if top_k:
        kept = mx.minimum(values[4], logprobs.shape[-1])
        logprobs = mx.where(logprobs < kth_largest(logprobs, kept), -mx.inf, logprobs)
    return logprobs


_MIX = (mx.array(0x7FEB352D, mx.uint32), mx.array(0x846CA68B, mx.uint32))
_GOLDEN = mx.array(0x9E3779B9, mx.uint32)


def _mix(x: mx.array) -> mx.array:
    """A 32-bit integer hash (lowbias32): every input bit flips about half the output bits."""
    x = (x ^ (x >> 16)) * _MIX[0]
    x = (x ^ (x >> 15)) * _MIX[1]
    return x ^ (x >> 16)


def gumbel_at(seed: mx.array, positions: mx.array, ids: mx.array) -> mx.array:
    """Gumbel noise of token ``ids`` at sequence ``positions`` (broadcast together) for
    ``seed``: counter-based, so the drafter and the target see the same noise for a token at a
    position, and it is computed only for the tokens a row holds (a drafter's candidates)."""
    return _compiled_gumbel(mx.array(seed), mx.array(positions), mx.array(ids))


@mx.compile
def _compiled_gumbel(seed: mx.array, positions: mx.array, ids: mx.array) -> mx.array:
    # Compiled: the hash's two dozen integer ops become one pass over the row (3x faster over
    # a [3, 32768] verification on the 2-core CPU, 2026-12-05).
    stream = _mix(seed.astype(mx.uint32) ^ _mix(positions.astype(mx.uint32) * _GOLDEN))
    return gumbel_from_bits(_mix(stream ^ _mix(ids.astype(mx.uint32) + _GOLDEN)))


def gumbel_from_bits(bits: mx.array) -> mx.array:
    """Gumbel noise from uniform 32-bit integers: 23 of their bits make a float32 strictly
    inside (0, 1) (with 24, the largest rounds to 1.0, whose noise is infinite, and a token the
    filters excluded would get -inf + inf)."""
    uniform = ((bits >> 9).astype(mx.float32) + 0.5) * (1.0 / (1 << 23))
    return -mx.log(-mx.log(uniform))


def coupled_choice(
    scaled: mx.array, seed: mx.array, positions: mx.array, ids: mx.array | None = None
) -> mx.array:
    """The Gumbel-max draw from rows of ``scaled`` logits ``[L, N]`` (filtered, divided by the
    temperature) at sequence ``positions`` ``[L]``: over token ``ids`` ``[L, N]`` (None: the
    whole vocabulary in order). Ties go to the lowest token id, as ``mx.argmax``'s do."""
    vocabulary = mx.arange(scaled.shape[-1], dtype=mx.uint32)[None] if ids is None else ids
    return noisy_choice(scaled, gumbel_at(seed, positions[:, None], vocabulary), ids)


def noisy_choice(scaled: mx.array, noise: mx.array, ids: mx.array | None = None) -> mx.array:
    """``coupled_choice`` with the rows' noise (``gumbel_at``) already drawn."""
    noisy = scaled.astype(mx.float32) + noise
    if ids is None:  # the whole row: the first maximum is the lowest id
        return mx.argmax(noisy, axis=-1).astype(mx.int32)
    return candidate_argmax(mx.broadcast_to(ids, noisy.shape).astype(mx.int32), noisy)


# How many of the best-noised tokens ``nucleus_choice`` tries before it gives up on a row. On the
# fixture's rows (10 held-out prompts x 20 seeds, 12,980 rows, top-p 0.95) none of the best two
# lies in the nucleus for 0.26% of rows at temperature 1.0 and 0.008% at 0.7; the best one alone
# misses 4.2% and 0.15%.
NUCLEUS_CANDIDATES = 2


def nucleus_choice(
    rows: mx.array,
    inverse_temp: mx.array,
    top_p: mx.array,
    noise: mx.array,
    ids: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """``(tokens, sure)``: the coupled top-p draw from ``rows`` ``[L, N]`` of logits (or
    log-probabilities: any shift of a row draws the same) with their Gumbel ``noise``
    (``gumbel_at``) over token ``ids`` (None: the whole vocabulary in order), without sorting a
    row. The draw is the best-noised token inside the nucleus, and a token lies in mlx-lm's
    nucleus exactly when the tokens above it hold less than ``top_p`` of the mass; so the
    best-noised tokens are tried in turn (ties: lowest id first). ``sure`` is False where none
    of ``NUCLEUS_CANDIDATES`` lies in the nucleus: that row's token is only a guess, and the
    exact draw needs ``coupled_choice`` over the filtered row."""
    if ids is None:
        ids = mx.arange(rows.shape[-1], dtype=mx.int32)[None]
    return _nucleus_choice(rows, mx.array(inverse_temp), mx.array(top_p), noise, ids)


@mx.compile
def _nucleus_choice(rows, inverse_temp, top_p, noise, ids) -> tuple[mx.array, mx.array]:
    # Compiled, the candidates' passes over the row fuse; 2 ** (x log2 e) is e ** x at half the
    # cost of MLX's CPU exp (5 rows of 32768: 4.7 ms against 6.2, 2026-12-05).
    rows = rows.astype(mx.float32)
    rows = rows - rows.max(axis=-1, keepdims=True)  # the top token's probability: 1
    noisy = rows * inverse_temp + noise
    probs = mx.power(2.0, rows * math.log2(math.e))
    bar = top_p * probs.sum(axis=-1, keepdims=True)
    order = mx.broadcast_to(ids, noisy.shape).astype(mx.int32)
    never = mx.array(mx.iinfo(mx.int32).max, mx.int32)
    chosen = mx.full((rows.shape[0], 1), -1, mx.int32)
    for _ in range(NUCLEUS_CANDIDATES):
        best = noisy.max(axis=-1, keepdims=True)
        token = mx.where(noisy == best, order, never).min(axis=-1, keepdims=True)
        level = mx.where(order == token, rows, -mx.inf).max(axis=-1, keepdims=True)
        above = mx.where(rows > level, probs, 0.0).sum(axis=-1, keepdims=True)
        chosen = mx.where((chosen < 0) & (above < bar), token, chosen)
        noisy = mx.where(order == token, -mx.inf, noisy)
    sure = chosen >= 0
    return mx.where(sure, chosen, token).reshape(-1), sure.reshape(-1)


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
    logits: mx.array, ids: mx.array | None, history: mx.array, penalty: mx.array
) -> mx.array:
    """mlx-lm's repetition penalty on logits ``[1, C]`` of token ``ids`` ``[1, C]`` (None: the
    whole vocabulary in order): the tokens that occur in ``history`` are penalised."""
    if ids is None:
        ids = mx.arange(logits.shape[-1])[None]
    seen = (ids.reshape(-1, 1) == history.reshape(1, -1)).any(axis=1)[None]
    return mx.where(seen, mx.where(logits < 0, logits * penalty, logits / penalty), logits)


def match_accept(drafts: mx.array, target_tokens: mx.array) -> mx.array:
    """Number of leading drafts equal to the target's own choices (``[k]`` vs ``[k+1]``), per
    row for a batch (``[B, k]`` vs ``[B, k+1]``)."""
    same = (drafts == target_tokens[..., : drafts.shape[-1]]).astype(mx.int32)
    return mx.cumprod(same, axis=-1).sum(axis=-1)


class TokenPolicy:
    """How tokens are picked from target and drafter logits (drafts are accepted while they
    equal the target's picks).

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
        self.params = params if params is not None and not params.greedy else None
        self.sampler = sampler or greedy_sampler
        self.processors = list(logits_processors or [])
        self.history_window = history_window if self.processors else 0
        self.repetition_penalty = repetition_penalty
        self.custom_sampler = sampler is not None
        self.values = mx.array(0.0) if self.params is None else self.params.values()
        if repetition_penalty is not None:
            self.values = mx.concatenate([self.values.reshape(-1), mx.array([repetition_penalty])])

    @property
    def coupled(self) -> bool:
        """True: Gumbel-max sampling with the output position's noise (see the module)."""
        return self.params is not None

    @property
    def acceptance_rule(self) -> str:
        return "coupled" if self.coupled else "match"

    @property
    def kind(self) -> tuple:
        """What a draft step computes besides the models and ``values``: policies of one kind
        share a compiled step, whatever their temperatures, top-p or penalties."""
        filters = self.params.filters if self.coupled else None
        penalty = self.repetition_penalty is not None
        return self.acceptance_rule, filters, self.history_window, penalty, len(self.processors)

    def target_rows(
        self, logits: mx.array, history: mx.array, drafts: list
    ) -> tuple[mx.array, mx.array]:
        """``(logprobs, rows)`` of a round's target ``logits`` ``[L, V]``: mlx-lm's
        log-probabilities (lazy: the responses', computed where read) and what ``choose``
        reads (``choice_rows``)."""
        if self.processors:
            logits = process_rows(logits, history, drafts, self.processors)
        logprobs = log_softmax(logits)
        return logprobs, self.choice_rows(logits, logprobs)

    def choice_rows(self, logits: mx.array, logprobs: mx.array) -> mx.array:
        """What tokens are chosen from: the log-probabilities for greedy, a sampler and mlx-lm's
        sorted top-p, which sums probabilities; else the logits. A Gumbel-max draw, the
        temperature, min-p, top-k and ``nucleus_choice`` are the same for any shift of a row,
        and the log-softmax costs 0.5 ms a 32,768-entry row on the 2-core CPU (a round of 4
        rows: 2.0 ms, 2026-12-05)."""
        sorted_top_p = self.coupled and self.params.filters[0] and not self.nucleus
        return logits if self.coupled and not sorted_top_p else logprobs

    def scaled(self, rows: mx.array, values: mx.array) -> mx.array:
        """Filtered rows (``choice_rows``) divided by the temperature (float32)."""
        filtered = filter_rows(rows, self.params.filters, values)
        return filtered.astype(mx.float32) * values[0]

    def draft(
        self, logits: mx.array, ids: mx.array | None, history, noise: mx.array, values: mx.array
    ) -> mx.array:
        """The drafted token ``[1]`` from draft ``logits`` ``[1, N]`` over token ``ids`` ``[1, N]``
        (None: the whole vocabulary, in order); ``noise``: ``[seed, position]`` of the draft;
        ``values``: ``self.values``, an array input of the compiled step."""
        if self.processors:
            if self.history_window is None:  # custom processors read whole rows
                logits = process_rows(logits, history, [], self.processors)
            else:  # only mlx-lm's repetition penalty reads a window
                logits = penalize_repeats(logits, ids, history, values[-1])
        if not self.coupled:
            token = mx.argmax(logits, axis=-1) if ids is None else candidate_argmax(ids, logits)
            return token.astype(mx.int32)
        rows = self.choice_rows(logits, log_softmax(logits))
        if self.nucleus:  # a draft needs no certainty: its guess is checked by the target
            vocabulary = mx.arange(logits.shape[-1])[None] if ids is None else ids
            draft_noise = gumbel_at(noise[0], noise[1:2, None], vocabulary)
            return nucleus_choice(rows, values[0], values[1], draft_noise, vocabulary)[0]
        return coupled_choice(self.scaled(rows, values), noise[0], noise[1:2], ids)

    @property
    def nucleus(self) -> bool:
        """Coupled top-p without other filters (the OpenAI clients' usual request): rows are
        drawn by ``nucleus_choice``, which sorts none."""
        return self.coupled and self.params.filters == (True, False, False, False)

    def choose(
        self,
        rows: mx.array,
        seed: mx.array,
        first_position: int | mx.array,
        first_exact: bool = True,
    ) -> tuple[mx.array, mx.array]:
        """``(tokens, trusted)`` for ``rows`` ``[L, V]`` (``choice_rows``) predicting positions
        ``first_position ..`` (an int, or a lazy scalar in a batch whose rows roll back on the
        device): the first ``trusted`` tokens are what plain decoding picks there. With top-p
        alone, rows are ``nucleus_choice``'s, which is the exact draw where it is sure, so a row
        it is unsure of ends the trusted tokens, and a round whose first row that is draws it
        exactly. ``first_exact``: the first row is always the exact draw (a sort, as mlx-lm's
        plain step makes), so ``trusted >= 1``; without it, ``trusted`` may be 0 and the caller
        draws the first row again with ``first_exact`` (the single-stream loop, which reads
        every round before it emits it; a batch cannot undo a row's next round)."""
        count = rows.shape[0]
        if not self.coupled:
            return self.sampler(rows), mx.array(count)
        positions = first_position + mx.arange(count)
        if not self.nucleus:
            return coupled_choice(self.scaled(rows, self.values), seed, positions), mx.array(count)
        vocabulary = mx.arange(rows.shape[-1], dtype=mx.uint32)[None]
        noise = gumbel_at(seed, positions[:, None], vocabulary)
        values = self.values
        if not first_exact:
            tokens, sure = nucleus_choice(rows, values[0], values[1], noise, vocabulary)
            return tokens, mx.cumprod(sure.astype(mx.int32)).sum()
        # mlx-lm's sorted top-p sums probabilities: it reads log-probabilities
        exact = noisy_choice(self.scaled(log_softmax(rows[:1]), values), noise[:1])
        if count == 1:
            return exact, mx.array(1)
        tokens, sure = nucleus_choice(rows[1:], values[0], values[1], noise[1:], vocabulary)
        return mx.concatenate([exact, tokens]), 1 + mx.cumprod(sure.astype(mx.int32)).sum()

    def accept(
        self,
        drafts: list,
        rows: mx.array,
        seed: mx.array,
        first_position: int | mx.array,
        first_exact: bool = True,
    ):
        """``(n, tokens)`` for drafts ``[k]`` and the target's ``rows`` ``[k+1, V]``
        (``choice_rows``) whose first predicts ``first_position``: ``n`` drafts equal the
        target's picks (and the pick after them, ``tokens[n]``, is plain decoding's); ``n`` is
        -1 where the first pick is only a guess (possible without ``first_exact``, see
        ``choose``)."""
        tokens, trusted = self.choose(rows, seed, first_position, first_exact)
        matched = match_accept(mx.concatenate(drafts), tokens) if drafts else mx.array(0)
        return mx.minimum(matched, trusted - 1), tokens
