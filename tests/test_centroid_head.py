"""The centroid-masked lm_head: portable path, storage order, output contract, transformers."""

from unittest import mock

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FIXTURE
from metal_shim.heads import (
    HeadCase,
    assert_matches_reference,
    assert_same_candidates,
    make_head,
)

from mlx_gemma_mtp.models import centroid_head as ch

E2B = {"num_centroids": 2048, "per_centroid": 128, "top_k": 32}

E2B_CASES = [  # the real E2B shape (a 262,144-token float64 reference): one runs by default
    HeadCase("f16-e2b-ordered", (1, 1, 256), **E2B, dtype=mx.float16, ordered=True),
    HeadCase("f32-e2b-ordered", (1, 1, 256), **E2B, dtype=mx.float32, ordered=True),
    HeadCase("q4-g64-e2b-ordered", (1, 1, 256), **E2B, bits=4, ordered=True),
    HeadCase("q8-g32-e2b", (1, 1, 256), **E2B, bits=8, group_size=32),
]
CASES = [
    HeadCase("bf16-e2b", (1, 1, 256), **E2B),
    HeadCase("f32-odd", (2, 3, 40), 37, 3, 5, mx.float32),
    HeadCase("f32-odd-ordered", (2, 3, 40), 37, 3, 5, mx.float32, ordered=True),
    HeadCase("bf16-batch-ordered", (3, 64), 50, 2, 7, ordered=True),
    HeadCase("q4-g128-batch-ordered", (2, 2, 256), 37, 3, 5, bits=4, group_size=128, ordered=True),
    HeadCase("q4-float-centroids", (1, 128), 40, 4, 6, bits=4, quantize_centroids=False),
    HeadCase("mxfp4", (1, 1, 64), 40, 4, 6, bits=4, group_size=32, mode="mxfp4"),
    HeadCase("keep-all", (1, 32), 6, 4, 6, mx.float32),
]


@pytest.mark.parametrize(
    "case",
    [*CASES, *(pytest.param(c, marks=pytest.mark.slow) for c in E2B_CASES)],
    ids=[c.name for c in [*CASES, *E2B_CASES]],
)
def test_portable_path_matches_full_lm_head(case):
    head = make_head(case, seed=1)
    ids, logits = ch.centroid_candidates(*head.args())
    assert ids.shape == logits.shape == (*case.hidden_shape[:-1], case.top_k * case.per_centroid)
    assert ids.dtype == mx.int32 and logits.dtype == mx.float32
    assert_matches_reference(head, ids, logits)


@pytest.mark.parametrize("bits", [0, 4])
def test_centroid_order_changes_storage_not_results(bits):
    vocab_order = make_head(HeadCase("v", (2, 64), 50, 4, 6, bits=bits, group_size=32), seed=2)
    ordered = make_head(vocab_order.case._replace(ordered=True), seed=2)
    assert not mx.array_equal(vocab_order.lm_head.weight, ordered.lm_head.weight)
    assert_same_candidates(
        ch.centroid_candidates(*vocab_order.args()), ch.centroid_candidates(*ordered.args())
    )
    full = ch.full_vocab_lm_head(vocab_order.hidden, vocab_order.lm_head)
    restored = ch.full_vocab_lm_head(ordered.hidden, ordered.lm_head, ordered.token_ordering)
    assert mx.array_equal(full, restored)


def test_order_by_centroid_permutes_every_lm_head_part():
    head = make_head(HeadCase("q", (1, 64), 10, 4, 3, bits=4, group_size=32), seed=3)
    lm = head.lm_head
    before = {part: lm[part] for part in ("weight", "scales", "biases")}
    ch.order_by_centroid(lm, head.token_ordering)
    for part, original in before.items():
        assert mx.array_equal(lm[part], original[head.token_ordering])


def test_ordering_must_be_a_permutation():
    lm = nn.Embedding(8, 4)
    with pytest.raises(ValueError, match="permutation"):
        ch.order_by_centroid(lm, mx.array([0, 1, 2, 3, 4, 5, 6, 6]))
    with pytest.raises(ValueError, match="permutation"):
        ch.order_by_centroid(lm, mx.arange(4))


