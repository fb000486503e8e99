"""Acceptance rules, and the statistical proof that speculative sampling changes nothing."""

import itertools
import json
import math
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURE
from drafting import ALWAYS_DRAFT, ON_HOST
from mlx_lm.generate import generate_step
from mlx_lm.models import gemma4_text
from mlx_lm.sample_utils import make_sampler

from mlx_gemma_mtp import load
from mlx_gemma_mtp.engine import SpeculativeGenerator
from mlx_gemma_mtp.generation import make_policy, stream_generate
from mlx_gemma_mtp.models import gemma4_assistant
from mlx_gemma_mtp.sampling import (
    SamplingParams,
    draft_probability_row,
    match_accept,
    speculative_accept,
)
from mlx_gemma_mtp.target import Target

S, F = "sliding_attention", "full_attention"
VOCAB = 8
# Every chi-square test here runs with fixed seeds (deterministic); it fails below this p-value.
SIGNIFICANCE = 1e-3


def chi_square_p_value(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Pearson's goodness of fit; cells expecting fewer than 5 draws are pooled into one."""
    n = observed.sum()
    expected = expected_probs * n
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    assert not (obs[~keep] > 0).any(), "draws where the distribution has no mass"
    obs, exp = obs[keep], exp[keep]
    statistic = float(((obs - exp) ** 2 / exp).sum())
    return chi2_survival(statistic, len(obs) - 1)


def chi2_survival(x: float, dof: int) -> float:
    """P(X > x) for X ~ chi-square(dof) (regularized upper incomplete gamma, series form)."""
    a, z = dof / 2, x / 2
    term = total = 1.0 / a
    for i in range(1, 10_000):
        term *= z / (a + i)
        total += term
        if term < total * 1e-15:
            break
    lower = total * math.exp(-z + a * math.log(z) - math.lgamma(a)) if z > 0 else 0.0
    return max(0.0, 1.0 - lower)


def test_chi_square_helper():
    assert abs(chi2_survival(3.841, 1) - 0.05) < 1e-3
    assert abs(chi2_survival(18.307, 10) - 0.05) < 1e-3
    fair = np.array([0.25] * 4)
    assert chi_square_p_value(np.array([250, 250, 250, 250]), fair) > 0.99
    assert chi_square_p_value(np.array([400, 200, 200, 200]), fair) < 1e-6


# -- the rules on fixed rows ---------------------------------------------------------------


def test_match_accept_counts_the_leading_matches():
    target = mx.array([5, 6, 7, 8])
    assert match_accept(mx.array([5, 6, 7]), target).item() == 3
    assert match_accept(mx.array([5, 9, 7]), target).item() == 1
    assert match_accept(mx.array([4, 6, 7]), target).item() == 0
    assert match_accept(mx.zeros((0,), mx.int32), target[:1]).item() == 0


def rows(q: mx.array):
    """``q_row`` for ``speculative_accept`` from probability rows ``[k, V]``."""
    return lambda i: mx.take(q, i, axis=0)


def test_speculative_accept_takes_drafts_the_target_agrees_with():
    logprobs = mx.log(mx.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))
    drafts = mx.array([1, 0])
    # q == p: every draft is accepted, the bonus comes from the last row.
    q_token = mx.take_along_axis(logprobs[:2], drafts[:, None], axis=-1)[:, 0]
    n, tokens = speculative_accept(drafts, q_token, rows(mx.exp(logprobs[:2])), logprobs)
    assert n.item() == 2 and tokens[:2].tolist() == [1, 0]
    # q puts all its mass on a token p never gives: always rejected, resampled from p.
    never = mx.log(mx.array([[0.0, 0.0, 1.0]])) + mx.zeros((1, 3))
    zero_p = mx.log(mx.array([[0.5, 0.5, 0.0], [0.3, 0.3, 0.4]]))
    for _ in range(20):
        n, tokens = speculative_accept(mx.array([2]), never[:, 2], rows(mx.exp(never)), zero_p)
        assert n.item() == 0 and tokens[0].item() in (0, 1)


