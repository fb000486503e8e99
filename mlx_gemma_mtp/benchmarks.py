"""What the benchmark scripts (``scripts/``) share: the fixture and its prompts, timing
summaries, the machine and code a run was made on, and how results are written."""

import datetime
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp.costs import ideal_speedup, tokens_per_round  # noqa: F401 (one formula)
from mlx_gemma_mtp.machine import blas_library, cpu_model


def summarize(samples: Sequence[float]) -> dict:
    """Median and spread of ``samples`` (quartiles need at least 4 samples, else min/max)."""
    values = sorted(samples)
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "p25": None, "p75": None}
    if len(values) >= 4:
        p25, _, p75 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        p25, p75 = values[0], values[-1]
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": values[0],
        "max": values[-1],
        "p25": p25,
        "p75": p75,
    }


def time_calls(
    fn: Callable[[], None],
    iters: int,
    warmup: int = 1,
    after: Callable[[], None] | None = None,
) -> dict:
    """Seconds per ``fn()`` call (``fn`` must evaluate what it computes); ``after`` runs
    untimed after every call (e.g. to roll a cache back)."""
    samples = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if after is not None:
            after()
        if i >= warmup:
            samples.append(elapsed)
    return summarize(samples)


def alpha_from_tokens_per_round(length: float, k: int) -> float:
    """Inverse of ``tokens_per_round`` in ``alpha`` (bisection)."""
    if not 1.0 <= length <= k + 1:
        raise ValueError(f"tokens per round {length} is outside [1, {k + 1}]")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_round(mid, k) < length else (lo, mid)
    return (lo + hi) / 2


def spread(stat: dict, scale: float = 1.0, digits: int = 1) -> str:
    """``median [min-max]`` (or the quartiles when there are enough samples)."""
    if not stat or stat.get("median") is None:
        return "-"
    lo, hi = (stat["p25"], stat["p75"]) if stat["n"] >= 4 else (stat["min"], stat["max"])
    f = f"{{:.{digits}f}}"
    return f"{f.format(stat['median'] * scale)} [{f.format(lo * scale)}-{f.format(hi * scale)}]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def code_version() -> dict:
    """The commit and a hash of the package sources as run (uncommitted changes included)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for file in sorted((root / "mlx_gemma_mtp").rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "mlx_gemma_mtp"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    return {
        "commit": commit or None,
        "package_changed_since_commit": bool(dirty),
        "package_sha256": digest.hexdigest()[:12],
    }


def machine_info() -> dict:
    import mlx_lm

    memory = total_memory_bytes()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "blas": blas_library(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "code": code_version(),
    }


def report_head(title: str, result: dict) -> list[str]:
    """A report's first lines: its title, the machine and the command that produced it."""
    return [
        f"## {title}",
        "",
        f"Machine: {machine_line(result['machine'])}",
        f"Command: `{result['command']}`",
    ]


def machine_line(info: dict) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {info['platform']}; "
        f"MLX {info['mlx']} ({info['device']}, BLAS: {info.get('blas', '?')}), "
        f"mlx-lm {info['mlx_lm']}; {info['date']}"
    ) + code_line(info.get("code"))


def code_line(code: dict | None) -> str:
    if not code:
        return ""
    changed = " + uncommitted changes" if code["package_changed_since_commit"] else ""
    return f"; code {code['commit']}{changed} (package sha256 {code['package_sha256']})"


def write_results(out: Path, name: str, result: dict, markdown: str) -> None:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md`` (making the folder), print the report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{name}.md").write_text(markdown.rstrip("\n") + "\n")
    print(markdown)


FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gemma4-tiny"


# -- prompts ----------------------------------------------------------------------------------


def read_prompts(path: Path, num_prompts: int | None) -> list[list[int]]:
    prompts = [json.loads(line)["input_ids"] for line in path.read_text().splitlines() if line]
    return prompts[:num_prompts] if num_prompts else prompts


def long_prompts(prompts: list[list[int]], count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens: concatenations of the prompts (each later one
    without its first token, the BOS), starting from a different prompt each time."""
    result = []
    for start in range(count):
        ids = list(prompts[start % len(prompts)])
        i = start + 1
        while len(ids) < length:
            ids += prompts[i % len(prompts)][1:]
            i += 1
        result.append(ids[:length])
    return result


# -- replaying draft schedules offline (scripts/replay_schedules.py, ablate_controller.py) ----


def replay(
    accepted: Sequence[Sequence[int]],
    make_schedule: Callable[[], object],
    round_seconds: Sequence[float],
    noise: float = 0.0,
    seed: int = 0,
    spells: float = 0.0,
) -> dict:
    """Tokens and seconds of one schedule over every prompt's ``accepted`` list (one generation
    each), a round of ``k`` drafts costing ``round_seconds[k]`` times a log-normal jitter of
    sigma ``noise``, and times the factor of the machine's spell (log-normal, sigma ``spells``,
    one per ``SPELL_TOKENS`` tokens of the replay: every schedule meets the same spell at the
    same token, whatever its rounds). As the engine's pipelined loop runs it: the first token
    comes from the prefill (not timed); the next round's ``k`` is chosen before this round is
    read (so within the tokens left before it), then cut to the tokens left; a round emits
    ``min(accepted, k) + 1``. Unlike the engine, every round is timed (it leaves the first plain
    step after a round untimed)."""
    rng = random.Random(seed)
    spell = spell_factors(spells, seed)
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
            cost *= spell(total_tokens + position)
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


SPELL_TOKENS = 64  # a spell of this CPU lasts seconds: a few hundred rounds


def spell_factors(sigma: float, seed: int) -> Callable[[int], float]:
    """The machine's speed factor at a token of the replay (1.0 without spells)."""
    rng, factors = random.Random(f"spells {seed}"), []

    def factor(token: int) -> float:
        while len(factors) <= token // SPELL_TOKENS:
            factors.append(rng.lognormvariate(0.0, sigma) if sigma else 1.0)
        return factors[token // SPELL_TOKENS]

    return factor


def start_server(command: list[str], name: str = "the server", **popen) -> tuple:
    """Start a server process (``command`` ends with its ``--port``) and wait until it
    answers ``/v1/models``; ``(process, base URL)``. ``popen``: ``env``, ``cwd``."""
    import subprocess

    import httpx

    port = command[command.index("--port") + 1]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(f"{name} did not start: {process.stderr.read().decode()[-2000:]}")
    raise RuntimeError(f"{name} did not start")


def add_pair_arguments(parser) -> None:
    """The server benchmarks' pair, dtype and prompts (default: the fixture pair in float32)."""
    parser.add_argument("--model", default=str(FIXTURE / "target"))
    parser.add_argument("--draft-model", default=str(FIXTURE / "assistant"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=Path, default=FIXTURE / "held_out_prompts.jsonl")
