"""The generation thread: it loads the models, then runs jobs one at a time in arrival order;
each job takes the cached conversation sharing its longest prefix (an LRU bounded in entries and
bytes), so a conversation's next turn only feeds its new tokens."""

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..engine.prompt_cache import (
    PromptCache,
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
    ``max_bytes``; a request takes the one sharing its longest prefix (or a new one)."""

    def __init__(self, target: Target, max_entries: int, max_bytes: int):
        self.target, self.max_entries, self.max_bytes = target, max_entries, max_bytes
        self.entries: list[PromptCache] = []

    def take(self, tokens: Sequence[int]) -> PromptCache:
        shared = [common_prefix_length(c.tokens, tokens) for c in self.entries]
        if shared and max(shared) > 0:
            return self.entries.pop(shared.index(max(shared)))
        return make_cache_for(self.target)

    def put(self, cache: PromptCache) -> None:
        self.entries.append(cache)
        while self.entries and (
            len(self.entries) > self.max_entries or self.nbytes > self.max_bytes
        ):
            self.entries.pop(0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.entries)


@dataclass
class Job:
    """One request for the generation thread; results go to ``items`` on the event loop."""

    tokens: list
    options: dict
    seed: int | None
    top_logprobs: int | None
    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))


class Worker:
    """Loads the models, then runs jobs one at a time, in arrival order, on its own thread
    (MLX streams belong to the thread that made them: all MLX work happens here)."""

    def __init__(self, load_models, max_entries: int, max_bytes: int):
        self.jobs: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        args = (load_models, max_entries, max_bytes)
        threading.Thread(target=self._serve, args=args, daemon=True, name="generation").start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def _serve(self, load_models, max_entries: int, max_bytes: int) -> None:
        try:
            self.target, self.drafter, self.tokenizer = load_models()
            self.lru = PromptCacheLRU(self.target, max_entries, max_bytes)
        except BaseException as e:
            self.load_error = e
            return
        finally:
            self.ready.set()
        while True:
            job = self.jobs.get()
            if not job.cancelled.is_set():
                self._run(job)

    def _run(self, job: Job) -> None:
        cache = self.lru.take(job.tokens)
        try:
            rest = trim_to_common_prefix(cache, job.tokens)
            if job.seed is not None:
                mx.random.seed(job.seed)
            drafter = self.drafter if job.options["num_draft_tokens"] > 0 else None
            stream = stream_generate(
                self.target,
                self.tokenizer,
                rest,
                draft_model=drafter,
                prompt_cache=cache,
                **job.options,
            )
            cached = len(job.tokens) - len(rest)
            try:
                for response in stream:
                    job.send("token", self._token(response, job.top_logprobs))
                    if response.finish_reason is not None:  # answer before settling the cache
                        job.send("end", usage(len(job.tokens), cached, response))
                        break
                    if job.cancelled.is_set():
                        job.send("end", usage(len(job.tokens), cached, response))
                        break
            finally:
                stream.close()  # settles the cache: prompt + emitted tokens
        except Exception as e:  # reported to the client; the server keeps serving
            logger.exception("generation failed")
            job.send("error", f"{type(e).__name__}: {e}")
            return  # the cache may be inconsistent: drop it
        self.lru.put(cache)

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
