"""The generation thread: it loads the models, then decodes jobs together with MTP (continuous
batching, ``engine.batch``). Each job starts from the best cached prefix of its own namespace
(``PromptCacheLRU``), leaves the batch between prompt chunks or rounds once cancelled, and hands
its tokens to the event loop through a bounded queue: a client that stops reading has its tokens
held back and, after a while, its job dropped."""

import asyncio
import contextlib
import copy
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generation_stream

from ..engine.batch import BatchGenerator, RowOutput
from ..engine.loop import DEFAULT_NUM_DRAFT_TOKENS, Stats
from ..engine.prompt_cache import (
    PromptCache,
    can_trim,
    common_prefix_length,
    make_cache_for,
    trim_to_common_prefix,
)
from ..generation import make_policy, mtp_stats
from ..media import (
    MediaError,
    MediaPrompt,
    build_media_prompt,
    cache_keys,
    conversation_suffix,
    expand_placeholders,
    prepare_media,
    towers_of,
)
from ..models.target import Target
from ..text import TextStream
from .protocol import BadRequest, usage

logger = logging.getLogger(__name__)

# The job options that make its ``TokenPolicy`` (``generation.make_policy``'s parameters).
POLICY_OPTIONS = (
    "temp",
    "top_p",
    "min_p",
    "top_k",
    "repetition_penalty",
    "repetition_context_size",
    "logit_bias",
    "presence_penalty",
    "presence_context_size",
    "frequency_penalty",
    "frequency_context_size",
)


class PromptCacheLRU:
    """Conversations' caches, least recently used first, within ``max_entries`` and
    ``max_bytes``. A request sees only the caches of its own namespace and starts from the one
    it can reuse the most of: an entry that is a prefix of it is taken (it is that conversation's
    history); an entry that shares only a prefix is copied and the copy rolled back, if every
    layer can roll back that far; otherwise it starts from an empty cache. No request trims or
    evicts another conversation's cache."""

    def __init__(self, target: Target, max_entries: int, max_bytes: int):
        self.target, self.max_entries, self.max_bytes = target, max_entries, max_bytes
        self.entries: list[tuple[str, PromptCache]] = []

    def take(self, tokens: Sequence[int], namespace: str = "") -> PromptCache:
        """A cache whose ``tokens`` are a prefix of ``tokens`` (shorter by at least one)."""
        best, best_keep = None, 0
        for i, (space, cache) in enumerate(self.entries):
            keep = reusable(cache, tokens) if space == namespace else 0
            if keep > best_keep or (keep == best_keep > 0 and self._is_prefix(i, tokens)):
                best, best_keep = i, keep
        if best is None:
            return make_cache_for(self.target)
        if self._is_prefix(best, tokens):
            cache = self.entries.pop(best)[1]
        else:
            cache = copy.deepcopy(self.entries[best][1])
        trim_to_common_prefix(cache, tokens)
        return cache

    def put(self, cache: PromptCache, namespace: str = "") -> None:
        """Keep ``cache`` as the most recently used; entries of the namespace it extends go."""
        if not cache.tokens:
            return
        self.entries = [
            (space, held)
            for space, held in self.entries
            if space != namespace or not is_prefix(held.tokens, cache.tokens)
        ]
        self.entries.append((namespace, cache))
        while self.entries and (
            len(self.entries) > self.max_entries or self.nbytes > self.max_bytes
        ):
            self.entries.pop(0)

    def _is_prefix(self, i: int, tokens: Sequence[int]) -> bool:
        return is_prefix(self.entries[i][1].tokens, tokens)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for _, c in self.entries)


def is_prefix(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) <= len(b) and common_prefix_length(a, b) == len(a)


def reusable(cache: PromptCache, tokens: Sequence[int]) -> int:
    """Tokens of ``tokens`` that ``cache`` can stand for once rolled back (at least one token is
    left to feed); 0 where a layer cannot roll back that far."""
    keep = min(common_prefix_length(cache.tokens, tokens), len(tokens) - 1)
    drop = len(cache.tokens) - keep
    return keep if all(can_trim(c, drop) for c in cache) else 0