def test_first_token_distribution_for_fixed_rows():
    """One position: emitted ~ p whatever q is, including q = 0 on some of p's tokens."""
    mx.random.seed(0)
    p = np.array([0.05, 0.3, 0.4, 0.05, 0.2])
    q = np.array([0.5, 0.0, 0.3, 0.2, 0.0])  # a centroid-masked drafter: q = 0 off its candidates
    draws = 4000
    counts = np.zeros(len(p))
    target_logprobs = mx.log(mx.array(np.stack([p, p])))
    draft_logprobs = mx.log(mx.array(q[None]))
    for _ in range(draws):
        draft = mx.random.categorical(draft_logprobs)
        q_token = draft_logprobs[0, draft]
        q_row = rows(mx.exp(draft_logprobs))
        n, tokens = speculative_accept(draft, q_token, q_row, target_logprobs)
        counts[tokens[0].item()] += 1
    assert chi_square_p_value(counts, p) > SIGNIFICANCE


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temp=1.0),
        SamplingParams(temp=0.7, top_p=0.8),
        SamplingParams(temp=1.3, top_k=3),
        SamplingParams(temp=1.0, min_p=0.1),
    ],
    ids=["temp", "top_p", "top_k", "min_p"],
)
def test_distribution_is_what_mlx_lm_samples(params):
    """``SamplingParams.distribution`` against draws of mlx-lm's own sampler."""
    mx.random.seed(1)
    logits = mx.random.normal((1, VOCAB)) * 2
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    draws = 20_000
    sampler = make_sampler(params.temp, params.top_p, params.min_p, top_k=params.top_k)
    tokens = sampler(mx.broadcast_to(logprobs, (draws, VOCAB)))
    counts = np.bincount(np.array(tokens), minlength=VOCAB)
    expected = np.exp(np.array(params.distribution(logprobs)[0]))
    assert abs(expected.sum() - 1) < 1e-5
    assert chi_square_p_value(counts, expected) > SIGNIFICANCE


# -- whole generations with a tiny model: MTP sampling == plain sampling ------------------------


def tiny_pair(seed: int = 0):
    """A random vocab-8 target (sharp enough to be far from uniform) and a centroid-masked drafter
    whose candidates are 4 of the 8 tokens (q = 0 on the others)."""
    mx.random.seed(seed)
    common = dict(
        num_attention_heads=2,
        head_dim=8,
        global_head_dim=8,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        sliding_window=4,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        final_logit_softcapping=None,
    )
    target = gemma4_text.Model(
        gemma4_text.ModelArgs.from_dict(
            dict(
                common,
                hidden_size=16,
                num_hidden_layers=2,
                intermediate_size=32,
                num_kv_shared_layers=0,
                layer_types=[S, F],
                tie_word_embeddings=False,
            )
        )
    )
    target.lm_head.weight = target.lm_head.weight * 6
    drafter = gemma4_assistant.Model(
        gemma4_assistant.ModelArgs(
            text_config=dict(
                common,
                hidden_size=16,
                num_hidden_layers=2,
                intermediate_size=32,
                layer_types=[S, F],
            ),
            backbone_hidden_size=16,
            use_ordered_embeddings=True,
            num_centroids=2,
            centroid_intermediate_top_k=1,
        )
    )
    drafter.masked_embedding.token_ordering = mx.random.permutation(VOCAB).astype(mx.int32)
    for model in (target, drafter):
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    return Target(target), drafter


PROMPT = [1, 2, 3]
NEW_TOKENS = 4  # t0 from the prefill, then one round of k=2 (and more rounds after rejections)


