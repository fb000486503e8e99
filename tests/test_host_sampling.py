"""Speculative sampling on the host: mlx-lm's filters reproduced bit for bit in numpy, the same
acceptance rule, and the engine running it (chosen by measurement, seeded, lossless)."""

import mlx.core as mx
import numpy as np
import pytest
from drafting import ALWAYS_DRAFT, ON_HOST
from test_engine import held_out_prompts, run
from test_sampling import SIGNIFICANCE, chi_square_p_value

from mlx_gemma_mtp import host_sampling
from mlx_gemma_mtp.costs import Costs, describe_places, load_costs, save_costs
from mlx_gemma_mtp.engine import SpeculativeGenerator
from mlx_gemma_mtp.generation import make_policy
from mlx_gemma_mtp.sampling import SamplingParams, log_softmax

FILTERS = [
    SamplingParams(0.7, top_p=0.95),
    SamplingParams(1.0, top_p=0.5),
    SamplingParams(1.0, min_p=0.05),
    SamplingParams(1.0, min_p=0.5, min_tokens_to_keep=40),
    SamplingParams(1.0, top_k=50),
    SamplingParams(1.0, top_p=0.9, min_p=0.02, top_k=2000),
]


def test_mlx_exp_is_mlx_cpu_exp_bit_for_bit():
    mx.random.seed(0)
    values = mx.concatenate(
        [(mx.random.normal((20_000,)) * s - s).astype(mx.float32) for s in (0.5, 4.0, 20.0, 60.0)]
        + [mx.array([0.0, -0.0, 88.0, 88.5, -88.0, -88.5, 1e-30, float("inf"), -float("inf")])]
    )
    expected = np.array(mx.exp(values))
    got = host_sampling.mlx_exp(np.array(values))
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("scale", [1.0, 4.0, 10.0])
def test_filters_keep_exactly_the_tokens_mlx_lm_keeps(dtype, scale):
    """Top-p (its sums, in MLX's order and MLX's exp), min-p (in the row's dtype) and top-k
    (ties at the boundary as MLX's partition breaks them) on rows of a 32,768 vocabulary."""
    mx.random.seed(int(scale))
    logits = (mx.random.normal((12, 32_768)) * scale).astype(dtype)
    logprobs = log_softmax(logits)
    rows, name = np.array(logprobs.astype(mx.float32)), str(dtype).split(".")[-1]
    for params in FILTERS:
        expected = np.isfinite(np.array(params.filter(logprobs).astype(mx.float32)))
        for row, keep in zip(rows, expected, strict=True):
            got = np.isfinite(host_sampling.filter_row(row, name, params))
            assert np.array_equal(got, keep), params


def test_distribution_is_the_policy_distribution():
    mx.random.seed(3)
    logprobs = log_softmax(mx.random.normal((1, 4096)) * 3)
    for params in FILTERS:
        ids, probs = host_sampling.distribution(np.array(logprobs[0]), "float32", params)
        expected = np.exp(np.array(params.distribution(logprobs)[0], np.float64))
        dense = np.zeros(4096)
        dense[ids] = probs
        assert np.abs(dense - expected).max() < 1e-6


def test_host_acceptance_keeps_the_target_distribution():
    """One position, q = 0 on some of p's tokens and q > 0 where p = 0: emitted ~ p."""
    rng = np.random.default_rng(0)
    p = np.array([0.05, 0.3, 0.4, 0.05, 0.2, 0.0])
    q = np.array([0.5, 0.0, 0.3, 0.1, 0.0, 0.1])
    ids = np.arange(6)
    counts, accepted = np.zeros(6), 0
    for _ in range(6000):
        draft = int(rng.choice(6, p=q))
        n, token = host_sampling.speculative_accept(
            [draft], [q[draft]], lambda i: (ids, q), lambda i: (ids, p), 6, rng
        )
        counts[draft if n else token] += 1
        accepted += n
    assert 0.2 < accepted / 6000 < 0.9
    assert chi_square_p_value(counts, p) > SIGNIFICANCE


