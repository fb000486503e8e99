"""OpenAI-compatible server: ``python -m mlx_gemma_mtp.server --model T --draft-model D``.

FastAPI parses and validates requests (pydantic) and streams server-sent events; uvicorn serves
them. Generation runs on one thread, one request at a time in arrival order; each request takes
the cached conversation sharing its longest prefix from a small LRU (bounded in entries and bytes),
so a conversation's next turn only feeds its new tokens.
"""

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ImportError as e:  # an optional extra
    raise ImportError(
        f"the server needs FastAPI and uvicorn ({e.name} is missing): "
        "pip install 'mlx-gemma-mtp[server]'"
    ) from None

from .config import ConfigError
from .engine import SCHEDULES
from .generation import (
    DEFAULT_NUM_DRAFT_TOKENS,
    encode_chat,
    encode_prompt,
    stream_generate,
)
from .loading import load
from .prompt_cache import (
    DEFAULT_MAX_DRAFT_TOKENS,
    PromptCache,
    common_prefix_length,
    make_cache_for,
    trim_to_common_prefix,
)
from .target import Target

# -- requests (fields follow OpenAI's; unknown fields are ignored, known ones are checked) ------


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    num_draft_tokens: int | None = Field(None, ge=0, le=DEFAULT_MAX_DRAFT_TOKENS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(Sampling):
    prompt: str | list = Field(min_length=1)  # token ids are checked against the vocabulary
    logprobs: int | None = Field(None, ge=0, le=20)


# -- the generation thread --------------------------------------------------------------------


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


def usage(prompt_tokens: int, cached: int, response) -> dict:
    """OpenAI's usage (``cached_tokens``: prompt tokens not fed again) and our MTP counters."""
    generated = response.generation_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": prompt_tokens + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
        "mtp": response.mtp_stats(),
    }


