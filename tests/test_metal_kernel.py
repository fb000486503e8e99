"""The Metal kernels of the centroid head, proven without a Mac.

(a) The exact text MLX compiles (header, generated signature, body) passes a clang syntax check
    against ``metal_shim/metal_shim.h``; planted errors fail it; MLX itself records that text.
(b) The same header and body, compiled with g++ against ``metal_shim/metal_emu.h``, run every
    thread of every launch on the CPU (through the real wiring in ``centroid_head``) and agree
    with the portable path and a float64 reference.
(c) ``mx.export_function`` records the drafter head with the kernel path.
On a Mac, the ``metal`` tests run the real kernels against the portable path too.
"""

import json
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURE
from metal_shim import harness
from metal_shim.heads import (
    HeadCase,
    assert_matches_reference,
    assert_same_candidates,
    make_head,
    reference,
)

from mlx_gemma_mtp import kernels as metal_kernels
from mlx_gemma_mtp.models import centroid_head as ch

E2B = {"num_centroids": 2048, "per_centroid": 128, "top_k": 32}

CASES = [
    HeadCase("bf16-e2b", (1, 1, 256), **E2B),
    HeadCase("q4-g64-e2b-ordered", (1, 1, 256), **E2B, bits=4, ordered=True),
    HeadCase("f32-odd", (2, 3, 40), 37, 3, 5, mx.float32),
    HeadCase("f16-odd-ordered", (1, 40), 37, 3, 5, mx.float16, ordered=True),
    HeadCase("bf16-ordered", (1, 1, 64), 64, 8, 8, ordered=True),
    HeadCase("f32-keep-all", (1, 32), 6, 4, 6, mx.float32),
    HeadCase("bf16-keep-one", (3, 64), 50, 2, 1),
    HeadCase("q4-g32", (1, 1, 256), 64, 8, 8, bits=4, group_size=32),
    HeadCase("q4-g64-ordered", (1, 1, 256), 64, 8, 8, bits=4, ordered=True),
    HeadCase("q4-g128", (1, 1, 256), 64, 8, 8, bits=4, group_size=128),
    HeadCase("q8-g32-ordered", (1, 1, 256), 64, 8, 8, bits=8, group_size=32, ordered=True),
    HeadCase("q8-g64", (1, 1, 256), 64, 8, 8, bits=8),
    HeadCase("q8-g128", (1, 1, 256), 64, 8, 8, bits=8, group_size=128),
    HeadCase("q2-g64", (1, 1, 256), 64, 8, 8, bits=2),
    HeadCase("q4-g32-odd", (2, 2, 96), 37, 3, 5, bits=4, group_size=32),
    HeadCase("q8-g128-odd-ordered", (1, 384), 37, 3, 5, bits=8, group_size=128, ordered=True),
    HeadCase("q4-float-centroids", (1, 1, 128), 40, 4, 6, bits=4, quantize_centroids=False),
    HeadCase("q4-f16", (1, 1, 128), 40, 4, 6, mx.float16, bits=4),
    HeadCase("q4-f32", (1, 1, 128), 40, 4, 6, mx.float32, bits=4, ordered=True),
]


SMALL = HeadCase("small", (1, 64), 37, 3, 5, mx.float32)
TIE = HeadCase("tie", (1, 64), 40, 4, 6, mx.float32)


def kernel_runner(run):
    """``centroid_head`` with ``run`` executing its launches (pass ``kernels=True``)."""
    return mock.patch.object(ch, "run", run)


@contextmanager
def drafter_kernels(drafter, enabled: bool):
    """``drafter``'s centroid head with the kernels forced on or off."""
    state = ch.head_state(drafter.masked_embedding.centroids)
    previous, state.kernels = state.kernels, enabled
    try:
        yield
    finally:
        state.kernels = previous


def launches_of(head) -> list:
    recorded = []

    def record(launch):
        recorded.append(launch)
        return [
            mx.zeros(s, dtype=d)
            for s, d in zip(launch.output_shapes, launch.output_dtypes, strict=True)
        ]

    with kernel_runner(record):
        ch.centroid_candidates(*head.args(), kernels=True)
    return recorded


