"""Parity with transformers 5.23.0 (float32, CPU): target logits, final hidden state and shared K/V
after a prefill, then the drafter's draft steps exactly as ``get_candidates`` runs them.

Tiny random pairs keep each architectural feature (``tests/hf_reference.py``): E2B-like (per-layer
inputs, KV-shared layers, centroid-masked drafter head), 31B-like (``attention_k_eq_v``) and
26B-A4B-like (MoE); the E2B-like target also as a ``Gemma4ForConditionalGeneration``; 12B-like
unified pairs (``gemma4_unified`` / ``gemma4_unified_text`` targets, ``gemma4_unified_assistant``
drafters, with and without ordered embeddings, sliding windows 4, 8 and 16). Each goes through the
converter and through the in-memory path of ``load``. The prompt is longer than the sliding window,
so the drafter's window + 1 sliding view is exercised; greedy MTP generation then runs well past it
and must equal transformers' greedy generation token for token.
"""

import json
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURE
from drafting import ALWAYS_DRAFT
from hf_reference import SLIDING_WINDOW, VOCAB, DraftStep, Reference, reference_outputs

from mlx_gemma_mtp import load
from mlx_gemma_mtp.convert import convert
from mlx_gemma_mtp.generation import stream_generate

NUM_STEPS = 4
PROMPT_LEN = 21
RTOL = 1e-4
TIE = 1e-5  # centroid scores this close at the top-k boundary may select either centroid
GENERATED = 40  # new tokens in the greedy generation comparison: past every sliding window
# (kind, target class, options for make_pair)
PAIRS = [
    ("e2b", "causal", {}),
    ("e2b", "conditional", {}),
    ("31b", "causal", {}),
    ("26b", "causal", {}),
    ("12b", "causal", dict(sliding_window=8, ordered=True)),
    ("12b", "conditional", dict(sliding_window=8, ordered=False)),
    ("12b", "causal", dict(sliding_window=4, ordered=False)),
    ("12b", "conditional", dict(sliding_window=16, ordered=True)),
]


def assert_close(actual, expected, what: str) -> None:
    actual, expected = np.asarray(actual, dtype=np.float32), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    error = float(np.abs(actual - expected).max())
    bound = RTOL * max(1.0, float(np.abs(expected).max()))
    assert error <= bound, f"{what}: max abs difference {error:.3g} > {bound:.3g}"


@dataclass
class Ours:
    logits: mx.array
    hidden: mx.array
    shared_kv: dict
    steps: list  # (DraftOutput, full-vocab DraftOutput)
    sliding_view: int  # sliding K/V entries the drafter reads: min(T, window + 1)


def run_ours(target, drafter, input_ids: list, num_steps: int, chunks=None) -> Ours:
    """Prefill (in ``chunks`` if given), then ``num_steps`` greedy draft steps at position T."""
    cache = target.make_cache()
    ends = np.cumsum(chunks or [len(input_ids)]).tolist()
    starts = [0] + ends[:-1]
    outs = [target(mx.array([input_ids[a:b]]), cache) for a, b in zip(starts, ends, strict=True)]
    logits = mx.concatenate([o.logits for o in outs], axis=1)
    hidden = mx.concatenate([o.hidden for o in outs], axis=1)
    shared_kv = target.shared_kv(cache)
    token, state = mx.argmax(logits[:, -1:], axis=-1), hidden[:, -1:]
    steps = []
    for _ in range(num_steps):
        inputs = mx.concatenate([target.embed(token), state], axis=-1)
        draft = drafter(inputs, shared_kv, len(input_ids))
        steps.append((draft, drafter(inputs, shared_kv, len(input_ids), full_vocab=True)))
        token, state = draft.tokens(), draft.hidden
    sliding_view = min(len(input_ids), drafter.sliding_window + 1)
    return Ours(logits[0], hidden[0], shared_kv, steps, sliding_view)


def assert_candidates_match(ours: np.ndarray, step, what: str) -> np.ndarray:
    """Our candidate ids equal the reference's, up to ties at the top-k boundary; returns the ids
    on which both computed logits."""
    expected = step.candidates
    if np.array_equal(np.sort(ours), expected):
        return expected
    scores = np.sort(step.centroid_logits)[::-1]
    k = len(expected) * len(step.centroid_logits) // len(step.full_logits)  # top-k centroids
    assert scores[k - 1] - scores[k] <= TIE, f"{what}: candidate token sets differ"
    return np.intersect1d(ours, expected)


