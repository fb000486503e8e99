"""MTP speculative decoding against plain decoding (and transformers), side by side in one process.

Arms, interleaved run by run (shuffled per prompt, with a short cool-down between runs):

- ``plain``: mlx-lm's own ``stream_generate`` on the same loaded target model (greedy, and at each
  ``--temps`` temperature): the baseline every mlx-lm user already has;
- ``ours-plain``: our engine without a drafter (greedy), to separate loop cost from drafting;
- ``mtp``: our ``stream_generate`` for each ``k`` in ``--ks``, ``constant`` and ``heuristic``
  schedules, at each temperature;
- with ``--with-transformers``: transformers' plain and assisted generation on the Hugging Face
  checkpoints (CPU, float32, greedy, ``num_assistant_tokens=--hf-k``, constant schedule).

Per arm: generation tokens/s (first to last generated token; median and quartiles over prompts and
repeats), speedup over plain (median of per-run ratios against mlx-lm plain at the same temperature,
and the ratio of total generation times), acceptance, tokens per target forward, rounds, peak
memory, and for greedy arms whether every output equals mlx-lm's plain greedy output.

Engine efficiency, in the same process on the loaded pair (cache prefilled with a long prompt):
t_target(1), t_target(k+1), t_draft, and ideal = E[tokens per round] x t_target(1) /
(t_target(k+1) + k t_draft), E from the measured rounds; reported with measured/ideal. With
``--profile`` a separate pass times each phase of a round (draft, verify, the rest).

    python scripts/bench_mtp.py                      # the fixture pair, all arms (~30 min)
    python scripts/bench_mtp.py --ks 2,3,4 --temps 0 --schedules constant --num-prompts 8

Writes ``--out``/bench_mtp.json, bench_mtp.md and bench_mtp.png (the plot needs matplotlib:
``pip install -e ".[bench]"``).
"""

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]

from bench_projection import linear_fit, measure_pair  # noqa: E402
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from mlx_gemma_mtp import benchmarks as bc  # noqa: E402
from mlx_gemma_mtp import load  # noqa: E402
from mlx_gemma_mtp.benchmarks import FIXTURE, long_prompts, read_prompts  # noqa: E402
from mlx_gemma_mtp.costs import Costs, cache_dir, ideal_speedup  # noqa: E402
from mlx_gemma_mtp.engine.loop import SpeculativeGenerator  # noqa: E402
from mlx_gemma_mtp.generation import COUNTERS, make_policy, stream_generate  # noqa: E402

# -- arms -------------------------------------------------------------------------------------


