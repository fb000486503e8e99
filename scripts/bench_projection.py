"""Real-shape projection: what MTP would buy at the real Gemma 4 E2B/E4B/12B sizes on this machine.

Builds the target (mlx-lm ``gemma4_text``; the 12B ``gemma4_unified_text`` is the same model) and
its assistant drafter at the published config sizes
(``scripts/real_configs/``) with random weights, fills the target cache with ``--context`` random
K/V entries, and times one target forward on 1 and on k+1 tokens and one draft step (with and
without centroid masking), in bf16 and with 4-bit weights. From those it computes the ideal
speedup over plain decoding,

    ideal = E[tokens per round] x t_target(1) / (t_target(k+1) + k t_draft),

at the acceptance measured on the fixture pair (``--acceptance-json``, written by bench_mtp.py)
and at third-party published ones (``real_configs/published_acceptance.json``).

Weights never exist in float32 at full size: every tensor is written directly in its final
dtype (or as packed 4-bit words), one at a time. Values are random; only the cost matters.

    python scripts/bench_projection.py                       # E2B and E4B, bf16 and 4-bit
    python scripts/bench_projection.py --models e2b --precisions bf16 --iters 2
    python scripts/bench_projection.py --models 12b --precisions q4   # bf16 12B needs ~24 GiB
"""

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import gemma4_text

from mlx_gemma_mtp import benchmarks as bc  # noqa: E402
from mlx_gemma_mtp.config import normalize_text_config  # noqa: E402
from mlx_gemma_mtp.engine.loop import SpeculativeGenerator  # noqa: E402
from mlx_gemma_mtp.models import gemma4_assistant  # noqa: E402
from mlx_gemma_mtp.models.target import Target  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "real_configs"
MODELS = {"e2b": "gemma-4-E2B-it", "e4b": "gemma-4-E4B-it", "12b": "gemma-4-12B-it"}
POOL_SIZE = 1 << 22
MEMORY_SHARE = 0.6
# The draft-step timing the ideal-speedup tables use, best first.
DRAFT_HEADS = ("centroid_compiled", "centroid", "full_vocab_compiled", "full_vocab")


def read_config(name: str) -> dict:
    config = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


class Precision:
    """``bf16``: every float in bfloat16. ``q4``/``q8``: affine-quantized weights (group 64) with
    ``act_dtype`` activations, scales and norms (float32 is by far the fastest on CPU)."""

    def __init__(self, name: str, act_dtype: str = "float32", group_size: int = 64):
        self.name = name
        if name in ("bf16", "fp16", "fp32"):
            self.bits = None
            self.dtype = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}[name]
        elif name in ("q4", "q8"):
            self.bits = int(name[1:])
            self.dtype = getattr(mx, act_dtype)
        else:
            raise ValueError(f"unknown precision {name!r} (bf16, fp16, fp32, q4, q8)")
        self.group_size = group_size

    def quantize(self, model: nn.Module) -> None:
        if self.bits is not None:
            nn.quantize(
                model,
                group_size=self.group_size,
                bits=self.bits,
                class_predicate=lambda _, m: (
                    hasattr(m, "to_quantized") and m.weight.shape[-1] % self.group_size == 0
                ),
            )

    def embedding(self, rows: int, dims: int) -> nn.Module:
        if self.bits is None:
            return nn.Embedding(rows, dims)
        return nn.QuantizedEmbedding(rows, dims, group_size=self.group_size, bits=self.bits)


def planned_bytes(model: nn.Module, precision: Precision) -> int:
    """Bytes the parameters will take once written in their final dtype."""
    total = 0
    for _, p in tree_flatten(model.parameters()):
        itemsize = precision.dtype.size if mx.issubdtype(p.dtype, mx.floating) else p.dtype.size
        total += p.size * itemsize
    return total


