"""Continuous batching with MTP (``engine/batch.py``, ``batch_generate``): every row's output is
its one-at-a-time output, rows joining and leaving mid-batch, past the sliding window."""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from test_sampling import (
    NEW_TOKENS,
    PROMPT,
    SIGNIFICANCE,
    VOCAB,
    chi_square_p_value,
    exact_sequence_probs,
    tiny_pair,
)

from mlx_gemma_mtp import batch_generate, make_prompt_cache, stream_generate
from mlx_gemma_mtp.benchmarks import FIXTURE, read_prompts
from mlx_gemma_mtp.costs import Costs
from mlx_gemma_mtp.engine.batch import BatchController, BatchGenerator, RaggedCache, batch_costs
from mlx_gemma_mtp.engine.loop import SpeculativeGenerator
from mlx_gemma_mtp.generation import make_policy

# A pair whose drafts always pay: ``auto`` drafts (and explores) every round, without measuring.
DRAFTING = Costs(verify=[1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3], draft=0.01)


@pytest.fixture(scope="module")
def prompts():
    return read_prompts(FIXTURE / "held_out_prompts.jsonl", 5)


def alone(pair, prompt, max_tokens, options=None, seed=None):
    target, drafter, _ = pair
    if seed is not None:
        mx.random.seed(seed)
    engine = SpeculativeGenerator(target, drafter, make_policy(**(options or {})),
                                  num_draft_tokens=3, draft_schedule="constant")  # fmt: skip
    return [t for block in engine.generate(mx.array(prompt), max_tokens) for t in block.tokens]


def run(engine: BatchGenerator, late: dict | None = None) -> dict:
    """Step until every row finished; ``late``: ``{step: [(prompt, kwargs), ...]}`` inserted
    after that step. Returns tokens per uid (uids in insertion order)."""
    tokens, step = {}, 0
    while engine.active or (late and any(s >= step for s in late)):
        for out in engine.step():
            tokens.setdefault(out.uid, []).extend(out.tokens)
        step += 1
        for prompt, kwargs in (late or {}).pop(step, []):
            tokens[engine.insert(prompt, **kwargs)] = []
    return dict(sorted(tokens.items()))