@pytest.fixture(scope="module")
def heads():
    return {case.name: make_head(case, seed=i) for i, case in enumerate([*CASES, SMALL, TIE])}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory, heads):
    """Every launch of every case, compiled in one g++ run."""
    emu = harness.Emulator(tmp_path_factory.mktemp("metal_emu"))
    emu.prepare([launch for head in heads.values() for launch in launches_of(head)])
    return emu


def emulated(emulator, head):
    with kernel_runner(emulator.run):
        return ch.centroid_candidates(*head.args(), kernels=True)


def portable(head):
    return ch.centroid_candidates(*head.args(), kernels=False)


# -- (b) the kernels' logic, run on the CPU ------------------------------------------------------


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_emulated_kernels_match_portable_path_and_reference(emulator, heads, name):
    head = heads[name]
    ids, logits = emulated(emulator, head)
    assert (
        ids.shape
        == logits.shape
        == (*head.hidden.shape[:-1], head.case.top_k * head.case.per_centroid)
    )
    assert ids.dtype == mx.int32 and logits.dtype == mx.float32
    assert_same_candidates((ids, logits), portable(head))
    assert_matches_reference(head, ids, logits)


def test_emulated_topk_breaks_ties_toward_lower_centroid_index(emulator):
    """Centroids 3, 11, 20 and 30 score the same, tied for the last 2 of 6 places: the kernel
    keeps 3 and 11, best first; the portable path keeps some valid top 6."""
    scores = np.random.default_rng(0).uniform(-1, 0, size=(1, 37)).astype(np.float32)
    top4, tied = [5, 17, 25, 36], [3, 11, 20, 30]
    scores[0, top4] = [3.0, 2.5, 2.0, 1.5]
    scores[0, tied] = 1.0
    (selected,) = emulator.run(ch.topk_launch(mx.array(scores), 6))
    assert np.array(selected)[0].tolist() == [*top4, 3, 11]
    kept = set(np.array(ch.top_centroids(mx.array(scores), 6))[0].tolist())
    assert set(top4) < kept and len(kept & set(tied)) == 2


def test_emulated_topk_orders_nan_and_infinities(emulator):
    scores = np.array([[0.5, np.nan, -np.inf, np.inf, 2.0, -np.inf, np.nan, 1.0]], np.float32)
    (selected,) = emulator.run(ch.topk_launch(mx.array(scores), 8))
    # NaN counts as -inf: among the four -inf (2, 5 and the NaNs 1, 6) lower indices first
    assert np.array(selected)[0].tolist() == [3, 4, 7, 0, 1, 2, 5, 6]


def test_emulated_greedy_tie_goes_to_lowest_token_id(emulator):
    """Two candidate tokens with identical lm_head rows and the best logit: both paths return
    the lower id, as argmax over the full row does."""
    head = make_head(TIE, seed=5)
    ids = np.array(portable(head)[0])[0]
    token = int(ids[np.argmax(reference(head).vocab_logits[0, ids])])
    other = int(ids[-1] if ids[-1] != token else ids[0])
    weight = np.array(head.lm_head.weight)
    weight[other] = weight[token]
    head.lm_head.weight = mx.array(weight)
    for out in (emulated(emulator, head), portable(head)):
        full = ch.scatter_full_vocab(*out, weight.shape[0])
        assert ch.candidate_argmax(*out).item() == min(token, other)
        assert mx.argmax(full, axis=-1).item() == min(token, other)


