"""How many drafts pay: the cost of a pair on this machine, the drafter's acceptance, and the
controller that picks ``k`` (0 included) every round.

A round with ``k`` drafts costs ``t_verify(k + 1) + k t_draft`` and emits ``E[tokens | k] =
1 + sum_{i<=k} a_1 ... a_i`` tokens, ``a_i`` being the chance that draft ``i`` is accepted when
drafts ``1..i-1`` were. ``k = 0`` is a plain step (one token for ``t_verify(1)``). The controller
maximises tokens per second. Costs are measured once per pair and machine (queued, as the loop
runs them), cached on disk, and followed online from the measured round times; acceptance is
followed online per draft position.
"""

import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .machine import speed_identity

# 6: one kind of file per kind of policy (sampling is coupled, on the device); 7: top-p rounds
# sort only their first row, so a cached table of the old rounds misprices every k.
COSTS_VERSION = 7


def tokens_per_round(alpha: float, k: int) -> float:
    """Expected tokens per verification round for ``k`` drafts, each accepted with probability
    ``alpha`` given the previous ones were (the bonus/correction token included)."""
    return sum(alpha**i for i in range(k + 1))


def expected_tokens(rates: Sequence[float], k: int) -> float:
    """``E[tokens | k]`` for per-position conditional acceptance ``rates`` (``rates[i]`` for
    draft ``i + 1``)."""
    total, reach = 1.0, 1.0
    for rate in rates[:k]:
        reach *= rate
        total += reach
    return total


def ideal_speedup(
    tokens_per_round: float, t_target_one: float, t_target_verify: float, k: int, t_draft: float
) -> float:
    """ideal = E[tokens per round] x t_target(1) / (t_target(k+1) + k t_draft): the speedup
    over plain decoding if the loop cost nothing but its forwards."""
    return tokens_per_round * t_target_one / (t_target_verify + k * t_draft)


@dataclass
class Costs:
    """Seconds per target forward over ``L`` tokens (``verify[L - 1]``) and per draft step."""

    verify: list[float]
    draft: float
    context: int = 0  # cache length when measured
    measured_at: float = field(default_factory=time.time)
    fixed: bool = False  # True: not followed online (benchmarks and tests that pin decisions)

    @property
    def k_max(self) -> int:
        return len(self.verify) - 1

    def round_seconds(self, k: int) -> float:
        return self.verify[k] + k * self.draft

    def speedup(self, tokens: float, k: int) -> float:
        """The ideal speedup of rounds of ``k`` drafts emitting ``tokens`` on average."""
        return ideal_speedup(tokens, self.verify[0], self.verify[k], k, self.draft)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Costs":
        """Costs read back from ``to_dict``; a ``ValueError`` for anything a measurement could
        not have given (a zero or absurd time, a value that is not a number)."""
        verify, draft = [seconds(v) for v in data["verify"]], seconds(data["draft"], zero=True)
        if not verify:
            raise ValueError("no verification costs")
        return cls(verify, draft, int(data.get("context", 0)), float(data.get("measured_at", 0)))


