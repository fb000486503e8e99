"""Target K/V caches that can roll back rejected drafts.

mlx-lm's ``RotatingKVCache`` overwrites the oldest entries in place, so once it has wrapped it can
no longer drop the newest ones: speculative decoding past the sliding window would attend to K/V of
rejected drafts. ``SlidingWindowCache`` keeps the recent entries in position order instead and
compacts (drops the oldest) only when its buffer is full, so trimming is always possible.
"""

import mlx.core as mx
import mlx_lm.models.cache
from mlx_lm.models.cache import KVCache, _BaseCache


class SlidingWindowCache(_BaseCache):
    """K/V of the most recent positions of a sliding-attention layer, oldest first.

    After every update it holds at least the last ``window + 1 + slack`` positions (fewer only at
    the start), so the drafter can read ``window + 1`` entries before its position after up to
    ``slack`` entries beyond the last update have been trimmed. Memory stays below about
    ``2 * (window + 1 + slack)`` entries plus the largest single update.
    """

    step = 256

    def __init__(self, window: int, slack: int = 16):
        self.window = window
        self.retain = window + 1 + slack
        self.keys = None
        self.values = None
        self.offset = 0  # absolute position of the next entry (RoPE reads it)
        self.length = 0  # entries held: positions offset - length .. offset - 1

    def _kept_before(self, num_new: int) -> int:
        """Entries kept when ``num_new`` are appended (compaction happens only when full)."""
        if self.keys is not None and self.length + num_new <= self.keys.shape[2]:
            return self.length
        return min(self.length, self.retain)

    def _reallocate(self, keep: int, keys: mx.array, values: mx.array):
        B, H, N, Dk = keys.shape
        capacity = keep + max(N, self.step, self.retain)
        new_k = mx.zeros((B, H, capacity, Dk), keys.dtype)
        new_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
        if keep > 0:
            start = self.length - keep
            new_k[..., :keep, :] = self.keys[..., start : self.length, :]
            new_v[..., :keep, :] = self.values[..., start : self.length, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        num_new = keys.shape[2]
        keep = self._kept_before(num_new)
        if self.keys is None or keep != self.length or keep + num_new > self.keys.shape[2]:
            self._reallocate(keep, keys, values)
        self.keys[..., keep : keep + num_new, :] = keys
        self.values[..., keep : keep + num_new, :] = values
        self.length = keep + num_new
        self.offset += num_new
        return self.ordered_kv()

    def ordered_kv(self) -> tuple[mx.array, mx.array]:
        """The held K/V, in position order (newest last)."""
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def make_mask(
        self, N: int, window_size: int | None = None, return_array: bool = False
    ) -> None | str | mx.array:
        """Mask for ``N`` new queries against the K/V ``update_and_fetch`` will return:
        the query at position ``q`` sees keys at positions ``(q - window_size, q]``."""
        num_keys = self._kept_before(N) + N
        if not return_array and (window_size is None or num_keys <= window_size):
            return None if N == 1 else "causal"
        query_pos = mx.arange(self.offset, self.offset + N)[:, None]
        key_pos = mx.arange(self.offset + N - num_keys, self.offset + N)[None]
        mask = key_pos <= query_pos
        if window_size is not None:
            mask = mask & (key_pos > query_pos - window_size)
        return mask

    def size(self) -> int:
        return self.length

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        if self.length - n < min(self.offset - n, self.window + 1):
            raise ValueError(
                f"cannot roll back {n} entries: only {self.length} held for window {self.window} "
                f"(the slack of {self.retain - self.window - 1} entries is too small)"
            )
        self.offset -= n
        self.length -= n
        return n

    @property
    def state(self):
        """``(keys, values, offset, window, retain)``: what ``from_state`` (and so mlx-lm's
        ``load_prompt_cache``) needs to rebuild the cache."""
        keys, values = self.ordered_kv() if self.keys is not None else (None, None)
        return keys, values, self.offset, self.window, self.retain

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.window, self.retain = v
        self.length = 0 if self.keys is None else self.keys.shape[2]

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


# mlx-lm's load_prompt_cache finds a cache class by its name in its own module: registered
# there, files holding window caches load with mlx-lm's loader as with ours.
mlx_lm.models.cache.SlidingWindowCache = SlidingWindowCache


def make_target_cache(args, slack: int = 16) -> list:
    """Caches for a Gemma 4 target (mlx-lm ``gemma4_text.ModelArgs``): ``KVCache`` for
    full-attention layers, ``SlidingWindowCache`` for sliding ones, none for KV-shared layers."""
    num_cached = args.num_hidden_layers - args.num_kv_shared_layers
    return [
        KVCache()
        if args.layer_types[i] == "full_attention"
        else SlidingWindowCache(args.sliding_window, slack)
        for i in range(num_cached)
    ]