def assert_matches_reference(ours: Ours, ref: Reference, label: str) -> None:
    assert_close(ours.logits, ref.logits, f"{label} target logits")
    assert_close(ours.hidden, ref.hidden, f"{label} target final hidden")
    assert set(ours.shared_kv) == set(ref.shared_kv), f"{label} shared K/V layer types"
    for layer_type, (keys, values) in ours.shared_kv.items():
        held = keys.shape[2]
        if layer_type == "sliding_attention":  # may drop entries older than the drafter's view
            assert held >= ours.sliding_view, f"{label}: {held} sliding K/V entries held"
        else:
            assert held == len(ref.hidden), f"{label}: {held} full-attention K/V entries held"
        ref_keys, ref_values = (x[:, -held:] for x in ref.shared_kv[layer_type])
        assert_close(keys[0], ref_keys, f"{label} {layer_type} shared keys")
        assert_close(values[0], ref_values, f"{label} {layer_type} shared values")
    assert int(mx.argmax(ours.logits[-1])) == ref.pending
    for i, ((draft, full), step) in enumerate(zip(ours.steps, ref.steps, strict=True)):
        what = f"{label} draft step {i + 1}"
        assert_close(full.logits[0, 0], step.full_logits, f"{what} full-vocab logits")
        assert_close(draft.hidden[0, 0], step.post_projection, f"{what} post_projection")
        if step.candidates is None:
            assert draft.candidates is None
            assert_close(draft.logits[0, 0], step.logits, f"{what} logits")
        else:
            ids = np.array(draft.candidates[0, 0])
            both = assert_candidates_match(ids, step, what)
            by_id = dict(zip(ids.tolist(), np.array(draft.logits[0, 0]).tolist(), strict=True))
            assert_close([by_id[t] for t in both], step.logits[both], f"{what} candidate logits")
        assert int(draft.tokens()[0, 0]) == step.token, f"{what} greedy token"


def assert_not_degenerate(ref: Reference) -> None:
    """Greedy choices with clear margins: otherwise float32 noise could legitimately flip them."""
    margins = [np.diff(np.sort(ref.logits[-1])[-2:])[0]]
    margins += [np.diff(np.sort(s.logits)[-2:])[0] for s in ref.steps]
    assert min(margins) > 1e-3, margins
    assert len({s.token for s in ref.steps}) > 1


def pair_id(kind: str, target_class: str, options: dict) -> str:
    return "-".join([kind, target_class, *(f"{k}={v}" for k, v in options.items())])


@pytest.fixture(scope="module", params=PAIRS, ids=[pair_id(*p) for p in PAIRS])
def case(request, hf_pair, tmp_path_factory):
    kind, target_class, options = request.param
    pair = hf_pair(kind, target_class, **options)
    rng = np.random.default_rng(1)
    input_ids = [2] + rng.integers(3, VOCAB, PROMPT_LEN - 1).tolist()
    ref = reference_outputs(pair.target, pair.assistant, input_ids, NUM_STEPS)
    assert_not_degenerate(ref)
    out = tmp_path_factory.mktemp("converted")
    convert(str(pair.target), str(out / "target"), dtype="float32")
    convert(str(pair.assistant), str(out / "assistant"), dtype="float32")
    return {
        "input_ids": input_ids,
        "sliding_window": options.get("sliding_window", SLIDING_WINDOW),
        "ref": ref,
        "converted": (out / "target", out / "assistant"),
        "hf": (pair.target, pair.assistant),
    }


@pytest.mark.parametrize("source", ["converted", "hf"])
def test_matches_transformers(case, source):
    target_path, drafter_path = case[source]
    target, drafter, _ = load(str(target_path), str(drafter_path), dtype="float32")
    ours = run_ours(target, drafter, case["input_ids"], NUM_STEPS)
    assert_matches_reference(ours, case["ref"], source)


def test_chunked_prefill_matches_transformers(case):
    """Prefill in pieces (a single token among them) through the cache: masks and RoPE offsets."""
    target, drafter, _ = load(*map(str, case["converted"]))
    ours = run_ours(target, drafter, case["input_ids"], NUM_STEPS, chunks=[7, 1, 13])
    assert_matches_reference(ours, case["ref"], "chunked prefill")