# -- the app ----------------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code=None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(worker: Worker, model_id: str, defaults: dict) -> FastAPI:
    """The FastAPI app; ``defaults`` are the server's sampling and drafting defaults."""
    target, drafter, tokenizer, lru = worker.target, worker.drafter, worker.tokenizer, worker.lru
    app = FastAPI(title="mlx-gemma-mtp")
    vocab_size = target.args.vocab_size

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(400, f"the body is not valid JSON ({first['msg']})")
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return error_response(400, f"{param or 'body'}: {first['msg']}", param)

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> dict:
        memory = {
            "active_bytes": mx.get_active_memory(),
            "mlx_cache_bytes": mx.get_cache_memory(),
            "prompt_cache_bytes": lru.nbytes,
            "prompt_cache_entries": len(lru.entries),
            "prompt_cache_budget_bytes": lru.max_bytes,
        }
        return {"status": "ok", "memory": memory}

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": model_id, "object": "model", "created": 0, "owned_by": "mlx-gemma-mtp"}
        return {"object": "list", "data": [entry]}

    def options(body: Sampling, max_tokens: int | None) -> dict:
        if body.model not in (None, model_id):
            raise BadRequest(
                f"model {body.model!r} is not served here (this server has {model_id!r})",
                "model",
                404,
                "model_not_found",
            )

        def pick(value, name: str):
            return defaults[name] if value is None else value

        k = pick(body.num_draft_tokens, "num_draft_tokens")
        if drafter is None and body.num_draft_tokens:
            raise BadRequest("this server has no draft model", "num_draft_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        return {
            "max_tokens": pick(max_tokens, "max_tokens"),
            "temp": pick(body.temperature, "temp"),
            "top_p": pick(body.top_p, "top_p"),
            "top_k": pick(body.top_k, "top_k"),
            "min_p": pick(body.min_p, "min_p"),
            "repetition_penalty": body.repetition_penalty,
            "num_draft_tokens": k if drafter is not None else 0,
            "draft_schedule": defaults["draft_schedule"],
            "stop": stop,
        }

    async def submit(body: Sampling, tokens: list, opts: dict, top: int | None) -> Job:
        job = Job(tokens, opts, body.seed, top, asyncio.get_running_loop())
        worker.jobs.put(job)
        return job

    async def results(job: Job, request: Request) -> AsyncIterator[tuple[str, Any]]:
        """The job's items; a client that goes away cancels it (within a round)."""
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.items.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield kind, value
                if kind in ("end", "error"):
                    return
        finally:
            job.cancelled.set()

    def stream_reply(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        opts = options(body, body.max_completion_tokens or body.max_tokens)
        if tokenizer is None:
            raise BadRequest("the model has no tokenizer: use /v1/completions with token ids")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        tokens = encode_chat(tokenizer, messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = await submit(body, tokens, opts, top)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": model_id}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            @cancels(job)
            async def events():
                chunk = {**head, "object": "chat.completion.chunk"}
                role = {"role": "assistant", "content": ""}
                yield sse({**chunk, "choices": [choice_delta(role, None)]})
                async for kind, value in results(job, request):
                    if kind == "error":
                        yield sse({"error": {"message": value, "type": "server_error"}})
                    elif kind == "token":
                        delta = {"content": value["text"]}
                        entry = choice_delta(delta, value["finish_reason"])
                        if top is not None:
                            entry["logprobs"] = {"content": [chat_logprob(value)]}
                        yield sse({**chunk, "choices": [entry]})
                    elif include_usage:
                        yield sse({**chunk, "choices": [], "usage": value})
                yield sse("[DONE]")

            return stream_reply(events())
        items = [item async for item in results(job, request)]
        text, finish, use, logprobs = collect(items)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        if top is not None:
            choice["logprobs"] = {"content": [chat_logprob(v) for k, v in items if k == "token"]}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": use}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        opts = options(body, body.max_tokens)
        if isinstance(body.prompt, str) and tokenizer is None:
            raise BadRequest("the model has no tokenizer: send token ids", "prompt")
        try:
            tokens = encode_prompt(tokenizer, body.prompt, vocab_size)
        except ValueError as e:
            raise BadRequest(str(e), "prompt") from None
        job = await submit(body, tokens, opts, body.logprobs)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": model_id}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            @cancels(job)
            async def events():
                async for kind, value in results(job, request):
                    if kind == "error":
                        yield sse({"error": {"message": value, "type": "server_error"}})
                    elif kind == "token":
                        entry = text_choice(value["text"], value["finish_reason"])
                        if body.logprobs is not None:
                            entry["logprobs"] = completion_logprobs([value])
                        yield sse({**head, "choices": [entry]})
                    elif include_usage:
                        yield sse({**head, "choices": [], "usage": value})
                yield sse("[DONE]")

            return stream_reply(events())
        items = [item async for item in results(job, request)]
        text, finish, use, _ = collect(items)
        choice = text_choice(text, finish)
        if body.logprobs is not None:
            choice["logprobs"] = completion_logprobs([v for k, v in items if k == "token"])
        return {**head, "choices": [choice], "usage": use}

    return app


def cancels(job: Job):
    """Closing the decorated event stream (the client went away) cancels ``job``."""

    def wrap(events):
        async def guarded():
            try:
                async for event in events():
                    yield event
            finally:
                job.cancelled.set()

        return guarded

    return wrap


def collect(items: list) -> tuple[str, str | None, dict | None, list]:
    """Text, finish reason and usage of a finished job (an error becomes a 500)."""
    for kind, value in items:
        if kind == "error":
            raise BadRequest(value, status=500)
    tokens = [v for k, v in items if k == "token"]
    use = next((v for k, v in items if k == "end"), None)
    finish = tokens[-1]["finish_reason"] if tokens else "stop"
    return "".join(t["text"] for t in tokens), finish, use, tokens


def choice_delta(delta: dict, finish_reason: str | None) -> dict:
    return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def text_choice(text: str, finish_reason: str | None) -> dict:
    return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}


def chat_logprob(item: dict) -> dict:
    def entry(piece: str, logprob: float) -> dict:
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {
        **entry(item["piece"], item["logprob"]),
        "top_logprobs": [entry(*t) for t in item["top"]],
    }


def completion_logprobs(items: list) -> dict:
    offsets, position = [], 0
    for item in items:
        offsets.append(position)
        position += len(item["text"])
    return {
        "tokens": [item["piece"] for item in items],
        "token_logprobs": [item["logprob"] for item in items],
        "top_logprobs": [dict(item["top"]) for item in items],
        "text_offset": offsets,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Gemma 4 target (MLX/HF folder, hub id).")
    parser.add_argument("--draft-model", help="Its assistant drafter (omit for plain decoding).")
    parser.add_argument("--host", default="127.0.0.1", help="Default: loopback only.")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--num-draft-tokens", type=int, default=DEFAULT_NUM_DRAFT_TOKENS)
    parser.add_argument(
        "--draft-schedule",
        choices=SCHEDULES,
        default="auto",
        help="auto: k chosen every round from measured costs and acceptance (0 parks drafting).",
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="Default per request.")
    parser.add_argument("--temp", type=float, default=0.0, help="Default temperature.")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--prompt-cache-size", type=int, default=4, help="Conversations kept.")
    parser.add_argument(
        "--prompt-cache-bytes", type=int, default=1 << 30, help="Their K/V memory budget."
    )
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if not 0 <= args.num_draft_tokens <= DEFAULT_MAX_DRAFT_TOKENS:
        parser.error(f"--num-draft-tokens must be in [0, {DEFAULT_MAX_DRAFT_TOKENS}]")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        worker = Worker(
            lambda: load(args.model, args.draft_model, args.dtype),
            args.prompt_cache_size,
            args.prompt_cache_bytes,
        )
    except ConfigError as e:
        raise SystemExit(f"Error: {e}") from None
    defaults = {
        "num_draft_tokens": args.num_draft_tokens,
        "draft_schedule": args.draft_schedule,
        "max_tokens": args.max_tokens,
        "temp": args.temp,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
    }
    app = create_app(worker, args.model, defaults)
    print(f"Serving {args.model} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
