"""Conversations on disk (save_prompt_cache/load_prompt_cache, checked against the model) and the
mlx-lm habits of the API: make_prompt_cache's signature, draft models, make_sampler samplers."""

import json

import mlx.core as mx
import mlx_lm.models.cache
import pytest
from conftest import FIXTURE, plain_greedy
from mlx_lm.sample_utils import make_sampler

from mlx_gemma_mtp import (
    PromptCache,
    load,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    stream_generate,
)
from mlx_gemma_mtp.engine.cache import SlidingWindowCache
from mlx_gemma_mtp.generation import make_policy, warn_once

TARGET, ASSISTANT = str(FIXTURE / "target"), str(FIXTURE / "assistant")


@pytest.fixture(scope="module")
def pair():
    return load(TARGET, ASSISTANT, dtype="float32")


def held_out_ids(count: int) -> list:
    lines = (FIXTURE / "held_out_prompts.jsonl").read_text().splitlines()
    return [t for line in lines[:count] for t in json.loads(line)["input_ids"]]


def tokens_of(responses) -> list:
    return [r.token for r in responses]


@pytest.fixture(scope="module")
def saved(pair, tmp_path_factory):
    """A conversation past the sliding window (the window caches have compacted), drafted,
    saved after turn 1; and turn 2 of the same conversation, uninterrupted."""
    target, drafter, _ = pair
    first, second = held_out_ids(5), [7, 8, 9, 10]
    cache = make_prompt_cache(target, draft_model=drafter)
    options = {"prompt_cache": cache, "draft_schedule": "constant"}  # no cost measurement
    turn1 = tokens_of(stream_generate(target, None, first, 12, drafter, **options))
    path = tmp_path_factory.mktemp("conversation") / "turn1.safetensors"
    save_prompt_cache(path, cache, {"note": "turn 1"})
    turn2 = tokens_of(stream_generate(target, None, second, 12, drafter, **options))
    return path, first + turn1, second, turn2


def test_a_saved_conversation_continues_token_identically(pair, saved):
    target, drafter, _ = pair
    path, history, second, turn2 = saved
    cache, metadata = load_prompt_cache(path, return_metadata=True)
    assert metadata == {"note": "turn 1"}
    assert isinstance(cache, PromptCache) and cache.tokens == history
    assert all(c.offset == len(history) for c in cache)
    window = next(c for c in cache if isinstance(c, SlidingWindowCache))
    assert window.length < len(history) and window.retain > window.window  # compacted, slack kept
    resumed = tokens_of(
        stream_generate(
            target, None, second, 12, drafter, prompt_cache=cache, draft_schedule="constant"
        )
    )
    assert resumed == turn2 == plain_greedy(target, history + second, 12)
    assert cache.tokens == history + second + turn2
    # The file is mlx-lm's format: mlx-lm's own loader reads it.
    layers = mlx_lm.models.cache.load_prompt_cache(str(path))
    assert [type(c) for c in layers] == [type(c) for c in load_prompt_cache(path)]


