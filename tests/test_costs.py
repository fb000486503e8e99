"""The ``auto`` schedule's models: costs, acceptance, the controller's choices, the cost cache."""

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner
from conftest import FIXTURE

from mlx_gemma_mtp import benchmarks as bench_common
from mlx_gemma_mtp import load
from mlx_gemma_mtp.calibrate import main as calibrate_main
from mlx_gemma_mtp.costs import (
    AcceptanceModel,
    Costs,
    DraftController,
    RoundTimes,
    costs_identity,
    expected_tokens,
    ideal_speedup,
    load_costs,
    measure_costs,
    save_costs,
    tokens_per_round,
)
from mlx_gemma_mtp.engine import loop as engine_module
from mlx_gemma_mtp.engine.loop import SpeculativeGenerator
from mlx_gemma_mtp.generation import make_policy

# The default Linux wheel (reference BLAS): a forward over L tokens costs about L forwards.
LINEAR = Costs([0.014 * L for L in range(1, 10)], 0.0015)
# An accelerator (or OpenBLAS): verifying a few tokens costs little more than one.
FLAT = Costs([0.0095 + 0.001 * (L - 1) for L in range(1, 10)], 0.0014)


def test_one_formula_for_the_ideal_speedup():
    assert bench_common.ideal_speedup is ideal_speedup
    assert expected_tokens([0.5] * 4, 2) == pytest.approx(tokens_per_round(0.5, 2)) == 1.75
    assert expected_tokens([0.5, 0.0, 1.0], 3) == 1.5
    assert FLAT.speedup(3.0, 4) == pytest.approx(3.0 * 0.0095 / (0.0135 + 4 * 0.0014))


def test_acceptance_model_follows_each_position():
    model = AcceptanceModel(4, prior=0.7)
    assert model.estimates() == [0.7] * 4
    model.observe(4, 1)  # draft 1 accepted, draft 2 rejected, 3 and 4 not reached
    rates = model.estimates()
    assert rates[0] > 0.7 and rates[1] < 0.7 and rates[2] == rates[3] == rates[1]
    for _ in range(200):
        model.observe(4, 4)
    assert all(rate > 0.99 for rate in model.estimates())
    for _ in range(60):  # the text changed: nothing is accepted any more
        model.observe(4, 0)
    assert model.estimates()[0] < 0.01


def test_a_position_rejected_once_is_drafted_again_by_exploring_rounds():
    """The first rounds of a reply accept little. One rejection at the fourth draft, then only
    three drafts a round, all accepted: the fourth position keeps its one observation, so only
    a round drafting one more than the best can correct it. Exploring rounds do, and the
    controller goes back to six drafts."""
    controller = DraftController(FLAT, 6)
    controller.observe(6, 3, None)
    assert controller.best(controller.acceptance.estimates(), 6) < 4
    ks = simulate(controller, 1.0, 300)
    assert min(ks[-20:]) == 6


def test_round_times_follow_the_measured_rounds():
    times = RoundTimes(FLAT)
    assert times.predict(3) == pytest.approx(FLAT.round_seconds(3))
    for _ in range(50):
        times.observe(3, 2 * FLAT.round_seconds(3))  # a machine twice as busy
    assert times.predict(3) == pytest.approx(2 * FLAT.round_seconds(3), rel=1e-3)
    assert times.predict(5) == pytest.approx(2 * FLAT.round_seconds(5), rel=1e-3)  # drift
    fixed = RoundTimes(Costs(FLAT.verify, FLAT.draft, fixed=True))
    fixed.observe(3, 1.0)
    assert fixed.predict(3) == FLAT.round_seconds(3)


def simulate(controller: DraftController, rate: float, tokens: int) -> list[int]:
    """The controller's choices when every draft is accepted with probability ``rate``
    (deterministically: the accepted count is the expected prefix rounded down) and every round
    takes its calibrated time."""
    ks, emitted = [], 0
    while emitted < tokens:
        k = controller.choose(16)
        accepted = 0
        while accepted < k and (accepted + 1) * rate >= accepted + 0.5:
            accepted += 1
        controller.observe(k, accepted, controller.times.costs.round_seconds(k))
        ks.append(k)
        emitted += accepted + 1
    return ks


def test_exploring_tries_a_plain_step_once_then_one_more_draft():
    """An exploring round measures a plain step if none ever was (while round times are
    followed), else drafts one more than the best, to learn the next position's acceptance."""
    controller = DraftController(FLAT, 6)
    assert controller.explore(3, 6) == 0
    controller.times.observe(0, FLAT.round_seconds(0))
    assert controller.explore(3, 6) == 4 and controller.explore(6, 6) == 6
    untimed = DraftController(Costs(FLAT.verify, FLAT.draft, fixed=True), 6)
    assert untimed.explore(3, 6) == 4


