"""The FastAPI app and ``python -m mlx_gemma_mtp.server``."""

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..config import ConfigError
from ..engine.loop import SCHEDULES
from ..engine.prompt_cache import (
    DEFAULT_MAX_DRAFT_TOKENS,
)
from ..generation import (
    DEFAULT_NUM_DRAFT_TOKENS,
    encode_chat,
    encode_prompt,
)
from ..loading import load
from ..media import MAX_AUDIO_BYTES, MAX_IMAGE_BYTES
from .access import API_KEY_VARIABLE, Access, Guard, served_name, warn_if_exposed
from .attachments import MediaSources, attachments, check_model, read_attachments
from .limits import (
    SHUTDOWN_GRACE,
    BodyLimit,
    GuardedH11,
    Limits,
    Server,
    cache_namespace,
    raise_open_files_limit,
)
from .protocol import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    Sampling,
    chat_logprob,
    choice_delta,
    collect,
    completion_logprobs,
    error_response,
    sse,
    text_choice,
)
from .tools import ToolCalls, calls_tools, forced_call, template_kwargs, template_messages
from .worker import Job, Worker

logger = logging.getLogger(__name__)
DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there


def request_error(error: dict) -> tuple[str, str | None]:
    """A validation error's message and the field it names (pydantic's union and validator
    tags left out of the path, and the ``type`` tag of a content part)."""
    loc, names = error["loc"], []
    for i, p in enumerate(loc):
        if i >= 2 and "tagged-union" in str(loc[i - 2]) and isinstance(loc[i - 1], int):
            continue  # the part's type, which pydantic puts after its index
        if p != "body" and not str(p).endswith("]"):
            names.append(str(p))
    names = [n for n in names if n not in ("str", "int", "float", "bool", "dict", "list")]
    param = ".".join(names) or None
    if error["type"] == "extra_forbidden":
        return f"{param}: this server does not support this field", param
    return f"{param or 'body'}: {error['msg'].removeprefix('Value error, ')}", param


