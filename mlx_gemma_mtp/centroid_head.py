"""Centroid-masked lm_head of the E2B/E4B assistant drafters (``use_ordered_embeddings``).

Score every centroid, keep the ``top_k`` best, and compute logits only for the vocab rows of those
centroids (``top_k * vocab_size / num_centroids`` tokens: 4,096 of 262,144 for E2B).

Output contract: ``centroid_candidates`` returns candidate token ids (original vocab ids) and
their float32 logits, in no particular order. Greedy decoding needs nothing more
(``candidate_argmax``); a full-vocabulary row is built only where a sampler needs one
(``scatter_full_vocab``), with ``-inf`` for every other token. transformers instead fills the other
tokens with ``min(candidate logits) - 1``. Both fills are below every candidate, so the argmax
(lowest id among equal maxima, as ``candidate_argmax`` and ``mx.argmax`` over the row pick) is
the same token, and so are top-k/top-p sets that stay within the candidates; only a softmax
over the whole row differs (transformers gives the non-candidates a little mass, we give none).
transformers' row has the hidden dtype (bfloat16): candidates within one bfloat16 step of each
other can tie there, not in our float32 logits.

Two implementations with the same results, chosen automatically: Metal kernels
(``metal_kernels/*.metal``) where ``mx.metal.is_available()`` and the default device is the GPU,
and MLX ops everywhere else. Both compute in float32 from the stored weights; candidate
order and which of exactly tied centroids is kept may differ (the kernel keeps the lower index).

Storage: the lm_head is tied to the drafter's ``model.embed_tokens``, which the drafter never
uses as an input embedding (its inputs are the target's embeddings), so its rows may be stored
in centroid order (``order_by_centroid``): row ``c * P + p`` then holds token
``token_ordering[c * P + p]``, each centroid's ``P`` rows are contiguous, and the candidates are
``top_k`` whole blocks instead of 4,096 scattered rows. Pass ``centroid_ordered=True`` then.
"""

from contextlib import contextmanager
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from . import metal_kernels

ROWS_PER_SIMDGROUP = 4  # rows per simdgroup in centroid_scores / candidate_logits
SIMDGROUPS = 2  # simdgroups per threadgroup there (64 threads, like MLX's qmv kernels)
TOPK_THREADS = 256  # threads of the one threadgroup per row in centroid_topk
METAL_BITS = (2, 4, 8)  # affine widths whose words hold whole values (32 / bits per word)
METAL_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


class RowMatrix(NamedTuple):
    """The rows of a Linear or Embedding weight; ``bits == 0`` for a float weight."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int = 0
    group_size: int = 0
    mode: str = "affine"


def row_matrix(module: nn.Module) -> RowMatrix:
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return RowMatrix(
            module["weight"],
            module["scales"],
            module.get("biases"),
            module.bits,
            module.group_size,
            getattr(module, "mode", "affine"),
        )
    return RowMatrix(module["weight"])


# -- dispatch ------------------------------------------------------------------------------------

_forced: bool | None = None


@contextmanager
def metal_kernel_path(enabled: bool = True):
    """Force (``True``) or forbid (``False``) the Metal kernels within the block, e.g. to record
    them with ``mx.export_function`` on a machine without Metal, or to compare both paths."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous


def metal_supported(hidden: mx.array, centroids: RowMatrix, lm_head: RowMatrix, top_k: int) -> bool:
    num_centroids = centroids.weight.shape[0]
    return (
        hidden.dtype in METAL_DTYPES
        and all(kernel_readable(m) for m in (centroids, lm_head))
        and 0 < top_k <= num_centroids <= 32 * TOPK_THREADS  # the top-k kernel's register mask
    )


