"""The Metal kernels of the centroid head, proven without a Mac.

(a) The exact text MLX compiles (header, generated signature, body) passes a clang syntax check
    against ``metal_shim/metal_shim.h``; planted errors fail it; MLX itself records that text.
(b) The same header and body, compiled with g++ against ``metal_shim/metal_emu.h``, run every
    thread of every launch on the CPU (through the real wiring in ``centroid_head``) and agree
    with the portable path and a float64 reference.
(c) ``mx.export_function`` records the drafter head with the kernel path.
On a Mac, the ``metal`` tests run the real kernels against the portable path too.
"""

from contextlib import contextmanager
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest
from metal_shim import harness
from metal_shim.heads import (
    HeadCase,
    assert_matches_reference,
    assert_same_candidates,
    make_head,
    reference,
)

from mlx_gemma_mtp import centroid_head as ch
from mlx_gemma_mtp import metal_kernels

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


@contextmanager
def kernel_runner(run):
    """The Metal path of ``centroid_head``, with ``run`` executing its launches."""
    with ch.metal_kernel_path(True), mock.patch.object(ch, "run", run):
        yield


def launches_of(head) -> list:
    recorded = []

    def record(launch):
        recorded.append(launch)
        return [
            mx.zeros(s, dtype=d)
            for s, d in zip(launch.output_shapes, launch.output_dtypes, strict=True)
        ]

    with kernel_runner(record):
        ch.centroid_candidates(*head.args())
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
        return ch.centroid_candidates(*head.args())


def portable(head):
    with ch.metal_kernel_path(False):
        return ch.centroid_candidates(*head.args())


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
    from pathlib import Path

    from mlx_gemma_mtp.config import read_config
    from mlx_gemma_mtp.loading import load_drafter_model

    path = Path(__file__).parent / "fixtures" / "gemma4-tiny" / "assistant"
    drafter = load_drafter_model(path, read_config(path))
    inputs, shared_kv = random_drafter_inputs(drafter, positions=9)
    with kernel_runner(emulator.run):
        kernel_out = drafter(inputs, shared_kv, 9)
    with ch.metal_kernel_path(False):
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
        wrong = ch.centroid_candidates(*head.args())
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
            return ch.centroid_candidates(hidden, *head.args()[1:])

        with ch.metal_kernel_path(True):
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


# -- (c) export --------------------------------------------------------------------------------


def test_export_records_drafter_with_kernel_path(tmp_path):
    from pathlib import Path

    from mlx_gemma_mtp.config import read_config
    from mlx_gemma_mtp.loading import load_drafter_model

    path = Path(__file__).parent / "fixtures" / "gemma4-tiny" / "assistant"
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
    with ch.metal_kernel_path(True):
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
        with ch.metal_kernel_path(False):
            expected = drafter.head(hidden)
        assert_same_candidates((candidates, logits), (expected[1], expected[0]))


# -- on a Mac: the real kernels ------------------------------------------------------------------

metal = pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal (Apple silicon)")


@metal
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_metal_kernels_match_portable_path_and_reference(heads, name):
    head = heads[name]
    with ch.metal_kernel_path(True), mx.stream(mx.gpu):
        ids, logits = ch.centroid_candidates(*head.args())
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