class Cancelled(Exception):
    """The job was cancelled: its client left or stopped reading, or the server is stopping."""


@dataclass(eq=False)
class Job:
    """One request for the generation thread; results go to ``items`` on the event loop.

    At most ``max_unread`` tokens wait there unread; more are held back on the generation thread
    (``send`` never blocks the batch), and once the client has read nothing for
    ``stall_timeout`` seconds the job is cancelled (``flush``). ``reason`` says why the server
    (not the client) cancelled it; the client is then sent that as an error.

    ``media``: the (images, audio) of a chat whose ``tokens`` hold their placeholders; such a job
    is ``admitted`` once the generation thread has built its prompt, or found it ``invalid`` (a
    400: media the model cannot read, or ``fit``, the request's bounds on the prompt's length
    with its soft tokens, refusing it)."""

    tokens: list
    options: dict
    seed: int | None
    top_logprobs: int | None
    loop: asyncio.AbstractEventLoop
    namespace: str = ""
    max_unread: int = 256
    stall_timeout: float = 30.0
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None
    media: tuple[list, list] | None = None
    fit: Callable[[int], None] | None = None
    admitted: asyncio.Event = field(default_factory=asyncio.Event)
    invalid: BadRequest | None = None

    def __post_init__(self):
        self.room = threading.Semaphore(self.max_unread)
        self.held: deque = deque()  # items not handed over yet (a token waits for room)
        self.stalled_since: float | None = None

    def send(self, kind: str, value: Any) -> None:
        """Queue an item for the client, in order, without waiting (see ``flush``)."""
        self.held.append((kind, value))
        self.flush()

    def flush(self) -> bool:
        """Hand over what the client has room for; True when nothing is held back. A client
        that read nothing for ``stall_timeout`` seconds has its job cancelled."""
        while self.held:
            kind, _ = self.held[0]
            if kind == "token" and not self.room.acquire(blocking=False):
                break
            self._put(self.held.popleft())
        if not self.held:
            self.stalled_since = None
            return True
        now = time.monotonic()
        self.stalled_since = self.stalled_since or now
        if now - self.stalled_since > self.stall_timeout:
            self.held.clear()
            self.cancel(f"the client read nothing for {self.stall_timeout:g} s")
        return False

    def _put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody will read
            self.cancel("the server has stopped")

    async def receive(self) -> tuple[str, Any]:
        kind, value = await self.items.get()
        if kind == "token":
            self.room.release()
        return kind, value

    def admit(self) -> None:
        """The generation thread has taken the job (or found it ``invalid``)."""
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody waits
            self.loop.call_soon_threadsafe(self.admitted.set)

    def cancel(self, reason: str | None = None) -> None:
        if not self.cancelled.is_set():
            self.reason = reason
        self.cancelled.set()

    def check(self, *_) -> None:
        """Raise ``Cancelled`` if the job was cancelled."""
        if self.cancelled.is_set():
            raise Cancelled(self.reason or "the client went away")


@dataclass(eq=False)
class Running:
    """A job in the batch: its text stream, its prompt's length (media expanded), what its cache
    reused, how many tokens it sent."""

    job: Job
    texts: TextStream
    prompt_tokens: int
    cached: int
    stats: Stats
    sent: int = 0


class RowUsage:
    """What ``protocol.usage`` reads of a finished row."""

    def __init__(self, stats: Stats, generated: int):
        self.stats, self.generation_tokens = stats, generated

    def mtp_stats(self) -> dict:
        return mtp_stats(self.stats, self.generation_tokens)


