"""The generation thread: it loads the models, then decodes jobs together with MTP (continuous
batching, ``engine.batch``); each job takes the cached conversation sharing its longest prefix
(an LRU bounded in entries and bytes), so a conversation's next turn only feeds its new
tokens."""

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generation_stream

from ..engine.batch import BatchGenerator
from ..engine.loop import DEFAULT_NUM_DRAFT_TOKENS, Stats
from ..engine.prompt_cache import (
    PromptCache,
    common_prefix_length,
    make_cache_for,
    trim_to_common_prefix,
)
from ..generation import counters, make_policy
from ..models.target import Target
from ..text import TextStream
from .protocol import usage

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


@dataclass
class Running:
    """A job in the batch: its text stream, how many tokens it sent, what its cache reused."""

    job: Job
    texts: TextStream
    cached: int
    stats: Stats
    sent: int = 0


class RowUsage:
    """What ``protocol.usage`` reads of a finished row."""

    def __init__(self, stats: Stats, generated: int):
        self.stats, self.generation_tokens = stats, generated

    def mtp_stats(self) -> dict:
        stats = self.stats
        rates = {
            "acceptance_rate": stats.acceptance_rate,
            "tokens_per_target_forward": self.generation_tokens / max(stats.target_forwards, 1),
        }
        return {**counters(stats), **rates}


class Worker:
    """Loads the models, then serves jobs on its own thread (MLX streams belong to the thread
    that made them: all MLX work happens here): up to ``decode_concurrency`` decode together in
    one ``BatchGenerator`` (MTP on), joining and leaving between rounds; ``prompt_concurrency``
    prompts are filled at once, a chunk per round."""

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
        threading.Thread(target=self._serve, args=args, daemon=True, name="generation").start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

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
        self.running: dict[int, Running] = {}
        with mx.stream(generation_stream):
            while True:
                self._admit(block=not self.engine.active)
                self._drop_cancelled()
                if self.engine.active:
                    self._step()

    def _new_engine(self) -> BatchGenerator:
        return BatchGenerator(self.target, self.drafter, **self.engine_options)

    def _admit(self, block: bool) -> None:
        """Insert the jobs that arrived (waiting for one when idle)."""
        while True:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                return
            block = False
            if not job.cancelled.is_set():
                self._insert(job)

    def _insert(self, job: Job) -> None:
        cache = self.lru.take(job.tokens)
        try:
            rest = trim_to_common_prefix(cache, job.tokens)
            options = dict(job.options)
            policy = make_policy(
                **{name: options.pop(name) for name in POLICY_OPTIONS if name in options}
            )
            uid = self.engine.insert(
                rest,
                max_tokens=options["max_tokens"],
                policy=policy,
                eos_token_ids=self.tokenizer.eos_token_ids if self.tokenizer else (),
                cache=cache,
                seed=job.seed,
                num_draft_tokens=options["num_draft_tokens"],
            )
        except Exception as e:  # reported to the client; the server keeps serving
            logger.exception("generation failed")
            job.send("error", f"{type(e).__name__}: {e}")
            return
        texts = TextStream(self.tokenizer, options.get("stop", ()))
        cached = len(job.tokens) - len(rest)
        self.running[uid] = Running(job, texts, cached, self.engine.row_stats(uid))

    def _drop_cancelled(self) -> None:
        for uid, run in list(self.running.items()):
            if run.job.cancelled.is_set():
                self._end(uid, self.engine.remove(uid, run.sent), finished=False)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed round fails the rows in it; the server keeps serving
            logger.exception("a decoding round failed")
            for run in self.running.values():
                run.job.send("error", f"{type(e).__name__}: {e}")
            self.running.clear()
            self.engine = self._new_engine()
            return
        for out in outputs:
            self._deliver(out)

    def _deliver(self, out) -> None:
        """Send a row's tokens; end it at its finish, or at a stop string (removing its row)."""
        run = self.running[out.uid]
        for i, token in enumerate(out.tokens):
            last = out.finish_reason is not None and i == len(out.tokens) - 1
            is_eos = last and out.finish_reason == "stop"
            text, stopped = run.texts.add(token, is_eos, last)
            run.sent += 1
            finish = "stop" if stopped else out.finish_reason if last else None
            run.job.send(
                "token", self._token(token, text, finish, out.logprobs[i], run.job.top_logprobs)
            )
            if stopped:
                cache = self.engine.remove(out.uid, run.sent) if not last else out.cache
                self._end(out.uid, cache, finished=True)
                return
        if out.finish_reason is not None:
            self._end(out.uid, out.cache, finished=True)

    def _end(self, uid: int, cache, finished: bool) -> None:
        run = self.running.pop(uid)
        run.job.send("end", usage(len(run.job.tokens), run.cached, RowUsage(run.stats, run.sent)))
        if cache is not None:
            self.lru.put(cache)

    def _token(self, token: int, text: str, finish, logprobs: mx.array, top: int | None) -> dict:
        item = {"text": text, "token": token, "finish_reason": finish}
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
