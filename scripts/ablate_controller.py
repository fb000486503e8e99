"""Replay ``auto`` with each of its constants taken out, in every regime the speed bars measure:
the measurement behind ``docs/controller.md``.

For each decoding (an acceptance file of ``replay_schedules.py --acceptance-json``: greedy, or
coupled sampling with a seed), each cost table (``flat``: OpenBLAS, where verifying a few tokens
costs little more than one; ``linear``: the default Linux wheel's reference BLAS, where a forward
over ``L`` tokens costs about ``L`` forwards) and each condition (``steady``: the calibration
right, rounds jittered; ``spells``: the calibration taken in another spell of the machine and
the machine's speed wandering), every variant is replayed over the same positions with the same
jitter as ``auto`` with its defaults. A cell is the variant's tokens per second over the
default's (median over seeds): below 0.98, the constant it removes earns its place.

    python scripts/ablate_controller.py --acceptance greedy=bench_out/acc_greedy.json \\
        --acceptance "temp 0.7 top-p 0.95=bench_out/acc_t07p095.json"
"""

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from mlx_gemma_mtp import benchmarks as bc  # noqa: E402
from mlx_gemma_mtp.benchmarks import replay  # noqa: E402
from mlx_gemma_mtp.costs import (  # noqa: E402
    AcceptanceModel,
    Costs,
    RoundTimes,
    calibration_widths,
    interpolate,
)
from mlx_gemma_mtp.engine import (  # noqa: E402
    DEFAULT_NUM_DRAFT_TOKENS,
    AutoSchedule,
    DraftSchedule,  # noqa: E402
)

# Greedy round times (ms, k = 0..6 drafts) of the fixture pair, float32, on this 2-core CPU.
# flat: the constant arms of an OpenBLAS run (scripts/replay_schedules.py's example; 4 tokens
# cost less than 3 there). linear: reference BLAS, a plain step and about one more per draft.
TABLES_MS = {
    "flat": (9.9, 15.7, 21.6, 19.7, 25.6, 26.4, 29.7),
    "linear": (9.9, 19.5, 29.4, 39.0, 48.8, 58.5, 68.3),
}
# What sampling adds to each verified row: mlx-lm plain ran 92.8 tokens/s greedy and 73.7 at
# temperature 0.7 top-p 0.95 (README, OpenBLAS: 2.8 ms a row; reference BLAS 90.3 and 72.6:
# 2.7 ms), the sort of top-p's filter; without top-p, the Gumbel noise over the vocabulary
# (policy.choose on one 32768-entry row: 0.04 ms greedy, 0.5 ms at temperature 1.0, this CPU).
ROW_MS = {"top-p": 2.7, "temperature": 0.45}


@dataclass(frozen=True)
class Condition:
    noise: float  # log-normal sigma of every round's time
    spells: float  # log-normal sigma of the machine's speed, one factor per 64 tokens
    calibrated_plain: float  # the calibration's plain step over the one the loop runs
    calibrated_rounds: float  # the calibration's rounds with drafts over the loop's


CONDITIONS = {
    "steady": Condition(0.1, 0.0, 1.0, 1.0),
    # A cached plain step of 22.8 ms cost 12.6 in a run (README), and queued calibration hides
    # a round's host work (rounds ran 5-17% over their calibration).
    "spells": Condition(0.1, 0.2, 1.5, 0.9),
}


@dataclass(frozen=True)
class Variant:
    """``auto`` with some constants changed: keyword arguments of its three parts, and the
    widths its calibration measured (the others interpolated)."""

    controller: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)
    acceptance: dict = field(default_factory=dict)
    widths: Callable[[int], list[int]] = calibration_widths
    k_max: int = DEFAULT_NUM_DRAFT_TOKENS
    schedule: type = AutoSchedule


NEVER = 10**9


class NoExploring(AutoSchedule):
    """``auto`` without exploring rounds (no extra draft, no plain step measured while drafting)."""

    def explore(self, best: int, limit: int) -> int:
        return best


VARIANTS = {
    "default": Variant(),
    "hope 0.9 -> 1.0": Variant(controller={"hope": 1.0}),
    "hope 0.9 -> 0.7": Variant(controller={"hope": 0.7}),
    "prior 0.9 -> 0.7 (hope kept)": Variant(acceptance={"prior": 0.7}),
    "fade 0.1 -> 0": Variant(acceptance={"fade": 0.0}),
    "fade 0.1 -> 0.05": Variant(acceptance={"fade": 0.05}),
    "fade 0.1 -> 0.2": Variant(acceptance={"fade": 0.2}),
    "max_age 64 -> none": Variant(times={"max_age": NEVER}),
    "max_age 64 -> 32": Variant(times={"max_age": 32}),
    "max_age 64 -> 128": Variant(times={"max_age": 128}),
    "margin 0.05 -> 0": Variant(controller={"margin": 0.0}),
    "margin 0.05 -> 0.1": Variant(controller={"margin": 0.1}),
    "every 8 -> 4": Variant(controller={"every": 4}),
    "every 8 -> 16": Variant(controller={"every": 16}),
    "no exploring rounds": Variant(schedule=NoExploring),
    "widths: every one -> {1,2,k+1}": Variant(widths=lambda k_max: [1, 2, k_max + 1]),
    "widths: every one -> {1,k+1}": Variant(widths=lambda k_max: [1, k_max + 1]),
    "k_max 6 -> 4": Variant(k_max=4),
    "k_max 6 -> 5": Variant(k_max=5),
}


