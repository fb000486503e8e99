"""The speculative loop: the drafter proposes, the target verifies, rejected K/V roll back.

State between rounds (the clean MTP semantics): the target cache holds positions ``0..p-1``,
token ``x_p`` is pending (chosen, not yet fed), ``h_{p-1}`` is the target's final hidden state at
``p - 1``. A round drafts ``d_1..d_k`` at constant position ``p`` from ``[embed(x_p); h_{p-1}]``,
verifies ``[x_p, d_1..d_k]`` in one target forward, accepts ``n`` drafts, emits ``n + 1`` tokens,
trims ``k - n`` entries from every cache and keeps the target hidden state at ``p + n``.
"""

import weakref
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import mlx.core as mx

from .models.gemma4_assistant import Model as Drafter
from .sampling import TokenPolicy

SCHEDULES = ("constant", "heuristic")


@dataclass
class Stats:
    """Counters of one generation; ``mode`` says whether the drafter was used, and why not."""

    mode: str = "mtp"
    plain_reason: str | None = None
    num_draft_tokens: int = 0
    prompt_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_lengths: list = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Block(NamedTuple):
    """Tokens emitted at once: ``logprobs[i]`` is the target's row for ``tokens[i]``; the first
    ``num_from_draft`` tokens were drafted (and accepted)."""

    tokens: list
    logprobs: mx.array
    num_from_draft: int


class DraftSchedule:
    """``constant``: always ``k_max``; ``heuristic`` (transformers'): +2 after a fully accepted
    round, -1 after a rejection, within ``[1, k_max]``."""

    def __init__(self, k_max: int, kind: str = "constant"):
        if kind not in SCHEDULES:
            raise ValueError(f"draft schedule {kind!r} is not one of {', '.join(SCHEDULES)}")
        if k_max < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {k_max}")
        self.k_max, self.kind, self.k = k_max, kind, k_max

    def most_next(self) -> int:
        """The largest ``k`` the next ``update`` can give (the next round's drafts are dispatched
        before this round's acceptance is known)."""
        return min(self.k_max, self.k + 2) if self.kind == "heuristic" else self.k

    def update(self, drafted: int, accepted: int) -> None:
        if self.kind == "heuristic" and drafted:
            step = 2 if accepted == drafted else -1
            self.k = max(1, min(self.k_max, self.k + step))


def draft_step(
    target, drafter, full_vocab: bool, full_rows: bool, token, hidden, shared_kv, masks, position
) -> dict:
    """One draft step from the pending ``token`` [1] and ``hidden`` [1, 1, H]: the next hidden
    state and the drafted ``token``, or the draft ``logits`` when the policy reads whole rows."""
    inputs = mx.concatenate([target.embed(token[None]), hidden], axis=-1)
    extra = {} if masks is None else {"masks": masks}  # any drafter callable works eagerly
    out = drafter(inputs, shared_kv, position, full_vocab, **extra)
    if full_rows:
        return {"logits": drafter.full_vocab_logits(out)[0], "hidden": out.hidden}
    return {"token": out.tokens()[0].astype(mx.int32), "hidden": out.hidden}


