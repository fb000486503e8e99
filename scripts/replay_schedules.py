"""Replay draft schedules offline, with the machine's noise taken out.

Greedy decoding is deterministic, so how many of ``k`` drafts a round accepts depends only on the
position the round starts from. For each prompt this script computes, once, the target's greedy
continuation and, at every position of it, how many of ``k_max`` drafts a round starting there
accepts (for ``k`` drafts: the smaller of that and ``k``). Then it replays each schedule over
those positions: ``constant`` ``k`` and ``auto`` (the engine's own ``DraftController``, carrying
its round times and acceptance from prompt to prompt as the engine does), every round costing
the same seconds per ``k`` for every schedule (``--round-ms``, e.g. the medians a benchmark
measured, or the pair's calibrated costs), with the same random jitter (``--noise``). A
difference between two rows is the schedules' choices, not the machine's spells: on this CPU,
identical work runs 0.7-1.3x of its neighbour within one benchmark.

    python scripts/replay_schedules.py --round-ms 9.9,15.7,21.6,19.7,25.6,26.4,29.7
"""

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]

from mlx_gemma_mtp import benchmarks as bc  # noqa: E402
from mlx_gemma_mtp.benchmarks import FIXTURE, long_prompts, read_prompts  # noqa: E402
from mlx_gemma_mtp.costs import Costs  # noqa: E402
from mlx_gemma_mtp.engine.loop import (  # noqa: E402
    AutoSchedule,
    DraftSchedule,
    SpeculativeGenerator,
    fresh_followed,
)
from mlx_gemma_mtp.loading import load  # noqa: E402

# -- what every position accepts ----------------------------------------------------------------


def greedy_tokens(target, drafter, prompt: list[int], max_tokens: int, k_max: int) -> list[int]:
    engine = SpeculativeGenerator(
        target, drafter, num_draft_tokens=k_max, draft_schedule="constant"
    )
    return [t for block in engine.generate(mx.array(prompt), max_tokens) for t in block.tokens]


def accepted_from(target, drafter, context: list[int], k_max: int) -> tuple[int, int]:
    """The first token after ``context`` and how many of ``k_max`` drafts after it are accepted
    (one prefill and one round of the engine)."""
    engine = SpeculativeGenerator(
        target, drafter, num_draft_tokens=k_max, draft_schedule="constant"
    )
    blocks = engine.generate(mx.array(context), k_max + 2)
    first, round_ = next(blocks), next(blocks)
    blocks.close()
    return first.tokens[0], round_.num_from_draft


def acceptance_lengths(target, drafter, prompt: list[int], max_tokens: int, k_max: int) -> dict:
    """``accepted[j]``: drafts accepted by a round whose pending token is the ``j``-th generated
    one. ``mismatches``: positions whose prefill gave another token than the continuation (a
    rounding difference between a prefill and a verification; expected to be 0)."""
    tokens = greedy_tokens(target, drafter, prompt, max_tokens, k_max)
    accepted, mismatches = [], 0
    for j in range(len(tokens)):
        first, n = accepted_from(target, drafter, prompt + tokens[:j], k_max)
        mismatches += first != tokens[j]
        accepted.append(n)
    return {"tokens": tokens, "accepted": accepted, "mismatches": mismatches}


# -- replaying schedules ------------------------------------------------------------------------


def replay(
    accepted: Sequence[Sequence[int]],
    make_schedule: Callable[[], object],
    round_seconds: Sequence[float],
    noise: float = 0.0,
    seed: int = 0,
) -> dict:
    """Tokens and seconds of one schedule over every prompt's ``accepted`` list (one generation
    each), a round of ``k`` drafts costing ``round_seconds[k]`` times a log-normal jitter of
    sigma ``noise``. As the engine's pipelined loop runs it: the first token comes from the
    prefill (not timed); the next round's ``k`` is chosen before this round is read (so within
    the tokens left before it), then cut to the tokens left; a round emits
    ``min(accepted, k) + 1``. Unlike the engine, every round is timed (it leaves the first plain
    step after a round untimed)."""
    rng = random.Random(seed)
    rates, rounds, histogram, total_tokens, total_seconds = [], [], {}, 0, 0.0
    for per_position in accepted:
        schedule = make_schedule()
        remaining = len(per_position)  # tokens to emit, the prefill's first one included
        chosen = schedule.choose(remaining - 2)
        remaining -= 1
        position, seconds, ns = 0, 0.0, []
        while remaining > 0:
            k = min(chosen, remaining - 1)
            n = min(per_position[position], k)
            chosen = schedule.choose(remaining - 2)
            cost = round_seconds[k] * (rng.lognormvariate(0.0, noise) if noise else 1.0)
            schedule.observe(k, n, cost)
            histogram[k] = histogram.get(k, 0) + 1
            ns.append(n)
            position, seconds, remaining = position + n + 1, seconds + cost, remaining - n - 1
        rates.append(position / seconds)
        rounds.append(ns)
        total_tokens, total_seconds = total_tokens + position, total_seconds + seconds
    return {
        "tokens_per_s": total_tokens / total_seconds,
        "per_prompt": rates,
        "accepted": rounds,
        "k_histogram": dict(sorted(histogram.items())),
    }


def auto_factory(calibration: Costs, k_max: int) -> Callable[[], AutoSchedule]:
    """``auto`` as the engine runs it greedily: round times and acceptance carried from one
    generation of the pair to the next."""
    followed = fresh_followed(calibration, k_max)
    return lambda: AutoSchedule(calibration, k_max, **followed)