def test_emulated_drafter_step_matches_portable(emulator):
    """The tiny real drafter (fixture), through ``Model.__call__``: same candidates and token."""

    from mlx_gemma_mtp.config import read_config
    from mlx_gemma_mtp.loading import load_drafter_model

    path = FIXTURE / "assistant"
    drafter = load_drafter_model(path, read_config(path))
    inputs, shared_kv = random_drafter_inputs(drafter, positions=9)
    with kernel_runner(emulator.run), drafter_kernels(drafter, True):
        kernel_out = drafter(inputs, shared_kv, 9)
    with drafter_kernels(drafter, False):
        portable_out = drafter(inputs, shared_kv, 9)
    assert_same_candidates(
        (kernel_out.candidates, kernel_out.logits), (portable_out.candidates, portable_out.logits)
    )
    assert kernel_out.tokens().item() == portable_out.tokens().item()


def random_drafter_inputs(drafter, positions: int):
    args = drafter.args.text_args
    key = mx.random.key(3)
    inputs = mx.random.normal((1, 1, 2 * drafter.args.backbone_hidden_size), key=key)
    shared_kv = {}
    for kind, dim in (
        ("sliding_attention", args.head_dim),
        ("full_attention", args.global_head_dim),
    ):
        shape = (1, args.num_key_value_heads, positions, dim)
        key, k1, k2 = mx.random.split(key, 3)
        shared_kv[kind] = (mx.random.normal(shape, key=k1), mx.random.normal(shape, key=k2))
    dtype = drafter.pre_projection.weight.dtype
    return inputs.astype(dtype), {
        k: (a.astype(dtype), b.astype(dtype)) for k, (a, b) in shared_kv.items()
    }


# -- the emulator catches what the GPU would not report --------------------------------------------


def test_emulation_detects_a_wrong_row_choice(emulator, heads):
    head = heads["small"]
    body = metal_kernels.source("candidate_logits.metal").replace(
        "ORDERED ? slot : uint(token)", "ORDERED ? uint(token) : slot"
    )

    def run(launch):
        return emulator.run(launch, body=body if launch.kernel == "candidate_logits" else None)

    with kernel_runner(run):
        wrong = ch.centroid_candidates(*head.args(), kernels=True)
    with pytest.raises(AssertionError):
        assert_same_candidates(wrong, portable(head))


@pytest.mark.parametrize(
    "kernel, old, new, message",
    [
        (
            "centroid_scores",
            "scores[size_t(n) * ROWS + row] = score;",
            "scores[size_t(n) * ROWS + row + 1] = score;",
            "out of bounds",
        ),
        (
            "centroid_topk",
            "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);",
            "if (tid != 3) { metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup); }",
            "simd_\\* call|barrier",
        ),
        (  # lanes of one simdgroup at two different simd_max calls (lanes that returned
            # early would just not take part, as on the GPU; wrong sums are the other tests' job)
            "centroid_topk",
            "float simd_best = metal::simd_max(best);",
            "float simd_best = lane < 16 ? metal::simd_max(best)\n : metal::simd_max(best);",
            "simd_\\* call",
        ),
        (
            "centroid_topk",
            "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);",
            "if (simd_group) { metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup); }",
            "threadgroup_barrier",
        ),
    ],
)
def test_emulation_reports_misuse(emulator, heads, kernel, old, new, message):
    launch = next(launch for launch in launches_of(heads["small"]) if launch.kernel == kernel)
    body = metal_kernels.source(metal_kernels.SPECS[kernel].source)
    assert old in body
    with pytest.raises(harness.EmulationError, match=message):
        emulator.run(launch, body=body.replace(old, new))


# -- the probe: each kernel once on the real weights before it is trusted ------------------------

no_metal = pytest.mark.skipif(mx.metal.is_available(), reason="proves the fallback without Metal")


def head_inputs(head) -> ch.HeadInputs:
    case = head.case
    centroids, lm_head = ch.row_matrix(head.centroids), ch.row_matrix(head.lm_head)
    return ch.HeadInputs(centroids, lm_head, head.token_ordering, case.top_k, case.ordered)


@pytest.mark.parametrize("name", ["bf16-ordered", "q4-g32-odd", "f32-keep-all"])
def test_probe_passes_the_emulated_kernels(emulator, heads, name):
    head = heads[name]
    with kernel_runner(emulator.run):
        results = ch.probe_kernels(head_inputs(head), head.hidden.dtype)
    assert [r.kernel for r in results] == list(metal_kernels.SPECS)
    assert all(r.ok for r in results), results


