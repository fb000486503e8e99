"""SlidingWindowCache against an uncapped KVCache with a windowed mask (the reference)."""

import random

import mlx.core as mx
import pytest
from mlx_lm.models import gemma4_text
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlx_gemma_mtp.check import tiny_text_config
from mlx_gemma_mtp.engine.cache import SlidingWindowCache, make_target_cache
from mlx_gemma_mtp.models.target import Target

WINDOW = 8


def attend(cache, keys, values, queries, window):
    mask = cache.make_mask(keys.shape[2], window_size=window, return_array=False)
    k, v = cache.update_and_fetch(keys, values)
    return mx.fast.scaled_dot_product_attention(queries, k, v, scale=1.0, mask=mask)


def random_kv(n, dim=4):
    return [mx.random.normal((1, 2, n, dim)) for _ in range(3)]


@pytest.fixture
def small_step(monkeypatch):
    """Grow the buffer in small steps so that compaction happens often."""
    monkeypatch.setattr(SlidingWindowCache, "step", 3)


@pytest.mark.parametrize("seed", range(4))
def test_matches_uncapped_cache_with_updates_and_trims(seed, small_step):
    """Chunked prefill, k+1 verify blocks, single tokens and random rollbacks, 10x the window."""
    rng = random.Random(seed)
    mx.random.seed(seed)
    ours, ref = SlidingWindowCache(WINDOW, slack=4), KVCache()
    compactions = 0
    while ours.offset < 10 * WINDOW:
        n = rng.choice([1, 1, 2, 5, 9, 13, 3 * WINDOW])
        keys, values, queries = random_kv(n)
        compactions += ours._kept_before(n) < ours.length
        out = attend(ours, keys, values, queries, WINDOW)
        expected = attend(ref, keys, values, queries, WINDOW)
        assert mx.allclose(out, expected, atol=1e-5).item()
        assert ours.offset == ref.offset
        assert ours.length >= min(ours.offset, WINDOW + 1 + 4)  # window + 1 + slack
        trim = rng.randint(0, n - 1)
        assert ours.trim(trim) == ref.trim(trim)
        # Always in position order, and at least window + 1 entries back (what the drafter reads).
        held_k, held_v = ours.ordered_kv()
        held = held_k.shape[2]
        assert held >= min(ours.offset, WINDOW + 1)
        ref_k, ref_v = ref.keys[..., : ref.offset, :], ref.values[..., : ref.offset, :]
        assert mx.array_equal(held_k, ref_k[..., ref.offset - held :, :]).item()
        assert mx.array_equal(held_v, ref_v[..., ref.offset - held :, :]).item()
    assert compactions >= 3


def test_memory_stays_bounded_by_the_window():
    cache = SlidingWindowCache(WINDOW, slack=4)
    for _ in range(500):
        keys, values, _ = random_kv(5)
        cache.update_and_fetch(keys, values)
        cache.trim(2)
    assert cache.offset == 1500
    # Buffer capacity: the kept entries plus one growth step (max(step, retain, update)).
    assert cache.keys.shape[2] <= cache.retain + max(cache.step, cache.retain, 5)
    assert cache.nbytes == 2 * cache.keys.nbytes


def test_trim_refuses_to_drop_what_it_no_longer_holds():
    cache = SlidingWindowCache(WINDOW, slack=2)
    for _ in range(300):
        cache.update_and_fetch(*random_kv(1)[:2])
    # Compaction keeps window + 1 + slack = 11 entries, plus what came after it.
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.trim(cache.length - WINDOW)
    cache.trim(cache.length - WINDOW - 1)
    assert cache.length == WINDOW + 1


def test_masks_are_what_mlx_lm_attention_needs():
    cache = SlidingWindowCache(WINDOW)
    assert cache.make_mask(1, window_size=WINDOW) is None
    assert cache.make_mask(4, window_size=WINDOW) == "causal"
    mask = cache.make_mask(4, window_size=WINDOW, return_array=True)
    assert mask.tolist() == mx.tril(mx.ones((4, 4), mx.bool_)).tolist()
    cache.update_and_fetch(*random_kv(20)[:2])
    mask = cache.make_mask(2, window_size=WINDOW)
    # Keys at positions 0..21 (nothing compacted yet); queries at 20, 21 see (q - 8, q].
    assert mask.shape == (2, 22)
    assert [i for i, v in enumerate(mask[0].tolist()) if v] == list(range(13, 21))
    assert [i for i, v in enumerate(mask[1].tolist()) if v] == list(range(14, 22))


