"""Random centroid heads for the centroid-head tests, and a float64 reference."""

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma_mtp.models.centroid_head import candidate_argmax, order_by_centroid, row_matrix


class HeadCase(NamedTuple):
    name: str
    hidden_shape: tuple  # (..., D)
    num_centroids: int
    per_centroid: int
    top_k: int
    dtype: mx.Dtype = mx.bfloat16  # hidden and float weights (and scales when quantized)
    bits: int = 0  # 0: float lm_head
    group_size: int = 64
    quantize_centroids: bool = True  # with bits: quantize the centroid Linear too
    ordered: bool = False  # lm_head stored in centroid order
    mode: str = "affine"


class Head(NamedTuple):
    case: HeadCase
    hidden: mx.array
    centroids: nn.Module
    lm_head: nn.Module
    token_ordering: mx.array

    def args(self):
        c = self.case
        return self.hidden, self.centroids, self.lm_head, self.token_ordering, c.top_k, c.ordered


def make_head(case: HeadCase, seed: int = 0) -> Head:
    d = case.hidden_shape[-1]
    vocab = case.num_centroids * case.per_centroid
    k = mx.random.split(mx.random.key(seed), 4)
    centroids = nn.Linear(d, case.num_centroids, bias=False)
    centroids.weight = mx.random.normal((case.num_centroids, d), key=k[0]) * 0.1
    lm_head = nn.Embedding(vocab, d)
    lm_head.weight = mx.random.normal((vocab, d), key=k[1]) * 0.1
    centroids.set_dtype(case.dtype)
    lm_head.set_dtype(case.dtype)
    if case.bits:
        q = {"group_size": case.group_size, "bits": case.bits, "mode": case.mode}
        lm_head = nn.QuantizedEmbedding.from_embedding(lm_head, **q)
        if case.quantize_centroids:
            centroids = nn.QuantizedLinear.from_linear(centroids, **q)
    token_ordering = mx.random.permutation(vocab, key=k[2]).astype(mx.int32)
    if case.ordered:
        order_by_centroid(lm_head, token_ordering)
    hidden = mx.random.normal(case.hidden_shape, key=k[3]).astype(case.dtype)
    mx.eval(centroids.parameters(), lm_head.parameters(), token_ordering, hidden)
    return Head(case, hidden, centroids, lm_head, token_ordering)


def dense(module: nn.Module) -> np.ndarray:
    """The weight as float64 (dequantized exactly: float32 scales, then float64)."""
    m = row_matrix(module)
    if m.bits == 0:
        return np.array(m.weight.astype(mx.float32), dtype=np.float64)
    scales = m.scales.astype(mx.float32) if m.mode == "affine" else m.scales
    biases = None if m.biases is None else m.biases.astype(mx.float32)
    w = mx.dequantize(m.weight, scales, biases, group_size=m.group_size, bits=m.bits, mode=m.mode)
    return np.array(w.astype(mx.float32), dtype=np.float64)


class Reference(NamedTuple):
    centroid_scores: np.ndarray  # [N, C]
    vocab_logits: np.ndarray  # [N, V], by token id


def reference(head: Head) -> Reference:
    x = np.array(head.hidden.astype(mx.float32), dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    rows = dense(head.lm_head)
    if head.case.ordered:  # back to vocab order
        by_id = np.empty_like(rows)
        by_id[np.array(head.token_ordering)] = rows
        rows = by_id
    return Reference(x @ dense(head.centroids).T, x @ rows.T)


def top_centroid_sets(scores: np.ndarray, top_k: int) -> list[set]:
    return [set(np.argsort(-row, kind="stable")[:top_k].tolist()) for row in scores]


def candidate_tokens(head: Head, centroid_sets: list[set]) -> list[set]:
    slots = np.array(head.token_ordering).reshape(head.case.num_centroids, -1)
    return [set(slots[sorted(s)].ravel().tolist()) for s in centroid_sets]


def by_id(ids, logits):
    """Per row: ids sorted, and their logits (the two paths order candidates differently)."""
    ids = np.array(ids).reshape(-1, ids.shape[-1])
    logits = np.array(logits).reshape(ids.shape)
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(logits, order, -1)


def assert_same_candidates(a, b):
    ids_a, logits_a = by_id(*a)
    ids_b, logits_b = by_id(*b)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(logits_a, logits_b, rtol=1e-4, atol=1e-4)


def assert_matches_reference(head, ids, logits):
    """The candidates are the tokens of the top centroids; their logits are the full lm_head's;
    the greedy token is the full row's argmax over the candidates."""
    ref = reference(head)
    sorted_ids, sorted_logits = by_id(ids, logits)
    expected = candidate_tokens(head, top_centroid_sets(ref.centroid_scores, head.case.top_k))
    greedy = np.array(candidate_argmax(ids, logits)).reshape(-1)
    for n in range(sorted_ids.shape[0]):
        assert set(sorted_ids[n].tolist()) == expected[n]
        np.testing.assert_allclose(
            sorted_logits[n], ref.vocab_logits[n, sorted_ids[n]], rtol=1e-4, atol=1e-4
        )
        masked = np.full(ref.vocab_logits.shape[1], -np.inf)
        masked[sorted_ids[n]] = ref.vocab_logits[n, sorted_ids[n]]
        assert greedy[n] == np.argmax(masked)
