"""``python -m mlx_gemma_mtp.calibrate``: what speculation costs and gains for a pair on this
machine, and the number of drafts the ``auto`` schedule would choose: the table to paste into a
bug report.

It measures (or reads from the cache the engine uses) the queued costs of a target forward over
1..k_max+1 tokens and of one draft step, greedy and sampled; measures per-position acceptance on a
few built-in prompts; and shows, for each acceptance level, the ``k`` the controller picks and the
speedup it expects.
"""

import json
import sys

import click
import mlx.core as mx

from .config import ConfigError
from .costs import AcceptanceModel, Costs, expected_tokens
from .engine.loop import DEFAULT_NUM_DRAFT_TOKENS, AutoSchedule, SpeculativeGenerator
from .generation import make_policy
from .machine import speed_identity

PROMPTS = [
    'import os\nimport sys\n\n\ndef main(argv):\n    """Parse the arguments and run."""\n',
    "The history of the printing press begins in the fifteenth century, when",
    "Question: Why is the sky blue? Explain it to a ten-year-old.\nAnswer:",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]
SAMPLING = {"temp": 0.7, "top_p": 0.95}
LEVELS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def prompt_ids(tokenizer, vocab_size: int) -> list[list[int]]:
    if tokenizer is not None:
        return [tokenizer.encode(text) for text in PROMPTS]
    keys = mx.random.split(mx.random.key(0), len(PROMPTS))
    return [mx.random.randint(3, vocab_size, (64,), key=key).tolist() for key in keys]


def measured_costs(target, drafter, prompt: list[int], k_max: int, sampling: dict) -> tuple:
    """The ``auto`` engine's costs for this policy (cached, or measured now and cached)."""
    engine = SpeculativeGenerator(target, drafter, make_policy(**sampling), num_draft_tokens=k_max)
    for _ in engine.generate(mx.array(prompt), 2):
        pass
    return engine.costs, engine.stats.costs


def position_acceptance(target, drafter, prompts, k_max: int, sampling: dict, tokens: int):
    """Per draft position: the share accepted of the drafts whose predecessors were, with
    ``k_max`` drafts every round."""
    reached, accepted = [0] * k_max, [0] * k_max
    for prompt in prompts:
        policy = make_policy(**sampling)
        engine = SpeculativeGenerator(
            target, drafter, policy, num_draft_tokens=k_max, draft_schedule="constant"
        )
        for _ in engine.generate(mx.array(prompt), tokens):
            pass
        for k, n in zip(engine.stats.draft_lengths, engine.stats.accepted_lengths, strict=True):
            for i in range(min(n + 1, k)):
                reached[i] += 1
                accepted[i] += i < n
    return [a / r if r else None for a, r in zip(accepted, reached, strict=True)]


def choices(costs: Costs, k_max: int) -> list[dict]:
    """The controller's ``k`` and expected speedup at each constant acceptance level."""
    rows = []
    for level in LEVELS:
        k = AutoSchedule(costs, k_max).best([level] * k_max, k_max)
        speedup = costs.speedup(expected_tokens([level] * k_max, k), k)
        rows.append({"acceptance": level, "k": k, "expected_speedup": speedup})
    return rows


def calibrate(target, drafter, tokenizer, k_max: int, tokens: int) -> dict:
    prompts = prompt_ids(tokenizer, target.args.vocab_size)
    context = sum(prompts, [])  # a few hundred tokens of context for the cost measurement
    report = {"machine": speed_identity(), "k_max": k_max, "modes": {}}
    for name, sampling in (("greedy", {}), ("sampled temp 0.7 top-p 0.95", SAMPLING)):
        costs, source = measured_costs(target, drafter, context, k_max, sampling)
        acceptance = position_acceptance(target, drafter, prompts, k_max, sampling, tokens)
        report["modes"][name] = {
            "costs": costs.to_dict(),
            "costs_source": source,
            "acceptance_rule": "coupled" if sampling else "match",
            "acceptance_by_position": acceptance,
            "prior_acceptance": AcceptanceModel(k_max).estimates()[0],
            "choices": choices(costs, k_max),
        }
    return report


def format_report(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"Machine: {machine['cpu']} ({machine['platform']}), GPU {machine['gpu'] or '-'}; "
        f"MLX {machine['mlx']} on {machine['device']}; BLAS: {machine['blas']}"
    ]
    for name, mode in report["modes"].items():
        costs = Costs.from_dict(mode["costs"])
        lines += ["", f"## {name}", f"Costs: {mode['costs_source']}", ""]
        lines.append(
            "| k | t_verify(k+1) ms | round ms (t_verify + k t_draft) | per position acc. |"
        )
        lines.append("| --- | --- | --- | --- |")
        for k in range(costs.k_max + 1):
            rate = mode["acceptance_by_position"][k - 1] if k else None
            lines.append(
                f"| {k} | {1e3 * costs.verify[k]:.2f} | {1e3 * costs.round_seconds(k):.2f} | "
                + ("-" if rate is None else f"{rate:.3f}")
                + " |"
            )
        lines.append(f"\nt_draft = {1e3 * costs.draft:.2f} ms per draft step")
        lines += ["", "| acceptance | k auto picks | expected speedup |", "| --- | --- | --- |"]
        for row in mode["choices"]:
            lines.append(
                f"| {row['acceptance']:.2f} | {row['k']} | {row['expected_speedup']:.2f}x |"
            )
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="Gemma 4 target: MLX or Hugging Face folder, hub id.")
@click.option("--draft-model", required=True, help="Its Gemma 4 assistant drafter.")
@click.option(
    "--num-draft-tokens",
    default=DEFAULT_NUM_DRAFT_TOKENS,
    show_default=True,
    type=click.IntRange(min=1),
    help="The most drafts per round (k_max).",
)
@click.option("--tokens", default=64, show_default=True, help="Tokens per acceptance prompt.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report.")
def main(model, draft_model, num_draft_tokens, tokens, json_path) -> None:
    """Measure a pair's costs on this machine and the draft length `auto` would choose."""
    from .loading import load

    try:
        target, drafter, tokenizer = load(model, draft_model)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    report = calibrate(target, drafter, tokenizer, num_draft_tokens, tokens)
    click.echo(format_report(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