@pytest.mark.parametrize(
    "schedule", ["constant", pytest.param("auto", marks=pytest.mark.slow), "plain"]
)
def test_greedy_rows_joining_and_leaving_equal_their_output_alone(fixture_pair, prompts, schedule):
    """Rows of different lengths and limits, two joining after a few rounds (one while another
    leaves), one decoding past the sliding window's ring: each row's tokens are its tokens
    alone."""
    target, drafter, _ = fixture_pair
    limits = [24, 10, 16, 20, 12]
    engine = BatchGenerator(
        target,
        None if schedule == "plain" else drafter,
        num_draft_tokens=3,
        draft_schedule="auto" if schedule == "auto" else "constant",
        max_rows=3,
        prefill_step_size=48,
        costs=DRAFTING,
    )
    prompts = [
        p + p[1:] * (2 - i // 2) if i % 2 == 0 else p[: 20 + 9 * i] for i, p in enumerate(prompts)
    ]
    for prompt, limit in zip(prompts[:3], limits[:3], strict=True):
        engine.insert(prompt, max_tokens=limit)
    late = {3: [(prompts[3], dict(max_tokens=limits[3])), (prompts[4], dict(max_tokens=limits[4]))]}
    got = list(run(engine, late).values())
    assert len(prompts[0]) + limits[0] > engine.layers[0].ring > engine.target.args.sliding_window
    assert got == [alone(fixture_pair, p, n) for p, n in zip(prompts, limits, strict=True)]


def test_sampled_rows_with_mixed_options_are_their_seeded_output_alone(fixture_pair, prompts):
    target, drafter, _ = fixture_pair
    options = [dict(temp=0.7, top_p=0.95), dict(temp=1.0), dict(), dict(temp=1.3, top_k=20),
               dict(temp=0.8, repetition_penalty=1.3)]  # fmt: skip
    engine = BatchGenerator(target, drafter, num_draft_tokens=3, max_rows=4, costs=DRAFTING)
    for i, (prompt, option) in enumerate(zip(prompts, options, strict=True)):
        engine.insert(prompt, max_tokens=24, policy=make_policy(**option), seed=10 + i)
    got = list(run(engine).values())
    expected = [alone(fixture_pair, p, 24, o, seed=10 + i)
                for i, (p, o) in enumerate(zip(prompts, options, strict=True))]  # fmt: skip
    assert got == expected


def test_batch_generate_is_generate_for_each_prompt(fixture_pair, prompts):
    target, drafter, tokenizer = fixture_pair
    response = batch_generate(target, tokenizer, prompts[:3], max_tokens=[12, 30, 20],
                              draft_model=drafter, return_token_ids=True, costs=DRAFTING,
                              return_logprobs=True, completion_batch_size=2)  # fmt: skip
    for prompt, ids, text, logprobs in zip(prompts[:3], response.token_ids, response.texts,
                                           response.logprobs, strict=True):  # fmt: skip
        reference = list(stream_generate(target, tokenizer, prompt, len(ids), drafter))
        assert ids == [r.token for r in reference]
        assert text == tokenizer.decode(ids)
        assert logprobs == pytest.approx([r.logprobs[r.token].item() for r in reference], abs=1e-4)
    assert response.stats.generation_tokens == 62
    with pytest.raises(TypeError, match="temperature"):
        batch_generate(target, tokenizer, prompts[:1], temperature=0.5)


def test_a_removed_row_leaves_a_cache_that_continues_the_conversation(fixture_pair, prompts):
    """Cancelled mid-batch, a row's cache stands for its prompt and what it emitted; the next
    turn from it is the same as from a cache that generated alone."""
    target, drafter, tokenizer = fixture_pair
    engine = BatchGenerator(target, drafter, num_draft_tokens=3, max_rows=4, costs=DRAFTING)
    cache = make_prompt_cache(target)
    uid = engine.insert(prompts[0], max_tokens=100, cache=cache)
    engine.insert(prompts[1], max_tokens=100)
    emitted = []
    while len(emitted) < 9:
        emitted += [t for out in engine.step() if out.uid == uid for t in out.tokens]
    settled = engine.remove(uid, num_emitted=7)
    assert settled is cache and settled.tokens == prompts[0] + emitted[:7]
    assert settled[0].offset == len(settled.tokens)
    follow_up = prompts[2][1:20]
    turn = [r.token for r in stream_generate(target, tokenizer, follow_up, 30, drafter,
                                             prompt_cache=settled)]  # fmt: skip
    history = prompts[0] + emitted[:7] + follow_up
    assert turn == [r.token for r in stream_generate(target, tokenizer, history, 30, drafter)]
    assert engine.active == 1


def test_finished_rows_return_settled_caches(fixture_pair, prompts):
    target, drafter, tokenizer = fixture_pair
    caches = [make_prompt_cache(target) for _ in range(2)]
    response = batch_generate(target, tokenizer, prompts[:2], prompt_caches=caches,
                              max_tokens=15, draft_model=drafter, costs=DRAFTING,
                              return_prompt_caches=True, return_token_ids=True)  # fmt: skip
    for cache, prompt, ids in zip(response.caches, prompts, response.token_ids, strict=False):
        assert cache.tokens == prompt + ids and cache[0].offset == len(cache.tokens)


def test_ragged_cache_masks_each_rows_own_positions():
    """Rows at lengths 3 and 6 in a sliding ring of 5 slots (window 3): every query sees its
    own row's positions inside the window, nothing of the other row, no slot overwritten."""
    layer = RaggedCache(window=3, ring=5)
    for length in (3, 6):
        keys = mx.arange(length, dtype=mx.float32).reshape(1, 1, length, 1)
        layer.add_row(_filled(keys))
    mask = layer.make_mask(2, window_size=3)  # queries at 3, 4 and 6, 7
    slots = layer.key_positions(layer.offset + 2, 5)
    for b, first in enumerate((3, 6)):
        for i in range(2):
            query = first + i
            seen = {int(p) for p, m in zip(slots[b, 0, 0].tolist(), mask[b, 0, i].tolist(),
                                          strict=True) if m}  # fmt: skip
            assert seen == {p for p in range(query - 2, query + 1) if p >= 0}
    assert layer.keys[1, 0, :, 0].tolist() == [5, 1, 2, 3, 4]  # position p at slot p % 5


def _filled(keys: mx.array):
    from mlx_lm.models.cache import KVCache

    cache = KVCache()
    cache.update_and_fetch(keys, keys)
    return cache


def test_batch_costs_price_a_round_by_its_verify_width():
    costs = Costs(verify=[1.0, 1.5, 2.0], draft=0.5)
    four = batch_costs(costs, 4)
    assert four.verify == [2.5, 4.5, 6.5]  # widths 4, 8 and 12, past the table at its slope
    assert four.draft == pytest.approx(0.5 * 2.5)


def test_bad_rows_are_refused(fixture_pair):
    target, drafter, _ = fixture_pair
    engine = BatchGenerator(target, drafter)
    with pytest.raises(ValueError, match="empty"):
        engine.insert([], max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.insert([1, 2], max_tokens=0)
    with pytest.raises(ValueError, match="heuristic"):
        BatchGenerator(target, drafter, draft_schedule="heuristic")
    with pytest.raises(KeyError):
        engine.remove(99)


@pytest.mark.slow
def test_sampled_rows_in_a_batch_are_lossless():
    """Chi-square goodness of fit, per row, of 1500 batches of three rows with different
    temperatures and filters (4 tokens each, vocab 8) to each row's exact plain-sampling
    distribution."""
    target, drafter = tiny_pair()
    options = [dict(temp=1.0), dict(temp=0.7, top_k=3), dict(temp=1.3, top_p=0.85)]
    policies = [make_policy(**o) for o in options]
    expected = [exact_sequence_probs(target, p.params).reshape(VOCAB, -1).sum(axis=0)
                for p in policies]  # fmt: skip
    mx.random.seed(5)
    counts = [Counter() for _ in options]
    drafted = accepted = 0
    for _ in range(1500):
        engine = BatchGenerator(target, drafter, num_draft_tokens=2, costs=DRAFTING)
        for policy in policies:
            engine.insert(PROMPT, max_tokens=NEW_TOKENS, policy=policy)
        stats = [engine.row_stats(uid) for uid in range(len(policies))]
        for row, tokens in enumerate(run(engine).values()):
            counts[row][tuple(tokens[1:])] += 1
        drafted += sum(s.drafted for s in stats)
        accepted += sum(s.accepted for s in stats)
    assert 0.1 < accepted / drafted < 0.9
    for row_counts, row_expected in zip(counts, expected, strict=True):
        observed = np.zeros(VOCAB ** (NEW_TOKENS - 1))
        for (a, b, c), n in row_counts.items():
            observed[(a * VOCAB + b) * VOCAB + c] = n
        assert chi_square_p_value(observed, row_expected) > SIGNIFICANCE


def test_auto_is_told_a_batch_round_time_only_where_the_next_round_drafts_as_many(
    fixture_pair, prompts, monkeypatch
):
    """The next round is queued before a round is read, so its drafts may run in either
    interval (the backend decides, as in ``SpeculativeGenerator``): a time is told only where
    the next round drafts as many."""
    target, drafter, _ = fixture_pair
    pattern = iter([2, 2, 2, 4, 4, 0, 0, 0, 3, 3, 3] * 4)
    told = []
    monkeypatch.setattr(BatchController, "choose_for", lambda self, rows, limit: next(pattern))
    monkeypatch.setattr(BatchController, "observe_rows",
                        lambda self, k, accepted, seconds: told.append((k, seconds)))  # fmt: skip
    engine = BatchGenerator(target, drafter, num_draft_tokens=4, max_rows=2, costs=DRAFTING)
    for prompt in prompts[:2]:
        engine.insert(prompt[:24], max_tokens=40)
    run(engine)
    ks = [k for k, _ in told]
    for i, (k, seconds) in enumerate(told[:-1]):
        assert (seconds is not None) == (ks[i + 1] == k), (i, ks[i : i + 2])
    assert {0, 2, 3, 4} <= {k for k, seconds in told if seconds is not None}
