"""What one client can do to the server and to other clients: conversation caches per namespace,
bounded queue and request sizes, abandoned work, failures, shutdown. Servers run in-process
(uvicorn on a thread, one generation worker for the module) unless a signal is needed."""

import asyncio
import contextlib
import json
import logging
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import FIXTURE, plain_greedy

pytest.importorskip("fastapi")

import uvicorn  # noqa: E402

from mlx_gemma_mtp import load  # noqa: E402
from mlx_gemma_mtp.engine.batch import BatchGenerator  # noqa: E402
from mlx_gemma_mtp.engine.prompt_cache import PromptCache  # noqa: E402
from mlx_gemma_mtp.generation import DEFAULT_NUM_DRAFT_TOKENS  # noqa: E402
from mlx_gemma_mtp.server import PromptCacheLRU, Worker, create_app  # noqa: E402
from mlx_gemma_mtp.server.limits import GuardedH11, Limits  # noqa: E402
from mlx_gemma_mtp.server.worker import Cancelled, Job  # noqa: E402

TARGET, ASSISTANT = str(FIXTURE / "target"), str(FIXTURE / "assistant")
DEFAULTS = {
    "num_draft_tokens": DEFAULT_NUM_DRAFT_TOKENS,
    "draft_schedule": "constant",
    "max_tokens": 512,
    "temp": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "prefill_step_size": 128,  # the fixture fills 128 prompt tokens in well under a second
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker():
    return Worker(lambda: load(TARGET, ASSISTANT, dtype="float32"), 8, 64 << 20,
                  draft_schedule=DEFAULTS["draft_schedule"],
                  prefill_step_size=DEFAULTS["prefill_step_size"])  # fmt: skip


@contextlib.contextmanager
def serving(worker, limits: Limits | None = None, **config):
    """An in-process server on a free loopback port; yields its base URL."""
    app = create_app(worker, TARGET, DEFAULTS, limits)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", http=GuardedH11, **config
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def base(worker):
    with serving(worker, Limits(max_queue=64)) as url:
        yield url


def post(url: str, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json=body, timeout=timeout)


def chat(url: str, messages: list, **fields) -> dict:
    response = post(url, "chat/completions", {"messages": messages, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def cached_tokens(reply: dict) -> int:
    return reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_every_flag_is_in_the_readme_table():
    from mlx_gemma_mtp.server.app import parse_args

    readme = (FIXTURE.parents[2] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `--")]
    for name in vars(parse_args(["--model", "m"])):
        flag = "--" + name.replace("_", "-")
        assert any(f"`{flag}`" in row.split("|")[1] for row in rows), flag


# -- conversation caches ------------------------------------------------------------------------


def test_interleaved_conversations_each_reuse_their_own_history(base):
    conversations = [[{"role": "user", "content": f"def task_{i}(x):"}] for i in range(4)]
    previous = [None] * 4
    for turn in range(3):
        for i, messages in enumerate(conversations):
            reply = chat(base, messages, max_tokens=6)
            if previous[i] is not None:
                assert cached_tokens(reply) >= previous[i], (turn, i, reply["usage"])
            previous[i] = reply["usage"]["prompt_tokens"]
            text = reply["choices"][0]["message"]["content"]
            messages += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": f"and {turn}?"},
            ]


def test_another_namespace_reuses_nothing_and_destroys_nothing(base, worker):
    messages = [{"role": "user", "content": "import os\nSECRET = 'swordfish'\n"}]
    alice = chat(base, messages, max_tokens=4, user="alice")
    for other in ({"user": "bob"}, {"cache_salt": "alice"}, {"user": "alice", "cache_salt": "x"}):
        probe = chat(base, messages, max_tokens=4, **other)
        assert cached_tokens(probe) == 0, other
    text = alice["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "more"}]
    again = chat(base, messages, max_tokens=4, user="alice")
    assert cached_tokens(again) >= alice["usage"]["prompt_tokens"]


def test_lru_takes_prefixes_copies_what_it_can_roll_back_and_keeps_its_budget(worker):
    from mlx_gemma_mtp import stream_generate

    target, tokenizer = worker.target, worker.tokenizer
    lru = PromptCacheLRU(target, max_entries=2, max_bytes=1 << 30)
    a, b, c = (PromptCache(tokens=t) for t in ([1, 2, 3], [1, 2, 9, 9], [7]))
    for cache in (a, b, c):
        lru.put(cache)
    assert [e for _, e in lru.entries] == [b, c]  # the least recently used went first
    shared = lru.take([1, 2, 5, 6])  # b only shares a prefix: a rolled-back copy
    assert shared is not b and shared.tokens == [1, 2] and lru.entries[0][1] is b
    assert lru.take([1, 2, 9, 9, 4]) is b and [e for _, e in lru.entries] == [c]
    assert lru.take([7, 1], namespace="other").tokens == []  # c is in namespace ""

    # A sliding-window layer cannot roll back past its slack: such a cache is never trimmed.
    long_prompt = [5 + i % 900 for i in range(300)]
    held = lru.take(long_prompt)
    list(stream_generate(target, tokenizer, long_prompt, 2, prompt_cache=held))
    lru.put(held)
    fresh = lru.take(long_prompt[:20] + [3, 3])
    assert fresh.tokens == [] and fresh is not held
    assert lru.entries[-1][1] is held and len(held.tokens) == 302
    branch = lru.take([*held.tokens[:-1], 9, 9])  # within the slack: a rolled-back copy
    assert branch is not held and branch.tokens == held.tokens[:-1]
    assert all(c.offset == 302 for c in held) and lru.entries[-1][1] is held
    reply = stream_generate(target, tokenizer, [9, 9], 3, prompt_cache=branch)
    assert [r.token for r in reply] == plain_greedy(target, [*held.tokens[:-1], 9, 9], 3)
    near = lru.take([*held.tokens, 4])  # held is a prefix: taken, nothing copied
    assert near is held and len(near.tokens) == 302
    history = list(near.tokens)
    reply = stream_generate(target, tokenizer, [4], 3, prompt_cache=near)  # held is intact
    assert [r.token for r in reply] == plain_greedy(target, [*history, 4], 3)

    lru.max_bytes = held.nbytes
    lru.put(held)
    lru.max_bytes = held.nbytes - 1  # over budget: the oldest go until it fits
    lru.put(PromptCache(tokens=[8]))
    assert len(lru.entries) == 1 and lru.nbytes <= lru.max_bytes


# -- bounded work -------------------------------------------------------------------------------


def test_full_queue_answers_503_with_retry_after_and_loses_nothing(worker, base):
    prompts = [f"def job_{i}(y):\n" for i in range(32)]
    expected = {}
    for p in prompts[:2]:  # one-at-a-time references
        reply = post(base, "completions", {"prompt": p, "max_tokens": 12})
        expected[p] = reply.json()["choices"][0]["text"]
    with serving(worker, Limits(max_queue=8)) as url:

        def ask(prompt: str) -> httpx.Response:
            return post(url, "completions", {"prompt": prompt, "max_tokens": 12})

        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(ask, prompts))
        statuses = [r.status_code for r in replies]
        assert set(statuses) == {200, 503} and statuses.count(200) >= 9, statuses
        for prompt, reply in zip(prompts, replies, strict=True):
            if reply.status_code == 503:
                assert reply.headers["Retry-After"] == "1"
                assert "waiting" in reply.json()["error"]["message"]
            else:
                assert reply.json()["usage"]["completion_tokens"] == 12
                if prompt in expected:
                    assert reply.json()["choices"][0]["text"] == expected[prompt]
        assert ask(prompts[0]).status_code == 200


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("chat/completions", {"max_tokens": 101}, "max_tokens"),
        ("chat/completions", {"max_completion_tokens": 101}, "max_completion_tokens"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x = 1\n" * 40}]},
         "messages"),
        ("completions", {"prompt": list(range(5, 56))}, "prompt"),
        ("completions", {"prompt": "y", "max_tokens": 1e15}, "max_tokens"),
    ],
)  # fmt: skip
def test_over_the_ceilings_is_a_400_naming_the_field(worker, path, body, param):
    if path == "chat/completions":
        body = {"messages": [{"role": "user", "content": "x"}], **body}
    with serving(worker, Limits(max_tokens=100, max_prompt_tokens=50)) as url:
        response = post(url, path, body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and "over this server's limit" in error["message"]
        assert post(url, "completions", {"prompt": [2, 3], "max_tokens": 2}).status_code == 200


def test_default_ceilings_are_the_models_context(base, worker):
    context = worker.target.args.max_position_embeddings
    response = post(base, "completions", {"prompt": "y", "max_tokens": context + 1})
    assert response.status_code == 400 and str(context) in response.json()["error"]["message"]


def test_bodies_over_the_limit_get_413_declared_or_chunked(worker):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'", "max_tokens": 2}'

    with serving(worker, Limits(max_body_bytes=4096)) as url:
        big = {"prompt": "x" * 5000, "max_tokens": 2}
        declared = post(url, "completions", big)
        assert declared.status_code == 413, declared.text
        assert "4096 bytes" in declared.json()["error"]["message"]
        chunked = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=60)
        assert chunked.status_code == 413, chunked.text
        assert post(url, "completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_two_thousand_idle_connections_do_not_stop_a_request(worker):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    # client and server ends are both in this process
    count = min(2000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2)
    sockets = []
    try:
        with serving(worker, limit_concurrency=4096) as url:
            port = int(url.rsplit(":", 1)[1])
            for i in range(count):
                s = socket.create_connection(("127.0.0.1", port))
                if i % 2:  # half of them send half a request and stop
                    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
                sockets.append(s)
            started = time.perf_counter()
            reply = post(url, "completions", {"prompt": "x", "max_tokens": 2}, timeout=30)
            assert reply.status_code == 200
            assert time.perf_counter() - started < 10
    finally:
        for s in sockets:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert count >= 500, f"only {count} sockets under the open-files limit"


# -- abandoned work -----------------------------------------------------------------------------


def delay_after_abandoning(url: str, body: dict, leave_after: float = 1.0) -> float:
    """Seconds the next small request takes after a client sends ``body`` and leaves, minus what
    the same small request takes on an idle server."""
    small = {"prompt": [2, 3], "max_tokens": 4}

    def timed() -> float:
        started = time.perf_counter()
        assert post(url, "completions", small).status_code == 200
        return time.perf_counter() - started

    idle = min(timed() for _ in range(2))
    with pytest.raises(httpx.ReadTimeout):
        post(url, "completions", body, timeout=leave_after)
    return timed() - idle


def test_a_non_streamed_request_abandoned_after_a_second_frees_the_server(base):
    delay = delay_after_abandoning(base, {"prompt": [2, 100, 200], "max_tokens": 1500})
    assert delay < 2.0, delay


def test_a_prompt_fill_abandoned_after_a_second_frees_the_server(base):
    prompt = [5 + (i * 7) % 30000 for i in range(8000)]
    delay = delay_after_abandoning(base, {"prompt": prompt, "max_tokens": 4})
    assert delay < 2.0, delay


def test_a_job_whose_client_stops_reading_is_held_back_then_dropped():
    """``send`` never blocks the batch: tokens past ``max_unread`` are held back, and a client
    that reads nothing for ``stall_timeout`` seconds has its job cancelled."""
    loop = asyncio.new_event_loop()
    job = Job([1], {}, None, None, loop, max_unread=3, stall_timeout=0.5)
    for i in range(5):
        job.send("token", i)
    assert len(job.held) == 2 and not job.cancelled.is_set()
    started = time.perf_counter()
    while job.held:
        assert not job.flush() or not job.held
        time.sleep(0.05)
        assert time.perf_counter() - started < 2.0
    assert time.perf_counter() - started >= 0.5
    assert job.cancelled.is_set() and job.reason.startswith("the client read nothing")
    with pytest.raises(Cancelled, match="read nothing for 0.5 s"):
        job.check()
    loop.close()


def test_a_job_that_is_read_never_pauses():
    loop = asyncio.new_event_loop()
    job = Job([1], {}, None, None, loop, max_unread=2, stall_timeout=5)

    def produce():  # as the generation thread does: send, and hand over as room frees
        for i in range(50):
            job.send("token", i)
        job.send("end", None)
        while not job.flush():
            time.sleep(0.01)

    async def consume() -> list:
        thread = threading.Thread(target=produce)
        thread.start()
        items = []
        while not items or items[-1][0] != "end":
            items.append(await job.receive())
        thread.join()
        return items

    items = loop.run_until_complete(consume())
    assert [v for k, v in items if k == "token"] == list(range(50))
    loop.close()


@pytest.mark.slow
def test_an_unread_stream_is_dropped_end_to_end(worker):
    """A streaming client that reads nothing: once the unread tokens and the bounded send
    buffers are full (about 800 tokens, 30 s on the fixture), its generation pauses and is
    dropped after the stall timeout."""
    with serving(worker, Limits(max_unread=8, stall_timeout=1.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"prompt": [2, 100], "max_tokens": 100000, "stream": True}).encode()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        s.connect(("127.0.0.1", port))
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        s.sendall(head + body)
        try:
            started = time.perf_counter()
            while not (jobs := worker.running_jobs()):
                assert time.perf_counter() - started < 30, "the stream did not start"
                time.sleep(0.05)
            (job,) = jobs
            while job in worker.running_jobs():
                assert time.perf_counter() - started < 120, "the unread stream was not dropped"
                time.sleep(0.2)
            assert job.reason == "the client read nothing for 1 s"
            reply = post(url, "completions", {"prompt": [2, 3], "max_tokens": 2}, timeout=30)
            assert reply.status_code == 200
        finally:
            s.close()


# -- failures -----------------------------------------------------------------------------------


def test_a_planted_failure_is_logged_and_the_others_are_answered(base, monkeypatch, caplog):
    planted = [2, 66, 777]
    real = BatchGenerator.insert

    def failing(self, prompt, **kwargs):  # prompt: what is not cached
        if list(prompt)[-1] == 777:
            raise RuntimeError("planted failure")
        return real(self, prompt, **kwargs)

    monkeypatch.setattr(BatchGenerator, "insert", failing)
    prompts = [[2, 10, 11], planted, [2, 12, 13], [2, 14, 15]]
    with (
        caplog.at_level(logging.ERROR, logger="mlx_gemma_mtp.server.worker"),
        ThreadPoolExecutor(4) as pool,
    ):
        replies = list(
            pool.map(lambda p: post(base, "completions", {"prompt": p, "max_tokens": 4}), prompts)
        )
    assert [r.status_code for r in replies] == [200, 500, 200, 200]
    assert "planted failure" in replies[1].json()["error"]["message"]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and "planted failure" in str(failures[0].exc_info[1])


def test_a_failure_in_the_cache_bookkeeping_leaves_the_thread_serving(base, monkeypatch, caplog):
    calls = []

    def broken_put(self, cache, namespace=""):
        calls.append(namespace)
        raise RuntimeError("bookkeeping failure")

    monkeypatch.setattr(PromptCacheLRU, "put", broken_put)
    with caplog.at_level(logging.ERROR, logger="mlx_gemma_mtp.server.worker"):
        first = post(base, "completions", {"prompt": [2, 20, 21], "max_tokens": 3})
        assert first.status_code == 200  # answered before the bookkeeping, which comes after
        deadline = time.monotonic() + 10
        while not calls or not caplog.records:
            assert time.monotonic() < deadline, "the bookkeeping never ran"
            time.sleep(0.01)
    monkeypatch.undo()
    assert any("bookkeeping failure" in str(r.exc_info[1]) for r in caplog.records)
    assert post(base, "completions", {"prompt": [2, 22], "max_tokens": 3}).status_code == 200


# -- shutdown -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig",
    [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],  # same path, 2nd process
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_stops_a_generating_server_within_5_s(sig):
    port = free_port()
    command = [
        sys.executable, "-m", "mlx_gemma_mtp.server", "--model", TARGET, "--draft-model",
        ASSISTANT, "--port", str(port), "--dtype", "float32", "--log-level", "info",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "did not start"
            time.sleep(0.3)
        lines = []
        body = {"prompt": [2, 100, 200], "max_tokens": 100000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            for line in stream.iter_lines():
                lines.append(line)
                if len(lines) == 10:  # generating
                    process.send_signal(sig)
                    stopping = time.monotonic()
        process.wait(timeout=5 - (time.monotonic() - stopping))
        exited = time.monotonic() - stopping
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert exited < 5, output
    events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]", events[-3:]
    assert "shutting down" in events[-2], events[-3:]
    assert "request cancelled: the server is shutting down" in output
