"""What apps send, in-process (FastAPI's TestClient, driven by the ``openai`` client where it
helps): tool calls, every field honoured or refused, bounds, and access checks."""

import itertools
import json
import logging
import shutil
from collections import Counter

import httpx
import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURE

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.sample_utils import make_logits_processors  # noqa: E402

from mlx_gemma_mtp import generation, load  # noqa: E402
from mlx_gemma_mtp.generation import encode_chat  # noqa: E402
from mlx_gemma_mtp.server import Worker, create_app  # noqa: E402
from mlx_gemma_mtp.server import worker as worker_module  # noqa: E402
from mlx_gemma_mtp.server.access import Access, served_name, warn_if_exposed  # noqa: E402
from mlx_gemma_mtp.server.app import parse_args  # noqa: E402
from mlx_gemma_mtp.server.tools import ToolCallText  # noqa: E402

TARGET, ASSISTANT = FIXTURE / "target", FIXTURE / "assistant"
BASE = "http://127.0.0.1"
DEFAULTS = {
    "num_draft_tokens": 3,
    "draft_schedule": "constant",  # drafting every round: the MTP path is what is tested
    "max_tokens": 16,
    "temp": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
}
USER = [{"role": "user", "content": "def main():"}]

# A template of our own in Gemma 4's tool wire format (declarations, calls, responses).
TOOL_TEMPLATE = """{% if messages[0].role == 'developer' %}\
{{ raise_exception('no developer messages here') }}{% endif %}{{ bos_token }}\
{% if tools %}<start_of_turn>system
{% for tool in tools %}<|tool>declaration:{{ tool.function.name }}\
{{ tool.function.parameters | tojson }}<tool|>{% endfor %}<end_of_turn>
{% endif %}{% for message in messages %}\
{% set role = 'model' if message.role == 'assistant' else message.role %}\
<start_of_turn>{{ role }}
{% for call in message.tool_calls or [] %}<|tool_call>call:{{ call.function.name }}{{ '{' }}\
{% for key, value in call.function.arguments | dictsort %}{{ key }}:<|"|>{{ value }}<|"|>\
{% if not loop.last %},{% endif %}{% endfor %}{{ '}' }}<tool_call|>{% endfor %}\
{% if message.role == 'tool' %}<|tool_response>response:{{ message.tool_call_id }}\
{value:<|"|>{{ message.content }}<|"|>}<tool_response|>\
{% else %}{{ message.content | trim }}{% endif %}<end_of_turn>
{% endfor %}{% if greeting %}{{ greeting }}{% endif %}\
{% if add_generation_prompt %}<start_of_turn>model
{% endif %}"""
# A Gemma 4 reply that calls a tool: text, then the call in its wire format.
RECORDED_CALL = 'Let me check.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def make_client(target_path=TARGET, access: Access | None = None) -> TestClient:
    def models():
        return load(str(target_path), str(ASSISTANT), dtype="float32")

    worker = Worker(models, 4, 1 << 26, num_draft_tokens=3, draft_schedule="constant")
    app = create_app(worker, served_name(str(target_path)), DEFAULTS, access=access)
    return TestClient(app, base_url=BASE)


@pytest.fixture(scope="module")
def client():
    return make_client()


