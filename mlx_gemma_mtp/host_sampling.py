"""Speculative sampling on the host, in numpy: mlx-lm's sampling filters and the acceptance rule
of ``sampling.speculative_accept``, for machines where the device's work on whole vocabulary rows
costs more than reading the rows back.

That is MLX's CPU backend: its ``exp`` is a scalar polynomial (about 20 ns an entry) and its sort
is about 30 times slower than numpy's, so a top-p row costs it 2-3 ms, a large part of a plain step
of the fixture pair. The host needs only the rows up to the first rejection, with numpy's sort.

The filters repeat mlx-lm's float32 arithmetic, with MLX's CPU ``exp`` (``mlx_exp``), so on that
backend they keep exactly the tokens mlx-lm keeps. The draws use the engine's numpy generator.
"""

from collections.abc import Callable, Sequence

import numpy as np

# MLX's CPU exp (mlx/backend/cpu/simd/math.h): 2**round(x log2 e) times a Cephes polynomial of the
# fraction, evaluated with fused multiply-adds (exact products of two float32 in float64, then one
# rounding, as std::fma).
_LOG2E = np.float32(1.442695)
_EXP_POLY = [
    float(np.float32(c))
    for c in (
        1.535336188319500e-4,
        1.339887440266574e-3,
        9.618437357674640e-3,
        5.550332471162809e-2,
        2.402264791363012e-1,
        6.931472028550421e-1,
        1.0,
    )
]
# Below this log-probability MLX's exp gives less than 2**-25, which adds nothing to a float32
# sum of at least 0.5 (less than half its last place); summed last, in sorted order, such
# entries leave every partial sum as it was.
NEGLIGIBLE_LOGPROB = -17.5

Rows = Callable[[int], tuple[np.ndarray, np.ndarray]]


def mlx_exp(x: np.ndarray) -> np.ndarray:
    """``mx.exp`` of float32 ``x`` as MLX's CPU backend computes it, bit for bit."""
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # infinities: replaced at the end
        y = x * _LOG2E
        whole = np.floor(y + np.float32(0.5))
        fraction = (y - whole).astype(np.float64)
        poly = np.full(x.shape, np.float32(_EXP_POLY[0]))
        fused = np.empty(x.shape, np.float64)
        for coefficient in _EXP_POLY[1:]:
            np.multiply(poly, fraction, out=fused)
            np.add(fused, coefficient, out=fused)
            poly[...] = fused  # one rounding to float32, as std::fma
        scale = ((whole.astype(np.int32) + 127) << 23).view(np.float32)
        result = scale * poly
    result = np.where(np.isnan(x), x, result)
    result = np.where(x > 88.0, np.float32(np.inf), result)
    return np.where(x < -88.0, np.float32(0), result).astype(np.float32)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Float32 ``x`` rounded to ``dtype`` (round to nearest even) and back: the values an MLX op
    in that dtype would hold."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = x.astype(np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
        return np.where(np.isfinite(x), rounded.view(np.float32), x)
    return x


def top_p_threshold(logprobs: np.ndarray, top_p: float) -> np.float32:
    """The smallest log-probability mlx-lm's ``apply_top_p`` keeps in float32 row ``logprobs``:
    sorted ascending, the mass above each entry summed from the largest, entries dropped while
    that mass reaches ``top_p`` of the total."""
    ordered = np.sort(logprobs)
    start = int(np.searchsorted(ordered, NEGLIGIBLE_LOGPROB))
    sums = np.cumsum(mlx_exp(ordered[start:])[::-1])  # sums[m]: the m + 1 largest
    if sums[-1] < 0.5 and start:  # the negligible entries would count: sum them all
        start, sums = 0, np.cumsum(mlx_exp(ordered)[::-1])
    total = sums[-1]
    # mass_above[j] for j >= start (exclusive of entry j); below start it is ``total``.
    mass_above = np.concatenate([sums[-2::-1], np.zeros(1, np.float32)])
    bound = np.float32(top_p) * total
    num_dropped = start + int(np.count_nonzero(mass_above >= bound))
    return ordered[num_dropped]


