"""Token choice and acceptance, and the proofs that coupled sampling changes nothing: drafting
leaves a seeded output as plain decoding gives it, and its distribution is the target's."""

import itertools
import math
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from drafting import ALWAYS_DRAFT, NEVER_DRAFT
from mlx_lm.models import gemma4_text
from mlx_lm.sample_utils import make_sampler

from mlx_gemma_mtp.check import tiny_text_config
from mlx_gemma_mtp.engine.loop import SpeculativeGenerator
from mlx_gemma_mtp.engine.sampling import (
    SamplingParams,
    coupled_choice,
    gumbel_at,
    gumbel_from_bits,
    match_accept,
    nucleus_choice,
)
from mlx_gemma_mtp.generation import make_policy, stream_generate, warn_once
from mlx_gemma_mtp.models import gemma4_assistant
from mlx_gemma_mtp.models.target import Target

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


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temp=1.0),
        SamplingParams(temp=0.7, top_p=0.8),
        SamplingParams(temp=1.3, top_k=3),
        SamplingParams(temp=1.0, min_p=0.1),
        SamplingParams(temp=1.0, min_p=0.3, min_tokens_to_keep=4),
    ],
    ids=["temp", "top_p", "top_k", "min_p", "min_p_keep"],
)
def test_distribution_is_what_mlx_lm_samples(params):
    """``SamplingParams.distribution`` (our filters, values as arrays) against draws of mlx-lm's
    own sampler."""
    mx.random.seed(1)
    logits = mx.random.normal((1, VOCAB)) * 2
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    draws = 20_000
    sampler = make_sampler(
        params.temp, params.top_p, params.min_p, params.min_tokens_to_keep, top_k=params.top_k
    )
    tokens = sampler(mx.broadcast_to(logprobs, (draws, VOCAB)))
    counts = np.bincount(np.array(tokens), minlength=VOCAB)
    expected = np.exp(np.array(params.distribution(logprobs)[0]))
    assert abs(expected.sum() - 1) < 1e-5
    assert chi_square_p_value(counts, expected) > SIGNIFICANCE


def test_coupled_draws_follow_the_distribution_over_seeds_and_positions():
    """The Gumbel-max draw with hashed noise, over 4,000 seeds x 5 positions, is distributed as
    the filtered, tempered row, at every position."""
    params = SamplingParams(temp=0.8, top_p=0.9)
    logprobs = mx.log(mx.array([[0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01]]))
    scaled = filter_scaled(params, logprobs)
    seeds, positions = mx.arange(4000, dtype=mx.uint32), mx.arange(100, 105)
    noise = gumbel_at(seeds[:, None, None], positions[None, :, None], mx.arange(VOCAB)[None, None])
    draws = mx.argmax(scaled + noise, axis=-1)  # [seeds, positions]
    assert mx.array_equal(draws[9], coupled_choice(mx.repeat(scaled, 5, 0), seeds[9], positions))
    expected = np.exp(np.array(params.distribution(logprobs)[0]))
    for position in range(positions.size):
        counts = np.bincount(np.array(draws[:, position]), minlength=VOCAB)
        assert chi_square_p_value(counts, expected) > SIGNIFICANCE
    assert (np.array(draws[:, 0]) != np.array(draws[:, 1])).mean() > 0.5  # positions differ


def filter_scaled(params: SamplingParams, logprobs: mx.array) -> mx.array:
    return make_policy(**vars(params)).scaled(logprobs, params.values())


def test_the_drafter_sees_the_targets_noise_at_its_candidates():
    """Noise is hashed per (seed, position, token): a candidate row gets exactly the values the
    full row has at those tokens, so a drafter that agrees with the target draws its token."""
    seed, position = mx.array(7, mx.uint32), mx.array([42])
    ids = mx.array([[5, 1, 30000, 7]])
    full = gumbel_at(seed, position[:, None], mx.arange(32768)[None])
    assert mx.array_equal(gumbel_at(seed, position[:, None], ids), full[:, ids[0]])
    logits = mx.random.normal((1, 32768))
    token = coupled_choice(logits, seed, position).item()
    candidates = mx.array([[token, 3, 9, 11]])
    assert coupled_choice(logits[:, candidates[0]], seed, position, candidates).item() == token
    other_seed = coupled_choice(logits, mx.array(8, mx.uint32), position).item()
    other_position = coupled_choice(logits, seed, mx.array([43])).item()
    assert token != other_seed or token != other_position


