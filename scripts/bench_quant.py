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

Rows can run as separate processes (``--targets 4bit``) and be joined into one table with
``--combine``, which reads their ``bench_quant.json`` files or the per-cell JSON lines each run
prints to stderr as it goes (a run stopped early keeps the cells it finished):

    python scripts/bench_quant.py --combine a/bench_quant.json b.log --out bench_out/quant
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import quantize_model

ROOT = Path(__file__).resolve().parents[1]

from mlx_gemma_mtp import benchmarks as bc  # noqa: E402
from mlx_gemma_mtp import load  # noqa: E402
from mlx_gemma_mtp.benchmarks import FIXTURE  # noqa: E402
from mlx_gemma_mtp.contract import (  # noqa: E402
    check_greedy_contract,
    full_forward_prefers,
    plain_greedy,
)
from mlx_gemma_mtp.generation import stream_generate  # noqa: E402

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
    identical = near_tie = 0
    violations = []
    for i, prompt in enumerate(prompts):
        mx.random.seed(args.seed + i)
        responses = list(
            stream_generate(
                target,
                None,
                prompt,
                args.max_tokens,
                drafter,
                temp=temp,
                num_draft_tokens=args.k,
                draft_schedule="constant",
            )
        )
        last = responses[-1]
        drafted, accepted = drafted + last.drafted, accepted + last.accepted
        generated, forwards = generated + last.generation_tokens, forwards + last.target_forwards
        if plain_runs is not None:
            tokens = [r.token for r in responses]
            check = check_greedy_contract(tokens, plain_runs[i])
            identical += check.first_difference is None
            near_tie += check.holds and check.first_difference is not None
            if not check.holds:
                violations.append(violation(target, prompt, tokens, plain_runs[i], i, check))
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


def violation(target, prompt, tokens, plain_steps, index, check) -> dict:
    """Where a greedy run left the contract, and whether the target's own full forward over
    that prefix agrees with MTP's token (rounding between forward paths, not a drafting bug)."""
    plain_tokens = [int(t) for t, _ in plain_steps]
    position = check.first_difference
    ours = tokens[position]
    return {
        "prompt": index,
        "position": position,
        "top2_gap": check.top2_gap,
        "full_forward_prefers_ours": full_forward_prefers(
            target.model, prompt, plain_tokens, position, ours
        ),
    }


def contract_text(cell: dict, num_prompts: int) -> str:
    if "identical" not in cell:
        return "n/a (sampling)"
    text = f"{cell['identical']}/{num_prompts} identical"
    if cell["near_tie_divergence"]:
        text += f", {cell['near_tie_divergence']} diverge at a near tie"
    violations = cell["violations"]
    if isinstance(violations, int):  # logged by a run that only counted them
        violations = [None] * violations
    for v in violations:
        text += ", **1 beyond the near-tie bound**"
        if v is not None:
            text += f" (prompt {v['prompt']}, token {v['position']}, gap {v['top2_gap']:.3f}"
            agrees = v["full_forward_prefers_ours"]
            text += "; the target's full forward agrees with MTP)" if agrees else ")"
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
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="FILE",
        help="join finished runs (bench_quant.json files or their stderr logs) into one report",
    )
    return parser.parse_args(argv)


def read_cells(path: Path) -> tuple[list[dict], dict]:
    """Cells and settings of a ``bench_quant.json``, or the cells in a run's stderr log."""
    text = path.read_text()
    if path.suffix == ".json":
        result = json.loads(text)
        return result["cells"], {k: v for k, v in result.items() if k != "cells"}
    cells = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return cells, {}


def combine(paths: list[str], args) -> dict:
    """One report from several runs of the same settings (``args`` give those of logs)."""
    cells, settings = [], []
    for path in paths:
        found, run_settings = read_cells(Path(path))
        cells += found
        settings.append(run_settings)
    keys = ("num_prompts", "max_tokens", "k", "group_size")
    expected = {"num_prompts": args.num_prompts, "max_tokens": args.max_tokens}
    expected.update(k=args.k, group_size=args.group_size)
    for run_settings in settings:
        if run_settings and any(run_settings[key] != expected[key] for key in keys):
            raise SystemExit(f"--combine: runs with different settings ({run_settings})")
    seen = [(c["target"], c["drafter"], c["temp"]) for c in cells]
    if len(seen) != len(set(seen)):
        raise SystemExit("--combine: a cell appears twice")
    order = {p: i for i, p in enumerate(TARGET_PRECISIONS + DRAFTER_PRECISIONS)}
    cells.sort(key=lambda c: (order[c["target"]], order[c["drafter"]], c["temp"]))
    return {**expected, "cells": cells, "combined_from": paths}


def main(argv=None) -> dict:
    args = parse_args(argv)
    command_args = sys.argv[1:] if argv is None else argv
    command = " ".join(["python scripts/bench_quant.py", *command_args])
    if args.combine:
        result = {"command": command, "machine": bc.machine_info(), **combine(args.combine, args)}
        return write_report(result, Path(args.out))
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
                reference = plain_runs if temp == 0 else None
                cell = run_cell(target, drafter, prompts, args, temp, reference)
                cell.update(target=target_precision, drafter=drafter_precision, temp=temp)
                cells.append(cell)
                print(json.dumps(cell), file=sys.stderr, flush=True)
    result = {
        "command": command,
        "machine": bc.machine_info(),
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "k": args.k,
        "group_size": args.group_size,
        "cells": cells,
    }
    return write_report(result, Path(args.out))


def write_report(result: dict, out: Path) -> dict:
    bc.write_results(out, "bench_quant", result, report(result))
    return result


if __name__ == "__main__":
    main()