def kernel_readable(m: RowMatrix) -> bool:
    if m.bits == 0:
        return m.weight.dtype in METAL_DTYPES
    return (
        m.mode == "affine"
        and m.bits in METAL_BITS
        and m.group_size % (32 // m.bits) == 0
        and m.scales.dtype in METAL_DTYPES
    )


def use_metal(hidden: mx.array, centroids: RowMatrix, lm_head: RowMatrix, top_k: int) -> bool:
    if _forced is False:
        return False
    if _forced is None and not (mx.metal.is_available() and mx.default_device().type == mx.gpu):
        return False
    if metal_supported(hidden, centroids, lm_head, top_k):
        return True
    if _forced:
        raise ValueError("the Metal kernels do not support these dtypes / quantization settings")
    return False


def centroid_candidates(
    hidden: mx.array,
    centroids: nn.Module,
    lm_head: nn.Module,
    token_ordering: mx.array,
    top_k: int,
    centroid_ordered: bool = False,
) -> tuple[mx.array, mx.array]:
    """Candidate token ids ``[..., top_k * P]`` and their float32 logits, ``P`` being
    ``vocab_size // num_centroids``. ``centroids``: the centroid Linear (float or quantized);
    ``lm_head``: the tied Embedding (float or quantized), in centroid order if
    ``centroid_ordered`` (see ``order_by_centroid``)."""
    c_rows, lm_rows = row_matrix(centroids), row_matrix(lm_head)
    batch = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden.shape[-1])
    if use_metal(x, c_rows, lm_rows, top_k):
        ids, logits = metal_candidates(x, c_rows, lm_rows, token_ordering, top_k, centroid_ordered)
    else:
        ids, logits = mlx_candidates(x, c_rows, lm_rows, token_ordering, top_k, centroid_ordered)
    return ids.reshape(*batch, -1), logits.reshape(*batch, -1)


# -- portable path (MLX ops) ---------------------------------------------------------------------


def mlx_candidates(
    x: mx.array,
    centroids: RowMatrix,
    lm_head: RowMatrix,
    token_ordering: mx.array,
    top_k: int,
    centroid_ordered: bool,
) -> tuple[mx.array, mx.array]:
    """``centroid_candidates`` for ``x`` [N, D] with MLX ops."""
    x = x.astype(mx.float32)
    selected = top_centroids(centroid_scores(x, centroids), top_k)  # [N, K]
    num_centroids = centroids.weight.shape[0]
    slots = token_ordering.reshape(num_centroids, -1)
    ids = slots[selected].reshape(x.shape[0], -1)  # [N, K * P]
    if centroid_ordered and lm_head.bits == 0 and lm_head.weight.dtype == mx.float32:
        # the selected blocks read in place (gather_mm is float32-only on the CPU)
        blocks = lm_head.weight.reshape(num_centroids, -1, x.shape[1]).swapaxes(-1, -2)
        logits = mx.gather_mm(x[:, None, None, :], blocks, rhs_indices=selected)
        return ids.astype(mx.int32), logits.reshape(x.shape[0], -1)
    if centroid_ordered:
        rows = take_rows(lm_head, selected, blocks=slots.shape[1])
    else:
        rows = take_rows(lm_head, ids)
    return ids.astype(mx.int32), batched_row_dots(x, rows)


def top_centroids(scores: mx.array, top_k: int) -> mx.array:
    """Indices of the ``top_k`` highest scores along the last axis (unordered)."""
    kth = scores.shape[-1] - top_k
    return mx.argpartition(scores, kth=kth, axis=-1)[..., kth:]


def centroid_scores(x: mx.array, centroids: RowMatrix) -> mx.array:
    """``x @ centroids.T`` in float32 for ``x`` [N, D] float32."""
    matrix = centroid_matrix(centroids)
    if matrix is not None:
        return x @ matrix
    if centroids.bits == 0:
        return x @ centroids.weight.T
    return mx.quantized_matmul(x, *quant_args(centroids), transpose=True, **quant_kwargs(centroids))


def centroid_matrix(centroids: RowMatrix) -> mx.array | None:
    """The centroid weights as one contiguous float32 [D, C] matrix (dequantized), or None where
    it cannot be made once and kept (under ``mx.compile`` with the weights as traced inputs).

    On the CPU ``x @ W`` with that layout is ~1.8x faster than ``x @ W.T`` (the Linux wheel of
    MLX uses the reference BLAS) and needs no cast per call; it is kept for as long as the weight
    array is the same object."""
    cache = CENTROID_MATRICES.get(id(centroids.weight))
    if cache is not None and cache[0] is centroids.weight:
        return cache[1]
    matrix = mx.contiguous(dequantized(centroids).T)
    try:
        mx.eval(matrix)
    except (ValueError, RuntimeError):
        return None
    if len(CENTROID_MATRICES) >= 8:  # a few models at most; never grow without bound
        CENTROID_MATRICES.pop(next(iter(CENTROID_MATRICES)))
    CENTROID_MATRICES[id(centroids.weight)] = (centroids.weight, matrix)
    return matrix