def round_ms(table: str, decoding: str) -> list[float]:
    """A round's milliseconds per ``k``: the table's greedy round plus sampling's work per row."""
    per_row = ROW_MS["top-p"] if "top-p" in decoding else 0.0
    if decoding != "greedy" and not per_row:
        per_row = ROW_MS["temperature"]
    return [ms + per_row * (k + 1) for k, ms in enumerate(TABLES_MS[table])]


def calibration(seconds: list[float], condition: Condition, widths: list[int]) -> Costs:
    """What the calibration measured (off by the condition's factors) at ``widths``, the other
    widths interpolated, as ``measure_costs`` does."""
    skewed = [s * (condition.calibrated_rounds if k else condition.calibrated_plain)
              for k, s in enumerate(seconds)]  # fmt: skip
    measured = {w: skewed[w - 1] for w in widths}
    return Costs([interpolate(measured, w) for w in range(1, len(seconds) + 1)], 0.0)


def auto(costs: Costs, variant: Variant) -> Callable[[], AutoSchedule]:
    """``auto`` as the engine runs it, its followed state carried across generations."""
    times = RoundTimes(costs, **variant.times)
    acceptance = AcceptanceModel(variant.k_max, **variant.acceptance)
    return lambda: variant.schedule(
        costs, variant.k_max, times=times, acceptance=acceptance, **variant.controller
    )


def tokens_per_s(accepted, variant, seconds, condition, seed) -> float:
    k_max = variant.k_max
    costs = calibration(seconds[: k_max + 1], condition, variant.widths(k_max))
    run = replay(accepted, auto(costs, variant), seconds, condition.noise, seed, condition.spells)
    return run["tokens_per_s"]


def regime_cells(accepted, seconds, condition: Condition, seeds: int) -> dict:
    """Every variant's tokens/s over the default's, and the default's over plain and over the
    best constant k (medians over seeds)."""

    def runs(make_schedule):  # fmt: skip
        return [
            replay(accepted, make_schedule, seconds, condition.noise, s, condition.spells)[
                "tokens_per_s"
            ]
            for s in range(seeds)
        ]

    plain = runs(lambda: DraftSchedule(0, "constant"))
    constant = {k: runs(lambda k=k: DraftSchedule(k, "constant")) for k in range(1, 7)}
    default = [tokens_per_s(accepted, VARIANTS["default"], seconds, condition, s)
               for s in range(seeds)]  # fmt: skip
    best_k = max(constant, key=lambda k: statistics.median(constant[k]))
    other_jitter = [tokens_per_s(accepted, VARIANTS["default"], seconds, condition, s)
                    for s in range(seeds, 2 * seeds)]  # fmt: skip
    cells = {
        "auto / plain": statistics.median(a / p for a, p in zip(default, plain, strict=True)),
        # What a cell moves by chance: the default with other jitter seeds, not paired.
        "noise: default, other seeds": statistics.median(other_jitter) / statistics.median(default),
        "auto / best constant": statistics.median(
            a / b for a, b in zip(default, constant[best_k], strict=True)
        ),
        "best constant k": best_k,
    }
    for name, variant in VARIANTS.items():
        if name == "default":
            continue
        mine = [tokens_per_s(accepted, variant, seconds, condition, s) for s in range(seeds)]
        cells[name] = statistics.median(m / d for m, d in zip(mine, default, strict=True))
    return cells


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--acceptance",
        action="append",
        required=True,
        help="DECODING=PATH: a replay_schedules.py --acceptance-json file; DECODING is greedy "
        "or names its temperature (and top-p, if any), e.g. 'temp 0.7 top-p 0.95'",
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="bench_out")
    return parser.parse_args(argv)


def report(result: dict) -> str:
    regimes = list(result["regimes"])
    lines = bc.report_head("auto with each constant taken out (replayed)", result) + [
        "Cells: tokens/s with the change over tokens/s of the default (medians over "
        f"{result['seeds']} seeds); the first rows: the default against plain steps and the "
        "best constant k.",
        "",
    ]
    names = list(next(iter(result["regimes"].values())))
    rows = []
    for name in names:
        cells = [result["regimes"][r][name] for r in regimes]
        text = [str(c) if isinstance(c, int) else f"{c:.3f}" for c in cells]
        worst = min(cells) if name in VARIANTS else ""
        rows.append([name, *text, f"{worst:.3f}" if worst != "" else ""])
    return "\n".join([*lines, bc.markdown_table(["change", *regimes, "worst"], rows)]) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    regimes = {}
    for item in args.acceptance:
        decoding, path = item.split("=", 1)
        accepted = [entry["accepted"] for entry in json.loads(Path(path).read_text())]
        for table in TABLES_MS:
            seconds = [ms / 1e3 for ms in round_ms(table, decoding)]
            for name, condition in CONDITIONS.items():
                label = f"{table}, {decoding}, {name}"
                regimes[label] = regime_cells(accepted, seconds, condition, args.seeds)
                print(f"[ablate] {label}: auto/plain {regimes[label]['auto / plain']:.3f}")
    result = {
        "machine": bc.machine_info(),
        "command": " ".join(
            ["python scripts/ablate_controller.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "seeds": args.seeds,
        "regimes": regimes,
    }
    bc.write_results(Path(args.out), "ablate_controller", result, report(result))
    return result


if __name__ == "__main__":
    main()
