"""The speculative loop: the drafter proposes, the target verifies, rejected K/V roll back.

State between rounds (the clean MTP semantics): the target cache holds positions ``0..p-1``,
token ``x_p`` is pending (chosen, not yet fed), ``h_{p-1}`` is the target's final hidden state at
``p - 1``. A round drafts ``d_1..d_k`` at constant position ``p`` from ``[embed(x_p); h_{p-1}]``,
verifies ``[x_p, d_1..d_k]`` in one target forward, accepts ``n`` drafts, emits ``n + 1`` tokens,
trims ``k - n`` entries from every cache and keeps the target hidden state at ``p + n``. A round
with ``k = 0`` is a plain decoding step.

One loop runs every mode. The next round's drafts are dispatched *before* the current round's
result is read: they depend on its accepted count ``n`` only through lazy arrays (the token and
the hidden state at ``n``, the position ``p + n + 1``, masks over the target's cache buffers, the
recent-token window of the logits processors), so the device drafts while the host reads the
result, rolls the caches back and builds the next verification. After a plain step nothing needs
rolling back, so the next verification is queued before the read too, as mlx-lm's plain loop
does. Only custom logits processors (which read the whole history on the host) and drafters
without ``visibility_masks`` draft after the read.

Every emitted token is the target's own pick at its position (``sampling.TokenPolicy``): argmax,
or, when sampling, a Gumbel-max draw with noise hashed from the generation's seed and the
position. So the output never depends on how many drafts a round had: with a seed, the same
request gives the same tokens whatever the costs measured and the schedule chose.
"""

import time
import weakref
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from ..costs import (
    AcceptanceModel,
    Costs,
    DraftController,
    RoundTimes,
    calibration_widths,
    costs_identity,
    load_costs,
    measure_costs,
    save_costs,
)
from ..models.centroid_head import prepare_head
from ..state import pair_state
from .sampling import TokenPolicy

SCHEDULES = ("auto", "constant", "heuristic")
DEFAULT_NUM_DRAFT_TOKENS = 6  # 4 cost up to 4.2% in replays, 5 up to 1.0% (docs/controller.md)
# Top-p rounds guess their first token without a sort until guesses pass 1 in 40 rounds. A guess
# loses the work queued on it: at temperature 1.5 top-p 0.9 (23% of tokens guessed) plain
# decoding ran 19% slower than with the sort, k = 3 6% slower; at 0.7/0.95 (no guess) 2% and 6%
# faster (fixture, OpenBLAS, 2026-12-05): the sort pays for itself from a few guesses in 100.
GUESSED_ROUNDS_LIMIT = 1 / 40