def test_all_drafts_accepted_then_a_bonus_token():
    rng = np.random.default_rng(1)
    ids, p = np.array([2, 5]), np.array([0.0, 1.0])
    n, token = host_sampling.speculative_accept(
        [5, 5], [0.5, 0.5], lambda i: (ids, p), lambda i: (ids, p), 8, rng
    )
    assert (n, token) == (2, 5)


def test_the_engine_samples_on_the_host_where_its_costs_say_so(fixture_pair):
    target, drafter, _ = fixture_pair
    prompt = mx.array(held_out_prompts()[0][:30])
    drafting_on_host = "host for k in [1, 2, 3, 4, 5, 6], device for the others"
    for costs, option, place in (
        (ALWAYS_DRAFT, "auto", "device"),
        # Plain steps sample on the device even where costs say otherwise (cached before
        # COSTS_VERSION 4, they could); only the option puts them on the host.
        (ON_HOST, "auto", drafting_on_host),
        (ALWAYS_DRAFT, "host", "host"),
    ):
        policy = make_policy(temp=0.8)
        engine = SpeculativeGenerator(target, drafter, policy, costs=costs, sampling_on=option)
        tokens = [t for block in engine.generate(prompt, 24) for t in block.tokens]
        assert len(tokens) == 24 and engine.stats.sampling_on == place
        assert engine.stats.rounds > 0 and engine.stats.accepted > 0
        assert engine.stats.draft_path == "compiled, pipelined, centroid-masked"
    # Greedy never samples on the host, whatever the costs or the option say.
    for options in (dict(costs=ON_HOST), dict(costs=ALWAYS_DRAFT, sampling_on="host")):
        engine = SpeculativeGenerator(target, drafter, **options)
        list(engine.generate(prompt, 8))
        assert engine.stats.sampling_on == "device"


def test_auto_measures_both_places_and_keeps_the_faster_per_round_size(fixture_pair, monkeypatch):
    target, drafter, _ = fixture_pair
    engine = SpeculativeGenerator(
        target, drafter, make_policy(temp=0.7, top_p=0.9), num_draft_tokens=3
    )
    list(engine.generate(mx.array(held_out_prompts()[1][:40]), 2))
    # The host is faster for rounds with drafts, and measured faster for a plain step too.
    measured = {
        "device": Costs([0.010, 0.030, 0.040, 0.050], 0.001),
        "host": Costs([0.009, 0.014, 0.016, 0.018], 0.002),
    }
    seen = []

    def fake_measure(k_max=None, **options):
        place = "host" if len(engine._host_rounds) else "device"
        seen.append(place)
        return measured[place]

    monkeypatch.setattr(engine, "_measure_costs", fake_measure)
    costs = engine.measure_costs()
    assert sorted(seen) == ["device", "host"]
    # A plain step stays mlx-lm's queued one: its calibration does not see the loop's host work.
    assert costs.sampling_on == ["device", "host", "host", "host"]
    assert [round(costs.round_seconds(k), 6) for k in range(4)] == [0.010, 0.016, 0.020, 0.024]
    assert describe_places(costs.sampling_on) == "host for k in [1, 2, 3], device for the others"
    # Forced: one place, measured once.
    forced = SpeculativeGenerator(target, drafter, make_policy(temp=0.7), sampling_on="host")
    list(forced.generate(mx.array(held_out_prompts()[1][:40]), 2))
    assert set(forced.measure_costs(blocks=1, calls=1).sampling_on) == {"host"}
    with pytest.raises(ValueError, match="sampling_on"):
        SpeculativeGenerator(target, drafter, sampling_on="gpu")


def test_a_seed_reproduces_host_sampled_output(fixture_pair):
    target, drafter, _ = fixture_pair
    prompt = held_out_prompts()[4]
    outputs = []
    for _ in range(2):
        mx.random.seed(11)
        outputs.append(run(target, drafter, prompt, 40, temp=0.8, top_p=0.95, costs=ON_HOST)[0])
    assert outputs[0] == outputs[1]


def test_a_damaged_placement_in_the_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE_DIR", str(tmp_path))
    identity = {"test": "placement"}
    path = save_costs(identity, ON_HOST)
    assert load_costs(identity, 4)[0].samples_on_host(3)
    path.write_text(path.read_text().replace('"host"', '"gpu"'))
    assert load_costs(identity, 4)[0] is None
