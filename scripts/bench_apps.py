"""What apps see: time to first token of a conversation's next turn with the prompt cache kept
(against prefilling the whole conversation again), and tokens/s through the OpenAI-compatible
server against the direct Python API on the same prompts.

Arms are interleaved (a shuffled order per repeat) and reported as medians with quartiles, since
the machine may be shared.
"""

import argparse
import random
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from mlx_gemma_mtp import benchmarks as bc  # noqa: E402
from mlx_gemma_mtp import generate, load, make_prompt_cache, stream_generate  # noqa: E402
from mlx_gemma_mtp.benchmarks import long_prompts, read_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_pair_arguments(parser)
    parser.add_argument("--history", type=int, default=2000, help="Tokens before turn 2.")
    parser.add_argument("--reply", type=int, default=32, help="Tokens of the turn-1 reply.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--server-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128, help="Per server/direct request.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    return parser.parse_args(argv)


def rollback(cache, length: int) -> None:
    """Back to the first ``length`` tokens (within the sliding caches' slack)."""
    for c in cache:
        c.trim(c.offset - length)
    del cache.tokens[length:]


def first_token_seconds(model, drafter, prompt: list, cache=None) -> float:
    start = time.perf_counter()
    stream = stream_generate(model, None, prompt, 1, drafter, prompt_cache=cache)
    next(stream)
    elapsed = time.perf_counter() - start
    stream.close()
    return elapsed


def ttft_turn_two(model, drafter, prompts: list, args) -> dict:
    """Turn 1: ``history`` tokens and the reply; turn 2 adds one more prompt's tokens."""
    history = long_prompts(prompts, 1, args.history)[0]
    cache = make_prompt_cache(model, draft_model=drafter)
    list(stream_generate(model, None, history, args.reply, drafter, prompt_cache=cache))
    conversation = list(cache.tokens)
    new = prompts[-1][1:17]
    samples = {"reused cache": [], "fresh": []}
    for _ in range(args.repeats):
        for arm in random.sample(sorted(samples), 2):
            if arm == "fresh":
                samples[arm].append(first_token_seconds(model, drafter, conversation + new))
            else:
                samples[arm].append(first_token_seconds(model, drafter, new, cache))
                rollback(cache, len(conversation))
    stats = {arm: bc.summarize(values) for arm, values in samples.items()}
    return {
        "history_tokens": len(conversation),
        "new_tokens": len(new),
        "seconds": stats,
        "speedup": stats["fresh"]["median"] / stats["reused cache"]["median"],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "mlx_gemma_mtp.server", "--model", args.model, "--draft-model",
        args.draft_model, "--dtype", args.dtype, "--port", str(free_port()),
        "--prompt-cache-size", "0",
    ]  # fmt: skip
    return bc.start_server(command)


def server_against_direct(model, drafter, tokenizer, prompts: list, args) -> dict:
    """Generated tokens / request wall time, the same prompts, greedy, no prompt-cache reuse
    on either side (the server runs with --prompt-cache-size 0)."""
    process, base = start_server(args)
    samples = {"server": [], "direct": []}
    mismatches = 0
    try:
        with httpx.Client(base_url=base, timeout=600) as client:
            body = {"max_tokens": args.max_tokens, "temperature": 0}
            for prompt in prompts:  # warm-up, both sides
                client.post("/v1/completions", json={**body, "prompt": prompt})
                generate(model, tokenizer, prompt, max_tokens=args.max_tokens, draft_model=drafter)
            for _ in range(args.repeats):
                for prompt in prompts:
                    texts = {}
                    for arm in random.sample(sorted(samples), 2):
                        start = time.perf_counter()
                        if arm == "server":
                            reply = client.post("/v1/completions", json={**body, "prompt": prompt})
                            reply.raise_for_status()
                            texts[arm] = reply.json()["choices"][0]["text"]
                            count = reply.json()["usage"]["completion_tokens"]
                        else:
                            responses = list(
                                stream_generate(model, tokenizer, prompt, args.max_tokens, drafter)
                            )
                            texts[arm] = "".join(r.text for r in responses)
                            count = len(responses)
                        samples[arm].append(count / (time.perf_counter() - start))
                    mismatches += texts["server"] != texts["direct"]
    finally:
        process.terminate()
        process.wait(timeout=30)
    stats = {arm: bc.summarize(values) for arm, values in samples.items()}
    return {
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "tokens_per_second": stats,
        "ratio": stats["server"]["median"] / stats["direct"]["median"],
        "text_mismatches": mismatches,
    }


def report(result: dict) -> str:
    ttft, serve = result["ttft"], result["server"]
    lines = bc.report_head("Apps: prompt-cache reuse and the server", result)
    lines += [
        "",
        f"Regime: {result['dtype']}, greedy, drafter on (k=4), {result['repeats']} repeats, "
        f"arms interleaved; load average at start {result['machine']['load_average']}.",
        "",
        f"Time to first token of turn 2 ({ttft['history_tokens']}-token history, "
        f"{ttft['new_tokens']} new tokens), ms, median [quartiles]:",
        "",
        bc.markdown_table(
            ["arm", "TTFT ms"],
            [[arm, bc.spread(stat, 1000)] for arm, stat in ttft["seconds"].items()],
        ),
        "",
        f"Speedup with the reused cache: **{ttft['speedup']:.1f}x** (target >= 5x).",
        "",
        f"Tokens/s, {serve['prompts']} prompts x {serve['max_tokens']} new tokens, "
        "request wall time (prefill included), median [quartiles]:",
        "",
        bc.markdown_table(
            ["arm", "tokens/s"],
            [[arm, bc.spread(stat)] for arm, stat in serve["tokens_per_second"].items()],
        ),
        "",
        f"Server / direct: **{serve['ratio']:.3f}** (target within 5%); "
        f"text mismatches: {serve['text_mismatches']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    random.seed(0)
    model, drafter, tokenizer = load(args.model, args.draft_model, args.dtype)
    prompts = read_prompts(args.prompts, None)
    result = {
        "machine": bc.machine_info(),
        "command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "dtype": args.dtype,
        "repeats": args.repeats,
    }
    result["ttft"] = ttft_turn_two(model, drafter, prompts, args)
    server_prompts = prompts[: args.server_prompts]
    result["server"] = server_against_direct(model, drafter, tokenizer, server_prompts, args)
    bc.write_results(args.out, "bench_apps", result, report(result))
    return result


if __name__ == "__main__":
    main()