def test_a_loaded_cache_is_checked_against_the_model(pair, saved, tmp_path):
    path = saved[0]
    target, drafter, _ = pair

    def refusal(cache, model=target) -> str:
        with pytest.raises(ValueError) as error:
            list(stream_generate(model, None, [5], 1, drafter, prompt_cache=cache))
        return str(error.value)

    as_stored, _, _ = load(TARGET)  # the same checkpoint in its own dtype (bfloat16)
    assert "the weights differ" in refusal(load_prompt_cache(path), as_stored)
    cache = load_prompt_cache(path)
    cache.made_for["sliding_window"] = 64
    assert "sliding_window is 64 in the cache but 128 in the model" in refusal(cache)
    cache = load_prompt_cache(path)
    del cache[-1]
    assert "has 4 layer caches but this model computes K/V in 5 layers" in refusal(cache)
    cache = load_prompt_cache(path)
    cache[0].window = 64
    assert "layer 0 has a sliding window of 64, this model's is 128" in refusal(cache)
    cache = load_prompt_cache(path)
    cache[4].keys = cache[4].keys[..., :64]
    message = refusal(cache)
    assert "layer 4 holds K/V of 1 heads with head dims 64/128" in message
    assert "1 heads of head_dim 128" in message
    cache = load_prompt_cache(path)
    cache.tokens.pop()
    assert "records" in refusal(cache)
    # Files it cannot check, and file names MLX would change, are refused at the door.
    foreign = tmp_path / "mlx_lm.safetensors"
    mlx_lm.models.cache.save_prompt_cache(str(foreign), list(load_prompt_cache(path)))
    with pytest.raises(ValueError, match="not saved by mlx_gemma_mtp.save_prompt_cache"):
        load_prompt_cache(foreign)
    with pytest.raises(ValueError, match="end in .safetensors"):
        save_prompt_cache(tmp_path / "conversation", make_prompt_cache(target))
    with pytest.raises(FileNotFoundError, match="no such prompt cache file"):
        load_prompt_cache(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="make_prompt_cache"):
        save_prompt_cache(foreign, target.make_cache())


def test_make_prompt_cache_takes_mlx_lm_arguments(pair):
    target, drafter, tokenizer = pair
    with pytest.raises(ValueError, match="max_kv_size=4096 is not supported.*Leave it unset"):
        make_prompt_cache(target, 4096)
    with pytest.raises(ValueError, match="max_kv_size=64 is not supported"):
        list(stream_generate(target, tokenizer, "x", 2, drafter, max_kv_size=64))
    assert make_prompt_cache(target, None, draft_model=drafter, max_draft_tokens=2)[0].retain == (
        128 + 1 + 6
    )
    # A model passed second, as this package's first releases took the drafter, is the drafter
    # (checked as one), not a max_kv_size.
    assert len(make_prompt_cache(target, drafter)) == 5
    with pytest.raises(TypeError, match="got a gemma4_text model"):
        make_prompt_cache(target, target.model)
    # A classic draft model (here a Gemma 4 text model) is refused with what to pass.
    for call in (
        lambda: make_prompt_cache(target, draft_model=target.model),
        lambda: list(stream_generate(target, tokenizer, "x", 2, draft_model=target.model)),
    ):
        with pytest.raises(TypeError, match="got a gemma4_text model.*mlx_lm.stream_generate"):
            call()


def test_make_sampler_samplers_sample_coupled(pair, recwarn):
    """A sampler from mlx-lm's make_sampler has its options taken over: the same tokens as the
    options themselves, for every draft schedule. Any other sampler warns once."""
    target, drafter, _ = pair
    policy = make_policy(sampler=make_sampler(0.7, top_p=0.9, min_p=0.05, top_k=40))
    assert policy.coupled and policy.params.top_k == 40 and policy.params.min_p == 0.05
    assert make_policy(sampler=make_sampler(0.0)).custom_sampler is False  # greedy, ours

    def sampled(num_draft_tokens, **options) -> list:
        mx.random.seed(3)
        responses = list(
            stream_generate(
                target, None, [2, 40, 41], 16, drafter, num_draft_tokens=num_draft_tokens,
                draft_schedule="constant", **options,
            )
        )  # fmt: skip
        assert responses[-1].acceptance_rule == "coupled"
        return tokens_of(responses)

    assert sampled(5, sampler=make_sampler(0.8, 0.95)) == sampled(2, temp=0.8, top_p=0.95)

    def sampler_warnings() -> list:
        return [w for w in recwarn.list if "coupled sampling" in str(w.message)]

    assert not sampler_warnings()
    warn_once.cache_clear()
    for sampler in (make_sampler(0.8, xtc_probability=0.5), lambda logprobs: logprobs.argmax(-1)):
        make_policy(sampler=sampler)
    warned = sampler_warnings()
    assert len(warned) == 1 and "a seed reproduces the output only for one" in str(
        warned[0].message
    )
