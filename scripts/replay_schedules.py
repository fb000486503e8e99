"""Replay draft schedules offline, with the machine's noise taken out.

Greedy decoding is deterministic, and so is coupled sampling with a seed (every position's draw
is fixed by the seed and the position, whatever the rounds), so how many of ``k`` drafts a round
accepts depends only on the position the round starts from. For each prompt this script
computes, once, the target's continuation (greedy, or sampled with ``--temp``/``--top-p`` and
``--seed``) and, at every position of it, how many of ``k_max`` drafts a round starting there
accepts (for ``k`` drafts: the smaller of that and ``k``). Then it replays each schedule over
those positions: ``constant`` ``k`` and ``auto`` (the engine's own ``DraftController``, carrying
its round times and acceptance from prompt to prompt as the engine does), every round costing
the same seconds per ``k`` for every schedule (``--round-ms``, e.g. the medians a benchmark
measured, or the pair's calibrated costs), with the same random jitter (``--noise``). A
difference between two rows is the schedules' choices, not the machine's spells: on this CPU,
identical work runs 0.7-1.3x of its neighbour within one benchmark.

    python scripts/replay_schedules.py --round-ms 9.9,15.7,21.6,19.7,25.6,26.4,29.7
    python scripts/replay_schedules.py --temp 0.7 --top-p 0.95 --round-ms 12.6,21.1,29.7,...
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]

from mlx_gemma_mtp import benchmarks as bc  # noqa: E402
from mlx_gemma_mtp.benchmarks import (  # noqa: E402
    FIXTURE,
    SPELL_TOKENS,
    long_prompts,
    read_prompts,
    replay,
)
from mlx_gemma_mtp.costs import Costs  # noqa: E402
from mlx_gemma_mtp.engine.loop import (  # noqa: E402
    AutoSchedule,
    DraftSchedule,
    SpeculativeGenerator,
    draft_slack,
    fresh_followed,
)
from mlx_gemma_mtp.engine.sampling import TokenPolicy  # noqa: E402
from mlx_gemma_mtp.generation import make_policy  # noqa: E402
from mlx_gemma_mtp.loading import load  # noqa: E402

# -- what every position accepts ----------------------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """How tokens are picked: greedy (``temp`` 0) or coupled sampling with this ``seed``, which
    every engine of one generation starts from (its noise is the seed's, at each position)."""

    temp: float = 0.0
    top_p: float = 0.0
    seed: int = 0

    def policy(self) -> TokenPolicy | None:
        return make_policy(temp=self.temp, top_p=self.top_p) if self.temp else None


def make_engine(
    target, drafter, decoding: Decoding, k_max: int, cache: list | None = None
) -> SpeculativeGenerator:
    """An engine drafting ``k_max`` every round; it takes its sampling seed from MLX's random
    state, so seeding it here gives every engine of a generation the same noise."""
    mx.random.seed(decoding.seed)
    return SpeculativeGenerator(
        target,
        drafter,
        decoding.policy(),
        num_draft_tokens=k_max,
        draft_schedule="constant",
        cache=cache,
    )


def continuation(
    target, drafter, decoding: Decoding, prompt: list[int], max_tokens: int, k_max: int
) -> list[int]:
    engine = make_engine(target, drafter, decoding, k_max)
    return [t for block in engine.generate(mx.array(prompt), max_tokens) for t in block.tokens]


def accepted_from(
    target, drafter, decoding: Decoding, cache: list, fed: list[int], k_max: int
) -> tuple[int, int]:
    """With ``fed`` appended to the context ``cache`` holds (and left there), the next token
    and how many of ``k_max`` drafts after it are accepted (one round of the engine). The noise
    of a position is the continuation's: same seed, positions counted from the cache's start."""
    engine = make_engine(target, drafter, decoding, k_max, cache)
    blocks = engine.generate(mx.array(fed), k_max + 2)
    first, round_ = next(blocks), next(blocks)
    blocks.close()
    engine.settle(0)
    return first.tokens[0], round_.num_from_draft


def acceptance_lengths(
    target, drafter, prompt: list[int], max_tokens: int, k_max: int, decoding: Decoding = Decoding()
) -> dict:
    """``accepted[j]``: drafts accepted by a round whose pending token is the ``j``-th generated
    one. ``mismatches``: positions whose prefill gave another token than the continuation (a
    rounding difference between a prefill and a verification; expected to be 0)."""
    tokens = continuation(target, drafter, decoding, prompt, max_tokens, k_max)
    # One cache, a token longer each time: a prefill of the whole context per position would
    # cost its length in forwards.
    cache = target.make_cache(draft_slack=draft_slack(k_max))
    accepted, mismatches = [], 0
    for j in range(len(tokens)):
        fed = prompt if j == 0 else tokens[j - 1 : j]
        first, n = accepted_from(target, drafter, decoding, cache, fed, k_max)
        mismatches += first != tokens[j]
        accepted.append(n)
    return {"tokens": tokens, "accepted": accepted, "mismatches": mismatches, **asdict(decoding)}


# -- replaying schedules ------------------------------------------------------------------------


def auto_factory(calibration: Costs, k_max: int) -> Callable[[], AutoSchedule]:
    """``auto`` as the engine runs it: round times and acceptance carried from one generation of
    the pair to the next."""
    followed = fresh_followed(calibration, k_max)
    return lambda: AutoSchedule(calibration, k_max, **followed)


def compare(
    accepted: Sequence[Sequence[int]],
    calibration: Costs,
    round_seconds: Sequence[float],
    k_max: int,
    noise: float,
    seeds: int,
    spells: float = 0.0,
) -> list[dict]:
    """One row per schedule: speedup over plain steps (replayed with the same jitter and
    spells), in total and per prompt (median), medians over ``seeds`` jitters."""
    constant = {
        f"constant k={k}": (lambda k=k: DraftSchedule(k, "constant")) for k in range(1, k_max + 1)
    }
    plain = [
        replay(accepted, lambda: DraftSchedule(0, "constant"), round_seconds, noise, seed, spells)
        for seed in range(seeds)
    ]
    rows = []
    for name in [*constant, "auto"]:
        runs = []
        for seed in range(seeds):  # auto's followed state starts afresh for each
            make = constant.get(name) or auto_factory(calibration, k_max)
            runs.append(replay(accepted, make, round_seconds, noise, seed, spells))
        rows.append(
            {"schedule": name, **speedups(runs, plain), "k_histogram": runs[0]["k_histogram"]}
        )
    best = max((r for r in rows if r["schedule"] != "auto"), key=lambda r: r["total"])
    for row in rows:
        row["vs_best_constant"] = row["total"] / best["total"]
    return rows


def speedups(runs: Sequence[dict], plain: Sequence[dict]) -> dict:
    """Tokens/s over plain steps with the same jitter: in total and per prompt (median),
    medians over the seeds."""
    pairs = list(zip(runs, plain, strict=True))
    per_prompt = [
        statistics.median(a / b for a, b in zip(run["per_prompt"], base["per_prompt"], strict=True))
        for run, base in pairs
    ]
    return {
        "total": statistics.median(
            run["tokens_per_s"] / base["tokens_per_s"] for run, base in pairs
        ),
        "per_prompt": statistics.median(per_prompt),
    }


def report(result: dict) -> str:
    lines = bc.report_head("Draft schedules replayed offline", result) + [
        f"Pair: `{result['model']}` + `{result['draft_model']}` ({result['dtype']}); "
        f"{result['prompts']} prompts, {result['max_tokens']} tokens each, "
        f"{describe(Decoding(**result['decoding']))}, "
        f"{result['mismatches']} prefill/continuation mismatches.",
        "Round times (ms, k = 0..): "
        + ", ".join(f"{1e3 * s:.2f}" for s in result["round_seconds"])
        + f" ({result['round_source']}); calibration: {result['calibration_source']}; "
        f"jitter sigma {result['noise']}, spells sigma {result['spells']}, "
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


def describe(decoding: Decoding) -> str:
    if not decoding.temp:
        return "greedy"
    top_p = f" top-p {decoding.top_p}" if decoding.top_p else ""
    return f"temp {decoding.temp}{top_p}, seed {decoding.seed}"


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
    parser.add_argument("--temp", type=float, default=0.0, help="0: greedy; else coupled sampling")
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="every sampled generation's seed")
    parser.add_argument(
        "--round-ms",
        default=None,
        help="comma-separated ms per round of k = 0..k_max drafts (default: the calibrated costs)",
    )
    parser.add_argument(
        "--calibration-ms",
        default=None,
        help="the costs auto starts from, as --round-ms (default: the pair's calibrated costs)",
    )
    parser.add_argument("--noise", type=float, default=0.1, help="log-normal sigma per round")
    parser.add_argument(
        "--spells",
        type=float,
        default=0.0,
        help=f"log-normal sigma of the machine's speed, one factor per {SPELL_TOKENS} tokens",
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--acceptance-json",
        default=None,
        help="read the per-position acceptance from this file if it exists, else write it there",
    )
    parser.add_argument("--out", default="bench_out")
    return parser.parse_args(argv)


def calibrated_costs(target, drafter, policy, prompt: list[int], k_max: int) -> Costs:
    """The costs ``auto`` would start from: cached for this pair and machine, or measured now."""
    engine = SpeculativeGenerator(target, drafter, policy, num_draft_tokens=k_max)
    for _ in engine.generate(mx.array(prompt), 2):
        pass
    return engine.costs


def read_ms(text: str, k_max: int, option: str) -> list[float]:
    """Seconds per round of ``k = 0..k_max`` drafts from comma-separated milliseconds."""
    seconds = [float(v) / 1e3 for v in text.split(",")]
    if len(seconds) != k_max + 1:
        raise SystemExit(f"{option}: {k_max + 1} values (k = 0..{k_max}) expected")
    return seconds


def measured_acceptance(args, target, drafter, prompts, decoding: Decoding) -> list[dict]:
    """Every prompt's ``acceptance_lengths``, from ``--acceptance-json`` if it holds them for
    this decoding (else computed, and written there)."""
    cached = Path(args.acceptance_json) if args.acceptance_json else None
    if cached and cached.exists():
        lengths = json.loads(cached.read_text())
        found = {Decoding(**{k: e.get(k, 0.0) for k in asdict(decoding)}) for e in lengths}
        if found != {decoding}:
            raise SystemExit(f"{cached} holds another decoding than {describe(decoding)}")
        return lengths
    start, lengths = time.perf_counter(), []
    for i, prompt in enumerate(prompts):
        lengths.append(
            acceptance_lengths(target, drafter, prompt, args.max_tokens, args.k_max, decoding)
        )
        print(f"[replay] prompt {i + 1}/{len(prompts)} ({time.perf_counter() - start:.0f} s)")
    if cached:
        cached.write_text(json.dumps(lengths))
    return lengths


def main(argv=None) -> dict:
    args = parse_args(argv)
    target, drafter, _ = load(args.model, args.draft_model, dtype=args.dtype)
    prompts = read_prompts(Path(args.prompts), args.num_prompts)
    prompts += long_prompts(prompts, args.long_prompts, args.long_length)
    decoding = Decoding(args.temp, args.top_p, args.seed if args.temp else 0)
    lengths = measured_acceptance(args, target, drafter, prompts, decoding)
    if args.calibration_ms:
        calibration = Costs(read_ms(args.calibration_ms, args.k_max, "--calibration-ms"), 0.0)
        calibration_source = "given"
    else:
        policy = decoding.policy()
        calibration = calibrated_costs(target, drafter, policy, prompts[0], args.k_max)
        calibration_source = "the pair's, measured on this machine"
    if args.round_ms:
        round_seconds = read_ms(args.round_ms, args.k_max, "--round-ms")
        source = "given"
    else:
        round_seconds = [calibration.round_seconds(k) for k in range(args.k_max + 1)]
        source = "the calibrated costs"
    accepted = [entry["accepted"] for entry in lengths]
    rows = compare(
        accepted, calibration, round_seconds, args.k_max, args.noise, args.seeds, args.spells
    )
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
        "calibration_source": calibration_source,
        "decoding": asdict(decoding),
        "noise": args.noise,
        "spells": args.spells,
        "seeds": args.seeds,
        "rows": rows,
    }
    bc.write_results(Path(args.out), "replay_schedules", result, report(result))
    return result


if __name__ == "__main__":
    main()
