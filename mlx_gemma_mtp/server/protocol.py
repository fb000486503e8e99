"""The OpenAI protocol: request bodies (fields follow OpenAI's and mlx-lm's; every field is
honoured, refused with a 400 naming it, or in ``IGNORED_FIELDS``; numbers get the bounds their
meaning implies), usage, errors and the shapes of responses and server-sent events."""

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..engine.prompt_cache import (
    DEFAULT_MAX_DRAFT_TOKENS,
)

# Accepted and ignored: they ask nothing of the generation (``user``, ``cache_salt`` and
# ``prompt_cache_key`` name a client or a cache namespace; OpenAI's bookkeeping fields).
IGNORED_FIELDS = (
    "user",
    "cache_salt",
    "prompt_cache_key",
    "safety_identifier",
    "metadata",
    "store",
    "service_tier",
)
MIN_TEMPERATURE = 1e-3  # below it 1 / temperature scales log-probabilities past float32's range
MAX_SEED = 2**64 - 1  # MLX's seed is an unsigned 64-bit integer
MAX_CONTEXT_SIZE = 1 << 16  # tokens a penalty looks back over


def unicode_text(text: str) -> str:
    """``text`` if it can be encoded (JSON's ``\\ud800`` escapes make lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        surrogate = f"a lone surrogate at character {e.start}"
        raise ValueError(f"not valid Unicode text ({surrogate})") from None
    return text


Text = Annotated[str, AfterValidator(unicode_text)]


class Strict(BaseModel):
    """Unknown fields are refused (a 400 naming them), infinities and NaNs too."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool = False  # no obfuscation padding is ever sent


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None

    @model_validator(mode="after")
    def only_text(self):
        if self.type != "text":
            raise ValueError(
                f"{self.type} is not supported (no constrained decoding): omit response_format "
                'or send {"type": "text"}'
            )
        return self


class Sampling(Strict):
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # and at most the vocabulary size (app.options)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Text | list[Text] | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    repetition_context_size: int | None = Field(None, ge=1, le=MAX_CONTEXT_SIZE)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    presence_context_size: int | None = Field(None, ge=1, le=MAX_CONTEXT_SIZE)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_context_size: int | None = Field(None, ge=1, le=MAX_CONTEXT_SIZE)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    num_draft_tokens: int | None = Field(None, ge=0, le=DEFAULT_MAX_DRAFT_TOKENS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    response_format: ResponseFormat | None = None
    user: str | None = None
    cache_salt: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("temperature")
    @classmethod
    def greedy_or_sampled(cls, temperature: float | None) -> float | None:
        if temperature and temperature < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return temperature


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ImageURL(Strict):
    url: Text = Field(min_length=1)  # a data URL; a local path or http(s) URL if the server allows
    detail: Literal["auto", "low", "high"] | None = None  # accepted, ignored (see the README)


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Strict):
    data: str = Field(min_length=1)  # base64
    format: str

    @field_validator("format")
    @classmethod
    def wav_only(cls, audio_format: str) -> str:
        if audio_format != "wav":
            raise ValueError(
                f"{audio_format!r} audio is not supported: send 16 kHz PCM WAV (format 'wav')"
            )
        return audio_format


class AudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]
MEDIA_KINDS = {"image_url": "image", "input_audio": "audio"}  # part type -> the template's


class FunctionCall(Strict):
    name: Text
    arguments: Text | dict = "{}"

    def argument_dict(self) -> dict:
        """The arguments as a mapping (Gemma 4's template renders keys and values)."""
        if isinstance(self.arguments, dict):
            return self.arguments
        try:
            arguments = json.loads(self.arguments or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"arguments are not JSON ({e})") from None
        if not isinstance(arguments, dict):
            raise ValueError("arguments must be a JSON object")
        return arguments


class ToolCall(Strict):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None
    reasoning_content: Text | None = None  # a turn's thinking: Gemma 4's template renders it
    # What clients send back from a reply: accepted when empty.
    refusal: None = None
    function_call: None = None
    audio: None = None
    annotations: list[None] | None = Field(None, max_length=0)

    def media_parts(self) -> list[tuple[int, ImagePart | AudioPart]]:
        """(index, part) of each image and audio part, in order."""
        if not isinstance(self.content, list):
            return []
        return [(j, part) for j, part in enumerate(self.content) if part.type in MEDIA_KINDS]

    def template_content(self) -> str | list[dict]:
        """The content as the chat template reads it: the text, or with media a list in which
        each image or clip is ``{"type": "image"}`` or ``{"type": "audio"}`` where it was sent
        (Gemma 4's template writes its placeholder there)."""
        if not isinstance(self.content, list):
            return self.content or ""
        if not self.media_parts():
            return "".join(part.text for part in self.content)
        return [
            {"type": "text", "text": part.text}
            if part.type == "text"
            else {"type": MEDIA_KINDS[part.type]}
            for part in self.content
        ]


class FunctionDefinition(Strict):
    name: Text
    description: Text | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: Text


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def logprobs_asked(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top


class CompletionRequest(Sampling):
    prompt: Text | list = Field(min_length=1)  # token ids are checked against the vocabulary
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = False
    best_of: Literal[1] = 1


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