def exact_sequence_probs(
    target, params: SamplingParams, penalty: float | None = None, window: int = 0
) -> np.ndarray:
    """P(t0..t3) for every sequence, from one batched target forward over all of them (with
    mlx-lm's repetition penalty over the last ``window`` tokens, if given)."""
    sequences = np.array(list(itertools.product(range(VOCAB), repeat=NEW_TOKENS)))
    inputs = np.concatenate([np.tile(PROMPT, (len(sequences), 1)), sequences], axis=1)
    logits = target.model(mx.array(inputs))[:, len(PROMPT) - 1 : -1]
    if penalty is not None:
        values = np.array(logits)
        for j in range(NEW_TOKENS):
            for b, history in enumerate(inputs[:, : len(PROMPT) + j]):
                seen = np.unique(history[-window:])
                row = values[b, j, seen]
                values[b, j, seen] = np.where(row < 0, row * penalty, row / penalty)
        logits = mx.array(values)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    dist = np.exp(np.array(params.distribution(logprobs)))  # [B, NEW_TOKENS, V]
    steps = np.take_along_axis(dist, sequences[..., None], axis=-1)[..., 0]
    return steps.prod(axis=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(temp=1.0),
        dict(temp=1.0, top_p=0.85, full_vocab_draft=True),
        dict(temp=0.9, top_k=3),
        dict(temp=1.0, repetition_penalty=1.8, repetition_context_size=3),
        dict(temp=1.0, top_p=0.85, repetition_penalty=1.8, repetition_context_size=3, host=1),
    ],
    ids=["temp", "top_p", "top_k", "repetition_penalty", "top_p_penalty_on_the_host"],
)
def test_mtp_sampling_distribution_equals_plain(options):
    """Chi-square goodness of fit of 3000 MTP generations (4 tokens each, vocab 8: cells are
    (t1, t2, t3), 512 of them) to the exact plain-sampling distribution of the target."""
    target, drafter = tiny_pair()
    options = dict(options)
    full_vocab = options.pop("full_vocab_draft", False)
    costs = ON_HOST if options.pop("host", False) else ALWAYS_DRAFT
    policy = make_policy(**options)
    penalty = options.get("repetition_penalty")
    window = options.get("repetition_context_size", 0)
    expected = exact_sequence_probs(target, policy.params, penalty, window)
    expected = expected.reshape(VOCAB, -1).sum(axis=0)
    mx.random.seed(2)
    counts, drafted, accepted = Counter(), 0, 0
    draws = 3000
    for _ in range(draws):
        engine = SpeculativeGenerator(
            target, drafter, policy, num_draft_tokens=2, full_vocab_draft=full_vocab,
            costs=costs,
        )  # fmt: skip
        tokens = [
            t for block in engine.generate(mx.array(PROMPT), NEW_TOKENS) for t in block.tokens
        ]
        counts[tuple(tokens[1:])] += 1
        drafted, accepted = drafted + engine.stats.drafted, accepted + engine.stats.accepted
    observed = np.zeros(VOCAB ** (NEW_TOKENS - 1))
    for (a, b, c), count in counts.items():
        observed[(a * VOCAB + b) * VOCAB + c] = count
    assert 0.1 < accepted / drafted < 0.9  # both acceptance and rejection paths are exercised
    head = "full-vocabulary" if full_vocab else "centroid-masked"
    assert engine.stats.draft_path == f"compiled, pipelined, {head}"  # the default loop
    on_host = "host for k in [1, 2], device for the others"  # plain steps: on the device
    assert engine.stats.sampling_on == (on_host if costs is ON_HOST else "device")
    assert chi_square_p_value(observed, expected) > SIGNIFICANCE


def test_plain_sampling_is_mlx_lm_sampling():
    """drafter=None: the same random draws as mlx-lm's generate_step with the same seed."""
    target, _, _ = load(str(FIXTURE / "target"), dtype="float32")
    prompt = json.loads((FIXTURE / "held_out_prompts.jsonl").read_text().splitlines()[0])
    prompt = prompt["input_ids"]
    mx.random.seed(3)
    sampler = make_sampler(0.9, top_p=0.95)
    steps = generate_step(mx.array(prompt), target.model, max_tokens=20, sampler=sampler)
    reference = [token for token, _ in steps]
    mx.random.seed(3)
    responses = stream_generate(target, None, prompt, 20, temp=0.9, top_p=0.95)
    assert [r.token for r in responses] == reference


def test_policy_options():
    assert make_policy().speculative is False
    assert make_policy(temp=0.5).speculative is True
    custom = make_policy(sampler=make_sampler(0.5))
    assert custom.speculative is False  # any sampler: lossless by matching its draws
    # mlx-lm's repetition penalty reads a window: it stays on the pipelined, compiled path.
    assert make_policy(repetition_penalty=1.2, repetition_context_size=9).history_window == 9
    assert make_policy().history_window == 0
    # A custom processor may read the whole history.
    assert make_policy(logits_processors=[lambda tokens, logits: logits]).history_window is None
    with pytest.raises(ValueError, match="either a sampler"):
        make_policy(sampler=make_sampler(0.5), temp=0.5)


def test_draft_probability_row_scatters_the_candidates_of_one_draft():
    logq = mx.log(mx.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]))
    ids = mx.array([[4, 1, 0], [2, 3, 5]])
    dists = [{"logq": logq[i : i + 1], "ids": ids[i : i + 1]} for i in range(2)]
    row = draft_probability_row(dists, 6)
    assert np.allclose(np.array(row(mx.array(1))), [0, 0, 0.2, 0.3, 0, 0.5])
    assert np.allclose(np.array(row(mx.array(0))), [0, 0.5, 0, 0, 0.5, 0])
    full = draft_probability_row([{"logq": logq[i : i + 1]} for i in range(2)], 3)
    assert np.allclose(np.array(full(mx.array(1))), [0.2, 0.3, 0.5])