CENTROID_MATRICES: dict[int, tuple[mx.array, mx.array]] = {}


def dequantized(m: RowMatrix) -> mx.array:
    """``m`` as a float32 matrix."""
    if m.bits == 0:
        return m.weight.astype(mx.float32)
    weight, scales, biases = quant_args(m)
    return mx.dequantize(weight, scales, biases, **quant_kwargs(m)).astype(mx.float32)


def take_rows(m: RowMatrix, indices: mx.array, blocks: int = 0) -> RowMatrix:
    """Rows ``indices`` [N, R] of ``m`` as [N, R, ...], or with ``blocks`` the blocks of that many
    rows (rows ``i * blocks .. i * blocks + blocks - 1``) as [N, R * blocks, ...]."""

    def take(a):
        if a is None:
            return None
        if blocks:
            a = a.reshape(-1, blocks, a.shape[-1])
        return a[indices].reshape(indices.shape[0], -1, a.shape[-1])

    return m._replace(weight=take(m.weight), scales=take(m.scales), biases=take(m.biases))


def batched_row_dots(x: mx.array, rows: RowMatrix) -> mx.array:
    """``rows[n] @ x[n]`` for each n, float32: [N, R]."""
    xs = x[:, None, :]
    if rows.bits == 0:
        # x @ rows.T, not rows @ x: the reference BLAS of MLX's Linux wheel is ~5x slower at that
        return (xs @ rows.weight.astype(mx.float32).swapaxes(-1, -2))[:, 0]
    return mx.gather_qmm(xs, *quant_args(rows), transpose=True, **quant_kwargs(rows))[:, 0]


def quant_args(m: RowMatrix) -> tuple:
    # float32 scales and biases: on the CPU, bfloat16 ones make quantized matmuls ~8x slower
    def prepared(a):
        if a is None:
            return None
        return a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a

    return prepared(m.weight), prepared(m.scales), prepared(m.biases)


def quant_kwargs(m: RowMatrix) -> dict:
    return {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}


# -- Metal path ----------------------------------------------------------------------------------


class Launch(NamedTuple):
    """One ``mx.fast.metal_kernel`` call: what ``run`` passes to MLX (and the tests emulate)."""

    kernel: str  # key of metal_kernels.SPECS
    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list
    output_dtypes: list


def run(launch: Launch) -> list[mx.array]:
    return metal_kernels.kernel(launch.kernel)(
        inputs=launch.inputs,
        template=launch.template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes,
        output_dtypes=launch.output_dtypes,
    )


def metal_candidates(
    x: mx.array,
    centroids: RowMatrix,
    lm_head: RowMatrix,
    token_ordering: mx.array,
    top_k: int,
    centroid_ordered: bool,
) -> tuple[mx.array, mx.array]:
    """``centroid_candidates`` for ``x`` [N, D] with the Metal kernels."""
    per_centroid = token_ordering.shape[0] // centroids.weight.shape[0]
    (scores,) = run(scores_launch(x, centroids))
    (selected,) = run(topk_launch(scores, top_k))
    launch = logits_launch(x, lm_head, selected, token_ordering, per_centroid, centroid_ordered)
    ids, logits = run(launch)
    return ids, logits


def matrix_inputs(m: RowMatrix) -> list:
    # A float matrix fills the scales/biases slots with its weight (never read): one kernel text
    # then serves both layouts, its quantized branch compiled out by BITS == 0.
    if m.bits == 0:
        return [m.weight, m.weight, m.weight]
    return [m.weight, m.scales, m.biases]


