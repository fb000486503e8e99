"""Self-check after installing: ``python -m mlx_gemma_mtp.check [--model T --draft-model D]``.

Reports the platform and versions, whether each Metal kernel compiles and matches the MLX-ops
path (and how fast it is), and runs a target/drafter pair: greedy MTP must give exactly plain
decoding's tokens, seeded sampling must be reproducible and valid. The pair is the one given,
else the repository's fixture pair when the source tree is at hand, else a tiny random pair built
in memory (a wheel ships no weights). Exits with status 1 when any check fails.
"""

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import click
import mlx.core as mx

from .calibrate import choices
from .config import ConfigError, normalize_target_config
from .contract import NEAR_TIE
from .costs import load_costs
from .engine.loop import SpeculativeGenerator
from .generation import stream_generate
from .loading import all_arrays, load, validate_pair
from .models import centroid_head as ch
from .models.target import Target

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gemma4-tiny"
GREEDY_TOKENS = 48
SAMPLING_TOKENS = 32
SEED = 7
KERNEL_TIMING_RUNS = 50


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


# -- platform ------------------------------------------------------------------------------------


def chip() -> str:
    device = mx.gpu if mx.metal.is_available() else mx.cpu
    return str(mx.device_info(device).get("device_name") or platform.machine())


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def platform_info() -> dict:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "chip": chip(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": version("mlx-lm"),
        "mlx_gemma_mtp": version("mlx-gemma-mtp"),
        "metal": mx.metal.is_available(),
        "default_device": str(mx.default_device()),
    }


def version_check(info: dict) -> Check:
    detail = ", ".join(f"{k} {info[k]}" for k in ("python", "mlx", "mlx_lm", "chip"))
    numbers = tuple(int(p) for p in info["mlx"].split(".")[:3] if p.isdigit())
    if info["metal"] and numbers < (0, 32, 2):
        # before 0.32.2 a primitive that throws during eval can leave arrays corrupt
        return Check("versions", False, detail + ": Metal needs mlx >= 0.32.2")
    return Check("versions", True, detail)


# -- the pair ------------------------------------------------------------------------------------


def load_pair(model: str | None, draft_model: str | None):
    """``(target, drafter, tokenizer, source)`` for the checks."""
    if model is not None:
        target, drafter, tokenizer = load(model, draft_model)
        return target, drafter, tokenizer, f"given ({model} + {draft_model})"
    if (FIXTURE / "target" / "config.json").is_file():
        target, drafter, tokenizer = load(
            str(FIXTURE / "target"), str(FIXTURE / "assistant"), dtype="float32"
        )
        return target, drafter, tokenizer, f"fixture ({FIXTURE})"
    target, drafter = random_pair()
    return target, drafter, None, "tiny random pair (built in memory)"


def tiny_text_config(**changes) -> dict:
    config = {
        "model_type": "gemma4_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 5,
        # the last two layers reuse the K/V of the last sliding and full layers before them
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]
        + ["sliding_attention", "full_attention"],
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "global_head_dim": 64,
        "num_kv_shared_layers": 2,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "vocab_size": 2048,
        "sliding_window": 16,
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "full_attention": {
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
                "rope_type": "proportional",
            },
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
    }
    return {**config, **changes}


def random_pair():
    """A float32 target and centroid-head drafter with random weights (nothing downloaded)."""
    from mlx_lm.models import gemma4_text

    from .models import gemma4_assistant

    mx.random.seed(SEED)
    target_config = normalize_target_config(tiny_text_config(), "the tiny random target")
    target = Target(gemma4_text.Model(gemma4_text.ModelArgs.from_dict(target_config)))
    drafter_config = {
        "model_type": "gemma4_assistant",
        "backbone_hidden_size": 64,
        "use_ordered_embeddings": True,
        "num_centroids": 64,
        "centroid_intermediate_top_k": 8,
        "text_config": tiny_text_config(
            num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]
        ),
    }
    drafter = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(drafter_config))
    drafter.masked_embedding.token_ordering = mx.random.permutation(2048).astype(mx.int32)
    drafter.order_lm_head()
    for model in (target.model, drafter):
        model.set_dtype(mx.float32)
        model.eval()
    validate_pair(target, drafter)
    mx.eval(all_arrays(target.model), all_arrays(drafter))
    return target, drafter


def prompt_ids(tokenizer) -> list[int]:
    if tokenizer is not None:
        return tokenizer.encode("The three primary colours are red, yellow and")
    return [2, 17, 101, 5, 999, 33]


