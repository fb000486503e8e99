"""A real server process on the loopback interface, driven by the official ``openai`` client."""

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import FIXTURE, plain_greedy

openai = pytest.importorskip("openai")

from mlx_gemma_mtp import generate, load  # noqa: E402
from mlx_gemma_mtp.engine.prompt_cache import common_prefix_length  # noqa: E402
from mlx_gemma_mtp.generation import encode_chat  # noqa: E402

TARGET, ASSISTANT = str(FIXTURE / "target"), str(FIXTURE / "assistant")
MODEL_ID = "target"  # the folder's name: the server shows no local path
CACHE_BUDGET = 4 << 20  # bytes of prompt caches the server may keep
QUESTION = "import json\n\n\ndef load_config(path):\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    command = [
        sys.executable, "-m", "mlx_gemma_mtp.server", "--model", TARGET, "--draft-model",
        ASSISTANT, "--port", str(port), "--dtype", "float32", "--prompt-cache-size", "6",
        "--prompt-cache-bytes", str(CACHE_BUDGET),
        # Drafting every round: auto may rightly park it on this machine, and the MTP counters
        # in usage are tested here.
        "--draft-schedule", "constant",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.5)
    yield base
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def pair():
    return load(TARGET, ASSISTANT, dtype="float32")


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_chat_greedy_equals_generate_and_plain_decoding(client, pair):
    target, drafter, tokenizer = pair
    messages = [{"role": "user", "content": QUESTION}]
    reply = chat(client, messages, max_tokens=24)
    prompt = encode_chat(tokenizer, messages)
    expected = generate(target, tokenizer, prompt, max_tokens=24, draft_model=drafter)
    assert reply.choices[0].message.content == expected
    assert tokenizer.encode(expected, add_special_tokens=False) == plain_greedy(target, prompt, 24)
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 24)
    assert usage.total_tokens == len(prompt) + 24
    assert reply.choices[0].finish_reason == "length"
    mtp = usage.model_extra["mtp"]
    assert mtp["mode"] == "mtp" and mtp["drafted"] > 0
    assert mtp["acceptance_rate"] == pytest.approx(mtp["accepted"] / mtp["drafted"])
    assert mtp["tokens_per_target_forward"] == pytest.approx(24 / mtp["target_forwards"])


def test_chat_streaming_and_usage(client, pair):
    target, drafter, tokenizer = pair
    messages = [{"role": "user", "content": "def main():"}]
    chunks = list(
        chat(client, messages, max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    prompt = encode_chat(tokenizer, messages)
    assert text == generate(target, tokenizer, prompt, max_tokens=20, draft_model=drafter)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_completions_text_and_token_ids_streamed_or_not(client, pair):
    target, drafter, tokenizer = pair
    ids = json.loads((FIXTURE / "held_out_prompts.jsonl").read_text().splitlines()[3])["input_ids"]
    expected = generate(target, tokenizer, ids, max_tokens=16, draft_model=drafter)
    whole = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=16)
    assert whole.choices[0].text == expected and whole.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    text = client.completions.create(model=MODEL_ID, prompt=QUESTION, max_tokens=12)
    assert text.choices[0].text == generate(target, tokenizer, QUESTION, max_tokens=12)


def test_stop_strings_max_tokens_and_mtp_off(client, pair):
    target, drafter, tokenizer = pair
    messages = [{"role": "user", "content": QUESTION}]
    full = chat(client, messages, max_tokens=40).choices[0].message.content
    stop = full[20:24]
    cut = chat(client, messages, max_tokens=40, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    short = chat(client, messages, max_tokens=5)
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"
    plain = chat(client, messages, max_tokens=40, extra_body={"num_draft_tokens": 0})
    assert plain.choices[0].message.content == full
    assert plain.usage.model_extra["mtp"]["mode"] == "plain"


def test_logprobs(client):
    reply = chat(client, [{"role": "user", "content": "x = "}], max_tokens=4, logprobs=True,
                 top_logprobs=3)  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.token == entry.top_logprobs[0].token


def test_conversation_reuses_its_cache_and_stays_exact(client, pair):
    target, _, tokenizer = pair
    messages = [{"role": "user", "content": "class Config:"}]
    first_prompt = encode_chat(tokenizer, messages)
    first = chat(client, messages, max_tokens=16).choices[0].message.content
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "def f():"}]
    second = chat(client, messages, max_tokens=16)
    prompt = encode_chat(tokenizer, messages)
    # The template renders the reply its own way (trimmed): the cache is reused up to there.
    held = first_prompt + plain_greedy(target, first_prompt, 16)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == common_prefix_length(held, prompt) >= len(first_prompt)
    expected = tokenizer.decode(plain_greedy(target, prompt, 16))
    assert second.choices[0].message.content == expected


