"""The OpenAI protocol: request bodies (fields follow OpenAI's; unknown fields are ignored,
known ones are checked), usage, errors and the shapes of responses and server-sent events."""

import json
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.prompt_cache import (
    DEFAULT_MAX_DRAFT_TOKENS,
)


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
    # Conversation caches are shared only between requests with the same two (vLLM's and
    # OpenAI's names): nobody learns another user's prompt from cached_tokens or timing.
    cache_salt: str | None = None
    user: str | None = None


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
