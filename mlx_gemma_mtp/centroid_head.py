"""Centroid-masked lm_head of the E2B/E4B assistant drafters (``use_ordered_embeddings``).

Score every centroid, keep the top ``top_k``, and compute logits only for the vocab rows of those
centroids. Returns candidate token ids and their logits; greedy decoding needs nothing more.
"""

import mlx.core as mx
import mlx.nn as nn


def gather_rows(lm_head: nn.Module, ids: mx.array) -> mx.array:
    """Rows ``ids`` of a (possibly quantized) tied embedding, dequantized."""
    if isinstance(lm_head, nn.QuantizedEmbedding):
        return mx.dequantize(
            lm_head["weight"][ids],
            scales=lm_head["scales"][ids],
            biases=lm_head["biases"][ids],
            group_size=lm_head.group_size,
            bits=lm_head.bits,
            mode=lm_head.mode,
        )
    return lm_head.weight[ids]


def top_centroids(centroid_logits: mx.array, top_k: int) -> mx.array:
    return mx.argpartition(-centroid_logits, kth=top_k - 1, axis=-1)[..., :top_k]


def centroid_candidates(
    hidden: mx.array,
    centroids: nn.Module,
    lm_head: nn.Module,
    token_ordering: mx.array,
    top_k: int,
) -> tuple[mx.array, mx.array]:
    """Candidate token ids ``[..., top_k * per_centroid]`` and their logits (portable MLX path)."""
    num_centroids = centroids.weight.shape[0]
    per_centroid = token_ordering.shape[0] // num_centroids
    selected = top_centroids(centroids(hidden), top_k)
    ids = token_ordering.reshape(num_centroids, per_centroid)[selected]
    ids = ids.reshape(*hidden.shape[:-1], top_k * per_centroid)
    rows = gather_rows(lm_head, ids)
    logits = (rows @ hidden[..., None])[..., 0]
    return ids, logits


def scatter_full_vocab(ids: mx.array, logits: mx.array, vocab_size: int) -> mx.array:
    """A full-vocabulary row with the candidates' logits and ``-inf`` everywhere else."""
    full = mx.full((*ids.shape[:-1], vocab_size), -mx.inf, dtype=logits.dtype)
    return mx.put_along_axis(full, ids, logits, axis=-1)