def compute_dtype(target: Target):
    return target.backbone.norm.weight.dtype


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


# -- generation ----------------------------------------------------------------------------------


def generate_tokens(target, drafter, prompt, max_tokens: int, **sampling):
    """Token ids, the target's log-probability rows and the last response of one generation.
    Drafting every round (``constant``): ``auto`` may rightly park it on this machine, and the
    check is of the drafting path."""
    tokens, rows, response = [], [], None
    options = dict(num_draft_tokens=4, draft_schedule="constant", **sampling)
    for response in stream_generate(target, None, prompt, max_tokens, drafter, **options):
        tokens.append(response.token)
        rows.append(response.logprobs)
    return tokens, rows, response


def greedy_check(target, drafter, prompt) -> Check:
    plain, plain_rows, _ = generate_tokens(target, None, prompt, GREEDY_TOKENS)
    mtp, _, response = generate_tokens(target, drafter, prompt, GREEDY_TOKENS)
    stats = (
        f"{response.accepted}/{response.drafted} drafts accepted, "
        f"{response.tokens_per_target_forward:.2f} tokens per target forward"
    )
    if mtp == plain:
        return Check("greedy MTP = plain", True, f"{len(mtp)} identical tokens; {stats}")
    pairs = zip(mtp, plain, strict=False)  # lengths may differ (an EOS)
    first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(mtp), len(plain)))
    detail = f"first difference at token {first} of {len(plain)}"
    if first < min(len(mtp), len(plain)):
        row = plain_rows[first]
        gap = (row[plain[first]] - row[mtp[first]]).item()
        dtype = compute_dtype(target)
        detail += f" (plain {plain[first]}, MTP {mtp[first]}, log-probability gap {gap:.3f})"
        if dtype != mx.float32 and gap <= NEAR_TIE:
            return Check(
                "greedy MTP = plain", True, f"{detail}: a {dtype_name(dtype)} near tie; {stats}"
            )
    return Check("greedy MTP = plain", False, detail)


def sampling_check(target, drafter, prompt, vocab_size: int) -> Check:
    """Seeded sampling with drafting gives seeded plain decoding's tokens, valid ones."""
    runs = []
    for model in (None, drafter):
        mx.random.seed(SEED)
        tokens, rows, response = generate_tokens(
            target, model, prompt, SAMPLING_TOKENS, temp=1.0, top_p=0.95
        )
        runs.append(tokens)
    problems = []
    if runs[0] != runs[1]:
        problems.append("the same seed gave other tokens with drafting than without")
    if len(runs[0]) != SAMPLING_TOKENS and response.finish_reason != "stop":
        problems.append(f"{len(runs[0])} tokens instead of {SAMPLING_TOKENS}")
    if not all(0 <= t < vocab_size for t in runs[0]):
        problems.append("a token id outside the vocabulary")
    chosen = [row[t].item() for row, t in zip(rows, runs[0], strict=True)]
    if not all(-1e30 < lp <= 1e-4 for lp in chosen):
        problems.append("a sampled token without a finite log-probability")
    if response.mode != "mtp" or response.drafted == 0:
        problems.append("the drafter was not used")
    if problems:
        return Check("sampling (temp 1, top-p 0.95)", False, "; ".join(problems))
    detail = (
        f"{len(runs[0])} tokens, with a seed the same as plain decoding's; "
        f"{response.accepted}/{response.drafted} drafts accepted"
    )
    return Check("sampling (temp 1, top-p 0.95)", True, detail)


# -- the Metal kernels ---------------------------------------------------------------------------


def head_inputs(drafter) -> ch.HeadInputs | None:
    if not getattr(drafter.args, "use_ordered_embeddings", False):
        return None
    me = drafter.masked_embedding
    return ch.HeadInputs(
        ch.row_matrix(me.centroids),
        ch.row_matrix(drafter.model.embed_tokens),
        me.token_ordering,
        me.top_k,
        drafter.lm_head_centroid_ordered,
    )


def kernel_checks(drafter) -> list[Check]:
    heads = head_inputs(drafter)
    if heads is None:
        return [Check("metal kernels", True, "not used: this drafter has no centroid head")]
    if not ch.kernels_wanted():
        why = f"{ch.METAL_SETTING}=0" if ch.kernel_setting() is False else "no Metal GPU"
        return [Check("metal kernels", True, f"not used ({why}): the MLX-ops path runs")]
    hidden = mx.zeros((1, ch.row_width(heads.centroids)), drafter.model.norm.weight.dtype)
    if not ch.metal_supported(hidden, heads.centroids, heads.lm_head, heads.top_k):
        return [Check("metal kernels", True, "not used: they cannot read this head's weights")]
    results = ch.probe_kernels(heads, hidden.dtype)
    checks = [Check(f"metal kernel {r.kernel}", r.ok, r.detail) for r in results]
    if all(r.ok for r in results):
        checks.append(kernel_speed(drafter, hidden))
    return checks