@pytest.mark.parametrize(
    "kernel, old, new, detail",
    [
        ("centroid_scores", "scores[size_t(n) * ROWS + row] = score;", "", "largest difference"),
        ("centroid_topk", "score > winner_score ||", "score < winner_score ||", "not the"),
        (
            "candidate_logits",
            "ORDERED ? slot : uint(token)",
            "ORDERED ? uint(token) : slot",
            "largest difference",
        ),
    ],
)
def test_probe_reports_a_kernel_that_disagrees(emulator, heads, kernel, old, new, detail):
    head = heads["bf16-ordered"]
    body = metal_kernels.source(metal_kernels.SPECS[kernel].source)
    assert old in body
    planted = body.replace(old, new)

    def run(launch):
        return emulator.run(launch, body=planted if launch.kernel == kernel else None)

    with kernel_runner(run):
        results = {r.kernel: r for r in ch.probe_kernels(head_inputs(head), head.hidden.dtype)}
    assert not results[kernel].ok and detail in results[kernel].detail, results[kernel]
    assert all(r.ok for name, r in results.items() if name != kernel), results


@no_metal
def test_forced_kernels_fall_back_with_one_warning(monkeypatch, heads):
    """Without Metal, ``mx.fast.metal_kernel`` fails at call time: the path of a kernel that a
    Mac's compiler rejects. The head warns once, then always uses the MLX-ops path."""
    monkeypatch.setenv(ch.METAL_SETTING, "1")
    head = make_head(SMALL, seed=11)
    with pytest.warns(RuntimeWarning) as record:
        out = ch.centroid_candidates(*head.args())
    (warning,) = record
    message = str(warning.message)
    assert "Metal kernel centroid_scores failed: [metal_kernel] No Metal back-end" in message
    assert f"{ch.METAL_SETTING}=0" in message
    assert_same_candidates(out, portable(head))
    calls = []
    with warnings.catch_warnings(), kernel_runner(lambda launch: calls.append(launch)):
        warnings.simplefilter("error")
        assert_same_candidates(ch.centroid_candidates(*head.args()), out)
    assert calls == []  # decided once for the head: no second probe


@no_metal
def test_the_engine_probes_before_compiling_the_draft_step(monkeypatch):
    from mlx_gemma_mtp import load
    from mlx_gemma_mtp.engine.loop import SpeculativeGenerator

    target, drafter, _ = load(str(FIXTURE / "target"), str(FIXTURE / "assistant"))
    monkeypatch.setenv(ch.METAL_SETTING, "1")
    verdicts = ch.head_state(drafter.masked_embedding.centroids).verdicts

    def compile_after_the_probe(function):
        assert list(verdicts.values()) == [False], "compiled before the probe"
        return function

    compiled = mock.patch.object(mx, "compile", side_effect=compile_after_the_probe)
    with pytest.warns(RuntimeWarning, match="Metal kernel centroid_scores failed"), compiled as c:
        SpeculativeGenerator(target, drafter)
    assert c.call_count == 1


def test_kernels_off_and_automatic_without_metal_never_run_a_kernel(monkeypatch, heads):
    head = make_head(SMALL, seed=12)
    failing = kernel_runner(mock.Mock(side_effect=AssertionError("a kernel ran")))
    settings = ["0"] if mx.metal.is_available() else ["0", ""]
    for setting in settings:
        monkeypatch.setenv(ch.METAL_SETTING, setting)
        with failing, warnings.catch_warnings():
            warnings.simplefilter("error")
            ch.centroid_candidates(*head.args())


def test_an_unknown_setting_is_an_error(monkeypatch):
    monkeypatch.setenv(ch.METAL_SETTING, "yes")
    with pytest.raises(ValueError, match="MLX_GEMMA_MTP_METAL='yes': expected 0"):
        ch.kernel_setting()