def filled(shape: tuple, pool: mx.array, scale: float) -> mx.array:
    """A fresh array of ``shape`` made from ``pool`` (never a view of it: weights that alias one
    small buffer would sit in cache and time unrealistically fast)."""
    n = math.prod(shape)
    if n <= pool.size:
        offset = int(scale * 1e6) % (pool.size - n + 1)
        return (pool[offset : offset + n] * scale).reshape(shape)
    cols = shape[-1]
    rows = n // cols
    block_rows = max(1, pool.size // cols)
    block = pool[: block_rows * cols].reshape(block_rows, cols) * scale
    return mx.tile(block, (-(-rows // block_rows), 1))[:rows].reshape(shape)


def randomize(model: nn.Module, precision: Precision, seed: int) -> None:
    """Replace every parameter by random values in its final dtype, evaluating one at a time."""
    mx.random.seed(seed)
    normal = mx.random.normal((POOL_SIZE,), dtype=precision.dtype)
    bits = mx.random.randint(0, 2**31 - 1, (POOL_SIZE,)).astype(mx.uint32)
    mx.eval(normal, bits)
    new = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        if name.endswith("token_ordering"):
            value = mx.random.permutation(p.shape[0]).astype(mx.int32)
        elif p.dtype == mx.uint32:
            value = filled(p.shape, bits, 1)
        elif name.endswith(".scales"):
            value = mx.full(p.shape, 0.003, precision.dtype)
        elif name.endswith(".biases"):
            value = mx.full(p.shape, -0.024, precision.dtype)
        elif p.ndim >= 2:
            value = filled(p.shape, normal, 0.02 * (1 + (i % 7) / 10))
        else:  # norms and layer scalars keep their initial values
            value = p.astype(precision.dtype)
        mx.eval(value)
        new.append((name, value))
    model.update(tree_unflatten(new))
    del new, normal, bits
    gc.collect()


def build_target(config: dict, precision: Precision, ple_rows: str, seed: int) -> tuple:
    """``(Target, info)``; the per-layer embedding table is cut to fewer rows when it would not
    fit in memory (a row lookup costs the same; ``info`` records it)."""
    text = normalize_text_config(config)
    model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(text))
    precision.quantize(model)
    full_bytes = planned_bytes(model, precision)
    backbone = model.model
    ple = backbone.embed_tokens_per_layer
    rows = None
    if ple is not None:
        ple_rows_full = text["vocab_size_per_layer_input"]
        ple_dims = text["num_hidden_layers"] * text["hidden_size_per_layer_input"]
        if ple_rows == "auto":
            available = bc.available_memory_bytes()
            # Leave room for the other processes of a shared machine.
            if available is not None and full_bytes > MEMORY_SHARE * available:
                rows = 32768
        elif ple_rows != "full":
            rows = int(ple_rows)
        if rows is not None and rows < ple_rows_full:
            backbone.embed_tokens_per_layer = precision.embedding(rows, ple_dims)
    randomize(model, precision, seed)
    info = {
        "params_bytes_full_size": full_bytes,
        "params_bytes_built": planned_bytes(model, precision),
        "ple_rows": rows if rows is not None else text.get("vocab_size_per_layer_input"),
        "ple_truncated": rows is not None,
        "token_id_limit": min(rows or text["vocab_size"], text["vocab_size"]),
    }
    return Target(model), info


def build_drafter(config: dict, precision: Precision, seed: int) -> tuple:
    model = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(config))
    precision.quantize(model)
    randomize(model, precision, seed)
    model.eval()
    return model, {"params_bytes": planned_bytes(model, precision)}


def prefill_cache(target: Target, context: int, dtype: mx.Dtype, seed: int) -> list:
    """The target cache after ``context`` positions, with random K/V (a real prefill of 1k
    tokens at these sizes takes minutes on a CPU and changes none of the costs measured)."""
    mx.random.seed(seed)
    cache = target.make_cache()
    layers = target.backbone.layers
    for layer_cache, layer in zip(cache, layers, strict=False):
        attn = layer.self_attn
        shape = (1, attn.n_kv_heads, context, attn.head_dim)
        keys = mx.random.normal(shape, dtype=dtype)
        values = mx.random.normal(shape, dtype=dtype)
        mx.eval(layer_cache.update_and_fetch(keys, values))
    return cache


# The draft step's history (logits processors) and random key, unused by a greedy policy.
NO_HISTORY, NO_KEY = mx.array(0), mx.array(0)


def measure_pair(
    target: Target,
    drafter: nn.Module,
    cache: list,
    lengths: list[int],
    iters: int,
    warmup: int,
    token_limit: int,
    dtype: mx.Dtype,
) -> dict:
    """Seconds per target forward on each of ``lengths`` tokens and per draft step. The
    lengths are measured round-robin, so load from other processes spreads over all of them."""
    forwards = {}
    for length in lengths:
        tokens = mx.random.randint(0, token_limit, (1, length))

        def forward(tokens=tokens, length=length):
            start = time.perf_counter()
            out = target(tokens, cache)
            mx.eval(mx.argmax(out.logits, axis=-1), out.hidden)
            elapsed = time.perf_counter() - start
            for layer_cache in cache:
                layer_cache.trim(length)
            return elapsed

        forwards[length] = forward
    # Warm-up (the first call after the prefill reallocates the sliding caches; CPU kernels
    # are not specialised per shape).
    for _ in range(warmup):
        forwards[lengths[0]]()
    samples = {length: [] for length in lengths}
    for _ in range(iters):
        for length in lengths:
            samples[length].append(forwards[length]())
    t_target = {length: bc.summarize(samples[length]) for length in lengths}
    position = cache[0].offset
    ordered = target.shared_kv(cache)
    buffers, first_positions = target.shared_kv_buffers(cache)
    masks = drafter.visibility_masks(buffers, first_positions, mx.array(position))
    token = mx.random.randint(0, token_limit, (1,))
    hidden = mx.random.normal((1, 1, target.hidden_size), dtype=dtype)
    mx.eval(ordered, masks, token, hidden)
    t_draft = {}
    modes = {"centroid": False, "full_vocab": True}
    if not drafter.args.use_ordered_embeddings:
        modes = {"full_vocab": True}
    for mode, full_vocab in modes.items():
        # The engine's own draft step: eager on the ordered K/V (any drafter, logits
        # processors), and compiled over the cache buffers with masks (the pipelined loop).
        engine = SpeculativeGenerator(target, drafter, full_vocab_draft=full_vocab)
        calls = {
            "": lambda e=engine: e._draft_step(
                token, hidden, ordered, None, position, NO_HISTORY, NO_KEY, NO_KEY
            ),
            "_compiled": lambda e=engine: e._compiled_step(
                token, hidden, buffers, masks, mx.array(position), NO_HISTORY, NO_KEY, NO_KEY
            ),
        }
        for suffix, call in calls.items():
            t_draft[mode + suffix] = bc.time_calls(
                lambda call=call: mx.eval(call()), iters * 3, warmup + 1
            )
    return {"t_target": t_target, "t_draft": t_draft}


def linear_fit(t_target: dict) -> dict:
    """Least-squares t(L) = fixed + per_token x L over the medians."""
    xs = list(t_target)
    ys = [t_target[x]["median"] for x in xs]
    if len(xs) < 2:
        return {"fixed": None, "per_token": None}
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return {"fixed": mean_y - slope * mean_x, "per_token": slope}


def acceptance_scenarios(acceptance_json: str | None) -> list[dict]:
    """Each scenario: a name and E[tokens per round] as a function of k."""
    scenarios = []
    if acceptance_json:
        measured = json.loads(Path(acceptance_json).read_text())
        per_k = measured.get("tokens_per_round_by_k", {})
        if per_k:
            scenarios.append(
                {
                    "name": "fixture pair, measured (bench_mtp.py, greedy)",
                    "tokens_per_round": {int(k): v for k, v in per_k.items()},
                }
            )
    published = json.loads((CONFIG_DIR / "published_acceptance.json").read_text())
    for entry in published["scenarios"]:
        alpha = bc.alpha_from_tokens_per_round(entry["acceptance_length"], entry["k"])
        scenarios.append(
            {
                "name": f"{entry['name']} (alpha {alpha:.3f})",
                "alpha": alpha,
                "tokens_per_round": {k: bc.tokens_per_round(alpha, k) for k in range(1, 9)},
            }
        )
    return scenarios


def project(arm: dict, ks: list[int], scenarios: list[dict]) -> list[dict]:
    t_one = arm["t_target"][1]["median"]
    rows = []
    for k in ks:
        t_verify = arm["t_target"][k + 1]["median"]
        for mode, t_draft in arm["t_draft"].items():
            for scenario in scenarios:
                tokens = scenario["tokens_per_round"].get(k)
                if tokens is None:
                    continue
                rows.append(
                    {
                        "k": k,
                        "draft_head": mode,
                        "scenario": scenario["name"],
                        "tokens_per_round": tokens,
                        "ideal_speedup": bc.ideal_speedup(
                            tokens, t_one, t_verify, k, t_draft["median"]
                        ),
                    }
                )
    return rows


def run_arm(model_key: str, precision: Precision, args) -> dict:
    name = MODELS.get(model_key, model_key)
    mx.reset_peak_memory()
    target, target_info = build_target(read_config(name), precision, args.ple_rows, args.seed)
    drafter, drafter_info = build_drafter(
        read_config(f"{name}-assistant"), precision, args.seed + 1
    )
    cache = prefill_cache(target, args.context, precision.dtype, args.seed + 2)
    lengths = sorted({1, *(k + 1 for k in args.ks)})
    timings = measure_pair(
        target,
        drafter,
        cache,
        lengths,
        args.iters,
        args.warmup,
        target_info["token_id_limit"],
        precision.dtype,
    )
    arm = {
        "model": name,
        "precision": precision.name,
        "activation_dtype": str(precision.dtype),
        "context": args.context,
        "target": target_info,
        "drafter": drafter_info,
        "peak_memory_bytes": mx.get_peak_memory(),
        **timings,
        "t_target_fit": linear_fit(timings["t_target"]),
    }
    del target, drafter, cache
    gc.collect()
    mx.clear_cache()
    return arm


def report(result: dict) -> str:
    lines = [
        *bc.report_head("Real-shape projection (random weights at the published sizes)", result),
        f"Context: {result['context']} cached positions; {result['iters']} timed calls per "
        "figure after one warm-up (median [min-max]; draft steps 3x as many). "
        "Weights are random; a row lookup costs the same in a cut per-layer embedding table.",
        "",
    ]
    headers = ["model", "precision", "t_target(1) ms"]
    headers += [f"t_target({k + 1}) ms" for k in result["ks"]]
    headers += [
        "t(L) fixed + per token ms",
        "t_draft centroid ms (compiled)",
        "t_draft full ms (compiled)",
        "weights",
    ]
    rows = []
    for arm in result["arms"]:
        fit = arm["t_target_fit"]
        t_draft = arm["t_draft"]
        row = [arm["model"], arm["precision"], bc.spread(arm["t_target"][1], 1e3)]
        row += [bc.spread(arm["t_target"][k + 1], 1e3) for k in result["ks"]]
        row += [
            f"{fit['fixed'] * 1e3:.1f} + {fit['per_token'] * 1e3:.1f} L"
            if fit["per_token"] is not None
            else "-",
            f"{bc.spread(t_draft.get('centroid'), 1e3, 2)} "
            f"({bc.spread(t_draft.get('centroid_compiled'), 1e3, 2)})",
            f"{bc.spread(t_draft.get('full_vocab'), 1e3, 2)} "
            f"({bc.spread(t_draft.get('full_vocab_compiled'), 1e3, 2)})",
            f"{arm['target']['params_bytes_full_size'] / 2**30:.2f} GiB + "
            f"{arm['drafter']['params_bytes'] / 2**20:.0f} MiB"
            + (
                f" (PLE cut to {arm['target']['ple_rows']} rows)"
                if arm["target"]["ple_truncated"]
                else ""
            ),
        ]
        rows.append(row)
    lines += [bc.markdown_table(headers, rows), ""]
    lines += [
        "Ideal speedup over plain decoding (centroid-masked draft head, draft step under "
        "mx.compile):",
        "",
    ]
    scenarios = sorted({p["scenario"] for arm in result["arms"] for p in arm["projection"]})
    headers = ["model", "precision", "acceptance"] + [f"k={k}" for k in result["ks"]] + ["best"]
    rows = []
    for arm in result["arms"]:
        head = next(m for m in DRAFT_HEADS if m in arm["t_draft"])
        for scenario in scenarios:
            ideal = {
                p["k"]: p["ideal_speedup"]
                for p in arm["projection"]
                if p["scenario"] == scenario and p["draft_head"] == head
            }
            if not ideal:
                continue
            best = max(ideal, key=ideal.get)
            rows.append(
                [arm["model"], arm["precision"], scenario]
                + [f"{ideal[k]:.2f}" if k in ideal else "-" for k in result["ks"]]
                + [f"{ideal[best]:.2f}x at k={best}"]
            )
    lines += [bc.markdown_table(headers, rows), ""]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default="e2b,e4b",
        help="comma list of e2b, e4b, 12b, or NAME for NAME.json + NAME-assistant.json in "
        "--config-dir",
    )
    parser.add_argument("--precisions", default="bf16,q4", help="comma list: bf16 fp16 fp32 q4 q8")
    parser.add_argument("--ks", default="1,2,4", help="draft lengths k (times t_target(k+1))")
    parser.add_argument("--context", type=int, default=1024, help="cached positions")
    parser.add_argument("--iters", type=int, default=2, help="timed calls per figure")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--ple-rows",
        default="auto",
        help="rows of the per-layer embedding table: full, auto (cut to 32768 when the model "
        "would take more than 60%% of the available memory) or a number",
    )
    parser.add_argument(
        "--q-act-dtype", default="float32", help="activation dtype for q4/q8 (float32 is fastest)"
    )
    parser.add_argument(
        "--acceptance-json", default=None, help="bench_mtp.py JSON with measured acceptance"
    )
    parser.add_argument(
        "--config-dir", default=None, help="folder of config JSONs (default scripts/real_configs)"
    )
    parser.add_argument("--out", default="bench_out", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    return args


def main(argv=None) -> dict:
    global CONFIG_DIR
    args = parse_args(argv)
    if args.config_dir:
        CONFIG_DIR = Path(args.config_dir)
    scenarios = acceptance_scenarios(args.acceptance_json)
    result = {
        "machine": bc.machine_info(),
        "command": "python scripts/bench_projection.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "context": args.context,
        "iters": args.iters,
        "ks": args.ks,
        "scenarios": scenarios,
        "arms": [],
    }
    for model_key in args.models.split(","):
        for precision_name in args.precisions.split(","):
            precision = Precision(precision_name, args.q_act_dtype)
            print(
                f"[projection] {MODELS.get(model_key, model_key)} {precision_name} ...", flush=True
            )
            arm = run_arm(model_key, precision, args)
            arm["projection"] = project(arm, args.ks, scenarios)
            result["arms"].append(arm)
            t = arm["t_target"]
            print(
                f"[projection]   t_target(1) {t[1]['median'] * 1e3:.1f} ms, "
                + ", ".join(f"t({k + 1}) {t[k + 1]['median'] * 1e3:.1f}" for k in args.ks)
                + ", draft "
                + ", ".join(f"{m} {s['median'] * 1e3:.2f}" for m, s in arm["t_draft"].items())
                + " ms",
                flush=True,
            )
    bc.write_results(Path(args.out), "projection", result, report(result))
    return result


if __name__ == "__main__":
    main()