class Arm:
    def __init__(self, kind: str, temp: float = 0.0, k: int = 0, schedule: str | None = None):
        self.kind, self.temp, self.k, self.schedule = kind, temp, k, schedule

    @property
    def name(self) -> str:
        name = self.kind
        if self.kind == "mtp" and self.schedule == "auto":
            name += f" auto k<={self.k}"
        elif self.kind == "mtp":
            name += f" k={self.k} {self.schedule}"
        elif self.kind == "hf-assisted":
            name += f" k={self.k}"
        return name + ("" if self.temp == 0 else f" temp={self.temp:g}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0


def make_arms(args) -> list[Arm]:
    arms = []
    for temp in args.temps:
        arms.append(Arm("plain", temp))
        if temp == 0 and not args.no_engine_plain:
            arms.append(Arm("ours-plain", temp))
        for schedule in args.schedules if temp == 0 else args.sampled_schedules:
            if schedule == "auto":
                arms.append(Arm("mtp", temp, args.auto_k_max, "auto"))
                continue
            for k in args.ks:
                if schedule == "heuristic" and k == 1:
                    continue  # identical to constant k=1
                arms.append(Arm("mtp", temp, k, schedule))
    if args.with_transformers:
        arms += [Arm("hf-plain"), Arm("hf-assisted", k=args.hf_k)]
    return arms


def timed_stream(responses) -> dict:
    """Consume a response stream; times of the first and the last token."""
    start = time.perf_counter()
    tokens, first, last, response = [], None, None, None
    for response in responses:
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        tokens.append(response.token)
    record = {"tokens": tokens, "t_total": last - start, "t_first": first - start}
    record["t_gen"] = last - first
    if response is not None:
        record.update(dict.fromkeys(COUNTERS), **getattr(response, "mtp_stats", dict)())
    return record


class Runner:
    def __init__(self, target, drafter, tokenizer, max_tokens: int, hf=None, top_p: float = 0.0):
        self.target, self.drafter, self.tokenizer = target, drafter, tokenizer
        self.max_tokens = max_tokens
        self.hf = hf
        self.top_p = top_p  # for every sampled arm

    def run(self, arm: Arm, prompt: list[int], seed: int) -> dict:
        gc.collect()  # nothing of an earlier run may count in this run's peak
        mx.random.seed(seed)
        mx.reset_peak_memory()
        if arm.kind == "plain":
            sampler = make_sampler(temp=arm.temp, top_p=self.top_p if arm.temp else 0.0)
            stream = mlx_lm_stream_generate(
                self.target.model,
                self.tokenizer,
                mx.array(prompt),
                max_tokens=self.max_tokens,
                sampler=sampler,
            )
            record = timed_stream(stream)
        elif arm.kind in ("ours-plain", "mtp"):
            stream = stream_generate(
                self.target,
                self.tokenizer,
                prompt,
                self.max_tokens,
                self.drafter if arm.kind == "mtp" else None,
                num_draft_tokens=max(arm.k, 1),
                draft_schedule=arm.schedule or "constant",
                temp=arm.temp,
                top_p=self.top_p if arm.temp else 0.0,
            )
            record = timed_stream(stream)
        else:
            record = self.hf.run(arm, prompt, self.max_tokens)
        record["peak_memory"] = mx.get_peak_memory() if not arm.kind.startswith("hf") else None
        return record


# -- transformers ------------------------------------------------------------------------------


class HFRunner:
    """transformers' generation on the Hugging Face checkpoints, CPU, float32."""

    def __init__(self, target_path: Path, assistant_path: Path, threads: int | None):
        import torch
        from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

        sys.path.insert(0, str(ROOT / "tests"))
        from hf_reference import patch_transformers

        patch_transformers()
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.target = Gemma4ForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
        self.assistant = Gemma4AssistantForCausalLM.from_pretrained(
            assistant_path, dtype=torch.float32
        ).eval()
        self.forwards = 0
        self.target.register_forward_hook(self._count)

    def _count(self, *_):
        self.forwards += 1

    def run(self, arm: Arm, prompt: list[int], max_tokens: int) -> dict:
        torch = self.torch
        streamer = _TimingStreamer()
        kwargs = dict(max_new_tokens=max_tokens, do_sample=False, streamer=streamer)
        if arm.kind == "hf-assisted":
            self.assistant.generation_config.num_assistant_tokens = arm.k
            self.assistant.generation_config.num_assistant_tokens_schedule = "constant"
            kwargs["assistant_model"] = self.assistant
        self.forwards = 0
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.target.generate(torch.tensor([prompt]), **kwargs)
        end = time.perf_counter()
        tokens = out[0, len(prompt) :].tolist()
        first = streamer.times[1] if len(streamer.times) > 1 else end
        return {
            "tokens": tokens,
            "t_total": end - start,
            "t_first": first - start,
            "t_gen": streamer.times[-1] - first if len(streamer.times) > 1 else 0.0,
            "target_forwards": self.forwards,
            "drafted": None,
            "accepted": None,
            "rounds": self.forwards - 1 if arm.kind == "hf-assisted" else None,
        }


class _TimingStreamer:
    """A transformers streamer that only records when tokens arrive (the first put is the
    prompt)."""

    def __init__(self):
        self.times = []

    def put(self, _):
        self.times.append(time.perf_counter())

    def end(self):
        pass


# -- summaries --------------------------------------------------------------------------------


def baseline_kind(arm: Arm) -> str:
    return "hf-plain" if arm.kind.startswith("hf") else "plain"


def summarize_arms(arms: list[Arm], runs: list[dict], drafter_bytes: int) -> list[dict]:
    by_key = {(r["arm"], r["prompt"], r["repeat"]): r for r in runs}
    plain_greedy = {(r["prompt"], r["repeat"]): r["tokens"] for r in runs if r["arm"] == "plain"}
    summaries = []
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm.name]
        base_name = Arm(baseline_kind(arm), arm.temp if arm.kind != "hf-assisted" else 0).name
        ratios, base_time, my_time = [], 0.0, 0.0
        for r in mine:
            base = by_key.get((base_name, r["prompt"], r["repeat"]))
            if base is None or not r["gen_tps"] or not base["gen_tps"]:
                continue
            ratios.append(r["gen_tps"] / base["gen_tps"])
            base_time += base["t_gen"] / max(len(base["tokens"]) - 1, 1)
            my_time += r["t_gen"] / max(len(r["tokens"]) - 1, 1)
        drafted = sum(r["drafted"] or 0 for r in mine)
        accepted = sum(r["accepted"] or 0 for r in mine)
        rounds = sum(r["rounds"] or 0 for r in mine)
        all_rounds = sum(sum((r.get("k_histogram") or {}).values()) for r in mine)
        forwards = sum(r["target_forwards"] or 0 for r in mine)
        tokens = sum(len(r["tokens"]) for r in mine)
        identical = None
        if arm.greedy and arm.kind != "plain":
            same = [r["tokens"] == plain_greedy.get((r["prompt"], r["repeat"])) for r in mine]
            identical = f"{sum(same)}/{len(same)}"
        gen_time = sum(r["t_gen"] for r in mine)
        peaks = [r["peak_memory"] for r in mine if r["peak_memory"] is not None]
        prompt_ratios = per_prompt_ratios(mine, [r for r in runs if r["arm"] == base_name])
        summaries.append(
            {
                "arm": arm.name,
                "kind": arm.kind,
                "k": arm.k,
                "schedule": arm.schedule,
                "temp": arm.temp,
                "runs": len(mine),
                "gen_tps": bc.summarize([r["gen_tps"] for r in mine if r["gen_tps"]]),
                "e2e_tps": bc.summarize([len(r["tokens"]) / r["t_total"] for r in mine]),
                "speedup": bc.summarize(ratios),
                "speedup_per_prompt": bc.summarize(prompt_ratios),
                "speedup_total_time": base_time / my_time if my_time else None,
                "acceptance": accepted / drafted if drafted else None,
                # Tokens per verification round (the first token comes from the prefill).
                "tokens_per_round": (tokens - len(mine)) / all_rounds if all_rounds else None,
                "tokens_per_target_forward": tokens / forwards if forwards else None,
                "mean_draft_length": drafted / rounds if rounds and drafted else None,
                # The same over every round, plain steps of ``auto`` included.
                "tokens_per_round_all": (tokens - len(mine)) / all_rounds if all_rounds else None,
                "seconds_per_round_all": gen_time / all_rounds if all_rounds else None,
                "rounds": bc.summarize([r["rounds"] for r in mine if r["rounds"] is not None]),
                # Generation time (first to last token) per round and per token, over all runs.
                "seconds_per_round": gen_time / rounds if rounds else None,
                "seconds_per_token": gen_time / max(tokens - len(mine), 1) if len(mine) else None,
                "peak_memory": max(peaks) if peaks else None,
                "identical_to_plain_greedy": identical,
                "drafter_bytes": drafter_bytes if arm.kind == "mtp" else 0,
            }
        )
    return summaries