def test_a_plain_step_is_measured_when_drafting_barely_pays_and_parks_it_if_faster():
    """Calibrated in a spell where a plain step cost 60% of a 2-token round, drafting looks 17%
    faster at acceptance 0.9; now a plain step costs 48% of it, and drafting loses. Only a
    plain step measured now can tell: exploring rounds try one, and the controller parks."""
    calibrated = Costs([0.018, 0.030], 0.0005)
    now = {0: 0.0145, 1: 0.0305}  # seconds a round of k drafts takes now
    controller = DraftController(calibrated, 1)
    ks = []
    for _ in range(120):
        k = controller.choose(1)
        controller.observe(k, k, now[k])  # every draft accepted: 2 tokens in 30.5 ms
        ks.append(k)
    assert ks[:7] == [1] * 7 and 0 in ks[7:9]
    assert set(ks[-40:]) == {0}
    # With fixed costs (nothing followed) nothing would be learnt: no plain step tried.
    untimed = DraftController(Costs(calibrated.verify, calibrated.draft, fixed=True), 1)
    for _ in range(40):
        k = untimed.choose(1)
        untimed.observe(k, k, None)
        assert k == 1
    # Drafting that clearly pays is interrupted once, by the three plain steps that measure
    # a plain step's cost.
    flat = DraftController(FLAT, 6)
    ks = []
    for _ in range(200):
        ks.append(flat.choose(6))
        flat.observe(ks[-1], ks[-1], FLAT.round_seconds(ks[-1]))
    assert ks.count(0) == 3 and ks.index(0) + 2 == len(ks) - ks[::-1].index(0) - 1


def test_a_round_time_measured_long_ago_no_longer_counts():
    """k = 5 measured in a slow spell, then not chosen: once its times are ``max_age`` rounds
    old, it is predicted from the calibration and the drift the recent rounds show."""
    times = RoundTimes(FLAT, max_age=20)
    for _ in range(5):
        times.observe(5, 3 * FLAT.round_seconds(5))
    assert times.predict(5) == pytest.approx(3 * FLAT.round_seconds(5))
    for _ in range(15):
        times.observe(4, 1.1 * FLAT.round_seconds(4))
    assert times.predict(5) == pytest.approx(3 * FLAT.round_seconds(5))
    for _ in range(5):
        times.observe(4, 1.1 * FLAT.round_seconds(4))
    assert times.recent(5) == [] and times.counts[5] == 5
    assert times.predict(5) == pytest.approx(1.1 * FLAT.round_seconds(5))


def test_round_times_are_medians_with_the_calibration_as_one_sample():
    times = RoundTimes(FLAT, max_age=8)
    c = FLAT.round_seconds(3)
    times.observe(3, 2 * c)
    assert times.predict(3) == pytest.approx(1.5 * c)  # the calibration counts as one
    times.observe(3, 2 * c)
    assert times.predict(3) == pytest.approx(2 * c)
    times.observe(3, 40 * c)  # one hiccup moves nothing
    assert times.predict(3) == pytest.approx(2 * c)
    for _ in range(8):  # the old times no longer count; the calibration is one of nine
        times.observe(3, 0.5 * c)
    assert times.predict(3) == pytest.approx(0.5 * c)


def test_controller_parks_where_no_draft_pays_and_never_probes_in_vain():
    controller = DraftController(LINEAR, 6)
    assert set(simulate(controller, 0.8, 500)) == {0}
    # Even if every draft were accepted, L forwards for L tokens plus drafting cannot win.
    assert controller.best([1.0] * 6, 6) == 0


def test_controller_drafts_where_it_pays_and_follows_acceptance():
    controller = DraftController(FLAT, 8)
    ks = simulate(controller, 0.9, 400)
    assert min(k for k in ks[5:] if k) >= 4 and ks.count(0) == 3  # the plain step measured once
    high = controller.choose(8)
    controller = DraftController(FLAT, 8)
    assert max(simulate(controller, 0.5, 200)[10:]) < high
    for _ in range(100):  # acceptance collapses: speculation parks
        controller.observe(controller.choose(8), 0, None)
    assert controller.choose(8) == 0


BREAK_EVEN = Costs([0.010 + 0.006 * (L - 1) for L in range(1, 10)], 0.0005)


def test_drafting_must_beat_a_plain_step_by_the_margin():
    """k = 1 at acceptance 1 with a verification 1.9x a plain step: 2 tokens in 1.9 (+ the draft)
    is 4-5% faster than plain, inside the 5% margin: parked; with no margin it drafts."""
    costs = Costs([0.010, 0.019], 0.0001, fixed=True)
    assert DraftController(costs, 1).best([1.0], 1) == 0
    assert DraftController(costs, 1, margin=0.0).best([1.0], 1) == 1
    faster = Costs([0.010, 0.017], 0.0001, fixed=True)  # 2 tokens in 1.71: 17% faster
    assert DraftController(faster, 1).best([1.0], 1) == 1


