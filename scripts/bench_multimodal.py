"""MTP after an image prompt next to the same length of text prompt, on one multimodal pair.

For each prompt kind (``text``: random token ids; ``image``: BOS, one picture, random ids, the
same length once the picture's placeholders are expanded) and each arm (``plain``: no drafter;
``mtp``: the drafter, ``--k`` tokens a round, constant schedule), greedy: prompt tokens/s (the
image prompt's includes its vision tower), generation tokens/s (median over ``--repeats``), the
MTP speedup over plain for the same prompt kind, acceptance and tokens per target forward.

Regime: with the random pair ``scripts/make_tiny_multimodal_pair.py`` writes (the default: written
into a temporary folder; needs the test extras) the drafter's acceptance is near 0, so the speedup
shows what drafting costs after each kind of prompt, not what a trained pair gains; pass
``--pair`` a folder with ``target`` and ``assistant`` (and ``--image``) for a real one.

    python scripts/bench_multimodal.py --max-tokens 64 --repeats 3
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from mlx_gemma_mtp import load  # noqa: E402
from mlx_gemma_mtp.generation import stream_generate  # noqa: E402
from mlx_gemma_mtp.media import build_media_prompt, towers_of  # noqa: E402

KINDS = ("text", "image")
ARMS = ("plain", "mtp")


def prompts(target, image: Path, text_length: int, seed: int = 0) -> dict:
    """Token ids of each kind, the same length once the image's placeholders are expanded."""
    vocab = target.args.vocab_size
    rng = np.random.default_rng(seed)
    image_id = towers_of(target).config["image_token_id"]
    words = rng.integers(3, min(vocab, image_id) - 8, text_length).tolist()
    image_prompt = [2, image_id, *words]
    expanded, _, _ = build_media_prompt(target, image_prompt, [image])
    text_prompt = [2, *rng.integers(3, min(vocab, image_id) - 8, len(expanded) - 1).tolist()]
    return {"text": (text_prompt, []), "image": (image_prompt, [image])}


def run(target, drafter, ids: list, images: list, max_tokens: int, k: int) -> dict:
    responses = stream_generate(
        target,
        None,
        ids,
        max_tokens,
        drafter,
        images=images or None,
        num_draft_tokens=k,
        draft_schedule="constant",
    )
    *_, last = responses
    return {
        "prompt_tokens": last.prompt_tokens,
        "prompt_tps": last.prompt_tps,
        "generation_tps": last.generation_tps,
        "acceptance": last.acceptance_rate if last.mode == "mtp" else None,
        "tokens_per_target_forward": last.tokens_per_target_forward,
    }


def measure(pair: Path, image: Path, args) -> list[dict]:
    target, drafter, _ = load(str(pair / "target"), str(pair / "assistant"), dtype=args.dtype)
    rows = []
    for kind, (ids, images) in prompts(target, image, args.text_length).items():
        for arm in ARMS:
            runs = [
                run(target, drafter if arm == "mtp" else None, ids, images, args.max_tokens, args.k)
                for _ in range(args.repeats + 1)
            ][1:]  # the first run warms up (compiles, loads the tower)
            row = {"kind": kind, "arm": arm, **runs[-1]}
            for key in ("prompt_tps", "generation_tps"):
                row[key] = statistics.median(r[key] for r in runs)
            rows.append(row)
    for row in rows:
        plain = next(r for r in rows if r["kind"] == row["kind"] and r["arm"] == "plain")
        row["speedup"] = row["generation_tps"] / plain["generation_tps"]
    return rows


def report(rows: list[dict], regime: str) -> str:
    lines = [
        f"Regime: {regime}",
        "",
        "| prompt | arm | prompt tokens | prompt tok/s | gen tok/s | speedup | acceptance | "
        "tokens/forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        lines.append(
            f"| {r['kind']} | {r['arm']} | {r['prompt_tokens']} | {r['prompt_tps']:.0f} | "
            f"{r['generation_tps']:.1f} | {r['speedup']:.2f} | {acceptance} | "
            f"{r['tokens_per_target_forward']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", help="folder with target/ and assistant/ (default: tiny random)")
    parser.add_argument("--image", help="picture for the image prompt (default: the pair's)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--k", type=int, default=3, help="draft tokens per round")
    parser.add_argument("--text-length", type=int, default=16, help="text after the picture")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the rows as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.pair is None:
            import make_tiny_multimodal_pair

            pair = make_tiny_multimodal_pair.main(["--out", str(Path(tmp) / "pair")])
            regime = "tiny random pair (acceptance near 0: what drafting costs, not gains)"
        else:
            pair, regime = Path(args.pair), f"pair {args.pair}"
        image = Path(args.image) if args.image else pair / "picture.png"
        rows = measure(pair, image, args)
    print(report(rows, f"{regime}; k={args.k}, constant schedule, greedy, {args.dtype}"))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
