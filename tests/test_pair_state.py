"""State the engine owns: nothing is written onto the caller's objects, what is kept per pair is
bounded by kinds of policy (never by their values), and it goes away with the models."""

import gc
import json

import pytest
from drafting import ALWAYS_DRAFT
from test_sampling import tiny_pair

from mlx_gemma_mtp.costs import Costs, costs_path, load_costs, save_costs
from mlx_gemma_mtp.engine.loop import SpeculativeGenerator
from mlx_gemma_mtp.generation import make_policy, stream_generate
from mlx_gemma_mtp.state import MAX_KINDS, live_states, pair_state


def attributes(*models) -> dict:
    """Every attribute of every module of ``models`` (and of the objects themselves)."""
    seen = {}
    for i, model in enumerate(models):
        seen[(i, "")] = set(vars(model))
        for name, module in getattr(model, "named_modules", lambda: [])():
            seen[(i, name)] = set(vars(module)) | set(module.keys())
    return seen


def test_nothing_is_set_on_the_callers_objects(fixture_pair):
    """Greedy and sampled generations, through our ``Target`` and through the bare mlx-lm model
    (as ``mlx_lm.load`` returns it), leave every attribute of the caller's objects as it was."""
    target, drafter, tokenizer = fixture_pair
    before = attributes(target, target.model, drafter)
    for model in (target, target.model):
        for options in ({}, {"temp": 0.9, "top_p": 0.9}, {"repetition_penalty": 1.1}):
            list(stream_generate(model, tokenizer, "def f(", 6, draft_model=drafter, **options))
    assert attributes(target, target.model, drafter) == before


def test_fifty_sampling_values_compile_and_measure_a_bounded_number_of_steps(
    fixture_pair, tmp_path, monkeypatch
):
    """50 requests with distinct temperatures and top-k values (as a server's clients send)
    share one compiled draft step and one cost file per kind of policy."""
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE_DIR", str(tmp_path))
    target, drafter, tokenizer = fixture_pair
    state = pair_state(target.backbone, drafter)
    steps = len(state.steps)
    for i in range(50):
        options = {"temp": 0.3 + 0.02 * i, "top_k": 2 + i}
        list(stream_generate(target, tokenizer, [2, 608, 540], 3, draft_model=drafter, **options))
    assert len(state.steps) <= steps + 1
    assert len(list(tmp_path.glob("costs/*.json"))) == 1


def test_kept_state_is_bounded_and_goes_away_with_the_models():
    before = live_states()
    target, drafter = tiny_pair()
    list(stream_generate(target, None, [1, 2, 3], 4, draft_model=drafter, costs=ALWAYS_DRAFT))
    list(stream_generate(target.model, None, [1, 2], 4, draft_model=drafter, costs=ALWAYS_DRAFT))
    assert live_states() > before
    state = pair_state(target.backbone, drafter)
    for i in range(2 * MAX_KINDS):
        state.steps.get(("another kind", i), lambda: None)
    assert len(state.steps) == MAX_KINDS
    del target, drafter, state
    gc.collect()
    assert live_states() == before


@pytest.mark.parametrize(
    "junk",
    [
        '{"identity": IDENTITY, "costs": {"verify": [0, 0, 0, 0, 0], "draft": 0}}',
        '{"identity": IDENTITY, "costs": {"verify": [1e30, 1, 1, 1, 1], "draft": 0.001}}',
        '{"identity": IDENTITY, "costs": {"verify": [[0.01], {"a": 1}], "draft": "x"}}',
        '{"identity": IDENTITY, "costs": {"verify": [NaN, 0.01, 0.01, 0.01, 0.01], "draft": 0}}',
        '{"identity": IDENTITY, "costs": [1, 2, 3]}',
        "[[[[]]]]",
        "",
    ],
    ids=["zero", "absurd", "nested", "nan", "list", "nested-list", "empty"],
)
def test_a_cost_file_a_measurement_could_not_have_written_is_measured_again(
    tmp_path, monkeypatch, junk
):
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE_DIR", str(tmp_path))
    identity = {"version": 0, "machine": "test", "draft": "greedy"}
    path = save_costs(identity, Costs([0.01] * 5, 0.001))
    assert load_costs(identity, 4)[0] is not None and path == costs_path(identity)
    path.write_text(junk.replace("IDENTITY", json.dumps(identity)))
    assert load_costs(identity, 4) == (None, path)


def test_draft_kinds_name_no_values(fixture_pair):
    target, drafter, _ = fixture_pair
    kinds = {
        SpeculativeGenerator(target, drafter, make_policy(temp=t, top_p=p))._draft_kind()
        for t, p in ((0.5, 0.9), (1.0, 0.2), (1.7, 0.99))
    }
    assert len(kinds) == 1 and "0.9" not in kinds.pop()
