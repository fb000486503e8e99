"""Many sequences at once, each with its own drafts: continuous batching with MTP.

Rows join between rounds (each prompt prefilled in chunks, one chunk per row and step,
interleaved with the rounds, as mlx-lm's ``BatchGenerator`` does) and leave when finished or
removed. A round drafts ``k`` tokens for every decoding row (the drafter runs once for the whole
batch, reading each row's K/V through masks), verifies ``[pending, drafts]`` of every row in one
target forward, and each row accepts, emits and rolls back on its own: ``RaggedCache`` keeps each
row's K/V at its own positions, so rolling a row back is moving its length. ``k`` is chosen for
the whole batch from the measured time of rounds of that many rows (``BatchRoundTimes``) and the
acceptance so far; 0 when drafting loses.

Every emitted token is the target's own pick at its position (``sampling.TokenPolicy``), with
the row's seed: a row's output is what it would be alone, whatever joins or leaves.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import mlx.core as mx
from mlx_lm.generate_utils import BatchCounters
from mlx_lm.models.cache import KVCache, _BaseCache

from ..costs import MAX_AGE, Costs, DraftController, RoundTimes
from ..media import MediaPrompt
from ..models.target import Target, ordered_kv
from .cache import SlidingWindowCache
from .loop import (
    DEFAULT_NUM_DRAFT_TOKENS,
    SCHEDULES,
    SpeculativeGenerator,
    Stats,
    chunk_end,
    compiled_for_pair,
    draft_slack,
    feed,
    history_after,
    initial_history,
    prefill,
    windowed_history_after,
)
from .prompt_cache import DEFAULT_MAX_DRAFT_TOKENS
from .sampling import TokenPolicy, log_softmax, match_accept

# -- the batch's caches -------------------------------------------------------------------------


class RaggedCache(_BaseCache):
    """One attention layer's K/V for a batch of rows of different lengths: row ``b`` holds
    positions ``0 .. positions[b] - 1``, position ``p`` at slot ``p`` (full attention) or at
    slot ``p % ring`` (sliding attention: a ring that keeps the window, the widest update and
    the slack a settled row's cache needs). Queries see their own row's positions through masks.

    ``positions`` may be lazy (a row rolls back by the drafts it rejected, known only on the
    device when the next round is built); ``bound`` is a host upper bound of them, which sizes
    the buffers and the K/V each query reads (masked beyond a row's own positions)."""

    step = 256

    def __init__(self, window: int | None = None, ring: int = 0):
        self.window, self.ring = window, ring if window is not None else 0
        self.keys = self.values = None
        self.positions = mx.zeros((0,), mx.int32)
        self.bound = 0

    @property
    def offset(self) -> mx.array:
        """Per row, the position of its next entry (RoPE reads it)."""
        return self.positions

    @property
    def rows(self) -> int:
        return self.positions.shape[0]

    def _capacity(self, needed: int) -> int:
        if self.ring:
            return self.ring
        return -(-needed // self.step) * self.step

    def _grow(self, needed: int, like: mx.array, value_dim: int) -> None:
        capacity = self._capacity(needed)
        if self.keys is not None and self.keys.shape[2] >= capacity:
            return
        new_k = mx.zeros((self.rows, like.shape[1], capacity, like.shape[3]), like.dtype)
        new_v = mx.zeros((self.rows, like.shape[1], capacity, value_dim), like.dtype)
        if self.keys is not None:
            held = self.keys.shape[2]
            new_k[..., :held, :] = self.keys
            new_v[..., :held, :] = self.values
        self.keys, self.values = new_k, new_v

    def _slots(self, positions: mx.array) -> mx.array:
        return positions % self.ring if self.ring else positions

    def _visible(self, end: int) -> int:
        """Slots that can hold a position before ``end``."""
        return min(self.ring, end) if self.ring else end

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        num_new = keys.shape[2]
        end = self.bound + num_new
        self._grow(end, keys, values.shape[3])
        slots = self._slots(self.positions[:, None] + mx.arange(num_new))[:, None, :, None]
        self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(slots, keys.shape), keys, axis=2)
        self.values = mx.put_along_axis(
            self.values, mx.broadcast_to(slots, values.shape), values, axis=2
        )
        self.positions, self.bound = self.positions + num_new, end
        visible = self._visible(end)
        return self.keys[..., :visible, :], self.values[..., :visible, :]

    def roll_back(self, drafts_rejected: mx.array) -> None:
        """Drop each row's newest ``drafts_rejected[b]`` entries (lazy; ``bound`` stays)."""
        self.positions = self.positions - drafts_rejected

    def known(self, lengths: list[int], in_flight: int = 0) -> None:
        """The rows' lengths as read on the host, before ``in_flight`` more tokens a round
        already queued writes: ``bound`` tightens to them (and ``positions`` become them, when
        nothing is in flight)."""
        self.bound = max(lengths, default=0) + in_flight
        if not in_flight:
            self.positions = mx.array(lengths, mx.int32)

    def key_positions(self, ends: mx.array, visible: int) -> mx.array:
        """``[B, 1, 1, visible]``: the position each slot holds when row ``b`` has written up to
        ``ends[b]`` (negative: none)."""
        slot = mx.arange(visible)
        if not self.ring:
            return mx.broadcast_to(slot, (ends.shape[0], 1, 1, visible))
        last = ends[:, None, None, None] - 1
        return last - ((last - slot) % self.ring)

    def make_mask(
        self, N: int, window_size: int | None = None, return_array: bool = False
    ) -> mx.array:
        """For ``N`` new queries per row against what ``update_and_fetch`` will return."""
        visible = self._visible(self.bound + N)
        keys = self.key_positions(self.positions + N, visible)
        queries = self.positions[:, None, None, None] + mx.arange(N)[:, None]  # [B, 1, N, 1]
        mask = (keys <= queries) & (keys >= 0)
        if window_size is not None:
            mask &= keys > queries - window_size
        return mask

    def drafter_view(self, sliding_window: int | None) -> tuple[tuple, mx.array]:
        """The ``(keys, values)`` a drafter attends to at each row's pending position
        (``positions[b]``) and the mask ``[B, 1, 1, S]`` of what it sees there: every earlier
        position, or in sliding layers the last ``sliding_window + 1`` (the reference mask)."""
        visible = self.keys.shape[2]  # whole buffers: a compiled draft step keeps its shapes
        keys = self.key_positions(self.positions, visible)
        position = self.positions[:, None, None, None]
        mask = (keys < position) & (keys >= 0)
        if sliding_window is not None:
            mask &= keys >= position - (sliding_window + 1)
        return (self.keys[..., :visible, :], self.values[..., :visible, :]), mask

    # -- rows joining and leaving ---------------------------------------------------------------

    def add_row(self, layer_cache) -> None:
        """Append a row holding what a single-row cache (``KVCache`` or ``SlidingWindowCache``)
        holds."""
        keys, values, length = row_kv(layer_cache)
        held = keys.shape[2]
        kept = held if not self.ring else min(held, self.ring)
        keys, values = keys[..., held - kept :, :], values[..., held - kept :, :]
        self.bound = max(self.bound, length)
        capacity = self._capacity(self.bound)
        if self.keys is not None:
            capacity = max(capacity, self.keys.shape[2])
        row_k = mx.zeros((1, keys.shape[1], capacity, keys.shape[3]), keys.dtype)
        row_v = mx.zeros((1, values.shape[1], capacity, values.shape[3]), values.dtype)
        if kept:
            slots = self._slots(mx.arange(length - kept, length))[None, None, :, None]
            row_k = mx.put_along_axis(row_k, mx.broadcast_to(slots, keys.shape), keys, axis=2)
            row_v = mx.put_along_axis(row_v, mx.broadcast_to(slots, values.shape), values, axis=2)
        if self.keys is None:
            self.keys, self.values = row_k, row_v
        else:
            self._grow(capacity, self.keys, self.values.shape[3])
            self.keys = mx.concatenate([self.keys, row_k])
            self.values = mx.concatenate([self.values, row_v])
        self.positions = mx.concatenate([self.positions, mx.array([length], mx.int32)])

    def remove_rows(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order)."""
        index = mx.array(keep, mx.int32)
        self.positions = self.positions[index] if keep else mx.zeros((0,), mx.int32)
        if not keep:
            self.keys = self.values = None
            self.bound = 0
        elif self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]

    def extract(self, row: int, length: int, like):
        """Row ``row``'s first ``length`` positions as a single-row cache of ``like``'s kind."""
        if isinstance(like, SlidingWindowCache):
            kept = min(length, like.retain, self.ring)
            slots = self._slots(mx.arange(length - kept, length))
            keys = mx.contiguous(self.keys[row : row + 1, :, slots])
            values = mx.contiguous(self.values[row : row + 1, :, slots])
            cache = SlidingWindowCache(like.window, like.retain - like.window - 1)
            held = (keys, values) if kept else (None, None)
            cache.state = (*held, length, like.window, like.retain)
            return cache
        cache = KVCache()
        if length:
            cache.keys = mx.contiguous(self.keys[row : row + 1, :, :length])
            cache.values = mx.contiguous(self.values[row : row + 1, :, :length])
            cache.offset = length
        return cache

    @property
    def state(self):
        return self.keys, self.values

    def is_trimmable(self) -> bool:
        return True

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def row_kv(layer_cache) -> tuple[mx.array, mx.array, int]:
    """``(keys, values, length)`` of a single-row cache: the held entries in position order,
    the last of them at position ``length - 1``."""
    if layer_cache.keys is None:
        empty = mx.zeros((1, 1, 0, 1))
        return empty, empty, layer_cache.offset
    return *ordered_kv(layer_cache), layer_cache.offset


# -- the controller -----------------------------------------------------------------------------


def width_seconds(costs: Costs, width: int) -> float:
    """A target forward over ``width`` tokens, from the single-stream calibration: measured up to
    ``k_max + 1`` tokens, extended with its mean slope beyond."""
    verify = costs.verify
    if width <= len(verify):
        return verify[width - 1]
    slope = (verify[-1] - verify[0]) / max(len(verify) - 1, 1)
    return verify[-1] + slope * (width - len(verify))


def batch_costs(costs: Costs, rows: int) -> Costs:
    """A first guess at the costs of rounds over ``rows`` rows, priced by their total verify
    width (``rows * (k + 1)``), the draft step like a verification of ``rows`` tokens; followed
    online from the measured rounds (``RoundTimes``) once rounds of ``rows`` rows ran."""
    k_max = costs.k_max
    verify = [width_seconds(costs, rows * (k + 1)) for k in range(k_max + 1)]
    draft = costs.draft * width_seconds(costs, rows) / costs.verify[0]
    return Costs(verify, draft, costs.context, costs.measured_at, costs.fixed)


class BatchRoundTimes:
    """``RoundTimes`` per number of rows (a round of 4 rows costs what it costs, not 4 rounds
    of one); ``rows`` is set before each choice."""

    def __init__(self, costs: Costs, max_age: int = MAX_AGE):
        self.costs, self.max_age, self.rows = costs, max_age, 1
        self.tables: dict[int, RoundTimes] = {}

    def table(self) -> RoundTimes:
        if self.rows not in self.tables:
            self.tables[self.rows] = RoundTimes(batch_costs(self.costs, self.rows), self.max_age)
        return self.tables[self.rows]

    @property
    def counts(self) -> dict:
        return self.table().counts

    def predict(self, k: int) -> float:
        return self.table().predict(k)

    def observe(self, k: int, seconds: float) -> None:
        self.table().observe(k, seconds)


class BatchController(DraftController):
    """``auto`` for a batch: one ``k`` for every row, the one that maximises the batch's
    expected tokens per second (the rows' acceptance pooled: each row's round is one
    observation)."""

    def __init__(self, costs: Costs, k_max: int):
        super().__init__(costs, k_max, times=BatchRoundTimes(costs))

    def choose_for(self, rows: int, limit: int) -> int:
        self.times.rows = rows
        return self.choose(limit)

    def observe_rows(self, k: int, accepted: list[int], seconds: float | None) -> None:
        for n in accepted[:-1]:
            if k:
                self.acceptance.observe(k, n)
        self.observe(k, accepted[-1], seconds)


class FixedBatchSchedule:
    """``constant``: every round drafts ``k`` (``heuristic`` is a single-stream schedule)."""

    def __init__(self, k: int):
        self.k = k

    def choose_for(self, rows: int, limit: int) -> int:
        return max(0, min(self.k, limit))

    def observe_rows(self, k: int, accepted: list[int], seconds: float | None) -> None:
        pass


# -- rows ---------------------------------------------------------------------------------------


class RowOutput(NamedTuple):
    """Tokens a row emitted in one step: ``logprobs[i]`` is the target's row for ``tokens[i]``;
    the first ``num_from_draft`` were drafted. ``finish_reason``: ``"stop"`` (EOS),
    ``"length"`` or None; ``cache``: the row's settled cache once it finished (when it was
    inserted with one)."""

    uid: int
    tokens: list
    logprobs: mx.array
    num_from_draft: int
    finish_reason: str | None
    cache: list | None = None


@dataclass(eq=False)
class Row:
    uid: int
    policy: TokenPolicy
    seed: mx.array
    max_tokens: int
    eos: set
    prompt: list  # the tokens after what ``cache`` held when inserted
    context: list  # the tokens ``cache`` held, where known (a ``PromptCache``'s)
    todo: mx.array  # prompt tokens not fed yet
    cache: list  # its own cache: what it came with, then the prompt (until it joins)
    start: int  # positions ``cache`` held when inserted
    keep_cache: bool  # the caller wants the settled cache back
    k_limit: int  # drafts per round it may accept
    keys: list  # what the cache's ``tokens`` get for the prompt (media keyed on content)
    media: MediaPrompt | None = None  # the prompt's image and audio embeddings, if any
    history: mx.array | None = None  # the processors' window (see TokenPolicy), maybe lazy
    length: int = 0  # positions its K/V holds after the last round read (the pending excluded)
    emitted: list = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)


@dataclass(eq=False)
class Round:
    """A round dispatched (lazy): ``result`` is ``[B, 1 + k + 1]`` (accepted count, then the
    target's tokens) for the ``rows`` of the batch when it was built."""

    rows: list
    k: int
    result: mx.array
    logprobs: mx.array | list


class BatchGenerator:
    """Continuous batching with speculative decoding. ``insert`` a prompt, call ``step`` until
    its row finishes; ``remove`` cancels a row. All MLX work happens in the caller's thread.

    ``max_rows`` (mlx-lm's ``completion_batch_size``, the server's ``--decode-concurrency``):
    rows decoding at once; more wait. ``prompt_concurrency`` (``--prompt-concurrency``): prompts
    prefilled at once (a chunk each per step). ``draft_schedule``: ``auto`` (default) or
    ``constant``.

    Rounds are pipelined as the single-stream loop's are: the next round (drafts and
    verification) is built from the current one's lazy result, the accepted counts included, and
    queued before the current one is read, so the host's work of a round (reading, emitting,
    building the next graph) overlaps the device's. A finished row's share of the queued round is
    dropped."""

    def __init__(
        self,
        target: Target,
        drafter=None,
        *,
        num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
        draft_schedule: str = "auto",
        full_vocab_draft: bool = False,
        prefill_step_size: int = 512,
        max_rows: int = 8,
        prompt_concurrency: int = 1,
        costs: Costs | None = None,
    ):
        if draft_schedule not in SCHEDULES:
            raise ValueError(f"draft schedule {draft_schedule!r} is not one of {SCHEDULES}")
        if draft_schedule == "heuristic":
            raise ValueError("the heuristic draft schedule is single-stream: use auto or constant")
        if max_rows < 1 or prompt_concurrency < 1:
            raise ValueError("max_rows and prompt_concurrency must be >= 1")
        if num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
        self.target, self.drafter = target, drafter
        self.k_max = num_draft_tokens if drafter is not None else 0
        self.draft_schedule, self.full_vocab_draft = draft_schedule, full_vocab_draft
        self.prefill_step_size = prefill_step_size
        self.max_rows, self.prompt_concurrency = max_rows, prompt_concurrency
        self.slack = draft_slack(max(self.k_max, 1))
        self.waiting: list[Row] = []  # inserted, not prefilling yet
        self.filling: list[Row] = []
        self.rows: list[Row] = []  # decoding, in batch order
        self.layers: list[RaggedCache] = self._make_layers()
        # Per row, in batch order (lazy): the pending token and the target's hidden state there.
        self.pending = mx.zeros((0,), mx.int32)
        self.hidden: mx.array | None = None
        self.in_flight: Round | None = None
        self._costs, self._schedule, self._next_uid = costs, None, 0
        self._clock = time.perf_counter()
        self.counters = BatchCounters()

    def _make_layers(self) -> list[RaggedCache]:
        """Sliding layers keep, beyond the window, what a round writes and what a settled
        row's cache keeps to roll back (that of ``make_prompt_cache``'s default), so a row
        leaves with the same cache it would have had alone."""
        args = self.target.args
        slack = max(self.slack, draft_slack(DEFAULT_MAX_DRAFT_TOKENS))
        ring = args.sliding_window + 1 + slack + self.k_max + 1
        return [
            RaggedCache(args.sliding_window if isinstance(c, SlidingWindowCache) else None, ring)
            for c in self.target.make_cache(draft_slack=self.slack)
        ]

    # -- rows joining and leaving ---------------------------------------------------------------

    def insert(
        self,
        prompt: Iterable[int],
        *,
        max_tokens: int,
        policy: TokenPolicy | None = None,
        eos_token_ids: Iterable[int] = (),
        cache: list | None = None,
        seed: int | None = None,
        num_draft_tokens: int | None = None,
        media: MediaPrompt | None = None,
    ) -> int:
        """Queue ``prompt`` (the tokens after what ``cache`` holds, if given: a cache from
        ``make_prompt_cache``, returned settled when the row finishes or is removed); returns
        the row's uid. ``seed`` fixes a sampled row's output (as ``mx.random.seed`` does for
        one generation). ``num_draft_tokens``: at most that many of each round's drafts are
        accepted for this row (default: the generator's). ``media``: the embeddings of a
        prompt with images or audio (``prompt`` and ``media`` as ``media.build_media_prompt``
        returns them); the cache's ``tokens`` get ``media.keys`` for the prompt."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        if media is not None and media.size != len(prompt):
            raise ValueError(
                f"media covers {media.size} prompt positions, the prompt has {len(prompt)}: "
                "pass the ids build_media_prompt returned with it"
            )
        keys = prompt if media is None else media.keys
        if keys is None:
            raise ValueError("media.keys is None: make the MediaPrompt with build_media_prompt")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        policy = policy or TokenPolicy()
        row_seed = mx.array(0, mx.uint32)
        if policy.coupled:  # as SpeculativeGenerator draws it, so the output is the same
            if seed is not None:
                mx.random.seed(seed)
            row_seed = mx.random.randint(0, 2**31 - 1, ()).astype(mx.uint32)
        keep = cache is not None
        if cache is None:
            cache = self.target.make_cache(draft_slack=self.slack)
        row = Row(
            uid=self._next_uid,
            policy=policy,
            seed=row_seed,
            max_tokens=max_tokens,
            eos=set(eos_token_ids),
            prompt=prompt,
            context=list(getattr(cache, "tokens", ())),
            todo=mx.array(prompt, mx.int32),
            cache=cache,
            start=cache[0].offset if cache else 0,
            keep_cache=keep,
            k_limit=self.k_max if num_draft_tokens is None else min(num_draft_tokens, self.k_max),
            keys=list(keys),
            media=media,
        )
        row.stats.prompt_tokens = len(prompt)
        row.stats.num_draft_tokens = self.k_max
        row.stats.draft_schedule = self.draft_schedule
        row.stats.acceptance_rule = policy.acceptance_rule
        if row.k_limit == 0:
            reason = "no draft model" if self.drafter is None else "num_draft_tokens is 0"
            row.stats.mode, row.stats.plain_reason = "plain", reason
        self._next_uid += 1
        self.waiting.append(row)
        return row.uid

    def remove(self, uid: int, num_emitted: int | None = None) -> list | None:
        """Cancel row ``uid`` (waiting, prefilling or decoding); returns its cache settled to
        its prompt and its first ``num_emitted`` tokens (default: all it emitted; a row still
        filling its prompt: the part fed), or None if it was inserted without one."""
        for queue in (self.waiting, self.filling):
            for row in queue:
                if row.uid == uid:
                    queue.remove(row)
                    return self._settle(row, None) if row.keep_cache else None
        for i, row in enumerate(self.rows):
            if row.uid == uid:
                if num_emitted is not None:
                    del row.emitted[num_emitted:]
                caches = self._leave([i])
                if not self.rows:
                    self.in_flight = None
                return caches[0]
        raise KeyError(f"no row {uid}")

    def _leave(self, indices: list[int]) -> list:
        """Rows ``indices`` leave the batch; their settled caches (None where not kept)."""
        caches = [self._settle(self.rows[i], i) if self.rows[i].keep_cache else None
                  for i in indices]  # fmt: skip
        keep = [i for i in range(len(self.rows)) if i not in indices]
        for layer in self.layers:
            layer.remove_rows(keep)
        self.rows = [self.rows[i] for i in keep]
        index = mx.array(keep, mx.int32)
        self.pending = self.pending[index] if keep else mx.zeros((0,), mx.int32)
        self.hidden = self.hidden[index] if keep else None
        return caches

    def _settle(self, row: Row, index: int | None) -> list:
        """``row``'s cache standing for what it held, its prompt and every emitted token
        (mlx-lm's prompt-cache meaning), taken from the batch (row ``index``; its K/V up to
        what the last round read holds, entries a queued round wrote after them dropped), the
        tokens not fed yet fed now. A row that never joined (``index`` None) leaves its own
        cache standing for the part of its prompt fed so far."""
        if index is None:  # what was fed of the prompt: an abandoned prompt is not filled
            sequence = row.keys[: len(row.prompt) - row.todo.size]
            mx.eval([c.state for c in row.cache])
            if hasattr(row.cache, "tokens"):
                row.cache.tokens += sequence
            return row.cache
        length = row.start + len(row.prompt) + len(row.emitted)
        held = min(row.length, length)  # never short of the prompt: it joined after it
        for j, layer in enumerate(self.layers):
            row.cache[j] = layer.extract(index, held, row.cache[j])
        if held < length:  # emitted tokens only: plain token embeddings
            todo = mx.array(row.emitted[len(row.emitted) - (length - held) :], mx.int32)
            prefill(self.target, row.cache, todo, self.prefill_step_size)
        mx.eval([c.state for c in row.cache])
        if hasattr(row.cache, "tokens"):
            row.cache.tokens += row.keys + row.emitted
        return row.cache

    @property
    def active(self) -> int:
        """Rows inserted and not finished."""
        return len(self.waiting) + len(self.filling) + len(self.rows)

    # -- one step -------------------------------------------------------------------------------

    def step(self) -> list[RowOutput]:
        """One prefill chunk for each prompt being filled, and one round for the decoding
        rows (unless a prompt was just filled: its first token is returned at once); what every
        row emitted (a finished row has left the batch)."""
        while self.waiting and len(self.filling) < self.prompt_concurrency:
            if len(self.filling) + len(self.rows) >= self.max_rows:
                break
            self.filling.append(self.waiting.pop(0))
        counters, clock = self.counters, time.perf_counter()
        firsts = [out for row in list(self.filling) if (out := self._prefill_chunk(row))]
        outputs = self._finish_rows(firsts)
        now = time.perf_counter()
        counters.prompt_time += now - clock
        if self.rows and not firsts:  # a first token goes out now, not after a round
            if self.in_flight is None:
                self.in_flight = self._dispatch()
            upcoming = self._dispatch() if self._pipelined() else None
            # Which interval between reads runs the next round's drafts is the backend's to
            # decide (``SpeculativeGenerator._generate``): timed where it drafts as many.
            timed = upcoming is None or upcoming.k == self.in_flight.k
            outputs += self._finish_rows(self._read(self.in_flight, timed))
            self.in_flight = upcoming if self.rows else None
            in_flight = self.in_flight.k + 1 if self.in_flight else 0
            for layer in self.layers:
                layer.known([row.length for row in self.rows], in_flight)
            counters.decode_time += time.perf_counter() - now
            counters.generation_steps += 1
        counters.generation_tokens += sum(len(out.tokens) for out in outputs)
        return outputs

    def _pipelined(self) -> bool:
        """Whether the next round can be built before this one is read: not when a row's
        processors read its whole history (known only on the host)."""
        return all(row.policy.history_window is not None for row in self.rows)

    def _prefill_chunk(self, row: Row) -> RowOutput | None:
        """Feed the next chunk of ``row``'s prompt; after its last token, choose the first token
        and join the batch."""
        fed = len(row.prompt) - row.todo.size  # the media's position of ``todo[0]``
        if row.todo.size > 1:
            chunk = chunk_end(0, row.todo.size, self.prefill_step_size, row.media, fed)
            self.counters.prompt_tokens += chunk
            feed(self.target, row.cache, row.todo, 0, chunk, row.media, fed)
            mx.eval([c.state for c in row.cache])
            row.todo = row.todo[chunk:]
            return None
        hidden = feed(self.target, row.cache, row.todo, 0, 1, row.media, fed)
        self.counters.prompt_tokens += 1
        row.todo, row.media = row.todo[:0], None  # settling a joined row never needs them
        row.history = initial_history(row.policy, mx.array(row.prompt, mx.int32), row.context)
        logits = self.target.logits(hidden[0])
        logprobs, choice = row.policy.target_rows(logits, row.history, [])
        _, tokens = row.policy.accept([], choice, row.seed, row.cache[0].offset)
        token = tokens[0].item()
        row.stats.target_forwards += 1
        row.length = row.cache[0].offset
        self.filling.remove(row)
        self._join(row, hidden, token)
        out = self._emit(row, [token], logprobs, 0)
        if row.policy.processors:
            row.history = history_after(row.policy, row.history, mx.array([token], mx.int32))
        return out

    def _join(self, row: Row, hidden: mx.array, token: int) -> None:
        for layer, layer_cache in zip(self.layers, row.cache, strict=True):
            layer.add_row(layer_cache)
        last = hidden[:, -1:]
        self.hidden = last if self.hidden is None else mx.concatenate([self.hidden, last])
        self.pending = mx.concatenate([self.pending, mx.array([token], mx.int32)])
        self.rows.append(row)

    def _emit(self, row: Row, tokens: list, logprobs: mx.array, from_draft: int) -> RowOutput:
        """``row``'s tokens of this step, cut after EOS or at its limit."""
        room = row.max_tokens - len(row.emitted)
        finish = None
        for j, token in enumerate(tokens[:room]):
            if token in row.eos:
                tokens, finish = tokens[: j + 1], "stop"
                break
        else:
            tokens = tokens[:room]
            finish = "length" if len(tokens) == room else None
        row.emitted += tokens
        count = len(tokens)
        return RowOutput(row.uid, tokens, logprobs[:count], min(from_draft, count), finish)

    def _finish_rows(self, outputs: list[RowOutput]) -> list[RowOutput]:
        """Finished rows leave the batch; their outputs carry their settled caches."""
        done = [j for j, out in enumerate(outputs) if out.finish_reason is not None]
        if not done:
            return outputs
        uids = [row.uid for row in self.rows]
        caches = self._leave([uids.index(outputs[j].uid) for j in done])
        for j, cache in zip(done, caches, strict=True):
            outputs[j] = outputs[j]._replace(cache=cache)
        return outputs

    def row_stats(self, uid: int) -> Stats:
        """The counters of a row still in the generator (the object stays valid after)."""
        for row in (*self.waiting, *self.filling, *self.rows):
            if row.uid == uid:
                return row.stats
        raise KeyError(f"no row {uid}")

    # -- a round --------------------------------------------------------------------------------

    def _schedule_for(self) -> "BatchController | FixedBatchSchedule":
        if self._schedule is None:
            if self.k_max == 0 or self.draft_schedule == "constant":
                self._schedule = FixedBatchSchedule(self.k_max)
            else:
                self._schedule = BatchController(self._pair_costs(), self.k_max)
        return self._schedule

    def _pair_costs(self) -> Costs:
        """The pair's single-stream costs (given, cached on disk, or measured now on a copy of
        the first row's cache, as ``SpeculativeGenerator`` does): the first guess for batches."""
        if self._costs is None:
            row = self.rows[0]
            cache = [layer.extract(0, row.length, like)
                     for layer, like in zip(self.layers, row.cache, strict=True)]  # fmt: skip
            engine = SpeculativeGenerator(self.target, self.drafter, TokenPolicy(),
                                          num_draft_tokens=self.k_max, cache=cache)  # fmt: skip
            self._costs = engine._costs()
            self._clock = time.perf_counter()
        return self._costs

    def _dispatch(self) -> Round:
        """Build the next round on the batch's (lazy) state and queue it; the state then
        stands for its result: each row rolled back past its rejected drafts, its pending token
        and hidden state those after its accepted ones."""
        rows = list(self.rows)
        limit = max(row.max_tokens - len(row.emitted) for row in rows) - 1
        k = self._schedule_for().choose_for(len(rows), min(limit, self.k_max))
        first = self.layers[0].positions  # the pending tokens' positions
        drafts = self._draft(k)
        result, logprobs, hidden = self._verify(drafts, first)
        mx.async_eval(result)
        limits = mx.array([row.k_limit for row in rows], mx.int32)
        accepted = mx.minimum(result[:, 0], limits)
        for layer in self.layers:
            layer.roll_back(k - accepted)
        batch = mx.arange(len(rows))
        self.pending = result[batch, accepted + 1]
        self.hidden = hidden[batch, accepted][:, None]
        for b, row in enumerate(rows):
            window = row.policy.history_window
            if row.policy.processors and window is not None:
                row.history = windowed_history_after(
                    row.history, result[b, 1:], accepted[b], window
                )
        return Round(rows, k, result, logprobs)

    def _read(self, done: Round, timed: bool) -> list[RowOutput]:
        """Read a round's result: each row still in the batch emits its tokens; ``timed``: its
        time is told to the schedule."""
        values = done.result.tolist()
        now = time.perf_counter()
        outputs, accepted = [], []
        for b, row in enumerate(done.rows):
            if row not in self.rows:  # removed while the round ran
                continue
            n = min(values[b][0], row.k_limit)
            tokens = values[b][1 : n + 2]
            row.length += n + 1
            row.stats.target_forwards += 1
            row.stats.count_round(done.k, n)
            if row.policy.processors and row.policy.history_window is None:
                row.history = history_after(row.policy, row.history, mx.array(tokens, mx.int32))
            accepted.append(n)
            logprobs = done.logprobs[b]
            outputs.append(self._emit(row, tokens, logprobs, n))
        if accepted:
            seconds = now - self._clock if timed else None
            self._schedule_for().observe_rows(done.k, accepted, seconds)
        self._clock = now
        return outputs

    def _draft(self, k: int) -> list[mx.array]:
        """``k`` drafts per row, each ``[B]``, by the batched drafter at each row's position."""
        if not k:
            return []
        rows, args = self.rows, self.target.args
        views = {}
        for layer_type, i in self.target.shared_kv_layers.items():
            window = args.sliding_window if layer_type == "sliding_attention" else None
            views[layer_type] = self.layers[i].drafter_view(window)
        shared_kv = {t: view[0] for t, view in views.items()}
        masks = {t: view[1] for t, view in views.items()}
        positions = self.layers[0].positions
        token, hidden = self.pending, self.hidden
        if all(not row.policy.coupled and not row.policy.processors for row in rows):
            step = compiled_for_pair(self.target, self.drafter, ("batch", self.full_vocab_draft),
                                     greedy_draft_step, self.full_vocab_draft)  # fmt: skip
            drafts = []
            for _ in range(k):
                token, hidden = step(token, hidden, shared_kv, masks, positions)
                drafts.append(token)
            return drafts
        histories, drafts = [row.history for row in rows], []
        for i in range(k):
            inputs = mx.concatenate([self.target.embed(token[:, None]), hidden], axis=-1)
            out = self.drafter(inputs, shared_kv, positions, self.full_vocab_draft, masks=masks)
            token, histories = self._pick_drafts(out, positions + i + 1, histories)
            hidden = out.hidden
            drafts.append(token)
        return drafts

    def _pick_drafts(self, out, positions: mx.array, histories: list) -> tuple[mx.array, list]:
        """Each row's draft from the batched drafter's output, by its own policy (at
        ``positions``, for its noise); the processors' histories after them."""
        rows = self.rows
        logits = out.logits.reshape(len(rows), -1)
        ids = None if out.candidates is None else out.candidates.reshape(len(rows), -1)
        picked, after = [], []
        for b, row in enumerate(rows):
            policy, row_logits, row_ids = row.policy, logits[b : b + 1], None
            if ids is not None:
                row_ids = ids[b : b + 1]
                if policy.history_window is None:  # custom processors read whole rows
                    row_out = out._replace(logits=row_logits, candidates=row_ids)
                    row_logits, row_ids = self.drafter.full_vocab_logits(row_out), None
            noise = mx.stack([row.seed, positions[b].astype(mx.uint32)])
            token = policy.draft(row_logits, row_ids, histories[b], noise, policy.values)
            picked.append(token.reshape(1))
            after.append(history_after(policy, histories[b], token.reshape(1)))
        return mx.concatenate(picked).astype(mx.int32), after

    def _verify(self, drafts: list, first: mx.array) -> tuple[mx.array, list, mx.array]:
        """One target forward over every row's ``[pending, drafts]`` (the pending tokens at
        positions ``first``): ``[B, 1 + k + 1]`` results (``n``, then the target's tokens), each
        row's log-probabilities and the hidden states."""
        rows = self.rows
        inputs = mx.concatenate([self.pending[:, None], *[d[:, None] for d in drafts]], axis=1)
        out = self.target(inputs, self.layers)
        if all(plain_argmax(row.policy) for row in rows):
            logprobs = log_softmax(out.logits)
            tokens = mx.argmax(logprobs, axis=-1).astype(mx.int32)
            n = match_accept(mx.stack(drafts, axis=1), tokens) if drafts else mx.zeros(len(rows))
            result = mx.concatenate([n[:, None].astype(mx.int32), tokens], axis=1)
            return result, logprobs, out.hidden
        results, row_logprobs = [], []
        for b, row in enumerate(rows):
            row_drafts = [d[b : b + 1] for d in drafts]
            logprobs, choice = row.policy.target_rows(out.logits[b], row.history, row_drafts)
            n, tokens = row.policy.accept(row_drafts, choice, row.seed, first[b] + 1)
            results.append(mx.concatenate([n.reshape(1), tokens]).astype(mx.int32))
            row_logprobs.append(logprobs)
        return mx.stack(results), row_logprobs, out.hidden


def greedy_draft_step(target, drafter, full_vocab: bool, token, hidden, shared_kv, masks,
                      positions) -> tuple[mx.array, mx.array]:  # fmt: skip
    """One draft position for a batch of greedy rows: the drafts ``[B]`` and the next hidden
    states (compiled once per pair, see ``compiled_for_pair``)."""
    inputs = mx.concatenate([target.embed(token[:, None]), hidden], axis=-1)
    out = drafter(inputs, shared_kv, positions, full_vocab, masks=masks)
    return out.tokens().reshape(-1).astype(mx.int32), out.hidden


def plain_argmax(policy: TokenPolicy) -> bool:
    """Greedy without processors: a whole batch of such rows is verified in a few ops."""
    return not (policy.coupled or policy.processors or policy.custom_sampler)
