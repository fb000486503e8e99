"""What choosing a round's tokens costs, apart from the forward: ``TokenPolicy.accept`` from the
target's logits of ``L`` verified rows (the log-softmax included where the policy reads it), per
policy: greedy, temperature 1.0, temperature 0.7 with top-p 0.95 (with and without the first
row's sort).

Rows are random logits over the fixture's vocabulary (``--vocab``), which makes a top-p
nucleus of a few hundred to thousands of tokens, as the fixture's own rows have. Median of
``--iters`` evaluated calls, each after ``--warmup``. Run it on two checkouts (``PYTHONPATH=TREE``)
to compare them; a round's cost is this plus ``t_target(L)`` of ``bench_mtp.py``.

    python scripts/bench_sampling.py
    python scripts/bench_sampling.py --rows 1,3,5,7 --vocab 262144
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp import benchmarks as bc
from mlx_gemma_mtp.generation import make_policy

# name: (sampling options, whether the first row is sorted: the batch engine's rounds, and
# single-stream rounds after frequent guesses; see ``TokenPolicy.choose``)
POLICIES = {
    "greedy": ({}, True),
    "temperature 1.0": (dict(temp=1.0), True),
    "temperature 0.7, top-p 0.95 (single stream)": (dict(temp=0.7, top_p=0.95), False),
    "temperature 0.7, top-p 0.95, first row sorted (batch)": (dict(temp=0.7, top_p=0.95), True),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,3,5", help="verified rows L (k + 1) per round")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="bench_out")
    return parser.parse_args(argv)


def accept_seconds(
    options: dict, first_exact: bool, rows: int, vocab: int, iters: int, warmup: int
) -> dict:
    mx.random.seed(0)
    logits = mx.random.normal((rows, vocab)) * 3
    mx.eval(logits)
    policy, seed = make_policy(**options), mx.array(1, mx.uint32)
    drafts = [mx.array([i]) for i in range(rows - 1)]

    def accept():
        _, choice_rows = policy.target_rows(logits, mx.array([], mx.int32), drafts)
        mx.eval(policy.accept(drafts, choice_rows, seed, 100, first_exact))

    return bc.time_calls(accept, iters, warmup)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command_args = sys.argv[1:] if argv is None else argv
    rows = [int(r) for r in args.rows.split(",")]
    cells = [
        dict(policy=name, rows=r, **accept_seconds(*policy, r, args.vocab, args.iters, args.warmup))
        for name, policy in POLICIES.items()
        for r in rows
    ]
    result = {
        "command": " ".join(["python scripts/bench_sampling.py", *command_args]),
        "machine": bc.machine_info(),
        "vocab": args.vocab,
        "cells": cells,
    }
    lines = bc.report_head("Choosing a round's tokens (TokenPolicy.accept)", result)
    lines += ["", f"Vocabulary {args.vocab}; ms per call, median [quartiles].", ""]
    table = [[c["policy"], c["rows"], bc.spread(c, 1e3, 2)] for c in cells]
    lines.append(bc.markdown_table(["policy", "rows L", "ms"], table))
    bc.write_results(Path(args.out), "bench_sampling", result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