def test_reference_tells_window_plus_one_from_window(case):
    """The comparison can fail: a drafter seeing only ``window`` sliding entries (not window + 1,
    as transformers' assistant mask gives) is off by far more than the tolerance."""
    target, drafter, _ = load(*map(str, case["converted"]))
    ours = run_ours(target, drafter, case["input_ids"], 1)
    keys, values = ours.shared_kv["sliding_attention"]
    window = case["sliding_window"]
    ours.shared_kv["sliding_attention"] = (keys[..., -window:, :], values[..., -window:, :])
    inputs = mx.concatenate(
        [target.embed(mx.array([[case["ref"].pending]])), ours.hidden[None, -1:]], axis=-1
    )
    full = drafter(inputs, ours.shared_kv, PROMPT_LEN, full_vocab=True)
    with pytest.raises(AssertionError):
        assert_close(full.logits[0, 0], case["ref"].steps[0].full_logits, "window-only drafter")


# Two pairs by default (E2B's centroid-masked head, a unified 12B pair); the other families'
# generation runs with the slow proofs. Their forward and draft steps are compared above at
# every shape, and test_engine.py's long generations check MTP = plain greedy for 31B and 26B.
GREEDY_BY_DEFAULT = {"e2b-causal", "12b-conditional-sliding_window=16-ordered=True"}
GREEDY_CASES = [
    pytest.param(
        p, id=pair_id(*p), marks=() if pair_id(*p) in GREEDY_BY_DEFAULT else pytest.mark.slow
    )
    for p in PAIRS
]


@pytest.mark.parametrize("case", GREEDY_CASES, indirect=True)
def test_greedy_mtp_equals_transformers_greedy(case):
    """float32: MTP's greedy output is transformers' plain greedy generation of the target, token
    for token, for ``GENERATED`` tokens (the drafter's sliding view moves past the window)."""
    torch = pytest.importorskip("torch")
    from hf_reference import load_hf

    target_path, drafter_path = case["hf"]
    ids = torch.tensor([case["input_ids"]])
    with torch.no_grad():
        out = load_hf(target_path).generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GENERATED,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    expected = out[0, ids.shape[1] :].tolist()
    target, drafter, _ = load(*map(str, case["converted"]), dtype="float32")
    tokens = [
        r.token
        for r in stream_generate(
            target,
            None,
            case["input_ids"],
            GENERATED,
            drafter,
            num_draft_tokens=3,
            costs=ALWAYS_DRAFT,
        )
    ]
    assert len(expected) == GENERATED
    assert tokens == expected


def test_fixture_pair_matches_transformers():
    """The trained fixture pair (bf16 weights, compared in float32) on the first held-out prompt."""
    prompt = json.loads((FIXTURE / "held_out_prompts.jsonl").read_text().splitlines()[0])
    input_ids = prompt["input_ids"]
    ref = reference_outputs(FIXTURE / "target", FIXTURE / "assistant", input_ids, NUM_STEPS)
    target, drafter, _ = load(str(FIXTURE / "target"), str(FIXTURE / "assistant"), dtype="float32")
    ours = run_ours(target, drafter, input_ids, NUM_STEPS)
    assert_matches_reference(ours, ref, "fixture")
    assert all(step.candidates is not None for step in ref.steps)


def test_candidate_sets_may_differ_only_by_a_tie_at_the_top_k_boundary():
    def step(centroid_logits):  # 4 centroids of 2 tokens, top-2: centroids 0 and 1
        logits = np.zeros(8, dtype=np.float32)
        scores = np.array(centroid_logits, dtype=np.float32)
        return DraftStep(logits, logits, logits, 0, np.arange(4), scores)

    swapped = np.array([0, 1, 4, 5])  # centroid 2 instead of 1
    both = assert_candidates_match(swapped, step([3.0, 1.000001, 1.0, 0.0]), "tie")
    np.testing.assert_array_equal(both, [0, 1])
    with pytest.raises(AssertionError, match="candidate token sets differ"):
        assert_candidates_match(swapped, step([3.0, 1.1, 1.0, 0.0]), "no tie")