def test_disconnect_cancels_the_generation(client):
    messages = [{"role": "user", "content": QUESTION}]
    timed = time.perf_counter()
    reference = chat(client, messages, max_tokens=32)
    per_token = (time.perf_counter() - timed) / reference.usage.completion_tokens
    long = 5000  # would take far longer than the check below allows
    with chat(client, messages, max_tokens=long, stream=True) as stream:
        for _, _ in zip(range(3), stream, strict=False):
            pass
    started = time.perf_counter()
    reply = chat(client, [{"role": "user", "content": "y"}], max_tokens=4)
    waited = time.perf_counter() - started
    assert reply.usage.completion_tokens == 4
    assert waited < min(60.0, long * per_token / 4), (waited, per_token)


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("chat/completions", "{not json", 400, None),
        ("chat/completions", {"messages": "hello"}, 400, "messages"),
        ("chat/completions", {"messages": []}, 400, "messages"),
        ("chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, None),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
         400, "max_tokens"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": 9},
         400, "temperature"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "num_draft_tokens": 99}, 400, "num_draft_tokens"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
        ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
         404, "model"),
        ("completions", {"prompt": [1, 2, 99999999]}, 400, "prompt"),
        ("completions", {"prompt": [1, 2, -5]}, 400, "prompt"),
        ("completions", {"prompt": [1, 2, 32768]}, 400, "prompt"),
        ("completions", {"prompt": [1, 2.5]}, 400, "prompt"),
        ("completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("nowhere", {}, 404, None),
    ],
)  # fmt: skip
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, path, body, status, param):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    response = httpx.post(f"{server}/v1/{path}", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if path == "completions" and param == "prompt":
        assert "vocabulary size is 32768" in error["message"]
    ok = httpx.post(
        f"{server}/v1/completions", json={"prompt": [2, 3], "max_tokens": 2}, timeout=60
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "clients, requests", [(3, 4), pytest.param(8, 10, marks=pytest.mark.slow)], ids=["3x4", "8x10"]
)
def test_load_clients_x_requests(client, server, clients, requests):
    """Bounded, loopback only: all succeed, greedy equals sequential, memory within budget. The
    8 x 10 load (30 s here) runs with the slow proofs; 3 x 4 goes through the same queue."""
    prompts = [f"def task_{i}(x):\n" for i in range(clients)]

    def ask(prompt: str) -> str:
        reply = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8)
        return reply.choices[0].text

    sequential = {p: ask(p) for p in prompts}
    before = httpx.get(f"{server}/health").json()["memory"]

    def client_run(i: int) -> list:
        return [(p, ask(p)) for p in (prompts[(i + j) % len(prompts)] for j in range(requests))]

    with ThreadPoolExecutor(clients) as pool:
        results = [pair for run in pool.map(client_run, range(clients)) for pair in run]
    assert len(results) == clients * requests
    assert all(text == sequential[p] for p, text in results)
    after = httpx.get(f"{server}/health").json()["memory"]
    assert after["prompt_cache_bytes"] <= CACHE_BUDGET
    assert after["active_bytes"] <= before["active_bytes"] + CACHE_BUDGET + (1 << 20)