def nucleus(logprobs, temp, top_p, seed, positions, ids=None) -> tuple[mx.array, mx.array]:
    vocabulary = mx.arange(logprobs.shape[-1])[None] if ids is None else ids
    noise = gumbel_at(seed, positions[:, None], vocabulary)
    return nucleus_choice(logprobs, 1 / temp, top_p, noise, ids)


def test_nucleus_choice_is_the_filtered_draw_where_sure():
    """Without a sort, the best-noised token inside the nucleus is the exact draw over the
    top-p-filtered row, over 64 seeds x 6 rows, from the logits as from the log-probabilities
    (the loop passes logits); it says where it is unsure (flat rows, a small top-p and a high
    temperature make that common), and a candidate row agrees with its full row."""
    mx.random.seed(3)
    logits = mx.random.normal((6, 512)) * mx.array([[0.5], [1.0], [2.0], [3.0], [4.0], [6.0]])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    positions = mx.arange(40, 46)
    sure_rows = unsure_rows = 0
    for temp, top_p in ((0.7, 0.95), (2.0, 0.3)):
        params = SamplingParams(temp=temp, top_p=top_p)
        scaled = filter_scaled(params, logprobs)
        for seed in mx.arange(64, dtype=mx.uint32):
            tokens, sure = nucleus(logprobs, temp, top_p, seed, positions)
            exact = coupled_choice(scaled, seed, positions)
            assert mx.all(mx.where(sure, tokens == exact, True)).item()
            from_logits = nucleus(logits + 20.0, temp, top_p, seed, positions)
            assert mx.all(from_logits[1] == sure).item()
            assert mx.all(mx.where(sure, from_logits[0] == exact, True)).item()
            sure_rows += sure.sum().item()
            unsure_rows += (~sure).sum().item()
    assert sure_rows > 400 and unsure_rows > 100
    ids = mx.array([[3, 500, 17, 250, 99, 7]])  # a drafter's candidates, in no order
    row = logprobs[:1, ids[0]]
    row = row - mx.logsumexp(row, axis=-1, keepdims=True)
    scaled = filter_scaled(SamplingParams(temp=1.0, top_p=0.8), row)
    for seed in mx.arange(16, dtype=mx.uint32):
        token, sure = nucleus(row, 1.0, 0.8, seed, positions[:1], ids)
        if sure.item():
            assert token.item() == coupled_choice(scaled, seed, positions[:1], ids).item()


def test_a_round_accepts_only_what_plain_decoding_picks():
    """Top-p rounds: the emitted tokens (accepted drafts and the pick after them) are, row by
    row, plain decoding's exact draw, even where the sort-free draw is unsure, and drafts that
    equal every row's draw are all accepted where it is sure."""
    policy = make_policy(temp=2.0, top_p=0.3)
    mx.random.seed(4)
    logits = mx.random.normal((5, 256)) * 0.5
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    truncated = guessed = 0
    for seed in mx.arange(48, dtype=mx.uint32):
        positions = 10 + mx.arange(5)
        exact = [coupled_choice(policy.scaled(logprobs[i : i + 1], policy.values), seed,
                                positions[i : i + 1]).item() for i in range(5)]  # fmt: skip
        drafts = [mx.array([t]) for t in exact[:4]]
        n, tokens = policy.accept(drafts, logprobs, seed, 10)
        n = n.item()
        assert tokens[: n + 1].tolist() == exact[: n + 1]
        _, sure = nucleus(logprobs, 2.0, 0.3, seed, positions)
        trusted = 1 + int(np.cumprod(np.array(sure[1:])).sum())
        assert n == min(4, trusted - 1)
        truncated += n < 4
        # Without the first row's sort, an unsure first row is -1: nothing trusted.
        n, tokens = policy.accept(drafts, logprobs, seed, 10, first_exact=False)
        n = n.item()
        assert tokens[: n + 1].tolist() == exact[: n + 1]
        assert n == min(4, int(np.cumprod(np.array(sure)).sum()) - 1)
        guessed += n < 0
    assert 0 < truncated < 48 and 0 < guessed < 48