def tiny_target_args():
    """The self-check's tiny random target, cut to 4 layers (the last one shares K/V) and a
    50-token vocabulary."""
    sliding, full = "sliding_attention", "full_attention"
    config = tiny_text_config(
        hidden_size=32,
        num_hidden_layers=4,
        intermediate_size=64,
        head_dim=16,
        global_head_dim=16,
        num_kv_shared_layers=1,
        vocab_size=50,
        vocab_size_per_layer_input=50,
        sliding_window=WINDOW,
        layer_types=[sliding, full, sliding, full],
    )
    return gemma4_text.ModelArgs.from_dict(config)


def test_target_cache_types_and_rotating_trap():
    args = tiny_target_args()
    caches = make_target_cache(args)
    assert [type(c) for c in caches] == [SlidingWindowCache, KVCache, SlidingWindowCache]
    assert all(c.is_trimmable() for c in caches)
    # The trap itself: mlx-lm's rotating cache cannot roll back once it has wrapped.
    rotating = RotatingKVCache(max_size=WINDOW)
    rotating.update_and_fetch(*random_kv(WINDOW + 2)[:2])
    assert not rotating.is_trimmable()


def test_target_forward_with_rollbacks_matches_full_recompute(small_step):
    """A real model: verify-style blocks with rollbacks far past the window give the logits of a
    from-scratch forward of the accepted sequence (uncapped cache, windowed masks)."""
    mx.random.seed(0)
    rng = random.Random(0)
    model = gemma4_text.Model(tiny_target_args())
    model.set_dtype(mx.float32)
    target = Target(model)
    cache = target.make_cache(draft_slack=4)
    accepted = [1]
    while len(accepted) < 6 * WINDOW:
        block = [rng.randrange(50) for _ in range(rng.randint(1, 6))]
        out = target(mx.array([accepted[-1:] + block]), cache)
        uncapped = [KVCache() for _ in cache]
        full = target(mx.array([accepted + block]), uncapped)
        assert mx.allclose(out.logits[0], full.logits[0, -len(block) - 1 :], atol=1e-4).item()
        keep = rng.randint(0, len(block))
        for c in cache:
            c.trim(len(block) - keep)
        accepted += block[:keep] + [rng.randrange(50)]  # the last one is pending (not fed yet)
        shared = target.shared_kv(cache)["sliding_attention"][0]
        assert shared.shape[2] >= min(len(accepted) - 1, WINDOW + 1)


def test_round_trips_through_mlx_lm_save_and_load(tmp_path, small_step):
    """mlx-lm's own save_prompt_cache/load_prompt_cache rebuild the window cache (empty or past
    its window, after a rollback), and it goes on exactly as the one that was saved."""
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    mx.random.seed(0)
    used = SlidingWindowCache(WINDOW, slack=4)
    for n in (5, 9, 13, 1, 3):
        attend(used, *random_kv(n), WINDOW)
    used.trim(2)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, [used, SlidingWindowCache(WINDOW, slack=4)])
    loaded, empty = load_prompt_cache(path)
    assert type(loaded) is SlidingWindowCache and empty.empty() and empty.window == WINDOW
    assert (loaded.offset, loaded.window, loaded.retain) == (used.offset, WINDOW, WINDOW + 5)
    assert all(
        mx.array_equal(a, b).item() for a, b in zip(loaded.state[:2], used.state[:2], strict=True)
    )
    for n in (1, 6, 2):
        keys, values, queries = random_kv(n)
        out = attend(loaded, keys, values, queries, WINDOW)
        assert mx.array_equal(out, attend(used, keys, values, queries, WINDOW)).item()
        assert loaded.trim(1) == used.trim(1)