def rows_grid(rows: int, n: int) -> tuple[tuple, tuple]:
    threads = 32 * SIMDGROUPS
    per_group = ROWS_PER_SIMDGROUP * SIMDGROUPS
    return (threads, -(-rows // per_group), n), (threads, 1, 1)


def scores_launch(x: mx.array, centroids: RowMatrix) -> Launch:
    n, d = x.shape
    num_centroids = centroids.weight.shape[0]
    grid, threadgroup = rows_grid(num_centroids, n)
    template = [
        ("D", d),
        ("BITS", centroids.bits),
        ("GROUP_SIZE", centroids.group_size),
        ("ROWS", num_centroids),
        ("RPS", ROWS_PER_SIMDGROUP),
    ]
    return Launch(
        "centroid_scores",
        [x, *matrix_inputs(centroids)],
        template,
        grid,
        threadgroup,
        [(n, num_centroids)],
        [mx.float32],
    )


def topk_launch(scores: mx.array, top_k: int) -> Launch:
    n, num_centroids = scores.shape
    return Launch(
        "centroid_topk",
        [scores],
        [("C", num_centroids), ("K", top_k), ("THREADS", TOPK_THREADS)],
        (TOPK_THREADS, n, 1),
        (TOPK_THREADS, 1, 1),
        [(n, top_k)],
        [mx.uint32],
    )


def logits_launch(
    x: mx.array,
    lm_head: RowMatrix,
    selected: mx.array,
    token_ordering: mx.array,
    per_centroid: int,
    centroid_ordered: bool,
) -> Launch:
    n, d = x.shape
    top_k = selected.shape[1]
    grid, threadgroup = rows_grid(top_k * per_centroid, n)
    template = [
        ("D", d),
        ("BITS", lm_head.bits),
        ("GROUP_SIZE", lm_head.group_size),
        ("K", top_k),
        ("P", per_centroid),
        ("RPS", ROWS_PER_SIMDGROUP),
        ("ORDERED", centroid_ordered),
    ]
    return Launch(
        "candidate_logits",
        [x, *matrix_inputs(lm_head), selected, token_ordering],
        template,
        grid,
        threadgroup,
        [(n, top_k * per_centroid)] * 2,
        [mx.int32, mx.float32],
    )


# -- using the candidates ------------------------------------------------------------------------


def candidate_argmax(ids: mx.array, logits: mx.array) -> mx.array:
    """The greedy token: the lowest id among the highest logits, i.e. exactly ``mx.argmax`` over
    the full-vocabulary row (``scatter_full_vocab``), whatever the candidates' order."""
    best = logits.max(axis=-1, keepdims=True)
    never = mx.array(mx.iinfo(ids.dtype).max, dtype=ids.dtype)
    return mx.where(logits == best, ids, never).min(axis=-1)


def scatter_full_vocab(ids: mx.array, logits: mx.array, vocab_size: int) -> mx.array:
    """A full-vocabulary row with the candidates' logits and ``-inf`` everywhere else."""
    full = mx.full((*ids.shape[:-1], vocab_size), -mx.inf, dtype=logits.dtype)
    return mx.put_along_axis(full, ids, logits, axis=-1)


def full_vocab_lm_head(
    hidden: mx.array, lm_head: nn.Module, token_ordering: mx.array | None = None
) -> mx.array:
    """Logits of every token in vocab order (``full_vocab_draft``); pass ``token_ordering`` when
    the rows are stored in centroid order, to put each logit back at its token id."""
    logits = lm_head.as_linear(hidden)
    if token_ordering is None:
        return logits
    ids = mx.broadcast_to(token_ordering, logits.shape)
    return mx.put_along_axis(mx.zeros_like(logits), ids, logits, axis=-1)


# -- centroid-ordered storage --------------------------------------------------------------------

LM_HEAD_PARTS = ("weight", "scales", "biases")


def order_by_centroid(lm_head: nn.Module, token_ordering: mx.array) -> None:
    """Store the rows of a (quantized) Embedding in centroid order, in place: row ``j`` becomes
    the row of token ``token_ordering[j]``. Use ``centroid_ordered=True`` afterwards."""
    check_permutation(token_ordering, lm_head["weight"].shape[0])
    lm_head.update({k: lm_head[k][token_ordering] for k in LM_HEAD_PARTS if k in lm_head})


def check_permutation(token_ordering: mx.array, vocab_size: int) -> None:
    expected = mx.arange(vocab_size, dtype=token_ordering.dtype)
    if token_ordering.shape != (vocab_size,) or not mx.array_equal(
        mx.sort(token_ordering), expected
    ):
        raise ValueError("token_ordering is not a permutation of the vocabulary")
