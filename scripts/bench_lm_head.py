"""Full lm_head + argmax against the centroid-masked head, at the E2B drafter's shapes.

    python scripts/bench_lm_head.py --json bench_lm_head.json

Per setting (float and quantized lm_heads) the full head (``as_linear`` + argmax) and the
centroid head (``centroid_candidates`` + ``candidate_argmax``, lm_head stored in centroid order;
also in vocab order, for comparison) run interleaved, one call each per iteration, and the
medians are reported with their ratio. Then a whole draft step of an E2B-shaped drafter
(``gemma4_assistant.Model``, random weights, a fake shared K/V) with and without masking, and
the head's share of it. On a Mac the centroid head runs the Metal kernels, and the portable MLX
ops and a kernels-with-argpartition variant are timed beside them.
"""

import argparse
import functools
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma_mtp.models import centroid_head as ch
from mlx_gemma_mtp.models import gemma4_assistant

# google/gemma-4-E2B-it-assistant's config.json, as transcribed (with its source) in real_configs/
E2B_ASSISTANT = json.loads(
    (Path(__file__).parent / "real_configs" / "gemma-4-E2B-it-assistant.json").read_text()
)
TEXT = E2B_ASSISTANT["text_config"]
HIDDEN, VOCAB = TEXT["hidden_size"], TEXT["vocab_size"]
CENTROIDS, TOP_K = E2B_ASSISTANT["num_centroids"], E2B_ASSISTANT["centroid_intermediate_top_k"]

# name, float dtype (of weights, scales and activations), bits (0: float), group size
SETTINGS = [
    ("bfloat16", mx.bfloat16, 0, 0),
    ("float16", mx.float16, 0, 0),
    ("float32", mx.float32, 0, 0),
    ("4bit-g64", mx.bfloat16, 4, 64),
    ("8bit-g64", mx.bfloat16, 8, 64),
]
STEP_SETTINGS = [("bfloat16", mx.bfloat16, 0, 0), ("4bit-g64", mx.bfloat16, 4, 64)]
SHARED_POSITIONS = 1024


def medians(fns, iters: int, warmup: int = 3) -> list[float]:
    """Median milliseconds of each function; one call of each per iteration, in turn."""
    for fn in fns:
        for _ in range(warmup):
            mx.eval(fn())
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, t in zip(fns, times, strict=True):
            start = time.perf_counter()
            mx.eval(fn())
            t.append(time.perf_counter() - start)
    return [round(statistics.median(t) * 1e3, 4) for t in times]


def embedding(weight: mx.array, bits: int, group_size: int) -> nn.Module:
    module = nn.Embedding(*weight.shape)
    module.weight = weight
    return nn.QuantizedEmbedding.from_embedding(module, group_size, bits) if bits else module


def head_modules(dtype, bits: int, group_size: int):
    """hidden, centroids, the lm_head in vocab order and in centroid order, token_ordering."""
    keys = mx.random.split(mx.random.key(0), 4)
    centroids = nn.Linear(HIDDEN, CENTROIDS, bias=False)
    centroids.weight = (mx.random.normal((CENTROIDS, HIDDEN), key=keys[0]) * 0.05).astype(dtype)
    if bits:
        centroids = nn.QuantizedLinear.from_linear(centroids, group_size, bits)
    weight = (mx.random.normal((VOCAB, HIDDEN), key=keys[1]) * 0.02).astype(dtype)
    lm_head, ordered = embedding(weight, bits, group_size), embedding(weight, bits, group_size)
    order = mx.random.permutation(VOCAB, key=keys[2]).astype(mx.int32)
    ch.order_by_centroid(ordered, order)
    hidden = mx.random.normal((1, 1, HIDDEN), key=keys[3]).astype(dtype)
    mx.eval(centroids.parameters(), lm_head.parameters(), ordered.parameters(), order, hidden)
    return hidden, centroids, lm_head, ordered, order


def kernels_with_argpartition(hidden, centroids, lm_head, order):
    """The Metal path with MLX's argpartition in place of the fused top-k kernel."""
    x = hidden.reshape(1, -1)
    heads = ch.HeadInputs(ch.row_matrix(centroids), ch.row_matrix(lm_head), order, TOP_K, True)
    (scores,) = ch.run(ch.scores_launch(x, heads.centroids))
    selected = ch.top_centroids(scores, TOP_K).astype(mx.uint32)
    return ch.candidate_argmax(*ch.run(ch.logits_launch(x, heads, selected)))


