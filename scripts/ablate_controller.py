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
# measured: OpenBLAS, the calibration of bench_out/s4_openblas_t1_topp (2026-12-05 11:20 UTC):
# t_target(k + 1) + k t_draft, greedy.
TABLES_MS = {
    "flat": (9.9, 15.7, 21.6, 19.7, 25.6, 26.4, 29.7),
    "linear": (9.9, 19.5, 29.4, 39.0, 48.8, 58.5, 68.3),
    "measured": (19.2, 26.7, 31.6, 36.2, 39.4, 43.0, 47.3),
}
# What sampling adds to a round (ms): (its first row, each row after it, each draft). Top-p sorts
# no row (sampling.TokenPolicy.choose): the calibration of bench_out/t1_openblas_t1_topp
# (2026-12-05 14:40 UTC, code a648e7e) at temperature 1.0 top-p 0.95 less its greedy one, fitted
# over L = 1..7: 1.3 ms at one row and 0.7 per further row, drafts 0.45 more. Without top-p, no
# more than greedy's log-softmax and argmax (scripts/bench_sampling.py: 0.74 ms against 0.69 at
# one row, 2.45 against 2.80 at five).
SAMPLING_MS = {"top-p": (1.3, 0.7, 0.45), "temperature": (0.0, 0.0, 0.0)}


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
    model: type = AcceptanceModel


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


# -- alternatives tried for the gap to the best constant k in sampled decoding ------------------


class NeverPark(AutoSchedule):
    """Always draft (k >= 1): what parking costs or saves, an upper bound of its errors."""

    def best(self, rates, limit: int) -> int:
        speeds = self.speeds(rates, limit)
        return max(range(1, limit + 1), key=lambda k: (speeds[k], -k))


class Hysteresis(AutoSchedule):
    """Park only when drafting looks ``margin`` slower than a plain step (unpark when
    ``margin`` faster, as the default does both ways)."""

    drafting = True

    def best(self, rates, limit: int) -> int:
        speeds = self.speeds(rates, limit)
        k = max(range(limit + 1), key=lambda k: (speeds[k], -k))
        bar = 1 - self.margin if self.drafting else 1 + self.margin
        return k if speeds[k] > speeds[0] * bar else 0

    def choose(self, limit: int) -> int:
        k = super().choose(limit)
        if not self.plain_left and not self.probing:
            self.drafting = k > 0
        return k


class Shrunk(AcceptanceModel):
    """Each position's rate is its counts plus one round of the position before it: a position
    reached a few times is not judged on them alone."""

    def estimates(self) -> list[float]:
        rates, before = [], self.prior
        for accepted, reached in zip(self.accepted, self.reached, strict=True):
            before = (accepted + before) / (reached + 1.0)
            rates.append(before)
        return rates


class Pooled(AcceptanceModel):
    """One rate for every position: all positions' counts together."""

    def estimates(self) -> list[float]:
        reached = sum(self.reached)
        return [sum(self.accepted) / reached if reached else self.prior] * len(self.reached)


class Anchored(AcceptanceModel):
    """The recent counts plus one round of a slow estimate (fading 1% a round): a parked
    estimate drifts back to the pair's long-run acceptance instead of staying where it parked."""

    def __init__(self, k_max: int, **options):
        super().__init__(k_max, **options)
        self.slow = AcceptanceModel(k_max, fade=0.01)

    def observe(self, drafted: int, accepted: int) -> None:
        super().observe(drafted, accepted)
        self.slow.observe(drafted, accepted)

    def estimates(self) -> list[float]:
        pairs = zip(self.accepted, self.reached, self.slow.estimates(), strict=True)
        return [(accepted + slow) / (reached + 1.0) for accepted, reached, slow in pairs]


ALTERNATIVES = {
    "never park": Variant(schedule=NeverPark),
    "hysteresis: park below 1 - margin": Variant(schedule=Hysteresis),
    "each position shrunk to the one before": Variant(model=Shrunk),
    "one rate for every position": Variant(model=Pooled),
    "anchored to a slow estimate": Variant(model=Anchored),
    "fade 0.1 -> 0.03": Variant(acceptance={"fade": 0.03}),
}


def round_ms(table: str, decoding: str) -> list[float]:
    """A round's milliseconds per ``k``: the table's greedy round plus sampling's work."""
    if decoding == "greedy":
        return list(TABLES_MS[table])
    first, row, draft = SAMPLING_MS["top-p" if "top-p" in decoding else "temperature"]
    return [ms + first + (row + draft) * k for k, ms in enumerate(TABLES_MS[table])]


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
    acceptance = variant.model(variant.k_max, **variant.acceptance)
    return lambda: variant.schedule(
        costs, variant.k_max, times=times, acceptance=acceptance, **variant.controller
    )


def tokens_per_s(accepted, variant, seconds, condition, seed) -> float:
    k_max = variant.k_max
    costs = calibration(seconds[: k_max + 1], condition, variant.widths(k_max))
    run = replay(accepted, auto(costs, variant), seconds, condition.noise, seed, condition.spells)
    return run["tokens_per_s"]


def regime_cells(accepted, seconds, condition: Condition, seeds: int, variants: dict) -> dict:
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
    for name, variant in variants.items():
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
    parser.add_argument("--tables", default=",".join(TABLES_MS), help="cost tables to replay")
    parser.add_argument(
        "--alternatives",
        action="store_true",
        help="replay the alternatives tried for the sampled gap (ALTERNATIVES) instead of the "
        "constants taken out",
    )
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
        worst = min(cells) if name in VARIANTS or name in ALTERNATIVES else ""
        rows.append([name, *text, f"{worst:.3f}" if worst != "" else ""])
    return "\n".join([*lines, bc.markdown_table(["change", *regimes, "worst"], rows)]) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    variants = ALTERNATIVES if args.alternatives else VARIANTS
    tables = args.tables.split(",")
    if unknown := set(tables) - set(TABLES_MS):
        raise SystemExit(f"--tables: {', '.join(sorted(unknown))} not among {', '.join(TABLES_MS)}")
    regimes = {}
    for item in args.acceptance:
        decoding, path = item.split("=", 1)
        accepted = [entry["accepted"] for entry in json.loads(Path(path).read_text())]
        for table in tables:
            seconds = [ms / 1e3 for ms in round_ms(table, decoding)]
            for name, condition in CONDITIONS.items():
                label = f"{table}, {decoding}, {name}"
                regimes[label] = regime_cells(accepted, seconds, condition, args.seeds, variants)
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
