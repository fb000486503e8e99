"""Acceptance under quantization on the fixture pair: target {float32, bf16, 8-bit, 4-bit} x
drafter {bf16, 8-bit, 4-bit}, greedy and sampled, with the tie-aware exactness contract checked.

Per cell: acceptance (accepted / drafted, pooled over prompts) and tokens per target forward
(generated tokens / target forwards, pooled), k = ``--k`` drafts per round with the constant
schedule. Quantization is mlx-lm's affine ``quantize_model`` (what ``mlx_gemma_mtp.convert -q`` and
``mlx_lm.convert -q`` run) with ``--group-size``, applied to the loaded bf16 fixture. The float32
row computes everything in float32 (the drafter's bf16 weights are exact in float32), so its bf16
drafter cell is the float32 pair.

Greedy cells are checked against mlx-lm's plain greedy decoding of the same target
(``mlx_gemma_mtp.contract``): identical, or differing only from a position where the plain run's
top two log-probabilities are within 0.25. Sampled cells have no per-token reference (lossless
sampling matches plain sampling in distribution, tested in ``tests/test_sampling.py``).

Acceptance does not depend on timing, so the numbers are the same on a loaded machine.

    python scripts/bench_quant.py                       # 20 prompts x 128 tokens (~1 h on 2 cores)
    python scripts/bench_quant.py --num-prompts 2 --max-tokens 16 --out bench_out/quant_smoke
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import quantize_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import bench_common as bc  # noqa: E402

from mlx_gemma_mtp import load  # noqa: E402
from mlx_gemma_mtp.contract import check_greedy_contract, plain_greedy  # noqa: E402
from mlx_gemma_mtp.generate import stream_generate  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "gemma4-tiny"
TARGET_PRECISIONS = ("float32", "bf16", "8bit", "4bit")
DRAFTER_PRECISIONS = ("bf16", "8bit", "4bit")


def apply_precision(model, precision: str, group_size: int) -> None:
    if precision == "float32":
        model.set_dtype(mx.float32)
    elif precision.endswith("bit"):
        quantize_model(model, {}, group_size, int(precision.removesuffix("bit")))
    elif precision != "bf16":
        raise ValueError(f"unknown precision {precision!r}")


def load_cell(target_precision: str, drafter_precision: str, group_size: int):
    target, drafter, _ = load(str(FIXTURE / "target"), str(FIXTURE / "assistant"))
    apply_precision(target.model, target_precision, group_size)
    apply_precision(drafter, drafter_precision, group_size)
    mx.eval(target.model.parameters(), drafter.parameters())
    return target, drafter


def run_cell(target, drafter, prompts, args, temp: float, plain_runs: list | None) -> dict:
    drafted = accepted = generated = forwards = 0
    identical = near_tie = violations = 0
    for i, prompt in enumerate(prompts):
        mx.random.seed(args.seed + i)
        responses = list(
            stream_generate(
                target,
                drafter,
                None,
                prompt,
                args.max_tokens,
                temp=temp,
                num_draft_tokens=args.k,
                draft_schedule="constant",
            )
        )
        last = responses[-1]
        drafted, accepted = drafted + last.drafted, accepted + last.accepted
        generated, forwards = generated + last.generation_tokens, forwards + last.target_forwards
        if plain_runs is not None:
            check = check_greedy_contract([r.token for r in responses], plain_runs[i])
            identical += check.first_difference is None
            near_tie += check.holds and check.first_difference is not None
            violations += not check.holds
    cell = {
        "acceptance": accepted / drafted if drafted else None,
        "tokens_per_target_forward": generated / forwards if forwards else None,
        "drafted": drafted,
        "accepted": accepted,
        "generated": generated,
        "target_forwards": forwards,
    }
    if plain_runs is not None:
        cell.update(identical=identical, near_tie_divergence=near_tie, violations=violations)
    return cell


def contract_text(cell: dict, num_prompts: int) -> str:
    if "identical" not in cell:
        return "n/a (sampling)"
    text = f"{cell['identical']}/{num_prompts} identical"
    if cell["near_tie_divergence"]:
        text += f", {cell['near_tie_divergence']} diverge at a near tie"
    if cell["violations"]:
        text += f", **{cell['violations']} VIOLATE**"
    return text


def report(result: dict) -> str:
    cells, n = result["cells"], result["num_prompts"]
    lines = bc.report_head("Acceptance under quantization (fixture pair)", result)
    lines += [
        "",
        f"{n} held-out prompts x {result['max_tokens']} new tokens, k = {result['k']} constant, "
        f"affine group size {result['group_size']}; acceptance = accepted / drafted and tokens per "
        "target forward = generated / target forwards, both pooled over prompts.",
        "",
    ]
    headers = ["target", "drafter", "temp", "acceptance", "tokens / target forward", "vs float32"]
    headers.append("contract vs plain greedy")
    rows = []
    for cell in cells:
        baseline = next(
            c
            for c in cells
            if c["target"] == "float32" and c["drafter"] == "bf16" and c["temp"] == cell["temp"]
        )
        ratio = cell["tokens_per_target_forward"] / baseline["tokens_per_target_forward"]
        rows.append(
            [
                cell["target"],
                cell["drafter"],
                f"{cell['temp']:g}",
                f"{cell['acceptance']:.3f}",
                f"{cell['tokens_per_target_forward']:.2f}",
                f"{ratio:.1%}",
                contract_text(cell, n),
            ]
        )
    lines.append(bc.markdown_table(headers, rows))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="drafts per round (constant schedule)")
    parser.add_argument("--temps", default="0,0.7", help="comma-separated temperatures")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    parser.add_argument("--targets", default=",".join(TARGET_PRECISIONS))
    parser.add_argument("--drafters", default=",".join(DRAFTER_PRECISIONS))
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt")
    parser.add_argument("--out", default="bench_out/quant", help="folder for the json and md")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    lines = (FIXTURE / "held_out_prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["input_ids"] for line in lines if line][: args.num_prompts]
    temps = [float(t) for t in args.temps.split(",")]
    cells = []
    for target_precision in args.targets.split(","):
        plain_runs = None
        for drafter_precision in args.drafters.split(","):
            target, drafter = load_cell(target_precision, drafter_precision, args.group_size)
            if plain_runs is None and 0.0 in temps:
                plain_runs = [plain_greedy(target.model, p, args.max_tokens) for p in prompts]
            for temp in temps:
                cell = run_cell(
                    target, drafter, prompts, args, temp, plain_runs if not temp else None
                )
                cell.update(target=target_precision, drafter=drafter_precision, temp=temp)
                cells.append(cell)
                print(json.dumps(cell), file=sys.stderr, flush=True)
    result = {
        "command": "python scripts/bench_quant.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": bc.machine_info(),
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "k": args.k,
        "group_size": args.group_size,
        "cells": cells,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quant.json").write_text(json.dumps(result, indent=2))
    text = report(result)
    (out / "bench_quant.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
