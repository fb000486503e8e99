"""What apps call: mlx-lm's call shapes, prompt caches kept between turns, token-id checks."""

import json

import mlx.core as mx
import mlx_lm
import pytest
from conftest import FIXTURE, plain_greedy

from mlx_gemma_mtp import (
    PromptCache,
    generate,
    load,
    make_prompt_cache,
    stream_generate,
    trim_to_common_prefix,
)
from mlx_gemma_mtp.engine.cache import SlidingWindowCache
from mlx_gemma_mtp.engine.loop import SpeculativeGenerator
from mlx_gemma_mtp.generation import as_target
from mlx_gemma_mtp.state import pair_state

TARGET, ASSISTANT = str(FIXTURE / "target"), str(FIXTURE / "assistant")
VOCAB = 32768


@pytest.fixture(scope="module")
def pair():
    return load(TARGET, ASSISTANT, dtype="float32")


def held_out(i: int) -> list:
    lines = (FIXTURE / "held_out_prompts.jsonl").read_text().splitlines()
    return json.loads(lines[i])["input_ids"]


def tokens_of(responses) -> list:
    return [r.token for r in responses]


def test_mlx_lm_call_shape_and_mlx_lm_load(pair):
    """An app that used mlx_lm.load + stream_generate changes one import and adds the drafter."""
    model, tokenizer = mlx_lm.load(TARGET)
    ours, drafter, _ = load(TARGET, ASSISTANT)  # the checkpoint's dtype, as mlx_lm.load
    responses = list(stream_generate(model, tokenizer, "def main():", 12, draft_model=drafter))
    assert tokens_of(responses) == tokens_of(
        stream_generate(ours, tokenizer, "def main():", 12, draft_model=drafter)
    )
    assert responses[-1].mode == "mtp" and responses[-1].drafted > 0
    assert as_target(model) is as_target(model)  # one wrapper (and compiled step) per model
    text = generate(model, tokenizer, "def main():", max_tokens=12, draft_model=drafter)
    assert text == "".join(r.text for r in responses)


def test_unknown_keyword_and_bad_arguments_are_clear(pair):
    target, drafter, tokenizer = pair
    with pytest.raises(ValueError, match="max_kv_size=64 is not supported"):
        list(stream_generate(target, tokenizer, "x", 4, drafter, max_kv_size=64))
    with pytest.raises(TypeError, match="temperature"):
        generate(target, tokenizer, "x", max_tokens=4, temperature=0.5)
    with pytest.raises(ValueError, match="-1 for no limit"):
        list(stream_generate(target, tokenizer, "x", 0, drafter))
    with pytest.raises(TypeError, match="Gemma 4 target"):
        list(stream_generate(drafter, tokenizer, "x", 4))


def test_no_limit_runs_to_eos(pair):
    target, drafter, _ = pair
    prompt = held_out(0)
    reference = plain_greedy(target, prompt, 30)
    eos = reference[20]
    responses = list(stream_generate(target, None, prompt, -1, drafter, eos_token_ids=[eos]))
    assert tokens_of(responses) == reference[: reference.index(eos) + 1]
    assert responses[-1].finish_reason == "stop"


@pytest.mark.parametrize("drafting", [True, False], ids=["mtp", "plain"])
def test_reused_cache_is_token_identical_to_a_fresh_run(pair, drafting):
    target, drafter, _ = pair
    drafter = drafter if drafting else None
    first, second = held_out(1), held_out(2)[:20]
    cache = make_prompt_cache(target, drafter)
    turn1 = tokens_of(stream_generate(target, None, first, 24, drafter, prompt_cache=cache))
    assert cache.tokens == first + turn1 and cache[0].offset == len(cache.tokens)
    turn2 = tokens_of(stream_generate(target, None, second, 24, drafter, prompt_cache=cache))
    assert turn2 == plain_greedy(target, first + turn1 + second, 24)
    assert cache.tokens == first + turn1 + second + turn2
    assert all(c.offset == len(cache.tokens) for c in cache)


@pytest.mark.parametrize("stop_after", [1, 6, 9])
def test_cancelling_leaves_the_prompt_and_the_emitted_tokens(pair, stop_after):
    """Breaking out mid-block (a round verified ahead, drafts in flight) settles the cache."""
    target, drafter, _ = pair
    prompt = held_out(3)
    cache = make_prompt_cache(target, drafter)
    stream = stream_generate(
        target, None, prompt, 40, drafter, num_draft_tokens=6, prompt_cache=cache
    )
    emitted = [next(stream).token for _ in range(stop_after)]
    stream.close()
    assert cache.tokens == prompt + emitted
    assert all(c.offset == len(cache.tokens) for c in cache)
    follow = [7, 8, 9]
    after = tokens_of(stream_generate(target, None, follow, 16, drafter, prompt_cache=cache))
    assert after == plain_greedy(target, prompt + emitted + follow, 16)