def seconds(value, zero: bool = False) -> float:
    """A measured time: a finite number of seconds under an hour (above 0 unless ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"a time must be a number, got {value!r}")
    if not math.isfinite(value) or not (0 <= value < 3600) or (value == 0 and not zero):
        raise ValueError(f"{value!r} s is not a measured time")
    return float(value)


def wider_never_cheaper(verify: Sequence[float]) -> list[float]:
    """``verify`` made non-decreasing in the width (a measured dip is noise or a quirk that
    another run need not repeat)."""
    return [max(verify[: i + 1]) for i in range(len(verify))]


# -- measuring ---------------------------------------------------------------------------------


def queued_seconds(step: Callable[[], mx.array], calls: int, warm: bool = True) -> float:
    """Seconds per call of ``step`` when calls are queued as the generation loops queue them:
    each call's graph is built and dispatched while the device still runs the previous one (each
    feeds the next), so host work is hidden behind device work. ``warm``: one untimed call
    first (its buffers allocated, its kernels built)."""
    if warm:
        mx.eval(step())
    start = time.perf_counter()
    for _ in range(calls):
        mx.async_eval(step())
    mx.synchronize()
    return (time.perf_counter() - start) / calls


def calibration_widths(k_max: int) -> list[int]:
    """Forward widths measured on first use: every one. A width interpolated between measured
    ones can be off by more than drafting gains (with OpenBLAS here 4 tokens cost less than 3):
    measuring 1, 2 and the widest cost up to 1.7% in replays (docs/controller.md)."""
    return list(range(1, k_max + 2))


def measure_costs(
    round_chain: Callable[[int], Callable[[], mx.array]],
    draft_chain: Callable[[], mx.array],
    k_max: int,
    context: int,
    widths: Sequence[int] | None = None,
    calls: int = 2,
    blocks: int = 2,
) -> Costs:
    """Queued costs: whole rounds of ``k`` drafts (``round_chain(k)``: drafting, the target
    forward over ``k + 1`` tokens with the policy's acceptance work, the rollback) for
    ``k + 1`` in ``widths`` (default ``calibration_widths``), and one draft step
    (``draft_chain``). ``verify[k]`` is a round's time less its drafting, interpolated to every
    width up to ``k_max + 1``. Each is measured ``blocks`` times round-robin and the fastest
    block kept, so a burst of load from elsewhere spoils one sample, not the table (the
    replays take the calibration as given: docs/controller.md)."""
    widths = sorted(widths or calibration_widths(k_max))
    chains = {w: round_chain(w - 1) for w in widths}
    chains["draft"] = draft_chain
    samples = {name: [] for name in chains}
    for block in range(blocks):
        for name, chain in chains.items():
            samples[name].append(queued_seconds(chain, calls, warm=block == 0))
    draft = min(samples["draft"])
    seconds = {w: max(min(samples[w]) - (w - 1) * draft, 0.0) for w in widths}
    verify = [interpolate(seconds, width) for width in range(1, k_max + 2)]
    return Costs(wider_never_cheaper(verify), draft, context)


def interpolate(seconds: dict, width: int) -> float:
    """Piecewise-linear in the width between measured widths (constant beyond them)."""
    widths = sorted(seconds)
    if width <= widths[0]:
        return seconds[widths[0]]
    for lo, hi in zip(widths, widths[1:], strict=False):
        if width <= hi:
            return seconds[lo] + (seconds[hi] - seconds[lo]) * (width - lo) / (hi - lo)
    return seconds[widths[-1]]


# -- the on-disk cache --------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$MLX_GEMMA_MTP_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlx_gemma_mtp``, else
    ``~/.cache/mlx_gemma_mtp``."""
    if os.environ.get("MLX_GEMMA_MTP_CACHE_DIR"):
        return Path(os.environ["MLX_GEMMA_MTP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx_gemma_mtp"


def model_identity(model) -> dict:
    """What a model's speed depends on: its configuration and every parameter's name, shape and
    dtype (which also says how it is quantized)."""
    args = getattr(model, "args", None)
    config = asdict(args) if args is not None and hasattr(args, "__dataclass_fields__") else {}
    digest = hashlib.sha256()
    for name, value in tree_flatten(model.parameters()):
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
    config_text = json.dumps(config, sort_keys=True, default=str)
    return {
        "model_type": getattr(args, "model_type", type(model).__name__),
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest()[:16],
        "parameters_sha256": digest.hexdigest()[:16],
    }


def costs_identity(target_model, drafter, draft_kind: str) -> dict:
    return {
        "version": COSTS_VERSION,
        "machine": speed_identity(),
        "target": model_identity(target_model),
        "drafter": model_identity(drafter),
        "draft": draft_kind,
    }


def costs_path(identity: dict) -> Path:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "costs" / f"{key}.json"


def load_costs(identity: dict, k_max: int) -> tuple[Costs | None, Path]:
    """The cached costs for ``identity`` if they cover ``k_max`` drafts, and the file's path."""
    path = costs_path(identity)
    try:
        data = json.loads(path.read_text())
        costs = Costs.from_dict(data["costs"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, path
    if data.get("identity") != identity or costs.k_max < k_max:
        return None, path
    return costs, path


def save_costs(identity: dict, costs: Costs) -> Path | None:
    """Write atomically; a cache folder that cannot be written is no error (None)."""
    path = costs_path(identity)
    text = json.dumps({"identity": identity, "costs": costs.to_dict()}, indent=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A staging file of its own per writer: two threads (or processes) may save at once.
        handle, staging = tempfile.mkstemp(suffix=".tmp", prefix=path.stem, dir=path.parent)
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(staging, path)
    except OSError:
        return None
    return path


# -- online models ----------------------------------------------------------------------------

# The controller's constants, each kept because its replays earned it (docs/controller.md has
# every measurement: scripts/ablate_controller.py, tokens/s with and without it in 16 regimes).
HOPED_ACCEPTANCE = 0.9  # 1.0 cost up to 3.2%, 0.7 up to 5.6% (OpenBLAS, sampled)
FADE = 0.1  # not fading cost up to 2.8% (OpenBLAS, temperature 1.0, spells)
MAX_AGE = 64  # bounds each round's host work and a slow spell's reach; none: -1.9% to +2.9%
MARGIN = 0.05  # none cost up to 2.8% (reference BLAS, spells)
EVERY = 8  # 4 cost up to 2.0%, 16 up to 1.7%; no exploring rounds at all, up to 3.2%


class AcceptanceModel:
    """Per draft position, the chance it is accepted when the drafts before it were: drafts
    accepted over drafts reached, in counts that fade by ``fade`` every step (speculative round
    or plain step), so a change in the text is followed, and the longer speculation was parked,
    the more a probe weighs. Position 0 starts from ``prior``, worth one round; a position never
    reached is taken to be as good as the one before it."""

    def __init__(self, k_max: int, prior: float = HOPED_ACCEPTANCE, fade: float = FADE):
        self.prior, self.keep = prior, 1.0 - fade
        self.accepted = [prior] + [0.0] * (k_max - 1)
        self.reached = [1.0] + [0.0] * (k_max - 1)

    def observe(self, drafted: int, accepted: int) -> None:
        """One round: ``accepted`` of ``drafted`` drafts."""
        self.fade()
        for i in range(min(accepted + 1, drafted)):
            self.reached[i] += 1.0
            self.accepted[i] += float(i < accepted)

    def fade(self) -> None:
        """One step's fading (a plain step calls only this)."""
        self.accepted = [count * self.keep for count in self.accepted]
        self.reached = [count * self.keep for count in self.reached]

    def estimates(self) -> list[float]:
        rates = [self.prior]
        for accepted, reached in zip(self.accepted, self.reached, strict=True):
            rates.append(accepted / reached if reached else rates[-1])
        return rates[1:]

    def expected_tokens(self, k: int) -> float:
        return expected_tokens(self.estimates(), k)


class RoundTimes:
    """Seconds per round of ``k`` drafts: for the ``k`` that ran lately, the median of their
    times measured in the last ``max_age`` rounds and the calibrated cost; for the others, the
    calibrated costs scaled by how far the measured rounds drifted from them (a busy machine, a
    longer context). A median, not a mean: one hiccup (a page fault, a retrace, the consumer's
    work between tokens) must not make plain steps look slow. An older time no longer counts: a
    ``k`` measured in a slow spell or a long context and not chosen since would otherwise keep
    looking slow, and never be chosen again to correct it."""

    def __init__(self, costs: Costs, max_age: int = MAX_AGE):
        self.costs, self.max_age = costs, max_age
        self.samples: dict[int, deque] = {}  # k -> (round, seconds) of its recent rounds
        self.counts: dict[int, int] = {}  # rounds ever measured per k
        self.rounds = 0
        self._predicted: dict[int, float] = {}  # until the next observation

    def predict(self, k: int) -> float:
        # Read and filled without a lock: generations of a pair on two threads share it.
        value = self._predicted.get(k)
        if value is None:
            measured = self.measured(k)
            value = measured or self.costs.round_seconds(k) * self.drift(k)
            self._predicted[k] = value
        return value

    def recent(self, k: int) -> list[float]:
        """The times of ``k`` that still count."""
        oldest = self.rounds - self.max_age
        return [seconds for when, seconds in tuple(self.samples.get(k, ())) if when > oldest]

    def measured(self, k: int) -> float | None:
        values = self.recent(k)
        return statistics.median([*values, self.costs.round_seconds(k)]) if values else None

    def drift(self, k: int) -> float:
        """How far the measured rounds are from the calibrated costs: plain steps and
        speculative rounds apart (a speculative round has host work of its own the queued
        calibration hides), from the other kind only when this one has not been seen lately."""
        ratios = {j: self.measured(j) for j in tuple(self.samples)}
        ratios = {j: t / self.costs.round_seconds(j) for j, t in ratios.items() if t is not None}
        same = [r for j, r in ratios.items() if (j == 0) == (k == 0)]
        kinds = same or list(ratios.values())
        return statistics.median(kinds) if kinds else 1.0

    def observe(self, k: int, seconds: float) -> None:
        if self.costs.fixed:
            return
        self.rounds += 1
        samples = self.samples.setdefault(k, deque())
        samples.append((self.rounds, seconds))
        while samples[0][0] <= self.rounds - self.max_age:
            samples.popleft()
        self.counts[k] = self.counts.get(k, 0) + 1
        self._predicted.clear()


class DraftController:
    """``auto``: every round, the ``k`` in ``0..k_max`` that maximises expected tokens per
    second. Every ``every`` rounds one more
    draft than the best is tried (to learn the next position's acceptance); when round times are
    followed (``timed``) and no plain step was ever measured, three plain steps instead: the
    calibration may come from a busier or quieter spell of the machine, in which a plain step
    cost another fraction of a round. ``k = 0`` parks speculation (plain steps). While parked, a
    round of the hoped-for ``k`` probes the acceptance after ``every`` plain tokens, an interval
    that doubles after each probe that did not pay; no probe when no ``k`` would pay even at
    ``hope`` (the probe would cost more than it could find). Drafting must beat a plain step by
    ``margin`` (a fraction) to be chosen: near break-even the estimates' errors (the acceptance
    seen so far, a round's host work the calibration hides) decide, and parked decoding is never
    slower."""

    def __init__(
        self,
        costs: Costs,
        k_max: int,
        margin: float = MARGIN,
        every: int = EVERY,
        hope: float = HOPED_ACCEPTANCE,
        times: "RoundTimes | None" = None,
        acceptance: AcceptanceModel | None = None,
    ):
        """``times``, ``acceptance``: followed in earlier generations of this pair, to go on
        from."""
        self.k_max, self.margin, self.every = k_max, margin, every
        self.hope = hope
        self.acceptance = acceptance or AcceptanceModel(k_max)
        self.times = times or RoundTimes(costs)
        self.timed = not costs.fixed
        self.probe_every = every
        self.parked_tokens = 0  # plain tokens since the last speculative round
        self.rounds = 0
        self.explored = 0  # 1 + the round count of the last exploring round
        self.plain_left = 0  # plain steps still to take in an exploring triple
        self.probing = False

    def speeds(self, rates: Sequence[float], limit: int) -> list[float]:
        """Expected tokens per second for ``k = 0..limit``."""
        return [expected_tokens(rates, k) / self.times.predict(k) for k in range(limit + 1)]

    def best(self, rates: Sequence[float], limit: int) -> int:
        speeds = self.speeds(rates, limit)
        k = max(range(limit + 1), key=lambda k: (speeds[k], -k))
        return k if speeds[k] > speeds[0] * (1 + self.margin) else 0

    def hopeful(self, limit: int) -> int:
        """The ``k`` that would be best were drafts accepted ``hope`` of the time: probes draft
        it to learn every position the costs could make worth drafting (a round at k = 1 would
        teach nothing about the second draft)."""
        return self.best([self.hope] * limit, limit)

    def explore(self, best: int, limit: int) -> int:
        """The ``k`` to try instead of ``best`` in an exploring round."""
        if self.timed and not self.times.counts.get(0):
            return 0
        return min(best + 1, limit)

    def choose(self, limit: int) -> int:
        """``k`` for the next round, drafting at most ``limit`` tokens."""
        limit = min(limit, self.k_max)
        if limit < 1:
            return 0
        if self.plain_left:
            self.plain_left -= 1
            return 0
        k = self.best(self.acceptance.estimates(), limit)
        if k == 0:
            return self.probe(limit)
        due = self.rounds % self.every == self.every - 1
        if due and self.explored != self.rounds + 1:
            self.explored = self.rounds + 1  # once: plain steps tried do not count a round
            k = self.explore(k, limit)
            # Three plain steps: only the second is queued behind another and followed by
            # one, as parked steps are, and timed like them (``SpeculativeGenerator._generate``).
            self.plain_left = 2 if k == 0 else 0
        return k

    def probe(self, limit: int) -> int:
        """Parked: a plain step, or a probing round once ``probe_every`` plain tokens passed."""
        if self.parked_tokens < self.probe_every:
            return 0
        k = self.hopeful(limit)
        if k:
            self.parked_tokens, self.probing = 0, True
        return k

    def observe(self, k: int, accepted: int, seconds: float | None) -> None:
        if k:
            self.rounds += 1
            self.acceptance.observe(k, accepted)
            # A probe that leaves speculation parked: probe half as often. Drafting that pays:
            # probe as often as at first the next time speculation parks.
            parked = self.best(self.acceptance.estimates(), self.k_max) == 0
            if not parked:
                self.probe_every = self.every
            elif self.probing:
                self.probe_every *= 2
            self.probing = False
        else:
            self.parked_tokens += 1
            self.acceptance.fade()
        if seconds is not None:
            self.times.observe(k, seconds)