def create_app(
    worker: Worker,
    model_id: str,
    defaults: dict,
    limits: Limits | None = None,
    access: Access | None = None,
    media: MediaSources | None = None,
) -> FastAPI:
    """The FastAPI app; ``defaults`` are the server's sampling and drafting defaults, ``limits``
    its bounds on work (unset ceilings: the model's context), ``access`` who may call it
    (default: loopback names only, no key, no ``/docs``), ``media`` where images may come from
    besides data URLs (default: nowhere)."""
    target, drafter, tokenizer, lru = worker.target, worker.drafter, worker.tokenizer, worker.lru
    access, media = access or Access(), media or MediaSources()
    docs = {} if access.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="mlx-gemma-mtp", **docs)
    app.add_middleware(Guard, access=access)
    vocab_size = target.args.vocab_size
    limits = (limits or Limits()).with_context(target.args.max_position_embeddings)
    defaults = {**defaults, "max_tokens": min(defaults["max_tokens"], limits.max_tokens)}
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    # One thread: the event loop stays free, and the tokenizer is never used by two at once.
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    async def off_loop(function, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizing, function, *args)

    context_size = getattr(target.args, "max_position_embeddings", None) or sys.maxsize

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(400, f"the body is not valid JSON ({first['msg']})")
        # The deepest error: of a union's branches, the one the body followed furthest.
        message, param = request_error(max(exc.errors(), key=lambda e: len(e["loc"])))
        return error_response(400, message, param)

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):  # logged here, not echoed to the client
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")

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
        top_k = pick(body.top_k, "top_k")
        if top_k > vocab_size:
            raise BadRequest(f"top_k: must be at most the vocabulary size {vocab_size}", "top_k")
        logit_bias = token_biases(body.logit_bias)
        return {
            "max_tokens": pick(max_tokens, "max_tokens"),
            "temp": pick(body.temperature, "temp"),
            "top_p": pick(body.top_p, "top_p"),
            "top_k": top_k,
            "min_p": pick(body.min_p, "min_p"),
            "repetition_penalty": body.repetition_penalty,
            **penalties(body),
            "logit_bias": logit_bias,
            "num_draft_tokens": k if drafter is not None else 0,
            "stop": stop,
        }

    def fit_context(body: Sampling, prompt_tokens: int, opts: dict) -> None:
        """The prompt and the reply within the model's context: a ``max_tokens`` asked for
        must fit, the default is cut to what fits."""
        room = context_size - prompt_tokens
        if room < 1:
            raise BadRequest(
                f"the prompt ({prompt_tokens} tokens) fills the model's context of "
                f"{context_size} tokens",
                "messages" if isinstance(body, ChatRequest) else "prompt",
            )
        completion = getattr(body, "max_completion_tokens", None)
        name = "max_tokens" if completion is None else "max_completion_tokens"
        asked = completion or body.max_tokens
        if asked is not None and asked > room:
            raise BadRequest(
                f"{name}: the prompt ({prompt_tokens} tokens) and {name} ({asked}) exceed the "
                f"model's context of {context_size} tokens",
                name,
            )
        opts["max_tokens"] = min(opts["max_tokens"], room)

    def token_biases(biases: dict | None) -> dict[int, float] | None:
        if not biases:
            return None
        out = {}
        for key, bias in biases.items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if not 0 <= token < vocab_size:
                raise BadRequest(
                    f"logit_bias: {key!r} is not a token id in [0, {vocab_size})", "logit_bias"
                )
            out[token] = bias
        return out

    async def submit(
        body: Sampling, tokens: list, opts: dict, top: int | None, media=None, fit=None
    ) -> Job:
        if worker.waiting() >= limits.max_queue:
            raise QueueFull(f"{limits.max_queue} requests are waiting already: retry later")
        fit_context(body, len(tokens), opts)
        job = Job(
            tokens,
            opts,
            body.seed,
            top,
            asyncio.get_running_loop(),
            namespace=cache_namespace(body),
            max_unread=limits.max_unread,
            stall_timeout=limits.stall_timeout,
            media=media,
            fit=fit,
        )
        worker.jobs.put(job)
        return job

    async def admission(job: Job, request: Request) -> None:
        """Wait for the generation thread to take a job with media: a 400 if it cannot use them
        (before any reply is sent, streamed or not)."""
        while not job.admitted.is_set():
            try:
                await asyncio.wait_for(job.admitted.wait(), timeout=DISCONNECT_POLL)
            except TimeoutError:
                if job.cancelled.is_set() or await request.is_disconnected():
                    job.cancel()
                    return
        if job.invalid is not None:
            raise job.invalid

    def fit_prompt(body: ChatRequest, opts: dict, prompt_tokens: int) -> None:
        """The length checks of a chat's prompt with its media's soft tokens (counted on the
        generation thread)."""
        check_lengths(prompt_tokens, opts, max_tokens_field(body), "messages")
        fit_context(body, prompt_tokens, opts)

    def check_lengths(prompt_tokens: int, opts: dict, max_tokens_field: str, prompt_field: str):
        if opts["max_tokens"] > limits.max_tokens:
            raise BadRequest(
                f"{max_tokens_field} is {opts['max_tokens']}, over this server's limit of "
                f"{limits.max_tokens}",
                max_tokens_field,
            )
        if prompt_tokens > limits.max_prompt_tokens:
            raise BadRequest(
                f"the prompt is {prompt_tokens} tokens, over this server's limit of "
                f"{limits.max_prompt_tokens}",
                prompt_field,
            )

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc: QueueFull):
        response = error_response(503, str(exc))
        response.headers["Retry-After"] = "1"
        return response

    async def results(job: Job, request: Request) -> AsyncIterator[tuple[str, Any]]:
        """The job's items; a client that goes away cancels it (within a round)."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.receive(), timeout=DISCONNECT_POLL)
                except TimeoutError:  # asyncio's own since Python 3.11
                    item = None
                if loop.time() - checked >= DISCONNECT_POLL or item is None:
                    if await request.is_disconnected():  # also while tokens keep coming
                        return
                    checked = loop.time()
                if item is None:
                    continue
                yield item
                if item[0] in ("end", "error"):
                    return
        finally:
            job.cancel()

    def stream_reply(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        opts = options(body, body.max_completion_tokens or body.max_tokens)
        if tokenizer is None:
            raise BadRequest("the model has no tokenizer: use /v1/completions with token ids")
        found = attachments(body, limits.max_media_per_request)
        messages, rendering = template_messages(body), template_kwargs(body, tokenizer)
        start = forced_call(body, tokenizer)
        try:
            tokens = await off_loop(partial(encode_chat, tokenizer, messages, **rendering))
        except TemplateError as e:  # the template refused these messages
            raise BadRequest(f"messages: the chat template failed ({e})", "messages") from None
        tokens += tokenizer.encode(start, add_special_tokens=False) if start else []
        check_lengths(len(tokens), opts, max_tokens_field(body), "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        if found:
            check_model(target, found, tokens)
            read = partial(read_attachments, found, media, limits.max_media_bytes)
            job = await submit(body, tokens, opts, top, await asyncio.to_thread(read),
                               partial(fit_prompt, body, opts))  # fmt: skip
            await admission(job, request)
        else:
            job = await submit(body, tokens, opts, top)
        parallel = body.parallel_tool_calls is not False
        tools = [tool.model_dump() for tool in body.tools or []]
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": model_id}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            calls = (
                ToolCalls(tokenizer, tools, True, parallel, start) if calls_tools(body) else None
            )

            @cancels(job)
            async def events():
                chunk = {**head, "object": "chat.completion.chunk"}
                role = {"role": "assistant", "content": ""}
                yield sse({**chunk, "choices": [choice_delta(role, None)]})
                async for kind, value in results(job, request):
                    if kind == "error":
                        yield sse({"error": {"message": value, "type": "server_error"}})
                    elif kind == "token":
                        delta, finish = {"content": value["text"]}, value["finish_reason"]
                        if calls is not None:
                            last = finish is not None
                            delta["content"], found = calls.feed(delta["content"], last)
                            delta.update({"tool_calls": found} if found else {})
                            finish = calls.finish_reason(finish)
                        entry = choice_delta(delta, finish)
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
        if calls_tools(body):
            calls = ToolCalls(tokenizer, tools, False, parallel, start)
            content, found = calls.feed(text, final=True)
            finish = calls.finish_reason(finish)
            message = {"role": "assistant", "content": content or None}
            message.update({"tool_calls": found} if found else {})
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
            tokens = await off_loop(encode_prompt, tokenizer, body.prompt, vocab_size)
        except ValueError as e:
            raise BadRequest(str(e), "prompt") from None
        check_lengths(len(tokens), opts, "max_tokens", "prompt")
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


class QueueFull(Exception):
    """The queue of waiting requests is full (a 503 with ``Retry-After``)."""


def max_tokens_field(body: ChatRequest) -> str:
    return "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"


def penalties(body: Sampling) -> dict:
    """mlx-lm's presence and frequency penalties and their look-back (defaults: mlx-lm's)."""
    sizes = {
        "repetition_context_size": body.repetition_context_size,
        "presence_context_size": body.presence_context_size,
        "frequency_context_size": body.frequency_context_size,
    }
    return {
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        **{name: size for name, size in sizes.items() if size is not None},
    }


def cancels(job: Job):
    """Closing the decorated event stream (the client went away) cancels ``job``."""

    def wrap(events):
        async def guarded():
            try:
                async for event in events():
                    yield event
            finally:
                job.cancel()

        return guarded

    return wrap


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_gemma_mtp.server", description="OpenAI-compatible MTP server."
    )
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
    parser.add_argument(
        "--decode-concurrency",
        type=int,
        default=8,
        help="Requests decoded together, MTP on (mlx-lm's flag; more wait in line).",
    )
    parser.add_argument(
        "--prompt-concurrency",
        type=int,
        default=1,
        help="Prompts filled at once, a chunk per round between decoding rounds.",
    )
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"))
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )
    add_limit_args(parser)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_VARIABLE),
        help=f"Bearer key every request must send (default: ${API_KEY_VARIABLE}; none: open).",
    )
    parser.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=[],
        metavar="HOST",
        help="Host names clients may use besides --host and loopback ('*': any; the Host check "
        "keeps web pages from reaching the server by DNS rebinding).",
    )
    parser.add_argument("--docs", action="store_true", help="Serve /docs and /openapi.json.")
    parser.add_argument(
        "--allowed-media-dir",
        action="append",
        type=directory,
        default=[],
        metavar="DIR",
        help="Directory whose files image_url parts may name (a path or file:// URL; "
        "repeatable; default: none, data URLs only).",
    )
    parser.add_argument(
        "--allow-remote-media",
        action="store_true",
        help="Fetch http(s) image URLs (the server then makes requests clients choose).",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.num_draft_tokens <= DEFAULT_MAX_DRAFT_TOKENS:
        parser.error(f"--num-draft-tokens must be in [0, {DEFAULT_MAX_DRAFT_TOKENS}]")
    for flag in ("decode_concurrency", "prompt_concurrency", "prefill_step_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.draft_schedule == "heuristic":
        parser.error("--draft-schedule heuristic is single-stream: use auto or constant")
    if args.max_tokens_limit is not None and args.max_tokens > args.max_tokens_limit:
        parser.error("--max-tokens must not be over --max-tokens-limit")
    if args.max_media_bytes > min(MAX_IMAGE_BYTES, MAX_AUDIO_BYTES):
        parser.error(f"--max-media-bytes must be at most {min(MAX_IMAGE_BYTES, MAX_AUDIO_BYTES)}")
    check_sampling_defaults(parser, args)
    return args


def directory(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return path


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    def positive(kind):
        def parse(text: str):
            value = kind(text)
            if value <= 0:
                raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
            return value

        return parse

    default = Limits()
    limit = parser.add_argument
    limit(
        "--max-queue",
        type=positive(int),
        default=default.max_queue,
        help="Requests waiting to start; more get 503 with Retry-After.",
    )
    limit(
        "--max-tokens-limit",
        type=positive(int),
        help="Ceiling on a request's max_tokens (default: the model's context).",
    )
    limit(
        "--max-prompt-tokens",
        type=positive(int),
        help="Ceiling on a request's prompt tokens (default: the model's context).",
    )
    limit(
        "--max-body-bytes",
        type=positive(int),
        default=default.max_body_bytes,
        help="Larger request bodies get 413.",
    )
    limit(
        "--prefill-step-size",
        type=positive(int),
        default=512,
        help="Prompt tokens per chunk (a cancelled request stops between chunks).",
    )
    limit(
        "--max-unread",
        type=positive(int),
        default=default.max_unread,
        help="Tokens a stream may have waiting unread before its generation pauses.",
    )
    limit(
        "--stall-timeout",
        type=positive(float),
        default=default.stall_timeout,
        help="Seconds a paused stream waits for its client before it is dropped.",
    )
    limit(
        "--max-media-per-request",
        type=positive(int),
        default=default.max_media_per_request,
        help="Image and audio parts one chat request may hold.",
    )
    limit(
        "--max-media-bytes",
        type=positive(int),
        default=default.max_media_bytes,
        help="Largest image or audio file, decoded (data URLs are within --max-body-bytes too).",
    )
    limit(
        "--max-connections",
        type=positive(int),
        default=4096,
        help="Open connections; requests beyond get 503 (uvicorn's limit_concurrency).",
    )
    limit("--timeout-keep-alive", type=positive(int), default=5,
          help="Seconds an idle keep-alive connection stays open.")  # fmt: skip


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(
        max_queue=args.max_queue,
        max_tokens=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=args.max_body_bytes,
        max_unread=args.max_unread,
        stall_timeout=args.stall_timeout,
        max_media_per_request=args.max_media_per_request,
        max_media_bytes=args.max_media_bytes,
    )


# The sampling flags and the request fields whose bounds they share.
DEFAULT_FIELDS = {
    "max_tokens": "max_tokens",
    "temp": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
}


def check_sampling_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The defaults get a request's bounds: a bad one is refused at start, naming its flag."""
    fields = {field: getattr(args, flag) for flag, field in DEFAULT_FIELDS.items()}
    try:
        Sampling(**fields)
    except ValidationError as e:
        message, param = request_error(e.errors()[0])
        flag = next(flag for flag, field in DEFAULT_FIELDS.items() if field == param)
        parser.error(f"--{flag.replace('_', '-')}{message.removeprefix(param)}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
    )
    try:
        worker = Worker(
            lambda: load(args.model, args.draft_model, args.dtype),
            args.prompt_cache_size,
            args.prompt_cache_bytes,
            decode_concurrency=args.decode_concurrency,
            prompt_concurrency=args.prompt_concurrency,
            num_draft_tokens=args.num_draft_tokens,
            draft_schedule=args.draft_schedule,
            prefill_step_size=args.prefill_step_size,
        )
    except ConfigError as e:
        raise SystemExit(f"Error: {e}") from None
    defaults = {
        "num_draft_tokens": args.num_draft_tokens,
        "max_tokens": args.max_tokens,
        "temp": args.temp,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
    }
    warn_if_exposed(args.host, args.api_key)
    access = Access.for_bind(args.host, args.allowed_hosts, api_key=args.api_key, docs=args.docs)
    model_id = served_name(args.model)
    media = MediaSources(args.allowed_media_dir, args.allow_remote_media)
    app = create_app(worker, model_id, defaults, limits_from(args), access, media)
    files = raise_open_files_limit(args.max_connections + 256)
    if files < args.max_connections + 256:
        logger.warning("open files are limited to %d: fewer connections will be accepted", files)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        http=GuardedH11,
        limit_concurrency=args.max_connections,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )
    print(f"Serving {model_id} on http://{args.host}:{args.port}/v1", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises a SIGINT it handled again
        Server(config, worker).run()


if __name__ == "__main__":
    main()