def test_stop_strings_and_eos_leave_the_emitted_tokens(pair):
    target, drafter, tokenizer = pair
    prompt = held_out(4)
    reference = tokens_of(stream_generate(target, tokenizer, prompt, 30, drafter))
    eos = reference[12]
    cache = make_prompt_cache(target, drafter)
    responses = list(
        stream_generate(
            target, tokenizer, prompt, 30, drafter, eos_token_ids=[eos], prompt_cache=cache
        )
    )
    assert cache.tokens == prompt + tokens_of(responses) and responses[-1].token == eos
    assert cache[0].offset == len(cache.tokens)


def test_resent_conversation_feeds_only_the_new_tokens(pair):
    """Prefix matching for apps and servers that send the whole conversation every time."""
    target, drafter, _ = pair
    prompt = held_out(5)
    cache = make_prompt_cache(target, drafter)
    turn1 = tokens_of(stream_generate(target, None, prompt, 20, drafter, prompt_cache=cache))
    # The client resends the conversation with its own rendering of the reply (diverging late).
    conversation = prompt + turn1[:15] + [11, 12, 13]
    rest = trim_to_common_prefix(cache, conversation)
    assert rest == [11, 12, 13] and cache.tokens == prompt + turn1[:15]
    assert all(c.offset == len(cache.tokens) for c in cache)
    out = tokens_of(stream_generate(target, None, rest, 16, drafter, prompt_cache=cache))
    assert out == plain_greedy(target, conversation, 16)
    # The same conversation again: at least one token is fed (its logits start the reply).
    again = trim_to_common_prefix(cache, conversation)
    assert again == conversation[-1:]


def test_prefix_past_the_sliding_window_rollback_rebuilds(pair):
    target, drafter, _ = pair
    # 390 tokens: the sliding caches (window 128) have dropped their oldest entries.
    long_prompt = [t for i in range(6) for t in held_out(i)]
    cache = make_prompt_cache(target, drafter, max_draft_tokens=6)
    list(stream_generate(target, None, long_prompt, 8, drafter, prompt_cache=cache))
    window = next(c for c in cache if isinstance(c, SlidingWindowCache))
    conversation = long_prompt[:40] + [5, 6, 7]
    rest = trim_to_common_prefix(cache, conversation)
    assert rest == conversation and cache.tokens == [] and window not in cache  # rebuilt
    out = tokens_of(stream_generate(target, None, rest, 12, drafter, prompt_cache=cache))
    assert out == plain_greedy(target, conversation, 12)


def test_prompt_cache_checks(pair):
    target, drafter, _ = pair
    with pytest.raises(ValueError, match="make_prompt_cache"):
        list(
            stream_generate(
                target,
                None,
                [1, 2],
                4,
                drafter,
                prompt_cache=mlx_lm.models.cache.make_prompt_cache(target.model),
            )
        )
    small = make_prompt_cache(target, drafter, max_draft_tokens=2)
    with pytest.raises(ValueError, match="max_draft_tokens"):
        list(
            stream_generate(
                target, None, [1, 2], 4, drafter, num_draft_tokens=4, prompt_cache=small
            )
        )
    assert isinstance(small, PromptCache) and small.nbytes == 0


def test_compiled_draft_step_is_built_once_per_pair(pair):
    target, drafter, _ = pair
    state = pair_state(target.backbone, drafter)
    list(stream_generate(target, None, [2, 3, 4], 6, drafter))
    steps = dict(state.steps.entries)
    list(stream_generate(target, None, [2, 3, 5], 6, drafter))
    assert dict(state.steps.entries) == steps and len(steps) == 1


def test_an_engine_generates_once(pair):
    target, drafter, _ = pair
    engine = SpeculativeGenerator(target, drafter)
    list(engine.generate(mx.array([1, 2, 3]), 4))
    with pytest.raises(RuntimeError, match="cache="):
        list(engine.generate(mx.array([1, 2, 3]), 4))


def test_prompt_progress_callback(pair):
    target, drafter, _ = pair
    calls = []
    prompt = held_out(9)
    list(
        stream_generate(
            target,
            None,
            prompt,
            2,
            drafter,
            prefill_step_size=16,
            prompt_progress_callback=lambda done, total: calls.append((done, total)),
        )
    )
    n = len(prompt)
    assert calls == [(0, n), (16, n), (32, n), (48, n), (n - 1, n), (n, n)]


@pytest.mark.parametrize(
    "prompt, bad",
    [
        ([1, 2, 99999999], "99999999 at position 2"),
        ([1, 2, -5], "-5 at position 2"),
        ([1, 2, VOCAB], f"{VOCAB} at position 2"),
        ([1, 2.5, 3], "2.5 at position 1 is not an integer"),
        (["1", 2], "'1' at position 0 is not an integer"),
        (mx.array([3, VOCAB + 1]), f"{VOCAB + 1} at position 1"),
    ],
    ids=["huge", "negative", "one-past", "float", "string", "mx-array"],
)
def test_token_ids_are_checked_at_the_door(pair, prompt, bad):
    target, drafter, _ = pair
    with pytest.raises(ValueError, match=f"token id {bad}.*vocabulary size is {VOCAB}"):
        list(stream_generate(target, None, prompt, 4, drafter))
    with pytest.raises(ValueError, match="must be integers"):
        list(stream_generate(target, None, mx.array([1.0, 2.0]), 4, drafter))