def compare(
    accepted: Sequence[Sequence[int]],
    calibration: Costs,
    round_seconds: Sequence[float],
    k_max: int,
    noise: float,
    seeds: int,
) -> list[dict]:
    """One row per schedule: speedup over plain steps (``round_seconds[0]`` a token), in total
    and per prompt (median), medians over ``seeds`` jitters."""
    arms = {
        f"constant k={k}": (lambda k=k: DraftSchedule(k, "constant")) for k in range(1, k_max + 1)
    }
    rows = []
    for name in [*arms, "auto"]:
        runs = []
        for seed in range(seeds):
            make = auto_factory(calibration, k_max) if name == "auto" else arms[name]
            runs.append(replay(accepted, make, round_seconds, noise, seed))
        plain = 1.0 / round_seconds[0]
        rows.append(
            {
                "schedule": name,
                "total": statistics.median(r["tokens_per_s"] / plain for r in runs),
                "per_prompt": statistics.median(
                    statistics.median(r["per_prompt"]) / plain for r in runs
                ),
                "k_histogram": runs[0]["k_histogram"],
            }
        )
    best = max((r for r in rows if r["schedule"] != "auto"), key=lambda r: r["total"])
    for row in rows:
        row["vs_best_constant"] = row["total"] / best["total"]
    return rows


def report(result: dict) -> str:
    lines = bc.report_head("Draft schedules replayed offline", result) + [
        f"Pair: `{result['model']}` + `{result['draft_model']}` ({result['dtype']}); "
        f"{result['prompts']} prompts, {result['max_tokens']} greedy tokens each, "
        f"{result['mismatches']} prefill/continuation mismatches.",
        "Round times (ms, k = 0..): "
        + ", ".join(f"{1e3 * s:.2f}" for s in result["round_seconds"])
        + f" ({result['round_source']}); jitter sigma {result['noise']}, "
        f"medians over {result['seeds']} seeds. speedup: tokens/s over plain steps.",
        "",
    ]
    headers = ["schedule", "speedup (total)", "per prompt (median)", "vs best constant", "k hist"]
    rows = [
        [r["schedule"], *(f"{r[key]:.3f}" for key in KEYS), str(r["k_histogram"])]
        for r in result["rows"]
    ]
    return "\n".join([*lines, bc.markdown_table(headers, rows)]) + "\n"


KEYS = ("total", "per_prompt", "vs_best_constant")


# -- the command ----------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(FIXTURE / "target"))
    parser.add_argument("--draft-model", default=str(FIXTURE / "assistant"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", default=str(FIXTURE / "held_out_prompts.jsonl"))
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--long-prompts", type=int, default=4)
    parser.add_argument("--long-length", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k-max", type=int, default=6)
    parser.add_argument(
        "--round-ms",
        default=None,
        help="comma-separated ms per round of k = 0..k_max drafts (default: the calibrated costs)",
    )
    parser.add_argument("--noise", type=float, default=0.1, help="log-normal sigma per round")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--acceptance-json",
        default=None,
        help="read the per-position acceptance from this file if it exists, else write it there",
    )
    parser.add_argument("--out", default="bench_out")
    return parser.parse_args(argv)


def calibrated_costs(target, drafter, prompt: list[int], k_max: int) -> Costs:
    """The costs ``auto`` would start from: cached for this pair and machine, or measured now."""
    engine = SpeculativeGenerator(target, drafter, num_draft_tokens=k_max)
    for _ in engine.generate(mx.array(prompt), 2):
        pass
    return engine.costs


def main(argv=None) -> dict:
    args = parse_args(argv)
    target, drafter, _ = load(args.model, args.draft_model, dtype=args.dtype)
    prompts = read_prompts(Path(args.prompts), args.num_prompts)
    prompts += long_prompts(prompts, args.long_prompts, args.long_length)
    cached = Path(args.acceptance_json) if args.acceptance_json else None
    if cached and cached.exists():
        lengths = json.loads(cached.read_text())
    else:
        start, lengths = time.perf_counter(), []
        for i, prompt in enumerate(prompts):
            lengths.append(acceptance_lengths(target, drafter, prompt, args.max_tokens, args.k_max))
            print(f"[replay] prompt {i + 1}/{len(prompts)} ({time.perf_counter() - start:.0f} s)")
        if cached:
            cached.write_text(json.dumps(lengths))
    calibration = calibrated_costs(target, drafter, prompts[0], args.k_max)
    if args.round_ms:
        round_seconds = [float(v) / 1e3 for v in args.round_ms.split(",")]
        if len(round_seconds) != args.k_max + 1:
            raise SystemExit(f"--round-ms: {args.k_max + 1} values (k = 0..{args.k_max}) expected")
        source = "given"
    else:
        round_seconds = [calibration.round_seconds(k) for k in range(args.k_max + 1)]
        source = "the pair's calibrated costs"
    accepted = [entry["accepted"] for entry in lengths]
    rows = compare(accepted, calibration, round_seconds, args.k_max, args.noise, args.seeds)
    result = {
        "machine": bc.machine_info(),
        "command": " ".join(
            ["python scripts/replay_schedules.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "model": args.model,
        "draft_model": args.draft_model,
        "dtype": args.dtype,
        "prompts": len(lengths),
        "max_tokens": args.max_tokens,
        "mismatches": sum(entry["mismatches"] for entry in lengths),
        "round_seconds": round_seconds,
        "round_source": source,
        "noise": args.noise,
        "seeds": args.seeds,
        "rows": rows,
    }
    bc.write_results(Path(args.out), "replay_schedules", result, report(result))
    return result


if __name__ == "__main__":
    main()