@pytest.fixture(scope="module")
def tool_client(tmp_path_factory):
    """The fixture target with a chat template that renders tools (mlx-lm then infers the
    Gemma 4 tool parser from its markers)."""
    folder = tmp_path_factory.mktemp("tools") / "gemma4-tools"
    shutil.copytree(TARGET, folder)
    (folder / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return make_client(folder)


def post(client, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, str):
        kwargs["content"], kwargs["headers"] = body, {"content-type": "application/json"}
    else:
        kwargs["json"] = body
    return client.post(f"/v1/{path}", **kwargs)


def chat(client, **body) -> dict:
    response = post(client, "chat/completions", {"messages": USER, **body})
    assert response.status_code == 200, response.text
    return response.json()


def surrogate_body(field: str) -> str:
    """A request whose ``field`` holds a lone surrogate (JSON's escape makes one)."""
    if field == "stop":
        return '{"messages": [{"role": "user", "content": "x"}], "stop": "\\ud800"}'
    return '{"messages": [{"role": "user", "content": "x\\ud800"}]}'


CHAT_REFUSALS = [
    ({"top_k": 1e9}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"max_completion_tokens": 131072}, "max_completion_tokens"),  # past the context
    ({"temperature": 1e-300}, "temperature"),
    ('{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": Infinity}',
     "repetition_penalty"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
    (surrogate_body("content"), "messages.0.content"),
    (surrogate_body("stop"), "stop"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"presence_context_size": 0}, "presence_context_size"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"logit_bias": {"32768": 1}}, "logit_bias"),
    ({"logit_bias": {"the": 1}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"n": 2}, "n"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
    ({"tool_choice": "any"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL]}, "tools"),  # this template cannot render tools
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"xtc_probability": 0.5}, "xtc_probability"),
    ({"functions": []}, "functions"),
    ({"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ({"messages": [{"role": "user", "content": "x", "images": []}]}, "messages.0.images"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, None),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]},
     "messages.0.tool_call_id"),
    ({"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]},
     "messages.0.refusal"),
]  # fmt: skip
COMPLETION_REFUSALS = [
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "max_tokens": 2**70, "top_k": -1}, "top_k"),
    ({"prompt": "x", "max_tokens": 2**70}, "max_tokens"),
    ({"prompt": [2] * 131072}, "prompt"),  # fills the context
]