def test_full_row_and_greedy_token():
    """Non-candidates are -inf; the greedy token is the lowest id among tied best logits,
    whatever the candidate order, exactly as argmax over the full row."""
    ids = mx.array([[7, 2, 9, 4], [3, 8, 1, 5]])
    logits = mx.array([[0.5, 1.5, 1.5, -1.0], [2.0, 2.0, 0.0, 2.0]])
    full = ch.scatter_full_vocab(ids, logits, 10)
    assert full.shape == (2, 10)
    assert mx.isinf(full[0, 0]).item() and full[0, 0].item() < 0
    assert full[0, 9].item() == 1.5
    assert ch.candidate_argmax(ids, logits).tolist() == [2, 3]
    assert mx.argmax(full, axis=-1).tolist() == [2, 3]


def test_matches_transformers_masked_embedder():
    """transformers' masked embedder (float32) picks the same candidates with the same logits and
    fills the rest with min - 1 where we use -inf: the greedy token is the same."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from transformers.models.gemma4_assistant.modeling_gemma4_assistant import (
        Gemma4AssistantMaskedEmbedder,
    )

    case = HeadCase("hf", (2, 3, 64), 32, 8, 4, mx.float32)
    head = make_head(case, seed=4)
    text_config = SimpleNamespace(hidden_size=64, vocab_size=256)
    config = SimpleNamespace(  # the fields the embedder reads
        get_text_config=lambda: text_config, num_centroids=32, centroid_intermediate_top_k=4
    )
    embedder = Gemma4AssistantMaskedEmbedder(config)
    embedder.centroids.weight.data = torch.tensor(np.array(head.centroids.weight))
    embedder.token_ordering.copy_(torch.tensor(np.array(head.token_ordering)))
    hidden = torch.tensor(np.array(head.hidden))
    hf = embedder(hidden, torch.tensor(np.array(head.lm_head.weight))).detach().numpy()

    ids, logits = ch.centroid_candidates(*head.args())
    ids, logits = np.array(ids).reshape(6, -1), np.array(logits).reshape(6, -1)
    hf = hf.reshape(6, -1)
    for n in range(6):
        np.testing.assert_allclose(hf[n, ids[n]], logits[n], rtol=1e-5, atol=1e-5)
        others = np.setdiff1d(np.arange(256), ids[n])
        assert np.all(hf[n, others] < logits[n].min())  # min - 1 of the whole batch
        assert np.argmax(hf[n]) == np.array(
            ch.candidate_argmax(mx.array(ids[n]), mx.array(logits[n]))
        )


def test_portable_path_is_used_without_metal():
    head = make_head(HeadCase("p", (1, 64), 10, 4, 3), seed=6)
    failing = mock.patch.object(ch, "metal_candidates", side_effect=AssertionError("Metal path"))
    with failing:
        if not mx.metal.is_available():
            ch.centroid_candidates(*head.args())
        ch.centroid_candidates(*head.args(), kernels=False)


def test_forcing_the_kernels_rejects_what_they_cannot_read():
    head = make_head(HeadCase("m", (1, 64), 40, 4, 6, bits=4, group_size=32, mode="mxfp4"), 7)
    with pytest.raises(ValueError, match="Metal kernels"):
        ch.centroid_candidates(*head.args(), kernels=True)


def quantized_head(**changes):
    head = make_head(HeadCase("g", (2, 64), 40, 4, 6, bits=4, group_size=32), seed=13)
    lm = ch.row_matrix(head.lm_head)._replace(**changes)
    return head, ch.row_matrix(head.centroids), lm


@pytest.mark.parametrize(
    "name",
    ["mixed scale and bias dtypes", "no biases", "empty batch", "narrower hidden", "bad scales"],
)
def test_inputs_the_kernels_cannot_read_go_to_the_mlx_ops_path(name):
    """One template type reads both scales and biases in ``row_dot``; the kernels assume the
    widths match and at least one row: anything else must never reach them."""
    head, centroids, lm = quantized_head()
    x = head.hidden.reshape(-1, head.hidden.shape[-1])
    assert ch.metal_supported(x, centroids, lm, 6)
    if name == "mixed scale and bias dtypes":
        lm = lm._replace(biases=lm.biases.astype(mx.float32))
    elif name == "no biases":
        lm = lm._replace(biases=None)
    elif name == "empty batch":
        x = x[:0]
    elif name == "narrower hidden":
        x = x[:, :32]
    else:
        lm = lm._replace(scales=lm.scales[:, :1])
    assert not ch.metal_supported(x, centroids, lm, 6)


def test_an_empty_batch_gives_empty_candidates(monkeypatch):
    monkeypatch.setenv(ch.METAL_SETTING, "1")
    head = make_head(HeadCase("e", (1, 64), 10, 4, 3), seed=14)
    failing = mock.patch.object(ch, "run", side_effect=AssertionError("a kernel ran"))
    with failing:
        ids, logits = ch.centroid_candidates(head.hidden[:0], *head.args()[1:])
    assert ids.shape == logits.shape == (0, 12)


def test_each_head_keeps_its_own_state():
    """The kept centroid matrix and the kernel choice are the head's own, kept by the package
    (nothing is set on the model's modules)."""
    a = make_head(HeadCase("a", (1, 64), 10, 4, 3), seed=15)
    b = make_head(HeadCase("b", (1, 64), 10, 4, 3), seed=16)
    attributes = set(vars(a.centroids))
    ch.centroid_candidates(*a.args())
    ch.centroid_candidates(*b.args())
    state_a, state_b = ch.head_state(a.centroids), ch.head_state(b.centroids)
    assert state_a is not state_b
    assert state_a.matrix[0] is a.centroids.weight and state_b.matrix[0] is b.centroids.weight
    assert set(vars(a.centroids)) == attributes


def test_drafter_honours_full_vocab():

    from mlx_gemma_mtp.config import read_config
    from mlx_gemma_mtp.loading import load_drafter_model

    path = FIXTURE / "assistant"
    drafter = load_drafter_model(path, read_config(path))
    hidden = mx.random.normal((1, 1, drafter.args.text_args.hidden_size), key=mx.random.key(8))
    hidden = hidden.astype(drafter.pre_projection.weight.dtype)
    logits, candidates = drafter.head(hidden, full_vocab=True)
    assert candidates is None and logits.shape == (1, 1, drafter.vocab_size)
    masked_logits, masked_ids = drafter.head(hidden)
    assert masked_ids.shape == (1, 1, 32 * drafter.vocab_size // 2048)
    full = np.array(logits.astype(mx.float32))[0, 0]
    np.testing.assert_allclose(
        full[np.array(masked_ids)[0, 0]], np.array(masked_logits)[0, 0], rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize("bits", [0, 4])
def test_portable_path_under_compile(bits):
    """Compiled with the weights as constants (the centroid matrix is made once and kept) or as
    traced inputs (it cannot be kept: the plain product is used): the same candidates."""
    head = make_head(HeadCase("c", (1, 64), 40, 4, 6, bits=bits, group_size=32), seed=9)

    def candidates(hidden):
        return ch.centroid_candidates(hidden, *head.args()[1:])

    eager = candidates(head.hidden)
    state = [head.centroids.state, head.lm_head.state]
    for compiled in (mx.compile(candidates), mx.compile(candidates, inputs=state)):
        assert_same_candidates(eager, compiled(head.hidden))


@pytest.mark.slow
def test_bench_script_runs(tmp_path):
    """scripts/bench_lm_head.py end to end for one setting, one iteration (timings unchecked)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_lm_head.py"
    out = tmp_path / "bench.json"
    args = ["--json", str(out), "--iters", "1", "--settings", "bfloat16", "--skip-draft-step"]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    (setting,) = json.loads(out.read_text())["settings"]
    assert setting["name"] == "bfloat16"
    assert setting["ratio"] == pytest.approx(setting["full_ms"] / setting["centroid_ms"], rel=0.01)