@dataclass
class Stats:
    """Counters of one generation; ``mode`` says whether the drafter was used, and why not."""

    mode: str = "mtp"
    plain_reason: str | None = None
    num_draft_tokens: int = 0
    draft_schedule: str = "auto"
    acceptance_rule: str = "match"
    draft_path: str = "none"
    prompt_tokens: int = 0
    rounds: int = 0  # speculative rounds (k >= 1)
    plain_steps: int = 0  # rounds with k = 0 after the first token
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_lengths: list = field(default_factory=list)  # k of every round, 0 for plain steps
    accepted_lengths: list = field(default_factory=list)  # n of every round
    k_counts: Counter = field(default_factory=Counter)  # rounds per k, counted as they end
    parked_seconds: float = 0.0  # spent in plain steps while a drafter was loaded
    costs: str | None = None  # where the controller's costs came from

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def k_histogram(self) -> dict:
        return dict(sorted(self.k_counts.items()))

    def count_round(self, k: int, n: int) -> None:
        """A round of ``k`` drafts (0: a plain step) of which ``n`` were accepted."""
        self.draft_lengths.append(k)
        self.accepted_lengths.append(n)
        self.k_counts[k] += 1
        if k:
            self.rounds += 1
            self.drafted += k
            self.accepted += n
        else:
            self.plain_steps += 1


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
        if kind not in ("constant", "heuristic"):
            raise ValueError(f"draft schedule {kind!r} is not one of {', '.join(SCHEDULES)}")
        self.k_max, self.kind, self.k = k_max, kind, k_max

    def choose(self, limit: int) -> int:
        """Drafts to dispatch for the next round (before this round's acceptance is known): the
        largest ``k`` the next ``observe`` can give."""
        most = min(self.k_max, self.k + 2) if self.kind == "heuristic" else self.k
        return max(0, min(most, limit))

    def verify(self, dispatched: int) -> int:
        """How many of the dispatched drafts to verify, now that the last round is known."""
        return min(self.k, dispatched)

    def observe(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        if self.kind == "heuristic" and drafted:
            step = 2 if accepted == drafted else -1
            self.k = max(1, min(self.k_max, self.k + step))


class AutoSchedule(DraftController):
    """``auto``: the cost- and acceptance-aware controller (``costs.DraftController``)."""

    def verify(self, dispatched: int) -> int:
        return dispatched


def fresh_followed(costs: Costs, k_max: int) -> dict:
    """What ``auto`` follows and carries from one generation of a pair to the next (the round
    times and the acceptance per draft position), before any generation."""
    return {"times": RoundTimes(costs), "acceptance": AcceptanceModel(k_max)}


def draft_step(target, drafter, policy, full_vocab, token, hidden, shared_kv, masks, position,
               history, noise, values) -> dict:  # fmt: skip
    """One draft step from the pending ``token`` [1] and ``hidden`` [1, 1, H]: the drafted
    ``token``, the next ``hidden`` state and ``history``. ``noise``: ``[seed, position of the
    drafted token]``; ``values``: the policy's sampling values (array inputs, so one compiled
    step serves every temperature)."""
    inputs = mx.concatenate([target.embed(token[None]), hidden], axis=-1)
    extra = {} if masks is None else {"masks": masks}
    out = drafter(inputs, shared_kv, position, full_vocab, **extra)
    logits, ids = out.logits.reshape(1, -1), out.candidates
    if ids is not None and policy.history_window is None:  # custom processors read whole rows
        logits, ids = drafter.full_vocab_logits(out).reshape(1, -1), None
    picked = policy.draft(logits, None if ids is None else ids.reshape(1, -1), history, noise,
                          values)  # fmt: skip
    if policy.processors:
        history = mx.concatenate([history, picked.astype(history.dtype)])
        if policy.history_window:
            history = history[1:]
    return {"token": picked, "hidden": out.hidden, "history": history}


def prefill(
    target,
    cache: list,
    prompt: mx.array,
    step_size: int,
    progress: Callable[[int, int], None] | None = None,
    media=None,
    first: int = 0,
) -> mx.array:
    """Feed ``prompt`` ``[P]`` in chunks; returns the final hidden state ``[1, 1, H]`` at P-1.

    As mlx-lm does, all but the last token only fill the cache (evaluated chunk by chunk, so no
    prompt-length activations outlive a chunk) and the last token runs alone. ``progress`` is
    called with ``(tokens processed, P)`` after each chunk (mlx-lm's prompt_progress_callback).
    ``media`` (``media.MediaPrompt``): embeddings to feed instead of the tokens' (images), of a
    prompt whose position ``first`` is ``prompt[0]``."""
    total, done = prompt.size, 0
    while total - done > 1:
        end = chunk_end(done, total, step_size, media, first)
        feed(target, cache, prompt, done, end, media, first)
        mx.eval([c.state for c in cache])
        done = end
        if progress is not None:
            progress(done, total)
        mx.clear_cache()
    return feed(target, cache, prompt, done, total, media, first)


def chunk_end(done: int, total: int, step_size: int, media, first: int) -> int:
    """Where the prefill chunk from ``done`` ends: after ``step_size`` tokens, before the
    prompt's last token (which runs alone), never inside a bidirectional image block."""
    end = min(done + step_size, total - 1)
    if media is not None:
        end = media.chunk_end(first + done, first + end) - first
    return end


def feed(target, cache: list, prompt: mx.array, start: int, end: int, media, first: int):
    """The backbone over ``prompt[start:end]`` (through ``media``'s embeddings, when given)."""
    if media is None:
        return target.backbone(prompt[None, start:end], cache=cache)
    return media.forward(target.backbone, cache, first + start, first + end)


def initial_history(policy: TokenPolicy, prompt: mx.array, context: Sequence[int] = ()) -> mx.array:
    """The processors' history: ``context`` (the tokens already in the cache) and the whole
    prompt, or their last ``W`` tokens (padded with the first, which the set-like repetition
    penalty counts once anyway)."""
    window = policy.history_window
    if not policy.processors:
        return mx.array(0)
    if context:
        context = context[-window:] if window else context
        prompt = mx.concatenate([mx.array(context, prompt.dtype), prompt])
    if window is None or prompt.size >= window:
        return prompt if window is None else prompt[-window:]
    return mx.concatenate([mx.repeat(prompt[:1], window - prompt.size), prompt])


def history_after(policy: TokenPolicy, history: mx.array, tokens: mx.array) -> mx.array:
    """The processors' history once ``tokens`` (emitted) are appended."""
    if not policy.processors:
        return history
    joined = mx.concatenate([history, tokens.astype(history.dtype)])
    window = policy.history_window
    return joined if window is None else joined[-window:]


def windowed_history_after(
    history: mx.array, tokens: mx.array, accepted: mx.array, window: int
) -> mx.array:
    """The last ``window`` tokens of the history once a round's emitted tokens ``t_0..t_n``
    are appended, from its tokens ``[k + 1]`` and its accepted count ``n`` (lazy: built on
    the device before the round is read)."""
    joined = mx.concatenate([history, tokens.astype(history.dtype)])
    return mx.take(joined, mx.arange(window) + accepted + 1)


def draft_slack(num_draft_tokens: int) -> int:
    """Entries a sliding-window cache keeps beyond ``window + 1`` so that every rollback stays
    possible: a round rejects up to ``k`` drafts, measuring the costs rolls back ``k + 1``
    tokens, and settling a cancelled generation drops a round verified ahead (``k + 1``) plus
    up to ``k`` tokens of a block not emitted."""
    return 2 * num_draft_tokens + 2


def compiled_draft_step(target, drafter, policy: TokenPolicy, full_vocab: bool):
    """The compiled ``draft_step`` of a (target, drafter) pair for this kind of policy."""
    key = (full_vocab, policy.kind)
    return compiled_for_pair(target, drafter, key, draft_step, policy, full_vocab)


def compiled_for_pair(target, drafter, key, step: Callable, *args):
    """``step(target, drafter, *args, ...)`` compiled, built once per pair and ``key`` and kept
    in the pair's state (traces are per compiled function: a new one per call would trace
    again). It holds weak proxies of the models: it keeps neither alive and makes no reference
    cycle."""

    def build():
        # A compiled function keeps unevaluated weights (lazy loads, casts) as graphs and would
        # recompute them on every call.
        mx.eval(drafter.parameters(), target.backbone.embed_tokens.parameters())
        prepare_head(drafter)  # the Metal kernels are probed before any is traced
        proxies = weakref.proxy(target), weakref.proxy(drafter)
        return weakref.ref(target), mx.compile(partial(step, *proxies, *args))

    steps = pair_state(target.backbone, drafter).steps
    built_for, compiled = steps.get(key, build)
    if built_for() is not target:  # another wrapper of the same model: its proxy may be dead
        built_for, compiled = steps.put(key, build())
    return compiled


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


@dataclass
class Round:
    """One verification, built (lazy): ``result`` is ``[n, t_0, .., t_k]`` (``n`` -1 where
    ``t_0`` is only a guess, see ``_draw_first_exactly``), ``hidden`` the target's hidden
    states at ``first..first+k``, ``history`` the processors' window after it."""

    k: int
    first: int
    result: mx.array
    logprobs: mx.array
    rows: mx.array  # what the tokens were chosen from (``TokenPolicy.choice_rows``)
    hidden: mx.array
    history: mx.array | None
    timed: bool = True


class SpeculativeGenerator:
    """Generates blocks of tokens; ``drafter=None`` gives plain decoding (one token per forward).

    ``draft_schedule``: ``auto`` (default) picks ``k`` in ``0..num_draft_tokens`` every round
    from the measured costs (``costs``, else cached on disk or measured on first use) and the
    acceptance so far; ``constant`` and ``heuristic`` as ``DraftSchedule``."""

    def __init__(
        self,
        target,
        drafter=None,
        policy: TokenPolicy | None = None,
        *,
        num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
        draft_schedule: str = "auto",
        full_vocab_draft: bool = False,
        prefill_step_size: int = 512,
        eos_token_ids: Iterable[int] = (),
        costs: Costs | None = None,
        cache: list | None = None,
        prompt_progress_callback: Callable[[int, int], None] | None = None,
        context: Sequence[int] = (),
        media=None,
    ):
        """``cache``: the target cache to continue from (``Target.make_cache``, with a slack of
        at least ``draft_slack(num_draft_tokens)``), kept by the caller between generations;
        after ``settle`` it stands for its old tokens, the prompt and the emitted tokens.
        A sampling policy takes its seed from MLX's random state here (``mx.random.seed``
        fixes it); nothing else draws from it. ``context``: the tokens already in ``cache``,
        which the logits processors' history starts with (so a cached conversation is penalised
        as a fresh one would be)."""
        if draft_schedule not in SCHEDULES:
            raise ValueError(f"draft schedule {draft_schedule!r} is not one of {SCHEDULES}")
        if num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
        self.target, self.drafter = target, drafter
        self.policy = policy or TokenPolicy()
        self.stats = Stats(
            num_draft_tokens=num_draft_tokens,
            draft_schedule=draft_schedule,
            acceptance_rule=self.policy.acceptance_rule,
        )
        if drafter is None or num_draft_tokens == 0:
            reason = "no draft model" if drafter is None else "num_draft_tokens is 0"
            self.stats.mode, self.stats.plain_reason = "plain", reason
            self.stats.num_draft_tokens, num_draft_tokens = 0, 0
        self.k_max = num_draft_tokens
        self.full_vocab_draft = full_vocab_draft  # full lm_head instead of centroid masking
        self.prefill_step_size = prefill_step_size
        self.eos_token_ids = set(eos_token_ids)
        self.costs = costs
        if cache is None:
            cache = target.make_cache(draft_slack=draft_slack(num_draft_tokens))
        else:
            check_slack(cache, draft_slack(num_draft_tokens))
        self.cache = cache
        self.start = cache[0].offset if cache else 0
        self.prompt, self.emitted = None, []
        self.prompt_progress_callback = prompt_progress_callback
        self.context = list(context)
        self.media = media  # media.MediaPrompt of the prompt's images, if any
        # ``auto`` gets its controller once the prompt is in the cache (see ``generate``).
        self.schedule = DraftSchedule(num_draft_tokens, draft_schedule.replace("auto", "constant"))
        # Drafting before the round's result is read needs the whole token history the
        # processors read on the device, and a drafter that sees K/V buffers through masks.
        self.pipelined = self.policy.history_window is not None and (
            drafter is None or hasattr(drafter, "visibility_masks")
        )
        # Not a bound method: the engine must not be in a reference cycle, or its caches would
        # outlive it until the garbage collector runs.
        self._draft_step = partial(draft_step, target, drafter, self.policy, full_vocab_draft)
        self._compiled_step = None
        if self.stats.mode == "mtp":
            self.stats.draft_path = self._describe_draft_path()
            if self.pipelined:
                self._compiled_step = compiled_draft_step(
                    target, drafter, self.policy, full_vocab_draft
                )
        self._auto = draft_schedule == "auto" and self.stats.mode == "mtp"
        self._seed = mx.array(0, mx.uint32)  # the noise of coupled sampling (see sampling.py)
        if self.policy.coupled:
            self._seed = mx.random.randint(0, 2**31 - 1, ()).astype(mx.uint32)
        self._buffer_shapes = None
        self._first_exact, self._guesses = False, 0  # see _draw_first_exactly

    def _head(self) -> str:
        args = getattr(self.drafter, "args", None)
        if self.full_vocab_draft or not getattr(args, "use_ordered_embeddings", True):
            return "full-vocabulary"
        return "centroid-masked"

    def _describe_draft_path(self) -> str:
        head = self._head()
        if self.pipelined:
            return f"compiled, pipelined, {head}"
        if self.policy.history_window is None:
            return f"synchronous (custom logits processors read the whole history), {head}"
        return f"synchronous (drafter without visibility_masks), {head}"

    # -- building rounds (lazy graphs) ------------------------------------------------------

    def _first_round(self, prompt: mx.array) -> Round:
        hidden = prefill(
            self.target,
            self.cache,
            prompt,
            self.prefill_step_size,
            self.prompt_progress_callback,
            media=self.media,
        )
        history = self._initial_history(prompt)
        logits = self.target.logits(hidden[0])
        logprobs, rows = self.policy.target_rows(logits, history, [])
        first = self.cache[0].offset - 1
        return Round(0, first, self._accept([], rows, first), logprobs, rows, hidden, history)

    def _initial_history(self, prompt: mx.array) -> mx.array | None:
        return initial_history(self.policy, prompt, self.context)

    def _accept(self, drafts: list, rows: mx.array, first: int) -> mx.array:
        """``[n, t_0, .., t_k]``: accepted count and target tokens (emitted: ``t_0..t_n``) of
        the rows fed from cache position ``first`` on (row ``i`` picks position
        ``first + 1 + i``)."""
        n, tokens = self.policy.accept(drafts, rows, self._seed, first + 1, self._first_exact)
        return mx.concatenate([n.reshape(1), tokens]).astype(mx.int32)

    def _draw_first_exactly(self, current: Round) -> None:
        """Make ``current``'s result ``[0, t_0]`` with ``t_0`` the exact draw, where the round
        only guessed its first token (``n`` -1, see ``TokenPolicy.choose``): the sort every
        round would otherwise pay (0.01% of rounds guess at temperature 0.7 top-p 0.95 on the
        fixture, 0.3% at 1.0). Where guesses are frequent, rounds sort again."""
        tokens, _ = self.policy.choose(current.rows[:1], self._seed, current.first + 1)
        current.result = mx.concatenate([mx.array([0], mx.int32), tokens.astype(mx.int32)])
        current.timed = False
        self._guesses += 1
        rounds = self.stats.target_forwards + 1
        if self._guesses >= 2 and self._guesses > GUESSED_ROUNDS_LIMIT * rounds:
            self._first_exact = True

    def _draft_after(self, done: Round, count: int) -> tuple[list, mx.array | None]:
        """Dispatch ``count`` drafts for the round after ``done`` (read or not): from the token
        and hidden state at its accepted count, at the position after it."""
        history = self._history_after(done)
        if count < 1:
            return [], history
        n = mx.maximum(done.result[0], 0)  # -1: a guessed first token, drawn again after
        token = mx.take(done.result, n + 1).reshape(1)
        hidden = mx.take(done.hidden, n, axis=1)[:, None]
        position = n + (done.first + 1)
        if self.pipelined:
            shared_kv, first_positions = self.target.shared_kv_buffers(self.cache)
            masks = self.drafter.visibility_masks(shared_kv, first_positions, position)
            step = self._compiled_step
            shapes = [kv[0].shape for kv in shared_kv.values()]
            if shapes != self._buffer_shapes:  # a retrace: this round's time says little
                self._buffer_shapes, done.timed = shapes, False
        else:
            shared_kv, masks, step = self.target.shared_kv(self.cache), None, self._draft_step
            position = position.item()
        drafts, draft_history, values = [], history, self.policy.values
        for i in range(count):
            noise = mx.stack([self._seed, mx.array(position + i + 1, mx.uint32)])
            out = step(token, hidden, shared_kv, masks, position, draft_history, noise, values)
            token, hidden, draft_history = out["token"], out["hidden"], out["history"]
            drafts.append(token)
        mx.async_eval(drafts)
        return drafts, history

    def _history_after(self, done: Round) -> mx.array | None:
        """The processors' history once ``done``'s emitted tokens ``t_0..t_n`` are appended."""
        if not self.policy.processors:
            return done.history
        tokens = done.result[1:].astype(done.history.dtype)
        window = self.policy.history_window
        if window is None:  # the whole history: known only after the read
            return mx.concatenate([done.history, tokens[: done.result[0].item() + 1]])
        return windowed_history_after(done.history, tokens, done.result[0], window)

    def _verify(self, pending: mx.array, drafts: list, history) -> Round:
        """One target forward over ``[pending, *drafts]``, with its accept result (lazy)."""
        first = self.cache[0].offset
        inputs = mx.concatenate([pending.reshape(1).astype(mx.int32), *drafts])
        out = self.target(inputs[None], self.cache)
        logprobs, rows = self.policy.target_rows(out.logits[0], history, drafts)
        result = self._accept(drafts, rows, first)
        mx.async_eval(result)
        return Round(len(drafts), first, result, logprobs, rows, out.hidden, history)

    # -- the loop -----------------------------------------------------------------------------

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
        blocks = self._generate(prompt, max_tokens)
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
        else:
            if self.media is not None and held < self.prompt.size:  # media embeddings first
                rest, step = self.prompt[held:], self.prefill_step_size
                prefill(self.target, self.cache, rest, step, media=self.media, first=held)
                held = self.prompt.size
            if held < tokens.size:
                prefill(self.target, self.cache, tokens[held:], self.prefill_step_size)
        mx.eval([c.state for c in self.cache])

    def _generate(self, prompt: mx.array, max_tokens: int) -> Generator[Block, None, None]:
        current = self._first_round(prompt)
        if self._auto:
            costs = self._costs()
            self.schedule = AutoSchedule(costs, self.k_max, **self._followed(costs))
        remaining, block, clock = max_tokens, None, time.perf_counter()
        while True:
            upcoming = None
            if self.pipelined:
                count = self.schedule.choose(remaining - 2)
                drafts, history = self._draft_after(current, count)
                # The next round's drafts are queued before this round is read. Which interval
                # between reads holds them is the backend's to decide (MLX's CPU blocks the
                # dispatch until the round has run; a GPU runs them after the read), so a time
                # is told only where both intervals would hold as many drafts.
                current.timed &= len(drafts) == current.k
                if current.k == 0 and remaining > 1:
                    # A plain step rolls nothing back: queue the next verification now.
                    k = self.schedule.verify(len(drafts))
                    upcoming = self._verify(current.result[1], drafts[:k], history)
                    # Part of that round may run before this step is read, as above.
                    upcoming.timed = not k
            if block is not None:
                yield block
            values = current.result.tolist()
            if values[0] < 0:  # the first token was a guess: what was built on it goes
                self._draw_first_exactly(current)
                values = current.result.tolist()
                if upcoming is not None:
                    for c in self.cache:
                        c.trim(upcoming.k + 1)
                    upcoming = None
                if self.pipelined:
                    drafts, history = self._draft_after(current, len(drafts))
            clock = self._record(current, values[0], clock)
            block, done = self._block(current, values, remaining)
            if done:
                if upcoming is not None:
                    for c in self.cache:
                        c.trim(upcoming.k + 1)
                yield block
                return
            remaining -= len(block.tokens)
            if upcoming is None:
                if not self.pipelined:
                    count = self.schedule.choose(remaining - 1)
                    drafts, history = self._draft_after(current, count)
                k = self.schedule.verify(min(len(drafts), remaining - 1))
                pending = mx.array(block.tokens[-1])
                upcoming = self._verify(pending, drafts[:k], history)
                # Parked plain steps are queued behind the one before; this one, built after a
                # round's read, was not, and its time would overstate theirs.
                upcoming.timed = not (self.pipelined and k == 0)
            current = upcoming

    def _block(self, current: Round, values: list, remaining: int) -> tuple[Block, bool]:
        n = values[0]
        tokens, done = self._finish(values[1 : n + 2], remaining)
        return Block(tokens, current.logprobs[: len(tokens)], min(n, len(tokens))), done

    def _record(self, current: Round, n: int, clock: float) -> float:
        """Count the round just read, roll its rejected drafts back and tell the schedule."""
        now = time.perf_counter()
        k, stats = current.k, self.stats
        stats.target_forwards += 1
        if stats.target_forwards == 1:  # the first token: prefill, no round
            return now
        stats.count_round(k, n)
        if k:
            for c in self.cache:
                c.trim(k - n)
        elif stats.mode == "mtp":
            stats.parked_seconds += now - clock
        self.schedule.observe(k, n, now - clock if current.timed else None)
        return now

    # -- the controller's costs ---------------------------------------------------------------

    def _costs(self) -> Costs:
        """The costs given, else the pair's for this kind of drafting: cached on disk, or
        measured now on the prefilled cache (then cached), once per process."""
        if self.costs is not None:
            self.stats.costs = "given"
            return self.costs
        state = pair_state(self.target.backbone, self.drafter)
        now = []  # the source, when this generation loads or measures them
        key = (self._draft_kind(), self.k_max)
        self.costs, path = state.costs.get(key, lambda: self._load_or_measure_costs(now))
        self.stats.costs = now[0] if now else f"cached ({path})" if path else "measured earlier"
        return self.costs

    def _load_or_measure_costs(self, source: list) -> tuple[Costs, Path | None]:
        identity = self.costs_identity()
        costs, path = load_costs(identity, self.k_max)
        if costs is not None:
            source.append(f"cached ({path})")
            return costs, path
        costs = self.measure_costs(widths=calibration_widths(self.k_max))
        saved = save_costs(identity, costs)
        source.append(f"measured now, cached in {saved}" if saved else "measured now")
        return costs, saved

    def _followed(self, costs: Costs) -> dict:
        """The round times and acceptance the pair's last generation of this kind followed,
        for ``AutoSchedule``: each generation goes on from them instead of from the
        calibration, which may come from another spell of the machine, and from the prior
        acceptance (a reply's first rounds accept less than the pair does on the whole: judged
        on them alone, two or three rejections parked speculation for 32 tokens). Neither
        changes the output, only its speed."""
        state = pair_state(self.target.backbone, self.drafter)
        key = (self._draft_kind(), self.k_max)
        followed = state.followed.get(key, lambda: fresh_followed(costs, self.k_max))
        if followed["times"].costs is not costs:
            followed = state.followed.put(key, fresh_followed(costs, self.k_max))
        return followed

    def costs_identity(self) -> dict:
        """The key of this engine's costs in the on-disk cache."""
        return costs_identity(self.target.model, self.drafter, self._draft_kind())

    def _draft_kind(self) -> str:
        """What the draft step and a round's acceptance work cost depend on, besides the models:
        a kind of policy, never a value of its (a temperature, a top-p)."""
        rule, filters, window, penalty, processors = self.policy.kind
        head = f"{'compiled' if self.pipelined else 'synchronous'}, {self._head()}"
        return f"{head}/{rule}/filters={filters}/processors={processors}"

    def measure_costs(self, k_max: int | None = None, **options) -> Costs:
        """Queued costs of this engine's rounds (drafting, verification with this policy's
        acceptance work, rollback) and draft step on its prefilled cache (left as it was);
        ``options`` go to ``costs.measure_costs``. Measuring draws no random numbers, so it
        changes nothing that is sampled afterwards."""
        k_max = self.k_max if k_max is None else k_max
        last = Round(
            0,
            self.cache[0].offset - 1,
            mx.array([0, 0], mx.int32),
            None,
            None,
            mx.zeros((1, 1, self.target.hidden_size)),
            self._initial_history(mx.array([0], mx.int32)),
        )

        def round_chain(k: int):
            def one_round() -> mx.array:
                drafts, history = self._draft_after(last, k)
                verified = self._verify(last.result[1], drafts, history)
                for c in self.cache:
                    c.trim(k + 1)
                return verified.result

            return one_round

        return measure_costs(
            round_chain,
            lambda: self._draft_after(last, 1)[0][0],
            k_max,
            self.cache[0].offset,
            **options,
        )