def test_noise_is_finite_at_the_extreme_bits():
    """The largest and smallest hashes give finite noise: an infinite one plus a filtered
    token's -inf made a NaN row whose argmax was no token at all."""
    noise = gumbel_from_bits(mx.array([0, 2**9, 2**31, 2**32 - 1], mx.uint32))
    assert mx.isfinite(noise).all().item()
    assert noise[0].item() < noise[1].item() < noise[2].item() < noise[3].item()


# -- the contract on the fixture pair ---------------------------------------------------------


SCHEDULES = {
    "plain": dict(num_draft_tokens=0),
    "constant k=2": dict(draft_schedule="constant", num_draft_tokens=2),
    "constant k=6": dict(draft_schedule="constant", num_draft_tokens=6),
    "heuristic": dict(draft_schedule="heuristic", num_draft_tokens=4),
    "auto, drafting": dict(costs=ALWAYS_DRAFT),
    "auto, parked": dict(costs=NEVER_DRAFT),
    "auto, measured": dict(),
}


@pytest.mark.parametrize(
    "sampling",
    [
        dict(temp=1.0),
        pytest.param(dict(temp=0.7, top_p=0.95), marks=pytest.mark.slow),
        pytest.param(dict(temp=2.0, top_p=0.5), marks=pytest.mark.slow),
        pytest.param(dict(temp=1.3, top_k=20, min_p=0.05), marks=pytest.mark.slow),
    ],
    ids=["temp1.0", "temp0.7-top_p", "temp2.0-top_p0.5", "temp1.3-top_k-min_p"],
)
def test_seeded_mtp_output_is_seeded_plain_output(fixture_pair, sampling):
    """With a seed, every draft schedule and cost table gives plain decoding's tokens."""
    target, drafter, tokenizer = fixture_pair
    prompt = tokenizer.encode("import os\nimport sys\n\n\ndef main(")
    outputs, drafted = {}, 0
    for name, options in SCHEDULES.items():
        mx.random.seed(11)
        responses = list(
            stream_generate(
                target, tokenizer, prompt, 32, draft_model=drafter, **sampling, **options
            )  # fmt: skip
        )
        outputs[name] = [r.token for r in responses]
        drafted += responses[-1].drafted
        assert responses[-1].acceptance_rule == "coupled"
    assert all(tokens == outputs["plain"] for tokens in outputs.values()), outputs
    assert drafted > 20  # the drafting schedules drafted


def test_a_guessed_first_token_is_drawn_again_exactly(fixture_pair, monkeypatch):
    """Top-p rounds draw their first token without a sort, so a round may only guess it (at
    temperature 2.0 top-p 0.5, most do): the loop draws it again with the sort and drops what it
    had queued on the guess, then sorts every round once guesses are frequent. Every token is
    the sorted draw at its position: mlx-lm's own plain loop with that draw as its sampler."""
    target, drafter, tokenizer = fixture_pair
    prompt = tokenizer.encode("import os\nimport sys\n\n\ndef main(")
    sampling = dict(temp=2.0, top_p=0.5)
    guesses = []
    draw_again = SpeculativeGenerator._draw_first_exactly

    def counted(engine, current):
        guesses.append(current.first)
        draw_again(engine, current)

    monkeypatch.setattr(SpeculativeGenerator, "_draw_first_exactly", counted)
    outputs = {}
    for k in (0, 4):
        mx.random.seed(11)
        options = dict(num_draft_tokens=k, draft_schedule="constant", **sampling)
        responses = stream_generate(target, tokenizer, prompt, 24, draft_model=drafter, **options)
        outputs[k] = [r.token for r in responses]
    assert len(guesses) == 4  # two per generation, then every round sorts

    mx.random.seed(11)
    seed = mx.random.randint(0, 2**31 - 1, ()).astype(mx.uint32)  # the engine's draw
    policy, positions = make_policy(**sampling), itertools.count(len(prompt))

    def sorted_draw(logprobs: mx.array) -> mx.array:
        position = mx.array([next(positions)])
        return coupled_choice(policy.scaled(logprobs, policy.values), seed, position)

    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt), target.model, max_tokens=24, sampler=sorted_draw)
    reference = [token for token, _ in steps]
    assert outputs[0] == outputs[4] == reference


