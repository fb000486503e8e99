"""The exactness contract of greedy MTP against plain greedy decoding (README "Guarantees").

In float32 the two are token-identical. In bf16/fp16 or with quantized weights, one-token and
multi-token forwards may round differently, so they are identical up to the first position where
the plain run's top two log-probabilities are within ``NEAR_TIE``; from there on they may differ.
"""

from collections.abc import Sequence
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step

# Log-probability gap (nats) within which bf16 may decide a tie either way: the verification
# (k + 1 tokens at once) and plain decoding (one token) round differently. Two bf16 ulps of a
# logit in the softcap range [16, 32).
NEAR_TIE = 0.25


class ContractCheck(NamedTuple):
    holds: bool
    first_difference: int | None  # None: identical
    top2_gap: float | None  # the plain run's top-two log-probability gap there


def plain_greedy(model: nn.Module, prompt: Sequence[int], max_tokens: int) -> list:
    """mlx-lm's own greedy decoding: ``(token, logprobs)`` per step."""
    return list(generate_step(mx.array(prompt), model, max_tokens=max_tokens))


def check_greedy_contract(
    tokens: Sequence[int], plain_steps: Sequence, near_tie: float = NEAR_TIE
) -> ContractCheck:
    """Whether MTP's greedy ``tokens`` keep the contract against ``plain_steps`` (from
    ``plain_greedy`` on the same model). A shorter ``tokens`` (stopped early) is compared on its
    length."""
    plain = [int(token) for token, _ in plain_steps]
    for i, (ours, reference) in enumerate(zip(tokens, plain, strict=False)):
        if ours != reference:
            top2 = mx.sort(plain_steps[i][1].astype(mx.float32))[-2:].tolist()
            gap = top2[1] - top2[0]
            return ContractCheck(gap < near_tie, i, gap)
    return ContractCheck(True, None, None)


def full_forward_prefers(
    model: nn.Module, prompt: Sequence[int], plain_tokens: Sequence[int], index: int, ours: int
) -> bool:
    """Diagnosis of a divergence at ``index``: whether one forward of the target over the whole
    prefix (prompt + the plain run's first ``index`` tokens, a path that rounds like the
    verification's multi-token forwards) ranks our token at least as high as the plain run's.
    True means the two runs differ only by how the target's own forwards round."""
    sequence = list(prompt) + [int(t) for t in plain_tokens[:index]]
    logits = model(mx.array([sequence]))[0, -1].astype(mx.float32)
    return logits[ours].item() >= logits[int(plain_tokens[index])].item()
