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

Two implementations with the same results: Metal kernels (``metal_kernels/*.metal``, see
``kernels``) and MLX ops. The kernels are used where ``mx.metal.is_available()`` and the default
device is the GPU (``MLX_GEMMA_MTP_METAL=0`` turns them off, ``=1`` forces them on), and only
after each has run once on the head's real weights and matched the MLX-ops path
(``probe_kernels``); a head whose kernels fail that uses MLX ops from then on, after one warning.
Both compute in float32 from the stored weights; candidate order and which of exactly tied
centroids is kept may differ (the kernel keeps the lower index).

Storage: the lm_head is tied to the drafter's ``model.embed_tokens``, which the drafter never
uses as an input embedding (its inputs are the target's embeddings), so its rows may be stored
in centroid order (``order_by_centroid``): row ``c * P + p`` then holds token
``token_ordering[c * P + p]``, each centroid's ``P`` rows are contiguous, and the candidates are
``top_k`` whole blocks instead of 4,096 scattered rows. Pass ``centroid_ordered=True`` then.
"""

import os
import warnings
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import kernels as metal
from ..state import kept_for

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


class HeadInputs(NamedTuple):
    """Everything but the hidden state that the candidates of one head depend on."""

    centroids: RowMatrix
    lm_head: RowMatrix
    token_ordering: mx.array
    top_k: int
    centroid_ordered: bool


# -- dispatch ------------------------------------------------------------------------------------

METAL_SETTING = "MLX_GEMMA_MTP_METAL"


def kernel_setting() -> bool | None:
    """``MLX_GEMMA_MTP_METAL``: ``0`` turns the Metal kernels off, ``1`` forces them on (still
    probed, still falling back), unset (or empty) chooses them where Metal is the device."""
    value = os.environ.get(METAL_SETTING, "").strip()
    if value in ("", "0", "1"):
        return None if value == "" else value == "1"
    raise ValueError(
        f"{METAL_SETTING}={value!r}: expected 0 (kernels off), 1 (kernels forced on) or unset"
    )


def kernels_wanted() -> bool:
    setting = kernel_setting()
    if setting is not None:
        return setting
    return mx.metal.is_available() and mx.default_device().type == mx.gpu


class HeadState:
    """What one centroid head keeps between calls. The package keeps it for the head's centroid
    module (``head_state``), so it goes away with its model and no two models share it."""

    def __init__(self):
        self.matrix: tuple[mx.array, mx.array] | None = None  # (weight, see centroid_matrix)
        # None: follow MLX_GEMMA_MTP_METAL and the probe; True / False: this head's choice
        self.kernels: bool | None = None
        self.verdicts: dict = {}  # hidden dtype -> whether the kernels passed their probe


def head_state(centroids: nn.Module) -> HeadState:
    """The ``HeadState`` of the head whose centroid module is ``centroids``."""
    return kept_for("centroid head", HeadState, centroids)


def metal_supported(hidden: mx.array, centroids: RowMatrix, lm_head: RowMatrix, top_k: int) -> bool:
    """Whether the kernels can read these inputs (``hidden`` [N, D]); everything else, empty
    batches and widths that do not match included, goes to the MLX-ops path."""
    n, width = hidden.shape
    num_centroids = centroids.weight.shape[0]
    return (
        n > 0
        and hidden.dtype in METAL_DTYPES
        and all(kernel_readable(m, width) for m in (centroids, lm_head))
        and 0 < top_k <= num_centroids <= 32 * TOPK_THREADS  # the top-k kernel's register mask
    )


def kernel_readable(m: RowMatrix, width: int) -> bool:
    """A float matrix of rows ``width`` wide, or an affine-quantized one whose scales and
    biases share one float type (``row_dot`` reads both with one template type)."""
    if m.bits == 0:
        return m.weight.dtype in METAL_DTYPES and m.weight.shape[-1] == width
    return (
        m.mode == "affine"
        and m.bits in METAL_BITS
        and m.group_size % (32 // m.bits) == 0
        and width % m.group_size == 0
        and m.weight.dtype == mx.uint32
        and m.weight.shape[-1] * (32 // m.bits) == width
        and m.biases is not None
        and m.scales.dtype in METAL_DTYPES
        and m.biases.dtype == m.scales.dtype
        and m.scales.shape == m.biases.shape == (m.weight.shape[0], width // m.group_size)
    )


def use_metal(
    x: mx.array, heads: HeadInputs, state: HeadState, kernels: bool | None = None
) -> bool:
    """Whether this call runs the kernels: ``kernels`` (this call), else the head's choice, else
    ``kernels_wanted`` and, the first time for each hidden dtype, the probe."""
    supported = metal_supported(x, heads.centroids, heads.lm_head, heads.top_k)
    if kernels is None:
        kernels = state.kernels
    if kernels is not None:
        if kernels and not supported:
            raise ValueError(
                "the Metal kernels do not support these dtypes / quantization settings / shapes"
            )
        return kernels
    if not (supported and kernels_wanted()):
        return False
    if x.dtype not in state.verdicts:
        state.verdicts[x.dtype] = probe_passed(heads, x.dtype)
    return state.verdicts[x.dtype]


def centroid_candidates(
    hidden: mx.array,
    centroids: nn.Module,
    lm_head: nn.Module,
    token_ordering: mx.array,
    top_k: int,
    centroid_ordered: bool = False,
    *,
    kernels: bool | None = None,
) -> tuple[mx.array, mx.array]:
    """Candidate token ids ``[..., top_k * P]`` and their float32 logits, ``P`` being
    ``vocab_size // num_centroids``. ``centroids``: the centroid Linear (float or quantized);
    ``lm_head``: the tied Embedding (float or quantized), in centroid order if
    ``centroid_ordered`` (see ``order_by_centroid``). ``kernels``: force (True) or forbid (False)
    the Metal kernels for this call, e.g. to record them with ``mx.export_function`` on a machine
    without Metal; None decides as ``use_metal`` says."""
    heads = HeadInputs(
        row_matrix(centroids), row_matrix(lm_head), token_ordering, top_k, centroid_ordered
    )
    state = head_state(centroids)
    batch = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden.shape[-1])
    path = metal_candidates if use_metal(x, heads, state, kernels) else mlx_candidates
    ids, logits = path(x, heads, state)
    width = top_k * (token_ordering.shape[0] // heads.centroids.weight.shape[0])
    return ids.reshape(*batch, width), logits.reshape(*batch, width)


# -- portable path (MLX ops) ---------------------------------------------------------------------


def mlx_candidates(
    x: mx.array, heads: HeadInputs, state: HeadState | None = None
) -> tuple[mx.array, mx.array]:
    """``centroid_candidates`` for ``x`` [N, D] with MLX ops."""
    x = x.astype(mx.float32)
    selected = top_centroids(centroid_scores(x, heads.centroids, state), heads.top_k)  # [N, K]
    return candidate_logits(x, heads, selected)


def candidate_logits(x: mx.array, heads: HeadInputs, selected: mx.array):
    """Ids and float32 logits of the tokens of the ``selected`` [N, K] centroids, for ``x``
    [N, D] float32, in the order of ``selected``."""
    lm_head = heads.lm_head
    num_centroids = heads.centroids.weight.shape[0]
    slots = heads.token_ordering.reshape(num_centroids, -1)
    width = selected.shape[1] * slots.shape[1]  # K * P (spelled out: N may be 0)
    ids = slots[selected].reshape(x.shape[0], width)
    if heads.centroid_ordered and lm_head.bits == 0 and lm_head.weight.dtype == mx.float32:
        # the selected blocks read in place (gather_mm is float32-only on the CPU)
        blocks = lm_head.weight.reshape(num_centroids, -1, x.shape[1]).swapaxes(-1, -2)
        logits = mx.gather_mm(x[:, None, None, :], blocks, rhs_indices=selected)
        return ids.astype(mx.int32), logits.reshape(x.shape[0], width)
    if heads.centroid_ordered:
        rows = take_rows(lm_head, selected, blocks=slots.shape[1])
    else:
        rows = take_rows(lm_head, ids)
    return ids.astype(mx.int32), batched_row_dots(x, rows)


def top_centroids(scores: mx.array, top_k: int) -> mx.array:
    """Indices of the ``top_k`` highest scores along the last axis (unordered)."""
    kth = scores.shape[-1] - top_k
    return mx.argpartition(scores, kth=kth, axis=-1)[..., kth:]


def centroid_scores(x: mx.array, centroids: RowMatrix, state: HeadState | None = None) -> mx.array:
    """``x @ centroids.T`` in float32 for ``x`` [N, D] float32."""
    matrix = centroid_matrix(centroids, state) if state is not None else None
    if matrix is not None:
        return x @ matrix
    if centroids.bits == 0:
        return x @ centroids.weight.T
    return mx.quantized_matmul(x, *quant_args(centroids), transpose=True, **quant_kwargs(centroids))


def centroid_matrix(centroids: RowMatrix, state: HeadState) -> mx.array | None:
    """The centroid weights as one contiguous float32 [D, C] matrix (dequantized), or None where
    it cannot be made once and kept (under ``mx.compile`` with the weights as traced inputs).

    On the CPU ``x @ W`` with that layout is ~1.8x faster than ``x @ W.T`` (the Linux wheel of
    MLX uses the reference BLAS) and needs no cast per call; the head's ``state`` keeps it for as
    long as the weight array is the same object."""
    if state.matrix is not None and state.matrix[0] is centroids.weight:
        return state.matrix[1]
    matrix = mx.contiguous(dequantized(centroids).T)
    try:
        mx.eval(matrix)
    except (ValueError, RuntimeError):
        return None
    state.matrix = (centroids.weight, matrix)
    return matrix


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
        return a[indices].reshape(indices.shape[0], indices.shape[1] * (blocks or 1), a.shape[-1])

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

    kernel: str  # key of kernels.SPECS
    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list
    output_dtypes: list


def run(launch: Launch) -> list[mx.array]:
    return metal.kernel(launch.kernel)(
        inputs=launch.inputs,
        template=launch.template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes,
        output_dtypes=launch.output_dtypes,
    )


def metal_candidates(
    x: mx.array, heads: HeadInputs, state: HeadState | None = None
) -> tuple[mx.array, mx.array]:
    """``centroid_candidates`` for ``x`` [N, D] with the Metal kernels."""
    (scores,) = run(scores_launch(x, heads.centroids))
    (selected,) = run(topk_launch(scores, heads.top_k))
    ids, logits = run(logits_launch(x, heads, selected))
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


def logits_launch(x: mx.array, heads: HeadInputs, selected: mx.array) -> Launch:
    n, d = x.shape
    lm_head, top_k = heads.lm_head, selected.shape[1]
    per_centroid = heads.token_ordering.shape[0] // heads.centroids.weight.shape[0]
    grid, threadgroup = rows_grid(top_k * per_centroid, n)
    template = [
        ("D", d),
        ("BITS", lm_head.bits),
        ("GROUP_SIZE", lm_head.group_size),
        ("K", top_k),
        ("P", per_centroid),
        ("RPS", ROWS_PER_SIMDGROUP),
        ("ORDERED", heads.centroid_ordered),
    ]
    return Launch(
        "candidate_logits",
        [x, *matrix_inputs(lm_head), selected, heads.token_ordering],
        template,
        grid,
        threadgroup,
        [(n, top_k * per_centroid)] * 2,
        [mx.int32, mx.float32],
    )


# -- probing the kernels before trusting them ----------------------------------------------------


class ProbeResult(NamedTuple):
    kernel: str
    ok: bool
    detail: str


PROBE_TOLERANCE = 1e-3  # of the largest magnitude: summation order differs, wrong rows do not


def probe_kernels(heads: HeadInputs, dtype) -> list[ProbeResult]:
    """Run each kernel once on the real weights (a random hidden state of ``dtype``), each on
    inputs from the MLX-ops path and alone in its evaluation, and compare with that path.

    ``mx.fast.metal_kernel`` compiles lazily, so a kernel that Metal rejects fails here, where
    it can be caught, instead of in the middle of generation."""
    mx.eval(heads.centroids, heads.lm_head, heads.token_ordering)
    width = row_width(heads.centroids)
    x = mx.random.normal((1, width), key=mx.random.key(0)).astype(dtype)
    x32 = x.astype(mx.float32)
    scores = centroid_scores(x32, heads.centroids)
    selected = top_centroids(scores, heads.top_k).astype(mx.uint32)
    ids, logits = candidate_logits(x32, heads, selected)
    mx.eval(x, scores, selected, ids, logits)

    def same_scores(out):
        return compare_logits(out[0], scores)

    def same_top(out):
        picked = np.asarray(out[0])[0]
        values = np.asarray(scores)[0]
        if len(set(picked.tolist())) != heads.top_k or picked.max() >= values.size:
            return f"selected {picked.tolist()}: not {heads.top_k} distinct centroids"
        expected = np.sort(values)[-heads.top_k :]
        if not np.array_equal(np.sort(values[picked]), expected):
            return "selected centroids are not the ones with the highest scores"
        return None

    def same_logits(out):
        if not np.array_equal(np.asarray(out[0]), np.asarray(ids)):
            return "candidate token ids differ"
        return compare_logits(out[1], logits)

    probes = [
        (scores_launch(x, heads.centroids), same_scores),
        (topk_launch(scores, heads.top_k), same_top),
        (logits_launch(x, heads, selected), same_logits),
    ]
    return [probe_one(launch, compare) for launch, compare in probes]


def probe_one(launch: Launch, compare) -> ProbeResult:
    try:
        out = run(launch)
        mx.eval(out)
    except Exception as e:  # whatever MLX raises (compile error, no Metal, threadgroup size)
        lines = str(e).strip().splitlines()[:3] or [type(e).__name__]
        return ProbeResult(launch.kernel, False, "failed: " + " / ".join(lines).rstrip("."))
    mismatch = compare(out)
    if mismatch:
        return ProbeResult(launch.kernel, False, "does not match the MLX-ops path: " + mismatch)
    return ProbeResult(launch.kernel, True, "matches the MLX-ops path")


def compare_logits(got: mx.array, expected: mx.array) -> str | None:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    error = np.abs(got - expected).max(initial=0.0) / scale
    if not error <= PROBE_TOLERANCE:  # NaN fails too
        return f"largest difference {error:.2e} of the largest value"
    return None


def probe_passed(heads: HeadInputs, dtype) -> bool:
    """``probe_kernels``, and one warning naming the first kernel that failed."""
    for result in probe_kernels(heads, dtype):
        if not result.ok:
            warnings.warn(
                f"Metal kernel {result.kernel} {result.detail}. The centroid head uses the "
                f"MLX-ops path instead (same results; slower on the GPU). Set "
                f"{METAL_SETTING}=0 to turn the kernels off.",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
    return True


def row_width(m: RowMatrix) -> int:
    """The width of the rows of ``m`` once dequantized."""
    return m.weight.shape[-1] * (32 // m.bits if m.bits else 1)


def prepare_head(drafter) -> None:
    """Probe the kernels of ``drafter``'s centroid head where they would be used, so that the
    choice is made (and any failure reported) before a draft step is compiled. Drafters without
    a centroid head need nothing."""
    masked = getattr(drafter, "masked_embedding", None)
    if masked is None or not kernels_wanted():
        return
    width = row_width(row_matrix(masked.centroids))
    dtype = drafter.model.norm.weight.dtype  # the dtype of the hidden states the head gets
    mx.eval(drafter.head(mx.zeros((1, 1, width), dtype)))


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