def test_a_seed_reproduces_and_another_seed_differs(fixture_pair):
    target, drafter, tokenizer = fixture_pair

    def run(seed: int) -> list[int]:
        mx.random.seed(seed)
        responses = stream_generate(target, tokenizer, "def main(", 24, draft_model=drafter,
                                    temp=1.0)  # fmt: skip
        return [r.token for r in responses]

    assert run(3) == run(3)
    assert run(3) != run(4)


# -- whole generations with a tiny model: the distribution is plain sampling's ----------------


def tiny_pair(seed: int = 0):
    """A random vocab-8 target (sharp enough to be far from uniform) and a centroid-masked drafter
    whose candidates are 4 of the 8 tokens (q = 0 on the others)."""
    mx.random.seed(seed)
    small = dict(
        hidden_size=16,
        num_hidden_layers=2,
        intermediate_size=32,
        layer_types=[S, F],
        head_dim=8,
        global_head_dim=8,
        vocab_size=VOCAB,
        sliding_window=4,
        final_logit_softcapping=None,
    )
    target_config = tiny_text_config(**small, num_kv_shared_layers=0, tie_word_embeddings=False)
    target = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(target_config))
    target.lm_head.weight = target.lm_head.weight * 6
    drafter = gemma4_assistant.Model(
        gemma4_assistant.ModelArgs(
            text_config=tiny_text_config(**small),
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
        dict(temp=1.0, top_p=0.85, plain=True),
    ],
    ids=["temp", "top_p", "top_k", "repetition_penalty", "plain"],
)
def test_mtp_sampling_distribution_equals_plain(options):
    """Chi-square goodness of fit of 3000 generations (4 tokens each, vocab 8: cells are
    (t1, t2, t3), 512 of them) to the exact plain-sampling distribution of the target, through
    the default loop (``auto`` drafting every round), and without a drafter."""
    target, drafter = tiny_pair()
    options = dict(options)
    full_vocab = options.pop("full_vocab_draft", False)
    plain = options.pop("plain", False)
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
            target, None if plain else drafter, policy, num_draft_tokens=2,
            full_vocab_draft=full_vocab, costs=ALWAYS_DRAFT,
        )  # fmt: skip
        tokens = [
            t for block in engine.generate(mx.array(PROMPT), NEW_TOKENS) for t in block.tokens
        ]
        counts[tuple(tokens[1:])] += 1
        drafted, accepted = drafted + engine.stats.drafted, accepted + engine.stats.accepted
    observed = np.zeros(VOCAB ** (NEW_TOKENS - 1))
    for (a, b, c), count in counts.items():
        observed[(a * VOCAB + b) * VOCAB + c] = count
    if not plain:
        assert 0.1 < accepted / drafted < 0.9  # both acceptance and rejection paths are exercised
        head = "full-vocabulary" if full_vocab else "centroid-masked"
        assert engine.stats.draft_path == f"compiled, pipelined, {head}"  # the default loop
    assert chi_square_p_value(observed, expected) > SIGNIFICANCE


def test_policy_options():
    assert make_policy().coupled is False
    assert make_policy(temp=0.5).coupled is True
    # mlx-lm's make_sampler: its options are taken over; any other sampler: lossless by
    # matching its draws.
    assert make_policy(sampler=make_sampler(0.5)).coupled is True
    warn_once.cache_clear()
    with pytest.warns(UserWarning, match="coupled sampling"):
        custom = make_policy(sampler=lambda logprobs: logprobs.argmax(-1))
    assert custom.coupled is False
    # mlx-lm's repetition penalty reads a window: it stays on the pipelined, compiled path.
    assert make_policy(repetition_penalty=1.2, repetition_context_size=9).history_window == 9
    assert make_policy().history_window == 0
    # A custom processor may read the whole history.
    assert make_policy(logits_processors=[lambda tokens, logits: logits]).history_window is None
    with pytest.raises(ValueError, match="either a sampler"):
        make_policy(sampler=make_sampler(0.5), temp=0.5)
    # One kind for every value of the same options: one compiled draft step serves them all.
    assert make_policy(temp=0.5, top_p=0.9).kind == make_policy(temp=1.2, top_p=0.3).kind
    assert make_policy(temp=0.5, top_p=0.9).kind != make_policy(temp=0.5).kind