def per_prompt_ratios(mine: list[dict], base: list[dict]) -> list[float]:
    """Per prompt, the arm's median tokens/s over the repeats over the baseline's: the spread
    of the speedup from prompt to prompt, with the machine's run-to-run noise (one run can be
    20% slower than the next with nothing changed) averaged over the repeats."""

    def medians(runs: list[dict]) -> dict:
        by_prompt = {}
        for r in runs:
            if r["gen_tps"]:
                by_prompt.setdefault(r["prompt"], []).append(r["gen_tps"])
        return {p: statistics.median(v) for p, v in by_prompt.items()}

    arm, baseline = medians(mine), medians(base)
    return [arm[p] / baseline[p] for p in sorted(arm) if p in baseline]


def add_efficiency(summaries: list[dict], runs: list[dict], costs: dict) -> None:
    """ideal and measured/ideal per MTP arm, with the one formula the controller uses
    (``mlx_gemma_mtp.costs.ideal_speedup``) and the same baseline as the measured speedup:
    mlx-lm's plain loop at the arm's temperature, seconds per token as measured in this run.
    The rounds' costs come from the engine's own queued costs at the arm's temperature (the
    sampled draft step for sampled arms), summed over every round each arm ran (plain steps of
    ``auto`` included); loop eff. = those costs / the measured time per round."""
    plain = {s["temp"]: s for s in summaries if s["kind"] == "plain"}
    for s in summaries:
        base = plain.get(s["temp"])
        if s["kind"] != "mtp" or base is None or not base["seconds_per_token"]:
            continue
        c = Costs.from_dict(costs[str(s["temp"])])
        histogram = Counter()
        for r in runs:
            if r["arm"] == s["arm"]:
                histogram.update({int(k): n for k, n in (r["k_histogram"] or {}).items()})
        rounds = sum(histogram.values())
        if not rounds:
            continue
        tokens = s["tokens_per_round_all"] * rounds
        k_mean = sum(k * n for k, n in histogram.items()) / rounds
        verify_mean = sum(c.verify[k] * n for k, n in histogram.items()) / rounds
        s["ideal_speedup"] = ideal_speedup(
            tokens / rounds, base["seconds_per_token"], verify_mean, k_mean, c.draft
        )
        measured = s["speedup"]["median"]
        s["measured_over_ideal"] = measured / s["ideal_speedup"] if measured else None
        round_seconds = verify_mean + k_mean * c.draft
        if s["seconds_per_round_all"]:
            s["loop_efficiency"] = round_seconds / s["seconds_per_round_all"]