def prefill(
    target,
    cache: list,
    prompt: mx.array,
    step_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> mx.array:
    """Feed ``prompt`` ``[P]`` in chunks; returns the final hidden state ``[1, 1, H]`` at P-1.

    As mlx-lm does, all but the last token only fill the cache (evaluated chunk by chunk, so no
    prompt-length activations outlive a chunk) and the last token runs alone. ``progress`` is
    called with ``(tokens processed, P)`` after each chunk (mlx-lm's prompt_progress_callback)."""
    total, done = prompt.size, 0
    while prompt.size > 1:
        chunk = min(step_size, prompt.size - 1)
        target.backbone(prompt[None, :chunk], cache=cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[chunk:]
        done += chunk
        if progress is not None:
            progress(done, total)
        mx.clear_cache()
    return target.backbone(prompt[None], cache=cache)


def draft_slack(num_draft_tokens: int) -> int:
    """Entries a sliding-window cache keeps beyond ``window + 1`` so that every rollback stays
    possible: a round rejects up to ``k`` drafts, and settling a cancelled generation drops
    the next round's ``k`` verified drafts plus up to ``k`` tokens of a block not emitted."""
    return max(2 * num_draft_tokens, 1)


def compiled_draft_step(target, drafter, full_vocab: bool, full_rows: bool):
    """The compiled ``draft_step`` of a (target, drafter) pair, built once per pair and kept
    on the target (traces are per compiled function: a new one per call would retrace).

    It holds weak proxies only, so it keeps neither model alive and makes no reference cycle."""
    steps = target.__dict__.setdefault("_draft_steps", {})
    key = (id(drafter), full_vocab, full_rows)
    if key in steps and steps[key][0]() is drafter:
        return steps[key][1]
    # A compiled function keeps unevaluated weights (lazy loads, casts) as graphs and would
    # recompute them on every call.
    mx.eval(drafter.parameters(), target.backbone.embed_tokens.parameters())
    step = partial(draft_step, weakref.proxy(target), weakref.proxy(drafter), full_vocab, full_rows)
    steps[key] = (weakref.ref(drafter), mx.compile(step))
    return steps[key][1]


class SpeculativeGenerator:
    """Generates blocks of tokens; ``drafter=None`` gives plain decoding (one token per forward)."""

    def __init__(
        self,
        target,
        drafter=None,
        policy: TokenPolicy | None = None,
        *,
        num_draft_tokens: int = 4,
        draft_schedule: str = "constant",
        full_vocab_draft: bool = False,
        prefill_step_size: int = 512,
        eos_token_ids: Iterable[int] = (),
        cache: list | None = None,
        prompt_progress_callback: Callable[[int, int], None] | None = None,
    ):
        """``cache``: the target cache to continue from (``Target.make_cache``, with a slack of
        at least ``draft_slack(num_draft_tokens)``), kept by the caller between generations;
        after ``settle`` it stands for its old tokens, the prompt and the emitted tokens."""
        self.target, self.drafter = target, drafter
        self.policy = policy or TokenPolicy()
        self.stats = Stats(num_draft_tokens=num_draft_tokens if drafter is not None else 0)
        if drafter is None:
            self.stats.mode, self.stats.plain_reason = "plain", "no draft model"
        elif num_draft_tokens == 0:
            self.stats.mode, self.stats.plain_reason = "plain", "num_draft_tokens is 0"
            self.stats.num_draft_tokens = 0
        else:
            self.schedule = DraftSchedule(num_draft_tokens, draft_schedule)
        self.full_vocab_draft = full_vocab_draft  # full lm_head instead of centroid masking
        self.full_rows = self.policy.needs_full_vocab_draft  # the policy reads whole rows
        self.prefill_step_size = prefill_step_size
        self.eos_token_ids = set(eos_token_ids)
        if cache is None:
            cache = target.make_cache(draft_slack=draft_slack(num_draft_tokens))
        else:
            check_slack(cache, draft_slack(self.stats.num_draft_tokens))
        self.cache = cache
        self.start = cache[0].offset if cache else 0
        self.prompt, self.emitted = None, []
        self.prompt_progress_callback = prompt_progress_callback
        self.context = None  # prompt + emitted tokens, only for logits processors
        # Our drafter without logits processors (which need each round's tokens on the host):
        # drafting is pipelined and its step compiled (see _generate_pipelined).
        self.pipelined = (
            self.stats.mode == "mtp" and isinstance(drafter, Drafter) and not self.policy.processors
        )
        # Not a bound method: the engine must not be in a reference cycle, or its caches would
        # outlive it until the garbage collector runs.
        self._draft_step = partial(draft_step, target, drafter, full_vocab_draft, self.full_rows)
        self._compiled_step = None
        if self.pipelined:
            self._compiled_step = compiled_draft_step(
                target, drafter, full_vocab_draft, self.full_rows
            )

    # -- one target step / one speculative round (lazy graphs) -----------------------------

    def _first_token(self, prompt: mx.array):
        self.hidden = prefill(
            self.target, self.cache, prompt, self.prefill_step_size, self.prompt_progress_callback
        )
        self.context = prompt if self.policy.processors else None
        logprobs = self.policy.target_logprobs(self.target.logits(self.hidden[0]), prompt, [])
        return self._accept([], [], logprobs), logprobs

    def _accept(self, drafts: list, dists: list, logprobs: mx.array) -> mx.array:
        """``[n, t_0, .., t_k]``: accepted count and target tokens (emitted: ``t_0..t_n``)."""
        n, tokens = self.policy.accept(drafts, dists, logprobs)
        return mx.concatenate([n.reshape(1), tokens]).astype(mx.int32)

    def _draft(self, token, hidden, count: int, shared_kv: dict, position, masks=None):
        """``count`` drafts (lazy) and, when speculative, their distributions."""
        step_fn = self._draft_step if masks is None else self._compiled_step
        drafts, dists = [], []
        for _ in range(count):
            step = step_fn(token, hidden, shared_kv, masks, position)
            if self.full_rows:
                token, dist = self.policy.draft(step["logits"], self.context, drafts)
                token = token.astype(mx.int32)
            else:
                token, dist = step["token"], None
            drafts.append(token)
            dists.append(dist)
            hidden = step["hidden"]
        return drafts, dists

    def _verify(self, pending: int, drafts: list, dists: list):
        """One target forward over ``[pending, *drafts]``: the accept result, the target's
        log-probabilities and its hidden states, all lazy."""
        inputs = mx.concatenate([mx.array([pending], mx.int32), *drafts])
        out = self.target(inputs[None], self.cache)
        logprobs = self.policy.target_logprobs(out.logits[0], self.context, drafts)
        return self._accept(drafts, dists, logprobs), logprobs, out.hidden

    # -- the loops ------------------------------------------------------------------------

    def _finish(self, tokens: list, remaining: int) -> tuple[list, bool]:
        """Cut ``tokens`` after the first EOS or at ``remaining``; True if generation ends."""
        for i, token in enumerate(tokens[:remaining]):
            if token in self.eos_token_ids:
                return tokens[: i + 1], True
        return tokens[:remaining], len(tokens) >= remaining

    def generate(self, prompt: mx.array, max_tokens: int) -> Generator[Block, None, None]:
        """Yield blocks of tokens for ``prompt`` (token ids ``[P]``), at most ``max_tokens``."""
        if prompt.size == 0:
            raise ValueError("the prompt is empty")
        if self.prompt is not None:
            raise RuntimeError(
                "this SpeculativeGenerator has generated already: make a new one, passing "
                "cache= to continue from its cache (after settle)"
            )
        self.prompt = prompt.astype(mx.int32)
        self.stats.prompt_tokens = prompt.size
        if self.stats.mode == "plain":
            blocks = self._generate_plain(prompt, max_tokens)
        else:
            blocks = self._generate_mtp(prompt, max_tokens)
        try:
            for block in blocks:
                self.emitted += block.tokens
                yield block
        finally:
            blocks.close()

    def settle(self, num_emitted: int) -> None:
        """Make the cache stand for what it held before ``generate``, the prompt and the first
        ``num_emitted`` generated tokens (mlx-lm's prompt-cache meaning, whether generation
        finished or was cancelled): K/V computed past them (drafts, a round verified ahead,
        tokens not emitted) are trimmed, and those not fed yet (the pending last token, or the
        rest of an interrupted prefill) are fed."""
        if self.prompt is None or not self.cache:
            return
        if num_emitted > len(self.emitted):
            raise ValueError(f"{num_emitted} tokens emitted, but only {len(self.emitted)} made")
        tokens = mx.concatenate([self.prompt, mx.array(self.emitted[:num_emitted], mx.int32)])
        held = self.cache[0].offset - self.start
        if held > tokens.size:
            for c in self.cache:
                c.trim(held - tokens.size)
        elif held < tokens.size:
            prefill(self.target, self.cache, tokens[held:], self.prefill_step_size)
        mx.eval([c.state for c in self.cache])

    def _generate_plain(self, prompt, max_tokens):
        """mlx-lm's loop: the next step is queued on the lazy token before this one is read."""
        result, logprobs = self._first_token(prompt)
        self.stats.target_forwards = 1
        remaining = max_tokens
        while True:
            token = result[1:2]
            if remaining > 1:
                self._extend_context(token)
                out = self.target(token[None], self.cache)
                next_logprobs = self.policy.target_logprobs(out.logits[0], self.context, [])
                next_result = self._accept([], [], next_logprobs)
                mx.async_eval(next_result)
            tokens, done = self._finish([result.tolist()[1]], remaining)
            yield Block(tokens, logprobs[:1], 0)
            if done:
                return
            self.stats.target_forwards += 1
            remaining -= 1
            result, logprobs = next_result, next_logprobs

    def _generate_mtp(self, prompt, max_tokens):
        """Draft, verify, read the result (the round's one host sync), roll back; any drafter."""
        if self.pipelined:
            yield from self._generate_pipelined(prompt, max_tokens)
            return
        result, logprobs = self._first_token(prompt)
        self.stats.target_forwards = 1
        tokens, done = self._finish(result.tolist()[1:], max_tokens)
        remaining = max_tokens - 1
        block = Block(tokens, logprobs, 0)
        while not done:
            k = min(self.schedule.k, remaining - 1)
            self._extend_context(mx.array(block.tokens, mx.int32))
            pending = mx.array(block.tokens[-1:], mx.int32)
            position = self.cache[0].offset
            shared_kv = self.target.shared_kv(self.cache)  # positions < p, read once per round
            drafts, dists = self._draft(pending, self.hidden, k, shared_kv, position)
            result, logprobs, hidden = self._verify(block.tokens[-1], drafts, dists)
            mx.async_eval(result)
            yield block  # the consumer's work overlaps the device's
            block, done, n = self._read_round(k, result, logprobs, remaining)
            self.hidden = hidden[:, n : n + 1]
            remaining -= len(block.tokens)
        yield block

    def _generate_pipelined(self, prompt, max_tokens):
        """The next round's drafts are dispatched before this round's result is read: they
        depend on its accepted count ``n`` only through lazy arrays (the token and the hidden
        state at ``n``, the position ``p + n + 1``, masks over the cache buffers), so the device
        drafts while the host reads the result, rolls back and builds the next verification."""
        result, logprobs = self._first_token(prompt)
        self.stats.target_forwards = 1
        count = min(self.schedule.most_next(), max_tokens - 2)
        first = self.cache[0].offset - 1  # position of the prompt's last token
        drafts, dists = self._draft_after(result, self.hidden, first, count)
        tokens, done = self._finish(result.tolist()[1:], max_tokens)
        remaining = max_tokens - 1
        block = Block(tokens, logprobs, 0)
        while not done:
            k = min(self.schedule.k, remaining - 1)  # <= len(drafts), see count
            first = self.cache[0].offset
            result, logprobs, hidden = self._verify(block.tokens[-1], drafts[:k], dists[:k])
            mx.async_eval(result)
            count = min(self.schedule.most_next(), remaining - 2)
            drafts, dists = self._draft_after(result, hidden, first, count)
            yield block
            block, done, _ = self._read_round(k, result, logprobs, remaining)
            remaining -= len(block.tokens)
        yield block

    def _draft_after(self, result: mx.array, hidden: mx.array, first: int, count: int):
        """Dispatch ``count`` drafts for the round after the forward over positions ``first..``
        whose accept result is ``result`` and hidden states ``hidden``, without reading them."""
        if count < 1:
            return [], []
        n = result[0]
        token = mx.take(result, n + 1).reshape(1)
        hidden = mx.take(hidden, n, axis=1)[:, None]
        position = n + (first + 1)
        shared_kv, first_positions = self.target.shared_kv_buffers(self.cache)
        masks = self.drafter.visibility_masks(shared_kv, first_positions, position)
        drafts, dists = self._draft(token, hidden, count, shared_kv, position, masks)
        mx.async_eval(drafts, [d for d in dists if d is not None])
        return drafts, dists

    def _read_round(self, k: int, result: mx.array, logprobs: mx.array, remaining: int):
        """The round's one host sync: read ``result``, roll back, and return the block to emit,
        whether generation ends, and the accepted count."""
        values = result.tolist()
        n = values[0]
        self._update(k, n)
        tokens, done = self._finish(values[1 : n + 2], remaining)
        return Block(tokens, logprobs[: len(tokens)], min(n, len(tokens))), done, n

    def _update(self, k: int, n: int) -> None:
        stats = self.stats
        stats.rounds += 1
        stats.target_forwards += 1
        stats.drafted += k
        stats.accepted += n
        stats.draft_lengths.append(k)
        self.schedule.update(k, n)
        for c in self.cache:
            c.trim(k - n)

    def _extend_context(self, tokens: mx.array) -> None:
        if self.context is not None:
            self.context = mx.concatenate([self.context, tokens.astype(self.context.dtype)])


def check_slack(cache: list, slack: int) -> None:
    """A caller's sliding-window caches must keep enough entries to roll back ``slack``."""
    for c in cache:
        kept = getattr(c, "retain", None)
        if kept is not None and kept - c.window - 1 < slack:
            raise ValueError(
                f"the prompt cache keeps {kept - c.window - 1} entries beyond the sliding window; "
                f"{slack} are needed for these draft tokens (make it with make_prompt_cache and "
                f"a large enough max_draft_tokens)"
            )
