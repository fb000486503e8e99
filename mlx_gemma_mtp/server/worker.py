"""The generation thread: it loads the models, then runs jobs one at a time in arrival order.
Each job starts from the best cached prefix of its own namespace (``PromptCacheLRU``), stops
between prompt chunks or rounds once cancelled, and hands its tokens to the event loop through a
bounded queue, so a client that stops reading pauses its job and, after a while, drops it."""

import asyncio
import copy
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..engine.prompt_cache import (
    PromptCache,
    can_trim,
    common_prefix_length,
    make_cache_for,
    trim_to_common_prefix,
)
from ..generation import (
    stream_generate,
)
from ..models.target import Target
from .protocol import usage

logger = logging.getLogger(__name__)


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


@dataclass
class Job:
    """One request for the generation thread; results go to ``items`` on the event loop.

    At most ``max_unread`` tokens wait there unread: ``send`` then waits, and cancels the job
    once the client has read nothing for ``stall_timeout`` seconds. ``reason`` says why the
    server (not the client) cancelled it; the client is then sent that as an error."""

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

    def __post_init__(self):
        self.room = threading.Semaphore(self.max_unread)

    def send(self, kind: str, value: Any) -> None:
        """Queue an item for the client (raises ``Cancelled`` once the job is cancelled)."""
        if kind == "token":
            self._wait_for_room()
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody will read
            self.cancel("the server has stopped")

    async def receive(self) -> tuple[str, Any]:
        kind, value = await self.items.get()
        if kind == "token":
            self.room.release()
        return kind, value

    def cancel(self, reason: str | None = None) -> None:
        if not self.cancelled.is_set():
            self.reason = reason
        self.cancelled.set()

    def check(self, *_) -> None:
        """Raise ``Cancelled`` if the job was cancelled (also the prompt progress callback)."""
        if self.cancelled.is_set():
            raise Cancelled(self.reason or "the client went away")

    def _wait_for_room(self) -> None:
        deadline = time.monotonic() + self.stall_timeout
        while not self.room.acquire(timeout=0.05):
            self.check()
            if time.monotonic() > deadline:
                self.cancel(f"the client read nothing for {self.stall_timeout:g} s")
                self.check()


class Worker:
    """Loads the models, then runs jobs one at a time, in arrival order, on its own thread
    (MLX streams belong to the thread that made them: all MLX work happens here). A job's
    failure is logged and reported to its client; the thread goes on with the next."""

    def __init__(self, load_models, max_entries: int, max_bytes: int):
        self.jobs: queue.Queue = queue.Queue()
        self.current: Job | None = None
        self.stopping: str | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        args = (load_models, max_entries, max_bytes)
        self.thread = threading.Thread(
            target=self._serve, args=args, daemon=True, name="generation"
        )
        self.thread.start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def waiting(self) -> int:
        """Jobs accepted and not started yet."""
        return self.jobs.qsize()

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Cancel every job, waiting or running (each ends with ``reason`` as its error within
        a round or prompt chunk), and end the thread after them."""
        self.stopping = reason
        with self.jobs.mutex:
            jobs = [*self.jobs.queue, self.current]
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
        except BaseException as e:
            self.load_error = e
            return
        finally:
            self.ready.set()
        while (job := self.jobs.get()) is not None:
            self.current = job
            if self.stopping is not None:
                job.cancel(self.stopping)
            self._settle(job)
            self.current = None

    def _settle(self, job: Job) -> None:
        try:
            self._run(job)
        except Cancelled as e:
            logger.info("request cancelled: %s", e)
            if job.reason is not None:
                job.send("error", job.reason)
        except Exception as e:  # reported to the client; the server keeps serving
            logger.exception("request failed (%d prompt tokens)", len(job.tokens))
            job.send("error", f"{type(e).__name__}: {e}")

    def _run(self, job: Job) -> None:
        job.check()
        cache = self.lru.take(job.tokens, job.namespace)
        rest = job.tokens[len(cache.tokens) :]
        if job.seed is not None:
            mx.random.seed(job.seed)
        drafter = self.drafter if job.options["num_draft_tokens"] > 0 else None
        stream = stream_generate(
            self.target,
            self.tokenizer,
            rest,
            draft_model=drafter,
            prompt_cache=cache,
            prompt_progress_callback=job.check,
            **job.options,
        )
        cached = len(job.tokens) - len(rest)
        try:
            for response in stream:
                job.send("token", self._token(response, job.top_logprobs))
                if response.finish_reason is not None:  # answer before settling the cache
                    job.send("end", usage(len(job.tokens), cached, response))
                    break
                job.check()
        finally:
            stream.close()  # settles the cache: prompt + emitted tokens (emptied on a failure)
            self.lru.put(cache, job.namespace)

    def _token(self, response, top: int | None) -> dict:
        item = {"text": response.text, "token": response.token, "finish_reason": None}
        item["finish_reason"] = response.finish_reason
        if top is not None:
            row = response.logprobs.astype(mx.float32)
            item["logprob"] = row[response.token].item()
            ids = mx.argsort(-row)[:top].tolist() if top else []
            values = row[mx.array(ids, mx.int32)].tolist() if ids else []
            item["top"] = [(self._piece(i), v) for i, v in zip(ids, values, strict=True)]
            item["piece"] = self._piece(response.token)
        return item

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])