def memory_check(summaries: list[dict]) -> dict:
    """Peak with the drafter vs a target-only run, against mlx-lm plain and against our engine
    without a drafter. The drafter's weights are resident in the process during the target-only
    arms too, so they are subtracted from those peaks first."""
    mtp = [s for s in summaries if s["kind"] == "mtp" and s["peak_memory"]]
    if not mtp:
        return {}
    drafter = mtp[0]["drafter_bytes"]
    worst = max(s["peak_memory"] for s in mtp)
    checks = {"drafter_bytes": drafter, "worst_mtp_peak": worst}
    for kind in ("plain", "ours-plain"):
        base = next((s for s in summaries if s["kind"] == kind and s["temp"] == 0), None)
        if base is None or base["peak_memory"] is None:
            continue
        target_only = base["peak_memory"] - drafter
        limit = 1.05 * target_only + drafter
        checks[kind] = {
            "target_only_peak": target_only,
            "limit": limit,
            "within_limit": worst <= limit,
        }
    return checks


# -- profile ----------------------------------------------------------------------------------


class _Timed:
    """Forwards attributes to ``inner``; calls are evaluated and timed into ``bucket``."""

    def __init__(self, inner, totals: dict, bucket: str):
        self._inner, self._totals, self._bucket = inner, totals, bucket

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if name == "backbone":  # the engine's prefill calls the target's backbone directly
            return _Timed(value, self._totals, "prefill")
        return value

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._inner(*args, **kwargs)
        mx.eval(out)
        self._totals[self._bucket] += time.perf_counter() - start
        return out


@contextlib.contextmanager
def timed_drafting(totals: dict):
    """Time the engine's draft phase (``SpeculativeGenerator._draft_after``: k draft steps,
    built and evaluated); the drafter itself may run inside ``mx.compile``, where nothing can be
    evaluated."""
    original = SpeculativeGenerator._draft_after

    def draft(self, *args, **kwargs):
        start = time.perf_counter()
        drafts, history = original(self, *args, **kwargs)
        mx.eval(drafts)
        totals["draft"] += time.perf_counter() - start
        return drafts, history

    SpeculativeGenerator._draft_after = draft
    try:
        yield
    finally:
        SpeculativeGenerator._draft_after = original