@no_metal
@pytest.mark.slow
def test_cli_with_kernels_forced_on_matches_kernels_off(tmp_path):
    """``python -m mlx_gemma_mtp.generate`` on the fixture pair: one warning, same tokens."""
    runs = {}
    for setting in ("1", "0"):
        stats = tmp_path / f"stats{setting}.json"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlx_gemma_mtp.generate",
                "--model",
                str(FIXTURE / "target"),
                "--draft-model",
                str(FIXTURE / "assistant"),
                "--prompt-tokens",
                "2 10 20 30 40",
                "--max-tokens",
                "24",
                "--stats-json",
                str(stats),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, ch.METAL_SETTING: setting},
            check=True,
        )
        runs[setting] = json.loads(stats.read_text()), result.stderr
    (on, on_err), (off, off_err) = runs["1"], runs["0"]
    assert on_err.count("Metal kernel") == 1 and "MLX_GEMMA_MTP_METAL=0" in on_err
    assert "Metal kernel" not in off_err
    assert on["mode"] == "mtp" and on["drafted"] > 0
    assert on["tokens"] == off["tokens"] and len(on["tokens"]) == 24


# -- (a) compile-level check of the exact source --------------------------------------------------


@pytest.fixture(scope="module")
def all_launches(heads):
    return {
        harness.kernel_source(launch): launch
        for head in heads.values()
        for launch in launches_of(head)
    }


def test_every_kernel_variant_passes_the_clang_check(all_launches):
    for text in all_launches:
        assert harness.clang_errors(text) == [], text[-600:]


def test_mlx_generates_exactly_the_checked_text(tmp_path, heads):
    """``mx.export_function`` records each custom kernel's full source: it is our text."""
    for name in ("bf16-ordered", "q4-g32-odd", "f32-keep-all"):
        head = heads[name]
        path = tmp_path / f"{name}.mlxfn"

        def candidates(hidden, head=head):
            return ch.centroid_candidates(hidden, *head.args()[1:], kernels=True)

        mx.export_function(str(path), candidates, head.hidden)
        exported = path.read_bytes()
        for launch in launches_of(head):
            assert harness.kernel_source(launch).encode() in exported


PLANTED = [
    ("centroid_scores", "metal::simd_sum", "metal::simd_summ", "no member named 'simd_summ'"),
    ("centroid_scores", "* RPS;", "* RSP;", "undeclared identifier 'RSP'"),
    ("centroid_scores", "uint row = first + r;", "uint row = first + r", "expected ';'"),
    ("centroid_topk", "uint lane = thread_index_in_simdgroup;", "", "undeclared identifier 'lane'"),
    (
        "centroid_topk",
        "own[j] = metal::isnan",
        "scores[c] = score;\n  own[j] = metal::isnan",
        "read-only variable is not assignable",
    ),
    (
        "centroid_topk",
        "metal::mem_flags::mem_threadgroup",
        "metal::mem_flags::mem_threadgroups",
        "no member named 'mem_threadgroups'",
    ),
    (
        "candidate_logits",
        "ids[size_t(n) * K * P + candidate] = token;",
        "token_ordering[slot] = token;",
        "read-only variable is not assignable",
    ),
    ("candidate_logits", "uint(selected[", "uint(selection[", "undeclared identifier 'selection'"),
    ("header", "float(scales[group])", "float(scale[group])", "undeclared identifier 'scale'"),
    # address spaces: `scores` is in the constant address space in the launch checked here
    (
        "centroid_topk",
        "float own[PER_THREAD];",
        "const device float* row = scores + size_t(n) * C;\nfloat own[PER_THREAD];",
        "cannot initialize a variable of type 'device float const *'",
    ),
    (
        "centroid_topk",
        "float winner_score = group_best[parity][0];",
        "thread float* bests = group_best[parity];\n  float winner_score = bests[0];",
        "cannot initialize a variable of type 'float *' with an lvalue of type",
    ),
]