class Worker:
    """Loads the models, then serves jobs on its own thread (MLX streams belong to the thread
    that made them: all MLX work happens here): up to ``decode_concurrency`` decode together in
    one ``BatchGenerator`` (MTP on), joining and leaving between rounds; ``prompt_concurrency``
    prompts are filled at once, a chunk per round. A job's failure is logged and reported to its
    client; the others go on (a failed round fails the jobs in it)."""

    def __init__(
        self,
        load_models,
        max_entries: int,
        max_bytes: int,
        *,
        decode_concurrency: int = 8,
        prompt_concurrency: int = 1,
        num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
        draft_schedule: str = "auto",
        prefill_step_size: int = 512,
    ):
        self.jobs: queue.Queue = queue.Queue()
        self.running: dict[int, Running] = {}
        self.draining: set[Job] = set()  # finished, with items their clients have not taken
        self.stopping: str | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.engine_options = {
            "num_draft_tokens": num_draft_tokens,
            "draft_schedule": draft_schedule,
            "prefill_step_size": prefill_step_size,
            "max_rows": decode_concurrency,
            "prompt_concurrency": prompt_concurrency,
        }
        args = (load_models, max_entries, max_bytes)
        self.thread = threading.Thread(
            target=self._serve, args=args, daemon=True, name="generation"
        )
        self.thread.start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def waiting(self) -> int:
        """Jobs accepted and not decoding yet (queued, or waiting for a row of the batch)."""
        return self.jobs.qsize() + len(self.engine.waiting)

    def running_jobs(self) -> list[Job]:
        return [run.job for run in list(self.running.values())]

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Cancel every job, waiting or running (each ends with ``reason`` as its error within
        a round or prompt chunk), and end the thread after them."""
        self.stopping = reason
        with self.jobs.mutex:
            jobs = [*self.jobs.queue, *self.running_jobs()]
        for job in jobs:
            if job is not None:
                job.cancel(reason)
        self.jobs.put(None)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _serve(self, load_models, max_entries: int, max_bytes: int) -> None:
        try:
            self.target, self.drafter, self.tokenizer = load_models()
            self.lru = PromptCacheLRU(self.target, max_entries, max_bytes)
            self.engine = self._new_engine()
        except BaseException as e:
            self.load_error = e
            return
        finally:
            self.ready.set()
        with mx.stream(generation_stream):
            while self._admit():
                self._flush()
                self._drop_cancelled()
                if self.engine.active:
                    self._step()
            for run in list(self.running.values()):  # stopping: every job is cancelled
                run.job.cancel(self.stopping)
            self._drop_cancelled()

    def _new_engine(self) -> BatchGenerator:
        return BatchGenerator(self.target, self.drafter, **self.engine_options)

    def _admit(self) -> bool:
        """Insert the jobs that arrived (waiting for one when there is nothing to do); False
        once the server stops."""
        block = not self.engine.active
        timeout = 0.05 if self.running or self.draining else None  # clients to hand items to
        while True:
            try:
                job = self.jobs.get(block=block, timeout=timeout)
            except queue.Empty:
                return self.stopping is None
            block = False
            if job is None:
                return False
            if self.stopping is not None:
                job.cancel(self.stopping)
            self._settle_failures(job, self._insert, job)
            job.admit()

    def _settle_failures(self, job: Job, action, *args) -> None:
        """Run ``action``; a failure is logged and reported to ``job``'s client only."""
        try:
            action(*args)
        except Cancelled as e:
            logger.info("request cancelled: %s", e)
            if job.reason is not None:
                job.send("error", job.reason)
        except Exception as e:  # reported to the client; the server keeps serving
            logger.exception("generation failed (a request of %d prompt tokens)", len(job.tokens))
            job.send("error", f"{type(e).__name__}: {e}")

    def _insert(self, job: Job) -> None:
        job.check()
        try:
            rest, cache, media, prompt_tokens = self._prompt(job)
        except (MediaError, BadRequest) as e:  # this request's fault: a 400, the batch goes on
            logger.warning("request refused: %s", e)
            job.invalid = e if isinstance(e, BadRequest) else BadRequest(str(e), "messages")
            return
        options = job.options
        policy = make_policy(**{name: options[name] for name in POLICY_OPTIONS if name in options})
        uid = self.engine.insert(
            rest,
            max_tokens=options["max_tokens"],
            policy=policy,
            eos_token_ids=self.tokenizer.eos_token_ids if self.tokenizer else (),
            cache=cache,
            seed=job.seed,
            num_draft_tokens=options["num_draft_tokens"],
            media=media,
        )
        texts = TextStream(self.tokenizer, options.get("stop", ()))
        cached = prompt_tokens - len(rest)
        stats = self.engine.row_stats(uid)
        self.running[uid] = Running(job, texts, prompt_tokens, cached, stats)

    def _prompt(self, job: Job) -> tuple[list, PromptCache, MediaPrompt | None, int]:
        """``(tokens to feed, the cache they follow, their media or None, the prompt's length)``:
        the cache is the namespace's that shares most with the prompt, media compared by
        content (``media.conversation_suffix``), so a question about an image already asked
        about feeds only its new text."""
        if job.media is None:
            cache = self.lru.take(job.tokens, job.namespace)
            return job.tokens[len(cache.tokens) :], cache, None, len(job.tokens)
        target, (images, audio) = self.target, job.media
        prepared = prepare_media(target, images, audio)  # once: each later step takes them
        expanded, starts = expand_placeholders(job.tokens, prepared, towers_of(target).config)
        keys = cache_keys(expanded, prepared, starts)
        if job.fit is not None:
            job.fit(len(keys))
        cache = self.lru.take(keys, job.namespace)
        images, audio = prepared[: len(images)], prepared[len(images) :]
        rest, images, audio = conversation_suffix(target, cache, job.tokens, images, audio)
        media = None
        if images or audio:
            rest, media, _ = build_media_prompt(target, rest, images, audio)
        return rest, cache, media, len(keys)

    def _flush(self) -> None:
        for run in list(self.running.values()):
            run.job.flush()
        self.draining = {job for job in self.draining if not job.flush()}

    def _drop_cancelled(self) -> None:
        for uid, run in list(self.running.items()):
            if run.job.cancelled.is_set():
                self._settle_failures(run.job, self._cancel, uid, run)

    def _cancel(self, uid: int, run: Running) -> None:
        del self.running[uid]
        cache = self.engine.remove(uid, run.sent)
        if cache is not None:
            self.lru.put(cache, run.job.namespace)
        run.job.check()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed round fails the jobs in it; the server keeps serving
            logger.exception("a round failed (%d requests in it)", len(self.running))
            for run in self.running.values():
                run.job.send("error", f"{type(e).__name__}: {e}")
            self.running.clear()
            self.engine = self._new_engine()
            return
        for out in outputs:
            run = self.running.get(out.uid)
            if run is not None:
                self._settle_failures(run.job, self._deliver, out, run)

    def _deliver(self, out: RowOutput, run: Running) -> None:
        """Send a row's tokens; end it at its finish, or at a stop string (removing its row)."""
        for i, token in enumerate(out.tokens):
            last = out.finish_reason is not None and i == len(out.tokens) - 1
            is_eos = last and out.finish_reason == "stop"
            text, stopped = run.texts.add(token, is_eos, last)
            run.sent += 1
            finish = "stop" if stopped else out.finish_reason if last else None
            run.job.send("token", self._token(token, text, finish, out.logprobs[i], run.job))
            if stopped:
                cache = out.cache if last else self.engine.remove(out.uid, run.sent)
                return self._end(out.uid, run, cache)
        if out.finish_reason is not None:
            self._end(out.uid, run, out.cache)

    def _end(self, uid: int, run: Running, cache) -> None:
        """Answer the job's usage, then keep its cache (a failure there is the server's)."""
        del self.running[uid]
        run.job.send("end", usage(run.prompt_tokens, run.cached, RowUsage(run.stats, run.sent)))
        if run.job.held:
            self.draining.add(run.job)
        if cache is not None:
            self.lru.put(cache, run.job.namespace)

    def _token(self, token: int, text: str, finish, logprobs: mx.array, job: Job) -> dict:
        item = {"text": text, "token": token, "finish_reason": finish}
        top = job.top_logprobs
        if top is not None:
            row = logprobs.astype(mx.float32)
            item["logprob"] = row[token].item()
            ids = mx.argsort(-row)[:top].tolist() if top else []
            values = row[mx.array(ids, mx.int32)].tolist() if ids else []
            item["top"] = [(self._piece(i), v) for i, v in zip(ids, values, strict=True)]
            item["piece"] = self._piece(token)
        return item

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])