def profile(runner: Runner, prompts: list[list[int]], ks: list[int]) -> list[dict]:
    """Per round: time drafting, in target forwards (verification), and in everything else
    (acceptance, cache trims, host syncs, Python, detokenizing). Each phase is evaluated where it
    ends, so this pass runs a little slower than the real loop (one host sync per round); its
    'unprofiled' column is the real loop's time per round for comparison."""
    rows = []
    for k in ks:
        totals = dict.fromkeys(("draft", "verify", "prefill"), 0.0)
        target = _Timed(runner.target, totals, "verify")
        wall, rounds, unprofiled, unprofiled_rounds = 0.0, 0, 0.0, 0
        for prompt in prompts:
            with timed_drafting(totals):
                record = timed_stream(
                    stream_generate(
                        target, runner.tokenizer, prompt, runner.max_tokens, runner.drafter,
                        num_draft_tokens=k, draft_schedule="constant",
                    )
                )  # fmt: skip
            wall += record["t_total"]
            rounds += record["rounds"]
            plain_record = timed_stream(
                stream_generate(
                    runner.target, runner.tokenizer, prompt, runner.max_tokens, runner.drafter,
                    num_draft_tokens=k, draft_schedule="constant",
                )
            )  # fmt: skip
            unprofiled += plain_record["t_gen"]
            unprofiled_rounds += plain_record["rounds"]
        rounds_wall = wall - totals["prefill"]
        other = rounds_wall - totals["draft"] - totals["verify"]
        rows.append(
            {
                "k": k,
                "rounds": rounds,
                "draft_ms_per_round": totals["draft"] / rounds * 1e3,
                "verify_ms_per_round": totals["verify"] / rounds * 1e3,
                "other_ms_per_round": other / rounds * 1e3,
                "profiled_ms_per_round": rounds_wall / rounds * 1e3,
                # First to last token of the same generation without the timing hooks.
                "unprofiled_ms_per_round": unprofiled / unprofiled_rounds * 1e3,
            }
        )
    return rows


# -- report -----------------------------------------------------------------------------------