@pytest.mark.parametrize("kernel, old, new, message", PLANTED)
def test_clang_check_catches_planted_errors(all_launches, kernel, old, new, message):
    quantized = [launch for launch in all_launches.values() if launch.template[1] == ("BITS", 4)]
    launches = [launch for launch in all_launches.values() if launch.kernel == kernel]
    if kernel == "header":  # the quantized branch of row_dot, used by quantized heads only
        launches, kernel = quantized, None
    # the small-C top-k launch passes `scores` in the constant address space
    launch = min(launches, key=lambda launch: launch.inputs[0].size)
    if kernel is None:
        header = metal_kernels.source(metal_kernels.HEADER)
        assert old in header
        text = harness.kernel_source(launch, header=header.replace(old, new))
    else:
        body = metal_kernels.source(metal_kernels.SPECS[kernel].source)
        assert old in body
        text = harness.kernel_source(launch, body=body.replace(old, new))
    errors = harness.clang_errors(text)
    assert any(message in e for e in errors), errors


def test_clang_check_knows_bfloat16_is_a_16_bit_float():
    text = "void f(bfloat16_t b) { static_assert(sizeof(b) == 2); float y = b * b + 1.0f; }"
    assert harness.clang_errors(text) == []
    assert harness.clang_errors("void f(const constant bfloat16_t* b) { b[0] = 1.0f; }")


# -- (c) export --------------------------------------------------------------------------------


def test_export_records_drafter_with_kernel_path(tmp_path):

    from mlx_gemma_mtp.config import read_config
    from mlx_gemma_mtp.loading import load_drafter_model

    path = FIXTURE / "assistant"
    drafter = load_drafter_model(path, read_config(path))
    inputs, shared_kv = random_drafter_inputs(drafter, positions=9)
    hidden = mx.zeros(
        (1, 1, drafter.args.text_args.hidden_size), drafter.pre_projection.weight.dtype
    )

    def step(inputs, *kv):
        shared = {"sliding_attention": kv[:2], "full_attention": kv[2:]}
        out = drafter(inputs, shared, 9)
        return out.logits, out.candidates, out.hidden

    kv = [*shared_kv["sliding_attention"], *shared_kv["full_attention"]]
    with drafter_kernels(drafter, True):
        mx.export_function(str(tmp_path / "head.mlxfn"), lambda h: drafter.head(h), hidden)
        mx.export_function(str(tmp_path / "step.mlxfn"), step, inputs, *kv)
    me = drafter.masked_embedding
    for file in ("head.mlxfn", "step.mlxfn"):
        exported = (tmp_path / file).read_bytes()
        for spec in metal_kernels.SPECS.values():
            assert f"custom_kernel_{spec.name}_".encode() in exported
    x = hidden.reshape(1, -1)
    launch = ch.scores_launch(x, ch.row_matrix(me.centroids))
    assert harness.kernel_source(launch).encode() in (tmp_path / "head.mlxfn").read_bytes()
    if mx.metal.is_available():  # only a Metal build can load and run what it recorded
        (logits, candidates) = mx.import_function(str(tmp_path / "head.mlxfn"))(hidden)
        with drafter_kernels(drafter, False):
            expected = drafter.head(hidden)
        assert_same_candidates((candidates, logits), (expected[1], expected[0]))


# -- on a Mac: the real kernels ------------------------------------------------------------------

metal = pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal (Apple silicon)")


@metal
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_metal_kernels_match_portable_path_and_reference(heads, name):
    head = heads[name]
    with mx.stream(mx.gpu):
        ids, logits = ch.centroid_candidates(*head.args(), kernels=True)
    assert_same_candidates((ids, logits), portable(head))
    assert_matches_reference(head, ids, logits)


@metal
def test_metal_is_chosen_automatically_on_the_gpu(heads):
    head = heads["bf16-ordered"]
    ran, run = [], ch.run
    record = mock.patch.object(ch, "run", lambda launch: ran.append(launch) or run(launch))
    with record, mx.stream(mx.gpu):
        mx.eval(ch.centroid_candidates(*head.args()))
    assert [launch.kernel for launch in ran] == list(metal_kernels.SPECS)