def test_parked_controller_probes_with_backoff():
    """Break-even costs: parked at low acceptance, it probes after 8 plain tokens, then 16,
    32...; when probes find drafts accepted again it resumes drafting."""
    controller = DraftController(BREAK_EVEN, 4)
    ks = []
    for _ in range(700):
        ks.append(controller.choose(4))
        controller.observe(ks[-1], 0, None)
    first_plain = ks.index(0)
    probes = [step for step in range(first_plain, len(ks)) if ks[step]]
    gaps = [b - a for a, b in zip([first_plain - 1, *probes], probes, strict=False)]
    assert gaps[:4] == [9, 17, 33, 65]  # 8 plain tokens, then 16, 32, 64

    controller = DraftController(BREAK_EVEN, 4)
    for _ in range(20):
        controller.observe(controller.choose(4), 0, None)
    assert controller.choose(4) == 0
    ks = []
    for _ in range(200):  # the text became easy: every draft is accepted
        k = controller.choose(4)
        controller.observe(k, k, BREAK_EVEN.round_seconds(k))
        ks.append(k)
    assert all(k > 0 for k in ks[-10:])


def test_costs_cache_round_trip_and_invalidation(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE_DIR", str(tmp_path))
    target, drafter, _ = load(str(FIXTURE / "target"), str(FIXTURE / "assistant"), "float32")
    identity = costs_identity(target.model, drafter, "greedy")
    assert load_costs(identity, 4)[0] is None
    path = save_costs(identity, FLAT)
    assert path.parent.parent == tmp_path and load_costs(identity, 4)[0] == FLAT
    assert load_costs(identity, 9)[0] is None  # does not cover k_max = 9
    # Another dtype, another machine or another draft path is another key.
    bf16, _, _ = load(str(FIXTURE / "target"), dtype="bfloat16")
    assert load_costs(costs_identity(bf16.model, drafter, "greedy"), 4)[0] is None
    assert load_costs(costs_identity(target.model, drafter, "sampled"), 4)[0] is None
    other = json.loads(json.dumps(identity))
    other["machine"]["blas"] = "something else"
    assert load_costs(other, 4)[0] is None
    path.write_text("{not json")
    assert load_costs(identity, 4)[0] is None  # a damaged file is measured again


def test_engine_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
    """Greedy and sampling measure every forward width, each in a file of its own kind."""
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE_DIR", str(tmp_path))
    target, drafter, _ = load(str(FIXTURE / "target"), str(FIXTURE / "assistant"), "float32")
    prompt = mx.array(list(range(2, 70)))
    measured = []
    monkeypatch.setattr(
        engine_module,
        "measure_costs",
        lambda *args, widths, **options: (
            measured.append(widths) or measure_costs(*args, widths=widths, **options)
        ),
    )
    for policy, widths in ((None, [[1, 2, 3, 4]]), (make_policy(temp=0.8), [[1, 2, 3, 4]])):
        sources, measured[:] = [], []
        for _ in range(2):
            engine = SpeculativeGenerator(target, drafter, policy, num_draft_tokens=3)
            list(engine.generate(prompt, 8))
            sources.append(engine.stats.costs)
            assert engine.costs.k_max == 3 and all(t > 0 for t in engine.costs.verify)
        assert sources[0].startswith("measured now, cached in") and sources[1].startswith("cached")
        assert measured == widths


def test_calibrate_command_reuses_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE_DIR", str(tmp_path))
    args = ["--model", str(FIXTURE / "target"), "--draft-model", str(FIXTURE / "assistant")]
    args += ["--num-draft-tokens", "3", "--tokens", "12", "--json", str(tmp_path / "c.json")]
    outputs = []
    for _ in range(2):
        result = CliRunner().invoke(calibrate_main, args)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert "Costs: measured now" in outputs[0] and "Costs: cached" in outputs[1]
    report = json.loads((tmp_path / "c.json").read_text())
    for mode in report["modes"].values():
        assert len(mode["costs"]["verify"]) == 4 and len(mode["acceptance_by_position"]) == 3
        assert [row["acceptance"] for row in mode["choices"]] == sorted(
            row["acceptance"] for row in mode["choices"]
        )
    assert "| acceptance | k auto picks | expected speedup |" in outputs[1]
    assert report["modes"]["sampled temp 0.7 top-p 0.95"]["acceptance_rule"] == "coupled"