def fmt(value, pattern="{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def report(result: dict) -> str:
    lines = [
        *bc.report_head("MTP speculative decoding vs plain decoding", result),
        f"Pair: `{result['model']}` + `{result['draft_model']}` ({result['dtype']}); "
        f"{result['num_prompts']} prompts ({result['prompt_lengths']}), "
        f"{result['max_tokens']} new tokens each, {result['repeats']} repeat(s), arms interleaved "
        f"run by run in random order with a {result['cooldown']} s cool-down; `auto`'s "
        f"costs: {result.get('costs_cache', 'the user cache')}.",
        "",
        "tokens/s: generation tokens/s from the first to the last generated token, median "
        "[quartiles] over runs. speedup: median [quartiles] of per-run ratios to mlx-lm plain "
        "decoding at the same temperature (transformers arms: to transformers plain); "
        "per prompt: median [quartiles] over prompts of the ratio of median tokens/s over the "
        "repeats (with one repeat, the per-run ratios); "
        "total: ratio of summed per-token generation times.",
        "",
    ]
    headers = [
        "arm",
        "tokens/s",
        "speedup",
        "per prompt",
        "total",
        "acceptance",
        "tokens/round",
        "tokens/forward",
        "rounds",
        "peak MiB",
        "identical",
        "ideal",
        "measured/ideal",
        "loop eff.",
    ]
    rows = []
    for s in result["arms"]:
        rows.append(
            [
                s["arm"],
                bc.spread(s["gen_tps"], 1, 1),
                *(
                    bc.spread(s.get(key), 1, 2) if s["kind"] not in ("plain", "hf-plain") else "1"
                    for key in ("speedup", "speedup_per_prompt")
                ),
                fmt(s["speedup_total_time"]),
                fmt(s["acceptance"], "{:.3f}"),
                fmt(s["tokens_per_round"]),
                fmt(s["tokens_per_target_forward"]),
                fmt(s["rounds"]["median"], "{:.0f}") if s["rounds"]["n"] else "-",
                fmt(s["peak_memory"] / 2**20 if s["peak_memory"] else None, "{:.1f}"),
                s["identical_to_plain_greedy"] or "-",
                fmt(s.get("ideal_speedup")),
                fmt(s.get("measured_over_ideal")),
                fmt(s.get("loop_efficiency")),
            ]
        )
    lines += [bc.markdown_table(headers, rows), ""]
    micro = result["efficiency"]
    fit = micro["fit"]
    lines += [
        f"Engine costs on the loaded pair ({micro['context']} cached positions), in ms. Queued "
        "(calls dispatched back to back, each feeding the next, as the loops run them; the "
        "fastest of 5 blocks of 4 calls), per temperature: "
        + "; ".join(
            f"temp {temp}: t_target(L) "
            + ", ".join(f"L={i + 1}: {1e3 * t:.2f}" for i, t in enumerate(c["verify"]))
            + f", draft step {1e3 * c['draft']:.2f}"
            for temp, c in micro["queued"].items()
        )
        + f". One synchronous call each (built, run, waited for; median [min-max] of "
        f"{micro['iters']}): t_target(L) "
        + ", ".join(f"L={L}: {bc.spread(s, 1e3, 2)}" for L, s in micro["t_target"].items())
        + f" (fit {fit['fixed'] * 1e3:.2f} + {fit['per_token'] * 1e3:.2f} L); t_draft "
        + ", ".join(f"{m} {bc.spread(s, 1e3, 2)}" for m, s in micro["t_draft"].items())
        + ". ideal = tokens/round x (mlx-lm plain seconds per token at the arm's temperature) / "
        "mean over rounds of (t_target(k+1) + k t_draft), every round of the arm (auto's plain "
        "steps included); loop eff. = that mean / measured time per round.",
        "",
    ]
    memory = result.get("memory_check") or {}
    for kind, label in (("plain", "mlx-lm plain"), ("ours-plain", "our engine without drafter")):
        check = memory.get(kind)
        if not check:
            continue
        lines += [
            f"Memory vs {label}: worst MTP peak {memory['worst_mtp_peak'] / 2**20:.1f} MiB; "
            f"target-only peak {check['target_only_peak'] / 2**20:.1f} MiB (drafter weights "
            f"{memory['drafter_bytes'] / 2**20:.1f} MiB subtracted); limit (+5% + drafter) "
            f"{check['limit'] / 2**20:.1f} MiB: {'within' if check['within_limit'] else 'OVER'}.",
            "",
        ]
    if result.get("profile"):
        headers = [
            "k",
            "draft ms/round",
            "verify ms/round",
            "other ms/round",
            "profiled ms/round",
            "unprofiled ms/round",
        ]
        rows = [[p["k"]] + [f"{p[key]:.2f}" for key in headers_keys()] for p in result["profile"]]
        lines += ["Per-phase breakdown (greedy, constant k; every call evaluated in place):", ""]
        lines += [bc.markdown_table(headers, rows), ""]
    return "\n".join(lines)


def headers_keys() -> list[str]:
    return [
        "draft_ms_per_round",
        "verify_ms_per_round",
        "other_ms_per_round",
        "profiled_ms_per_round",
        "unprofiled_ms_per_round",
    ]


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib not installed: no plot (pip install -e '.[bench]')")
        return False
    fig, (ax_tps, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    temps = sorted({s["temp"] for s in result["arms"]})
    for temp in temps:
        plain = next(
            (s for s in result["arms"] if s["kind"] == "plain" and s["temp"] == temp), None
        )
        if plain is not None:
            ax_tps.axhline(
                plain["gen_tps"]["median"],
                linestyle=":",
                color="gray" if temp == 0 else "silver",
                label=f"mlx-lm plain, temp {temp:g}",
            )
        for schedule in ("constant", "heuristic"):
            arms = [
                s
                for s in result["arms"]
                if s["kind"] == "mtp" and s["temp"] == temp and s["schedule"] == schedule
            ]
            if not arms:
                continue
            ks = [s["k"] for s in arms]
            label = f"{schedule}, temp {temp:g}"
            med = [s["gen_tps"]["median"] for s in arms]
            lo = [s["gen_tps"]["median"] - s["gen_tps"]["p25"] for s in arms]
            hi = [s["gen_tps"]["p75"] - s["gen_tps"]["median"] for s in arms]
            ax_tps.errorbar(ks, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
            ax_acc.plot(ks, [s["acceptance"] for s in arms], marker="o", label=label)
    ax_tps.set_xlabel("k (draft tokens per round; max for heuristic)")
    ax_tps.set_ylabel("generation tokens/s (median, quartiles)")
    ax_tps.legend(fontsize=7)
    ax_acc.set_xlabel("k")
    ax_acc.set_ylabel("acceptance (accepted / drafted)")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend(fontsize=7)
    model = Path(result["model"])
    fig.suptitle(
        f"{model.parent.name}/{model.name} + drafter, {result['dtype']}, "
        f"{result['machine']['cpu']} ({result['machine']['cores']} cores), "
        f"BLAS: {result['machine'].get('blas', '?').split(' (')[0]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- main -------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(FIXTURE / "target"))
    parser.add_argument("--draft-model", default=str(FIXTURE / "assistant"))
    parser.add_argument("--dtype", default="float32", help="cast weights (float32, bfloat16...)")
    parser.add_argument(
        "--prompts",
        default=str(FIXTURE / "held_out_prompts.jsonl"),
        help="JSONL with an input_ids list per line",
    )
    parser.add_argument("--num-prompts", type=int, default=None, help="first N prompts only")
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="cut the prompts (quick runs)"
    )
    parser.add_argument(
        "--long-prompts",
        type=int,
        default=4,
        help="extra prompts made by concatenating the prompts",
    )
    parser.add_argument("--long-length", type=int, default=500, help="tokens per long prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ks", default="1,2,3,4,5,6")
    parser.add_argument("--schedules", default="auto,constant,heuristic")
    parser.add_argument("--temps", default="0,0.7")
    parser.add_argument("--top-p", type=float, default=0.0, help="top-p of every sampled arm")
    parser.add_argument(
        "--sampled-schedules", default=None, help="schedules of sampled arms (default --schedules)"
    )
    parser.add_argument("--auto-k-max", type=int, default=6, help="num_draft_tokens for auto")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cooldown", type=float, default=0.2, help="seconds between runs")
    parser.add_argument("--no-engine-plain", action="store_true", help="skip the ours-plain arm")
    parser.add_argument("--with-transformers", action="store_true")
    parser.add_argument("--hf-k", type=int, default=4, help="num_assistant_tokens for transformers")
    parser.add_argument("--hf-model", default=None, help="HF target folder (default --model)")
    parser.add_argument(
        "--hf-draft-model", default=None, help="HF assistant (default --draft-model)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads for the transformers arms (1: like MLX here, and stable on a shared "
        "machine; 2 threads with another process on the other core is several times slower)",
    )
    parser.add_argument("--micro-iters", type=int, default=10, help="calls per engine-cost figure")
    parser.add_argument("--profile", action="store_true", help="add the per-phase breakdown")
    parser.add_argument("--profile-ks", default=None, help="ks to profile (default --ks)")
    parser.add_argument("--profile-prompts", type=int, default=4)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument(
        "--from-json", default=None, help="only rewrite the report and plot of a saved run"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fresh-costs",
        action="store_true",
        help="auto's cost cache starts empty, as on a user's first run (default: the user's)",
    )
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.schedules = [s for s in args.schedules.split(",") if s]
    sampled = args.sampled_schedules
    args.sampled_schedules = [s for s in sampled.split(",") if s] if sampled else args.schedules
    args.temps = [float(t) for t in args.temps.split(",") if t]
    if 0.0 not in args.temps:
        args.temps.insert(0, 0.0)  # the greedy plain run is the reference for 'identical'
    args.profile_ks = [int(k) for k in args.profile_ks.split(",")] if args.profile_ks else args.ks
    return args


def prefilled_cache(target, prompt: list[int], slack: int) -> list:
    cache = target.make_cache(draft_slack=slack)
    mx.eval(target.backbone(mx.array(prompt)[None], cache=cache))
    return cache


def engine_costs(target, drafter, prompt: list[int], args) -> dict:
    """Synchronous single-call costs (``measure_pair``), and per temperature the queued costs
    the ``auto`` controller measures (``SpeculativeGenerator.measure_costs``, every width, more
    calls), on a cache prefilled with ``prompt``."""
    k_max = max([*args.ks, args.auto_k_max])
    cache = prefilled_cache(target, prompt, k_max + 1)
    lengths = list(range(1, k_max + 2))
    dtype = getattr(mx, args.dtype) if args.dtype else mx.float32
    micro = measure_pair(
        target, drafter, cache, lengths, args.micro_iters, 2, target.args.vocab_size, dtype
    )
    micro["fit"] = linear_fit(micro["t_target"])
    micro["context"] = len(prompt)
    micro["iters"] = args.micro_iters
    micro["queued"] = {}
    for temp in args.temps:
        policy = make_policy(temp=temp, top_p=args.top_p if temp else 0.0)
        engine = SpeculativeGenerator(target, drafter, policy, num_draft_tokens=k_max)
        for _ in engine.generate(mx.array(prompt), 1):
            pass
        costs = engine.measure_costs(k_max, widths=lengths, calls=4, blocks=5)
        micro["queued"][str(temp)] = costs.to_dict()
    return micro


def write_outputs(result: dict, out: Path) -> None:
    bc.write_results(out, "bench_mtp", result, report(result))
    plot(result, out / "bench_mtp.png")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        write_outputs(result, Path(args.out))
        return result
    if args.fresh_costs:  # as a user's first run: auto measures its costs on first use
        os.environ["MLX_GEMMA_MTP_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_mtp_costs_")
    costs_cache = "fresh (measured on first use)" if args.fresh_costs else str(cache_dir())
    target, drafter, tokenizer = load(args.model, args.draft_model, dtype=args.dtype)
    drafter_bytes = sum(p.nbytes for _, p in tree_flatten(drafter.parameters()))
    prompts = read_prompts(Path(args.prompts), args.num_prompts)
    if args.max_prompt_tokens:
        prompts = [p[: args.max_prompt_tokens] for p in prompts]
    prompts += long_prompts(prompts, args.long_prompts, args.long_length)
    hf = None
    if args.with_transformers:
        hf = HFRunner(
            Path(args.hf_model or args.model),
            Path(args.hf_draft_model or args.draft_model),
            args.torch_threads,
        )
    runner = Runner(target, drafter, tokenizer, args.max_tokens, hf, args.top_p)
    arms = make_arms(args)
    command = "python scripts/bench_mtp.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"[bench] {len(arms)} arms x {len(prompts)} prompts x {args.repeats} repeat(s)", flush=True
    )

    # Warm up every code path once (first calls build caches and compile small kernels).
    for arm in arms:
        runner.run(arm, prompts[0][:16], args.seed)

    runs = []
    rng = random.Random(args.seed)
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for p, prompt in enumerate(prompts):
            order = list(arms)
            rng.shuffle(order)
            for arm in order:
                time.sleep(args.cooldown)
                record = runner.run(arm, prompt, args.seed + 1000 * repeat + p)
                n = len(record["tokens"])
                record["gen_tps"] = (n - 1) / record["t_gen"] if n > 1 and record["t_gen"] else None
                record.update(arm=arm.name, prompt=p, repeat=repeat, prompt_tokens=len(prompt))
                runs.append(record)
            print(
                f"[bench] repeat {repeat} prompt {p + 1}/{len(prompts)} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            gc.collect()

    summaries = summarize_arms(arms, runs, drafter_bytes)
    micro = engine_costs(target, drafter, max(prompts, key=len), args)
    add_efficiency(summaries, runs, micro["queued"])
    lengths = sorted({len(p) for p in prompts})
    result = {
        "machine": bc.machine_info(),
        "command": command,
        "model": args.model,
        "draft_model": args.draft_model,
        "dtype": args.dtype,
        "top_p": args.top_p,
        "num_prompts": len(prompts),
        "prompt_lengths": f"{lengths[0]}-{lengths[-1]} tokens",
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "cooldown": args.cooldown,
        "costs_cache": costs_cache,
        "arms": summaries,
        "efficiency": micro,
        "memory_check": memory_check(summaries),
        "tokens_per_round_by_k": {
            s["k"]: s["tokens_per_round"]
            for s in summaries
            if s["kind"] == "mtp" and s["temp"] == 0 and s["schedule"] == "constant"
        },
        "runs": runs,
    }
    if args.profile:
        result["profile"] = profile(runner, prompts[: args.profile_prompts], args.profile_ks)
    write_outputs(result, Path(args.out))
    return result


if __name__ == "__main__":
    main()