def filter_row(logprobs: np.ndarray, dtype: str, params) -> np.ndarray:
    """mlx-lm's ``make_sampler`` truncations (``params``: ``sampling.SamplingParams``), in its
    order, on one float32 row holding values of ``dtype`` (excluded entries get -inf):
    ``SamplingParams.filter`` on the host."""
    top_p, min_p, top_k = params.top_p, params.min_p, params.top_k
    min_tokens_to_keep = params.min_tokens_to_keep
    row = logprobs.copy()
    if 0 < top_p < 1.0:
        row[row < top_p_threshold(row, top_p)] = -np.inf
    if min_p != 0.0:
        log_min_p = round_to(np.array([np.log(min_p)], np.float32), dtype)
        bound = round_to(row.max(keepdims=True) + log_min_p, dtype)
        remove = row < bound
        if min_tokens_to_keep > 1:
            remove[largest(row, min_tokens_to_keep, ties_from_the_end=True)] = False
        row[remove] = -np.inf
    if 0 < top_k < row.size:
        kept = np.full(row.shape, -np.inf, np.float32)
        top = largest(row, top_k, ties_from_the_end=False)
        kept[top] = row[top]
        row = kept
    return row


def largest(row: np.ndarray, count: int, ties_from_the_end: bool) -> np.ndarray:
    """Indices of the ``count`` largest entries. Ties at the boundary go as in MLX's
    ``argpartition``, which orders equal values by index: ``argpartition(-x)[:count]`` (top-k)
    keeps the first of them, ``argpartition(x)[-count:]`` (min-p's minimum) the last."""
    boundary = np.partition(row, row.size - count)[row.size - count]
    above = np.flatnonzero(row > boundary)
    tied = np.flatnonzero(row == boundary)
    needed = count - above.size
    return np.concatenate([above, tied[-needed:] if ties_from_the_end else tied[:needed]])


def distribution(logprobs: np.ndarray, dtype: str, params) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, probs)``: the token ids the sampler keeps (ascending) and their probabilities at
    its temperature: ``SamplingParams.distribution`` on the host."""
    filtered = filter_row(logprobs, dtype, params)
    ids = np.flatnonzero(filtered > -np.inf)
    scaled = filtered[ids].astype(np.float64) / params.temp
    probs = np.exp(scaled - scaled.max())
    return ids, probs / probs.sum()


def draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability proportional to ``weights``."""
    cumulative = np.cumsum(weights)
    index = np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")
    return int(min(index, weights.size - 1))


def probability_of(token: int, ids: np.ndarray, probs: np.ndarray) -> float:
    at = np.searchsorted(ids, token)
    return float(probs[at]) if at < ids.size and ids[at] == token else 0.0


def speculative_accept(
    drafts: Sequence[int],
    draft_q: Sequence[float],
    draft_rows: Rows,
    target_rows: Rows,
    vocab_size: int,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """The rule of ``sampling.speculative_accept`` for ``k >= 0`` drafts, row by row up to the
    first rejection: draft ``i`` (drawn with probability ``draft_q[i]``) is accepted if
    ``u q < p``; on rejection the token comes from ``max(0, p - q)``, else from ``p`` (a bonus
    token; the only one when there are no drafts). ``target_rows(i)`` and ``draft_rows(i)`` give
    ``(ids, probs)`` of ``p`` and ``q`` at position ``i``. Returns ``(n, token)``: ``n`` drafts
    are accepted and ``token`` follows them."""
    for i, (token, q_token) in enumerate(zip(drafts, draft_q, strict=True)):
        ids, p = target_rows(i)
        if rng.random() * q_token < probability_of(token, ids, p):
            continue
        q_ids, q = draft_rows(i)
        dense_q = np.zeros(vocab_size)
        dense_q[q_ids] = q
        residual = np.maximum(p - dense_q[ids], 0.0)
        # p == q up to rounding: rejection is (nearly) impossible there, but keep the row valid.
        weights = residual if residual.sum() > 0 else p
        return i, int(ids[draw(weights, rng)])
    ids, p = target_rows(len(drafts))
    return len(drafts), int(ids[draw(p, rng)])