def bench_head(name: str, dtype, bits: int, group_size: int, iters: int) -> dict:
    hidden, centroids, lm_head, ordered, order = head_modules(dtype, bits, group_size)

    def full():
        return mx.argmax(lm_head.as_linear(hidden), axis=-1)

    def masked(head, centroid_ordered, kernels=None):
        args = (hidden, centroids, head, order, TOP_K, centroid_ordered)
        return ch.candidate_argmax(*ch.centroid_candidates(*args, kernels=kernels))

    def portable():
        return masked(ordered, True, kernels=False)

    fns = [full, lambda: masked(ordered, True), lambda: masked(lm_head, False)]
    heads = ch.HeadInputs(ch.row_matrix(centroids), ch.row_matrix(ordered), order, TOP_K, True)
    metal = ch.use_metal(hidden.reshape(1, -1), heads, ch.head_state(centroids))
    if metal:
        fns += [portable, lambda: kernels_with_argpartition(hidden, centroids, ordered, order)]
    ms = medians(fns, iters)
    result = {
        "name": name,
        "full_ms": ms[0],
        "centroid_ms": ms[1],
        "ratio": round(ms[0] / ms[1], 2),
        "centroid_vocab_order_ms": ms[2],
        "vocab_order_ratio": round(ms[0] / ms[2], 2),
        "centroid_path": "metal" if metal else "mlx-ops",
    }
    if metal:
        result["centroid_mlx_ops_ms"] = ms[3]
        result["centroid_metal_argpartition_ms"] = ms[4]
    print(json.dumps(result), flush=True)
    return result


def drafter_model(dtype, bits: int, group_size: int):
    """An E2B-shaped drafter with random weights, its lm_head in centroid order, and the context
    its head needs to use that order: none once the drafter orders its own lm_head
    (``order_lm_head``), else ``centroid_ordered=True`` handed to ``centroid_candidates``."""
    drafter = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(E2B_ASSISTANT))
    drafter.set_dtype(dtype)
    if bits:
        nn.quantize(drafter, group_size, bits)
    me = drafter.masked_embedding
    me.token_ordering = mx.random.permutation(VOCAB, key=mx.random.key(1)).astype(mx.int32)
    drafter.eval()
    if hasattr(drafter, "order_lm_head"):
        drafter.order_lm_head()
        context = nullcontext()
    else:
        ch.order_by_centroid(drafter.model.embed_tokens, me.token_ordering)
        candidates = functools.partial(ch.centroid_candidates, centroid_ordered=True)
        context = mock.patch.object(gemma4_assistant, "centroid_candidates", candidates)
    mx.eval(drafter.parameters())
    return drafter, context


def bench_draft_step(name: str, dtype, bits: int, group_size: int, iters: int) -> dict:
    drafter, centroid_order = drafter_model(dtype, bits, group_size)
    args = drafter.args.text_args
    keys = mx.random.split(mx.random.key(2), 5)
    inputs = mx.random.normal((1, 1, 2 * drafter.args.backbone_hidden_size), key=keys[0])
    inputs = inputs.astype(dtype)
    shared_kv = {}
    for i, (kind, dim) in enumerate(
        (("sliding_attention", args.head_dim), ("full_attention", args.global_head_dim))
    ):
        shape = (1, args.num_key_value_heads, SHARED_POSITIONS, dim)
        kv = [mx.random.normal(shape, key=k).astype(dtype) for k in keys[1 + 2 * i : 3 + 2 * i]]
        shared_kv[kind] = tuple(kv)

    def backbone():
        return drafter.backbone(inputs, drafter.visible_kv(shared_kv), SHARED_POSITIONS)

    hidden = backbone()
    mx.eval(inputs, shared_kv, hidden)

    def step(full_vocab):
        out = drafter(inputs, shared_kv, SHARED_POSITIONS, full_vocab=full_vocab)
        return out.tokens(), out.hidden

    def head(full_vocab):
        logits, candidates = drafter.head(hidden, full_vocab)
        if candidates is None:
            return mx.argmax(logits, axis=-1)
        return ch.candidate_argmax(candidates, logits)

    fns = [lambda: step(False), lambda: step(True), lambda: head(False), lambda: head(True)]
    with centroid_order:
        ms = medians([*fns, backbone], iters)
    result = {
        "name": name,
        "step_masked_ms": ms[0],
        "step_full_vocab_ms": ms[1],
        "step_speedup": round(ms[1] / ms[0], 2),
        "head_masked_ms": ms[2],
        "head_full_vocab_ms": ms[3],
        "backbone_ms": ms[4],
        "head_share_masked": round(ms[2] / ms[0], 3),
        "head_share_full_vocab": round(ms[3] / ms[1], 3),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--skip-draft-step", action="store_true")
    parser.add_argument(
        "--settings", help="comma-separated subset of: " + ", ".join(s[0] for s in SETTINGS)
    )
    args = parser.parse_args()
    chosen = args.settings.split(",") if args.settings else [s[0] for s in SETTINGS]
    report = {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "machine": platform.platform(),
        "shapes": {"hidden": HIDDEN, "vocab": VOCAB, "centroids": CENTROIDS, "top_k": TOP_K},
        "iters": args.iters,
        "settings": [bench_head(*s, args.iters) for s in SETTINGS if s[0] in chosen],
    }
    if not args.skip_draft_step:
        report["draft_step"] = {
            "config": E2B_ASSISTANT["_source"],
            "weights": "random",
            "shared_kv_positions": SHARED_POSITIONS,
            "settings": [bench_draft_step(*s, args.iters) for s in STEP_SETTINGS if s[0] in chosen],
        }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