@pytest.mark.parametrize(
    "path, body, param",
    [("chat/completions", b, p) for b, p in CHAT_REFUSALS]
    + [("completions", b, p) for b, p in COMPLETION_REFUSALS],
)
def test_unsupported_fields_and_bad_values_get_400_naming_them(client, path, body, param):
    if isinstance(body, dict) and path == "chat/completions":
        body = {"messages": USER, **body}
    response = post(client, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
        assert param.split(".")[-1] in error["message"]
    assert post(client, "completions", {"prompt": [2, 3], "max_tokens": 2}).status_code == 200


def test_ignored_and_neutral_fields_are_accepted(client):
    sent_back = {"role": "assistant", "content": "x", "refusal": None, "annotations": [],
                 "function_call": None, "audio": None, "reasoning_content": "hm"}  # fmt: skip
    reply = chat(
        client,
        messages=[*USER, sent_back, *USER],
        max_tokens=4,
        user="u1",
        cache_salt="s",
        prompt_cache_key="k",
        safety_identifier="x",
        metadata={"a": "b"},
        store=False,
        service_tier="auto",
        response_format={"type": "text"},
        n=1,
        seed=2**64 - 1,
        parallel_tool_calls=True,
        stream_options=None,
        top_k=32768,
    )
    assert reply["usage"]["completion_tokens"] == 4
    assert reply["model"] == "target"


def test_logit_bias_makes_every_token_that_token_with_mtp(client):
    token = 300
    body = {"prompt": [2, 3, 4], "max_tokens": 12, "logit_bias": {str(token): 100}, "logprobs": 0}
    reply = post(client, "completions", body).json()
    tokenizer = load(str(TARGET), None, dtype="float32")[2]
    pieces = reply["choices"][0]["logprobs"]["tokens"]
    assert pieces == [tokenizer.decode([token])] * 12
    mtp = reply["usage"]["mtp"]
    assert mtp["mode"] == "mtp" and mtp["drafted"] > 0


def test_penalties_change_the_output_and_mtp_equals_plain_and_mlx_lm(client):
    penalties = {"presence_penalty": 1.5, "frequency_penalty": 0.8, "logit_bias": {"13": -5}}
    mtp = chat(client, max_tokens=24, **penalties)
    plain = chat(client, max_tokens=24, num_draft_tokens=0, **penalties)
    unpenalized = chat(client, max_tokens=24)
    text = mtp["choices"][0]["message"]["content"]
    assert mtp["usage"]["mtp"]["drafted"] > 0 and plain["usage"]["mtp"]["mode"] == "plain"
    assert text == plain["choices"][0]["message"]["content"]
    assert text != unpenalized["choices"][0]["message"]["content"]
    again = chat(client, max_tokens=24, **penalties)  # the prompt comes from the cache now
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["choices"][0]["message"]["content"] == text
    # mlx-lm's own loop with its own processors picks the same tokens.
    target, _, tokenizer = load(str(TARGET), None, dtype="float32")
    prompt = encode_chat(tokenizer, USER)
    processors = make_logits_processors(
        logit_bias={13: -5}, presence_penalty=1.5, frequency_penalty=0.8
    )
    steps = generate_step(mx.array(prompt), target.model, max_tokens=24,
                          logits_processors=processors)  # fmt: skip
    assert text == tokenizer.decode([t for t, _ in steps])


def test_generation_errors_are_logged_and_the_server_keeps_serving(client, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(worker_module, "make_policy", broken)
    with caplog.at_level(logging.ERROR, logger="mlx_gemma_mtp.server.worker"):
        response = post(client, "completions", {"prompt": [2, 3], "max_tokens": 2})
    assert response.status_code == 500
    assert "the device went away" in response.json()["error"]["message"]
    assert any("generation failed" in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    assert post(client, "completions", {"prompt": [2, 3], "max_tokens": 2}).status_code == 200


# -- tools --------------------------------------------------------------------------------------


def forced_reply(monkeypatch, tokenizer, text: str) -> None:
    """The server's next generations emit ``text`` (then EOS) through the real engine, MTP on:
    a logits processor leaves only the next recorded token."""
    forced = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]

    def policy(**options):
        start = []

        def force(history, logits):
            start.append(start[0] if start else history.size)
            position = min(history.size - start[0], len(forced) - 1)
            return mx.where(mx.arange(logits.shape[-1]) == forced[position], 0.0, -1e9)[None]

        return generation.make_policy(logits_processors=[force], **options)

    monkeypatch.setattr(worker_module, "make_policy", policy)


def tool_history() -> list:
    arguments = json.dumps({"city": "Paris"})
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}  # fmt: skip
    return [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]


def test_tools_and_tool_results_are_rendered_through_the_template(tool_client):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=f"{BASE}/v1", api_key="-", http_client=tool_client)
    tokenizer = load(str(TARGET), None)[2]
    reply = api.chat.completions.create(
        model="gemma4-tools",
        messages=tool_history(),
        tools=[WEATHER_TOOL],
        max_tokens=6,
        extra_body={"chat_template_kwargs": {"greeting": "Hello"}},
    )
    rendered = [
        *tool_history()[:2],
        {**tool_history()[2], "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        tool_history()[3],
    ]  # fmt: skip
    tokenizer.chat_template = TOOL_TEMPLATE
    expected = encode_chat(tokenizer, rendered, tools=[WEATHER_TOOL], greeting="Hello")
    text = tokenizer.decode(expected)
    assert '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>' in text
    assert "<|tool>declaration:get_weather" in text and "response:call_1" in text
    assert text.endswith("Hello<start_of_turn>model\n")
    assert reply.usage.prompt_tokens == len(expected)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content


def test_bad_values_deep_in_the_request_get_400(tool_client):
    kwargs = '"chat_template_kwargs": {"greeting": "\\udfff"}'
    body = '{"messages": [{"role": "user", "content": "x"}], ' + kwargs + "}"
    response = post(tool_client, "chat/completions", body)
    assert response.status_code == 400 and "Unicode" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "chat_template_kwargs"
    tool = '{"type": "function", "function": {"name": "f", "parameters": {"x": "\\ud800"}}}'
    body = '{"messages": [{"role": "user", "content": "x"}], "tools": [' + tool + "]}"
    assert post(tool_client, "chat/completions", body).json()["error"]["param"] == "tools"
    developer = {"messages": [{"role": "developer", "content": "x"}]}
    refused = post(tool_client, "chat/completions", developer).json()["error"]
    assert refused["param"] == "messages" and "no developer messages here" in refused["message"]


def test_tool_call_output_becomes_tool_calls(tool_client, monkeypatch):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=f"{BASE}/v1", api_key="-", http_client=tool_client)
    forced_reply(monkeypatch, load(str(TARGET), None)[2], RECORDED_CALL)
    ask = dict(model="gemma4-tools", messages=USER, tools=[WEATHER_TOOL], max_tokens=64)
    reply = api.chat.completions.create(**ask)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert reply.usage.model_extra["mtp"]["drafted"] > 0

    chunks = list(api.chat.completions.create(**ask, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    streamed = [c for d in deltas for c in d.tool_calls or []]
    assert len(streamed) == 1 and streamed[0].index == 0
    assert streamed[0].function.name == "get_weather"
    assert json.loads(streamed[0].function.arguments) == {"city": "Paris", "days": 3}
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"

    # tool_choice none: the tools leave the prompt and the text is left as it is.
    plain = api.chat.completions.create(**ask, tool_choice="none")
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content == RECORDED_CALL
    assert plain.usage.prompt_tokens < reply.usage.prompt_tokens


def test_readme_tool_example_runs(tool_client, monkeypatch, capsys):
    from test_readme import code_blocks

    (example,) = [b for b in code_blocks("python") if "tool_call_id" in b]
    forced_reply(monkeypatch, load(str(TARGET), None)[2], RECORDED_CALL)
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="-", http_client=tool_client)
    example = example.replace('model="target"', 'model="gemma4-tools", max_tokens=64')
    example = example.replace('client = OpenAI(base_url="http://127.0.0.1:8080/v1", '
                              'api_key="unused")', "")  # fmt: skip
    namespace = {"client": client}
    exec(compile(example, "README.md", "exec"), namespace)
    tool_message = namespace["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"]
    assert capsys.readouterr().out.strip() == "Let me check."


def test_parallel_calls_and_a_call_cut_short(tool_client, monkeypatch):
    tokenizer = load(str(TARGET), None)[2]
    second = '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>'
    forced_reply(monkeypatch, tokenizer, RECORDED_CALL + second)
    body = {"messages": USER, "tools": [WEATHER_TOOL], "max_tokens": 80}
    both = post(tool_client, "chat/completions", body).json()["choices"][0]["message"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in both["tool_calls"]] == [
        "Paris",
        "Rome",
    ]
    one = post(tool_client, "chat/completions", {**body, "parallel_tool_calls": False}).json()
    assert len(one["choices"][0]["message"]["tool_calls"]) == 1
    cut = post(tool_client, "chat/completions", {**body, "max_tokens": 12}).json()["choices"][0]
    assert cut["finish_reason"] == "length" and "tool_calls" not in cut["message"]
    assert RECORDED_CALL.startswith(cut["message"]["content"])


def test_tool_choice_required_or_named_starts_the_call(tool_client, monkeypatch):
    """The prompt ends with the call's start (Gemma 4's wire format), so the reply is a call."""
    tokenizer = load(str(TARGET), None)[2]
    body = {"messages": USER, "tools": [WEATHER_TOOL], "max_tokens": 40}
    free = post(tool_client, "chat/completions", body).json()["usage"]["prompt_tokens"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    forced_reply(monkeypatch, tokenizer, 'city:<|"|>Oslo<|"|>}<tool_call|>')
    reply = post(tool_client, "chat/completions", {**body, "tool_choice": named}).json()
    (call,) = reply["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    start = tokenizer.encode("<|tool_call>call:get_weather{", add_special_tokens=False)
    assert reply["usage"]["prompt_tokens"] == free + len(start)
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    forced_reply(monkeypatch, tokenizer, 'get_weather{city:<|"|>Rome<|"|>}<tool_call|>')
    body["stream"] = True
    events = post(tool_client, "chat/completions", {**body, "tool_choice": "required"}).text
    chunks = [json.loads(e[6:]) for e in events.split("\n\n") if e.startswith("data: {")]
    calls = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Rome"}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    unknown = {"type": "function", "function": {"name": "get_time"}}
    refused = post(tool_client, "chat/completions", {**body, "tool_choice": unknown})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"
    assert "get_time" in refused.json()["error"]["message"]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 200])
def test_tool_call_text_splits_at_markers_in_any_chunking(size):
    text = "a<b" + RECORDED_CALL + "tail<|tool" + "<|tool_call>call:f{}<tool_call|>"
    splitter = ToolCallText("<|tool_call>", "<tool_call|>")
    content, calls = "", []
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    for i, chunk in enumerate(chunks):
        piece, found = splitter.feed(chunk, final=i == len(chunks) - 1)
        content, calls = content + piece, calls + found
    assert content == "a<bLet me check.tail<|tool"
    assert calls == ['call:get_weather{city:<|"|>Paris<|"|>,days:3}', "call:f{}"]


# -- access -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded():
    access = Access.for_bind("127.0.0.1", ["mybox.lan"], api_key="s3cret")
    return make_client(access=access)


ENDPOINTS = [
    ("get", "/health", None),
    ("get", "/v1/models", None),
    ("post", "/v1/chat/completions", {"messages": USER, "max_tokens": 2}),
    ("post", "/v1/completions", {"prompt": [2, 3], "max_tokens": 2}),
]


@pytest.mark.parametrize("method, path, body", ENDPOINTS)
def test_api_key_host_and_origin_on_every_endpoint(guarded, method, path, body):
    def call(**headers):
        kwargs = {} if body is None else {"json": body}
        return guarded.request(method, path, headers=headers, **kwargs)

    key = {"Authorization": "Bearer s3cret"}
    assert call().status_code == 401
    assert call(Authorization="Bearer wrong").status_code == 401
    assert call(**key).status_code == 200
    assert call(**key, Host="mybox.lan:8080").status_code == 200
    assert call(**key, Host="[::1]:8080").status_code == 200
    refused = call(**key, Host="attacker.example")
    assert refused.status_code == 400 and "--allowed-hosts" in refused.json()["error"]["message"]
    assert call(**key, Origin="http://attacker.example").status_code == 403
    assert call(**key, Origin="http://localhost:3000").status_code == 200


def test_docs_only_when_asked_and_no_paths_echoed(client, guarded):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404
    assert guarded.get("/docs").status_code == 401  # the key guards it too
    assert make_client(access=Access(docs=True)).get("/openapi.json").status_code == 200
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["target"]
    assert str(FIXTURE) not in json.dumps(models)
    wrong = post(client, "chat/completions", {"model": "gpt-4", "messages": USER})
    assert wrong.status_code == 404 and str(FIXTURE) not in wrong.text


@pytest.mark.parametrize(
    "flags, refused",
    [("--temp 1e-300", "--temp"), ("--temp nan", "--temp"), ("--top-k -1", "--top-k"),
     ("--top-p 0", "--top-p"), ("--max-tokens 0", "--max-tokens"), ("--min-p 2", "--min-p")],
)  # fmt: skip
def test_sampling_flags_get_the_request_bounds(flags, refused, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", *flags.split()])
    assert f"error: {refused}: " in capsys.readouterr().err


def test_flags_and_exposure_warning(monkeypatch, caplog):
    monkeypatch.setenv("MLX_GEMMA_MTP_API_KEY", "from-env")
    args = parse_args(["--model", "m", "--allowed-hosts", "a.lan", "b.lan", "--docs"])
    assert (args.api_key, args.allowed_hosts, args.docs) == ("from-env", ["a.lan", "b.lan"], True)
    assert parse_args(["--model", "m", "--api-key", "k"]).api_key == "k"
    assert served_name(str(TARGET)) == "target" and served_name("org/model") == "org/model"
    with caplog.at_level(logging.WARNING, logger="mlx_gemma_mtp.server.access"):
        warn_if_exposed("127.0.0.1", None)
        warn_if_exposed("::1", None)
        warn_if_exposed("0.0.0.0", "key")
        assert not caplog.records
        warn_if_exposed("0.0.0.0", None)
    assert "without an API key" in caplog.records[0].getMessage()
    assert Access.for_bind("::", ["X.lan:80"]).hosts == (
        "localhost", "127.0.0.1", "[::1]", "[::]", "x.lan",
    )  # fmt: skip


# -- the distribution under penalties -----------------------------------------------------------


def penalised_sequence_probs(target, policy, processors) -> np.ndarray:
    """P(t1, t2, t3) of plain sampling with mlx-lm's ``processors``, exactly: every 4-token
    sequence from one batched target forward, each row processed with its own history."""
    from test_sampling import NEW_TOKENS, PROMPT, VOCAB

    sequences = np.array(list(itertools.product(range(VOCAB), repeat=NEW_TOKENS)))
    inputs = np.concatenate([np.tile(PROMPT, (len(sequences), 1)), sequences], axis=1)
    logits = target.model(mx.array(inputs))[:, len(PROMPT) - 1 : -1]
    rows = []
    for b in range(len(sequences)):
        for j in range(NEW_TOKENS):
            row = logits[b, j][None]
            for processor in processors:
                row = processor(mx.array(inputs[b, : len(PROMPT) + j]), row)
            rows.append(row)
    logits = mx.concatenate(rows).reshape(len(sequences), NEW_TOKENS, VOCAB)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    dist = np.exp(np.array(policy.params.distribution(logprobs)))
    steps = np.take_along_axis(dist, sequences[..., None], axis=-1)[..., 0]
    return steps.prod(axis=1).reshape(VOCAB, -1).sum(axis=0)


def fit(counts: Counter, expected: np.ndarray) -> float:
    """The chi-square p-value of ``counts`` of (t1, t2, t3) against ``expected``."""
    from test_sampling import VOCAB, chi_square_p_value

    observed = np.zeros(VOCAB**3)
    for (a, b, c), count in counts.items():
        observed[(a * VOCAB + b) * VOCAB + c] = count
    return chi_square_p_value(observed, expected)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["alone", "batch"])
def test_penalised_mtp_sampling_distribution_equals_plain(engine):
    """Chi-square fit of 2000 generations (vocab 8; cells (t1, t2, t3)) with presence and
    frequency penalties and a logit bias, drafting every round, to the exact distribution
    mlx-lm's processors give plain sampling; the penalties move that distribution. ``batch``:
    the server's engine, each penalised row beside an unpenalised one (which keeps its own)."""
    from drafting import ALWAYS_DRAFT
    from test_sampling import NEW_TOKENS, PROMPT, SIGNIFICANCE, tiny_pair

    from mlx_gemma_mtp.engine.batch import BatchGenerator
    from mlx_gemma_mtp.engine.loop import SpeculativeGenerator
    from mlx_gemma_mtp.generation import make_policy

    target, drafter = tiny_pair()
    penalties = dict(presence_penalty=1.0, frequency_penalty=0.7, logit_bias={3: 1.5})
    policy, plain = make_policy(temp=1.0, **penalties), make_policy(temp=1.0)
    expected = penalised_sequence_probs(target, policy, make_logits_processors(**penalties))
    unpenalised = penalised_sequence_probs(target, policy, [])
    assert np.abs(expected - unpenalised).sum() / 2 > 0.1  # total variation
    mx.random.seed(5)
    counts, beside, drafted, accepted = Counter(), Counter(), 0, 0
    for _ in range(2000):
        if engine == "alone":
            generator = SpeculativeGenerator(target, drafter, policy, num_draft_tokens=2,
                                             costs=ALWAYS_DRAFT)  # fmt: skip
            tokens = [t for b in generator.generate(mx.array(PROMPT), NEW_TOKENS) for t in b.tokens]
            stats = generator.stats
        else:
            generator = BatchGenerator(target, drafter, num_draft_tokens=2, costs=ALWAYS_DRAFT)
            rows = [
                generator.insert(PROMPT, max_tokens=NEW_TOKENS, policy=p) for p in (policy, plain)
            ]
            stats, out = generator.row_stats(rows[0]), {uid: [] for uid in rows}
            while generator.active:
                for step in generator.step():
                    out[step.uid].extend(step.tokens)
            tokens = out[rows[0]]
            beside[tuple(out[rows[1]][1:])] += 1
        counts[tuple(tokens[1:])] += 1
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert 0.1 < accepted / drafted < 0.9  # acceptance and rejection both exercised
    assert fit(counts, expected) > SIGNIFICANCE
    if engine == "batch":
        assert fit(beside, unpenalised) > SIGNIFICANCE
