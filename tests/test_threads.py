"""Two target/drafter pairs generating at once on two threads do not interfere."""

from concurrent.futures import ThreadPoolExecutor

from conftest import FIXTURE

from mlx_gemma_mtp import load
from mlx_gemma_mtp.generation import stream_generate

PROMPTS = [[2, 10, 20, 30, 40], [2, 7, 7, 99, 512, 1000, 3]]
MAX_TOKENS = 32


def greedy_tokens(pair, prompt) -> list[int]:
    target, drafter = pair
    return [r.token for r in stream_generate(target, None, prompt, MAX_TOKENS, drafter)]


def test_two_pairs_on_two_threads_match_sequential_runs():
    pairs = []
    for _ in PROMPTS:  # the fixture pair loaded twice: nothing shared but the files
        target, drafter, _ = load(str(FIXTURE / "target"), str(FIXTURE / "assistant"))
        pairs.append((target, drafter))
    sequential = [greedy_tokens(pair, prompt) for pair, prompt in zip(pairs, PROMPTS, strict=True)]
    assert sequential[0] != sequential[1]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(2):
            futures = [
                pool.submit(greedy_tokens, pair, prompt)
                for pair, prompt in zip(pairs, PROMPTS, strict=True)
            ]
            assert [f.result(timeout=120) for f in futures] == sequential