def kernel_speed(drafter, hidden: mx.array) -> Check:
    me = drafter.masked_embedding
    args = (me.centroids, drafter.model.embed_tokens, me.token_ordering, me.top_k)
    ordered = drafter.lm_head_centroid_ordered
    x = mx.random.normal(hidden.shape, key=mx.random.key(SEED)).astype(hidden.dtype)
    medians = {}
    for kernels in (True, False):
        times = []
        for _ in range(KERNEL_TIMING_RUNS):
            start = time.perf_counter()
            mx.eval(ch.centroid_candidates(x, *args, ordered, kernels=kernels))
            times.append(time.perf_counter() - start)
        medians[kernels] = statistics.median(times[5:]) * 1e3
    detail = (
        f"centroid head, one row: kernels {medians[True]:.3f} ms, MLX ops {medians[False]:.3f} ms "
        f"(median of {KERNEL_TIMING_RUNS - 5}; {medians[False] / medians[True]:.2f}x)"
    )
    return Check("metal kernel speed", True, detail)


# -- all checks ----------------------------------------------------------------------------------


def run_checks(model: str | None = None, draft_model: str | None = None) -> list[Check]:
    checks = [version_check(platform_info())]
    try:
        target, drafter, tokenizer, source = load_pair(model, draft_model)
    except (ConfigError, OSError, ValueError) as e:
        return [*checks, Check("pair", False, f"could not load: {e}")]
    if drafter is None:
        return [*checks, Check("pair", False, "no drafter: give --draft-model")]
    checks.append(Check("pair", True, f"{source}, {dtype_name(compute_dtype(target))}"))
    checks += kernel_checks(drafter)
    prompt = prompt_ids(tokenizer)
    checks.append(greedy_check(target, drafter, prompt))
    checks.append(sampling_check(target, drafter, prompt, drafter.vocab_size))
    checks.append(cost_table(target, drafter))
    return checks


def cost_table(target, drafter) -> Check:
    """The ``auto`` schedule's cached costs for this pair on this machine (greedy), as the
    engine's first generation or ``calibrate`` measured them; informational."""
    engine = SpeculativeGenerator(target, drafter)
    costs, path = load_costs(engine.costs_identity(), engine.k_max)
    if costs is None:
        return Check(
            "cost table",
            True,
            "none cached yet for this pair and machine: `python -m mlx_gemma_mtp.calibrate "
            "--model T --draft-model D` measures it (the first generation does too)",
        )
    table = ", ".join(f"L={i + 1}: {1e3 * t:.2f}" for i, t in enumerate(costs.verify))
    picks = ", ".join(
        f"{row['acceptance']}: k={row['k']}"
        for row in choices(costs, engine.k_max)
        if row["acceptance"] in (0.5, 0.7, 0.9)
    )
    detail = (
        f"cached in {path}: t_verify(L) ms {table}; t_draft {1e3 * costs.draft:.2f} ms; "
        f"auto picks at acceptance {picks}"
    )
    return Check("cost table", True, detail)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", help="Gemma 4 target (MLX or Hugging Face folder, or hub id).")
@click.option("--draft-model", help="Its assistant drafter (needed with --model).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results here.")
def main(model, draft_model, json_path) -> None:
    """Check this installation: platform, Metal kernels, and a pair's exactness."""
    if (model is None) != (draft_model is None):
        raise click.UsageError("give both --model and --draft-model, or neither")
    info = platform_info()
    click.echo(
        f"{info['platform']} | {info['chip']} | Python {info['python']} | mlx {info['mlx']} | "
        f"mlx-lm {info['mlx_lm']} | Metal {'yes' if info['metal'] else 'no'}"
    )
    checks = run_checks(model, draft_model)
    for check in checks:
        click.echo(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    ok = all(check.ok for check in checks)
    if json_path:
        report = {"ok": ok, "platform": info, "checks": [asdict(c) for c in checks]}
        Path(json_path).write_text(json.dumps(report, indent=2))
    click.echo("all checks passed" if ok else "some checks FAILED", err=not ok)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
