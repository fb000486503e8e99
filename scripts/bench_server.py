"""Many clients at once: aggregate tokens/s, time to first token and inter-token latency of our
server (continuous batching with MTP) against ``mlx_lm.server`` (batched plain decoding, the
same target weights and dtype) and against ours at ``--decode-concurrency 1``.

The three servers run side by side; for every client count the arms alternate (a shuffled order
per repeat) and the report gives medians. Every client streams its requests one after another
(``/v1/completions``, the prompt as text, ``--max-tokens`` new tokens, EOS ignored where the
server allows it). The regime is named: the BLAS the servers load (``--openblas`` preloads
OpenBLAS, one thread), the dtype and the temperature.
"""

import argparse
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from mlx_gemma_mtp import benchmarks as bc
from mlx_gemma_mtp.benchmarks import read_prompts

ROOT = Path(__file__).resolve().parents[1]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_pair_arguments(parser)
    parser.add_argument("--clients", default="1,2,4,8", help="Client counts, comma-separated.")
    parser.add_argument("--requests", type=int, default=2, help="Per client, one after another.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--openblas", action="store_true", help="Servers preload OpenBLAS.")
    parser.add_argument(
        "--arms",
        default="ours,ours-serial,mlx-lm",
        help="Also ours-before: the server of the source tree --before (an earlier commit).",
    )
    parser.add_argument("--before", type=Path, help="A checkout of an earlier commit.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(arm: str, args, port: int) -> list[str]:
    if arm == "mlx-lm":
        return [sys.executable, "-m", "mlx_lm.server", "--model", args.mlx_lm_model,
                "--port", str(port), "--prompt-cache-size", "0"]  # fmt: skip
    command = [sys.executable, "-m", "mlx_gemma_mtp.server", "--model", args.model,
               "--draft-model", args.draft_model, "--dtype", args.dtype, "--port", str(port),
               "--prompt-cache-size", "0"]  # fmt: skip
    return command + (["--decode-concurrency", "1"] if arm == "ours-serial" else [])


def same_dtype_copy(model: str, dtype: str, folder: Path) -> str:
    """``model`` for ``mlx_lm.server`` in ``dtype`` (which mlx-lm takes from the files): the
    same weights, converted by mlx-lm into ``folder``."""
    subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", model,
                    "--mlx-path", str(folder), "--dtype", dtype],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return str(folder)


def start(arm: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    if args.openblas:
        env.update(LD_PRELOAD=OPENBLAS, OPENBLAS_NUM_THREADS="1")
    # python -m imports the package of the working folder first: ours-before runs that tree's.
    folder = args.before if arm == "ours-before" else None
    return bc.start_server(server_command(arm, args, port), arm, env=env, cwd=folder)


def stream_one(client: httpx.Client, body: dict) -> dict:
    """One streamed request: its token arrival times (a chunk per token) and its usage."""
    start, times = time.perf_counter(), []
    with client.stream("POST", "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                times.append(time.perf_counter() - start)
    return {"times": times}


def run_clients(base: str, prompts: list[str], clients: int, args) -> dict:
    """``clients`` threads, each streaming ``args.requests`` requests one after another."""
    results, errors = [], []
    body = {"max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True}

    def client_loop(index: int) -> None:
        with httpx.Client(base_url=base, timeout=600) as client:
            for r in range(args.requests):
                prompt = prompts[(index * args.requests + r) % len(prompts)]
                try:
                    results.append(stream_one(client, {**body, "prompt": prompt}))
                except httpx.HTTPError as e:
                    errors.append(str(e))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    tokens = sum(len(r["times"]) for r in results)
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    return {
        "tokens_per_second": tokens / wall,
        "ttft": [r["times"][0] for r in results if r["times"]],
        "itl": gaps,
        "errors": errors,
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def peak_rss(pid: int) -> int:
    """The server's peak resident memory so far (bytes; Linux), 0 where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(args, prompts: list[str]) -> dict:
    arms = args.arms.split(",")
    servers = {arm: start(arm, args) for arm in arms}
    samples = {}
    try:
        for _, base in servers.values():  # warm-up: compile, measure costs, load caches
            run_clients(base, prompts, 2, argparse.Namespace(**{**vars(args), "requests": 1}))
        for clients in [int(c) for c in args.clients.split(",")]:
            for _ in range(args.repeats):
                for arm in random.sample(arms, len(arms)):
                    result = run_clients(servers[arm][1], prompts, clients, args)
                    result["peak_rss"] = peak_rss(servers[arm][0].pid)
                    samples.setdefault((clients, arm), []).append(result)
                    print(clients, arm, round(result["tokens_per_second"], 1), flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)
    table = {}
    for (clients, arm), runs in samples.items():
        ttft = [t for run in runs for t in run["ttft"]]
        itl = [t for run in runs for t in run["itl"]]
        table.setdefault(str(clients), {})[arm] = {
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
            "ttft_p50": percentile(ttft, 0.5),
            "ttft_p95": percentile(ttft, 0.95),
            "itl_p50": percentile(itl, 0.5),
            "itl_p95": percentile(itl, 0.95),
            "errors": sum(len(r["errors"]) for r in runs),
            "peak_rss_mib": max(r["peak_rss"] for r in runs) / 2**20,
        }
    return table


def report(result: dict) -> str:
    regime = (
        f"{'OpenBLAS (1 thread)' if result['openblas'] else 'reference BLAS (default wheel)'}, "
        f"{result['dtype']}, temperature {result['temperature']}, {result['requests']} streamed "
        f"requests x {result['max_tokens']} tokens per client, {result['repeats']} repeats"
    )
    lines = bc.report_head("Server: many clients at once", result)
    lines += [
        "",
        f"Regime: {regime}. Peak RSS: the server process's high-water mark after the "
        "runs of that many clients (client counts run in increasing order).",
        "",
    ]
    rows = []
    for clients, arms in result["table"].items():
        base = arms.get("mlx-lm", {}).get("tokens_per_second")
        for arm, stat in arms.items():
            ratio = stat["tokens_per_second"] / base if base else None
            rows.append([
                clients, arm, f"{stat['tokens_per_second']:.1f}",
                f"{ratio:.2f}" if ratio else "-",
                f"{1000 * stat['ttft_p50']:.0f} / {1000 * stat['ttft_p95']:.0f}",
                f"{1000 * stat['itl_p50']:.1f} / {1000 * stat['itl_p95']:.1f}",
                f"{stat['peak_rss_mib']:.0f}", str(stat["errors"]),
            ])  # fmt: skip
    headers = ["clients", "server", "tokens/s", "vs mlx-lm", "TTFT ms p50/p95",
               "ITL ms p50/p95", "peak RSS MiB", "errors"]  # fmt: skip
    lines.append(bc.markdown_table(headers, rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    random.seed(0)
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(Path(args.model))
    prompts = [tokenizer.decode(ids[1:]) for ids in read_prompts(args.prompts, None)]
    result = {
        "machine": bc.machine_info(),
        "command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        **{
            k: getattr(args, k)
            for k in ("dtype", "temperature", "requests", "max_tokens", "repeats", "openblas")
        },  # fmt: skip
    }
    with tempfile.TemporaryDirectory() as folder:
        args.mlx_lm_model = same_dtype_copy(args.model, args.dtype, Path(folder) / "target")
        result["table"] = measure(args, prompts)
    name = f"bench_server_{'openblas' if args.openblas else 'reference'}_t{args.temperature:g}"
    bc.write_results(args.out, name, result, report(result))
    print(report(result))
    return result


if __name__ == "__main__":
    main()
