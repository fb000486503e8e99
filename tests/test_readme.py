"""The README's commands and Python example work as written (on the vendored fixture pair)."""

import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import FIXTURE as FIXTURE_PATH

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
FIXTURE = FIXTURE_PATH.relative_to(ROOT).as_posix()  # as the README writes it


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_first_command_runs_mtp_generation_on_the_fixture_pair():
    first = code_blocks("bash")[0].strip()
    assert "pip install -e ." in first
    generate = first.split(" && ")[-1]
    assert generate.startswith("python -m mlx_gemma_mtp.generate")
    assert f"--draft-model {FIXTURE}/assistant" in generate
    args = shlex.split(generate)[1:]
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "tokens per target forward" in result.stderr
    assert len(result.stdout.strip()) > 20


def test_second_command_is_what_ci_runs():
    second = code_blocks("bash")[1].strip()
    assert second == 'pip install -e ".[test]" && python -m pytest -q'
    assert second in (ROOT / ".ci" / "run").read_text()


def run_python_example(example: str, namespace: dict | None = None) -> dict:
    example = example.replace("google/gemma-4-E2B-it-assistant", f"{ROOT / FIXTURE}/assistant")
    example = example.replace("google/gemma-4-E2B-it", f"{ROOT / FIXTURE}/target")
    for long, short in (("max_tokens=256", "max_tokens=24"), ("max_tokens=100", "max_tokens=24"),
                        (", 256,", ", 24,")):  # fmt: skip
        example = example.replace(long, short)
    namespace = {} if namespace is None else namespace
    exec(compile(example, "README.md", "exec"), namespace)
    return namespace


def test_python_api_examples_run_on_the_fixture_pair(tmp_path, monkeypatch):
    api, conversation, on_disk = [
        b
        for b in code_blocks("python")
        if "from mlx_gemma_mtp import" in b and "batch" not in b and "images=" not in b
    ]  # the images example needs a vision tower and a chat template: no local pair has both
    namespace = run_python_example(api)
    assert namespace["r"].finish_reason in ("length", "stop")
    assert namespace["text"]
    namespace = run_python_example(conversation)
    cache, r = namespace["cache"], namespace["r"]
    assert r.finish_reason in ("length", "stop")
    assert len(cache.tokens) == cache[0].offset > r.prompt_tokens + r.generation_tokens
    monkeypatch.chdir(tmp_path)  # the example saves its conversation in the working folder
    held = len(cache.tokens)
    namespace = run_python_example(on_disk, namespace)
    assert (tmp_path / "conversation.safetensors").is_file()
    assert len(namespace["cache"].tokens) > held and namespace["cache"] is not cache


def test_batch_example_runs_on_the_fixture_pair():
    (example,) = [b for b in code_blocks("python") if "batch_generate" in b]
    namespace = run_python_example(example.replace("max_tokens=64", "max_tokens=8"))
    response = namespace["response"]
    assert len(response.texts) == 3 and response.stats.generation_tokens > 0


def test_server_and_chat_commands_run_on_the_fixture_pair():
    server, chat = [b.strip() for b in code_blocks("bash") if "mlx_gemma_mtp.server" in b
                    or "mlx_gemma_mtp.chat" in b]  # fmt: skip
    assert f"--draft-model {FIXTURE}/assistant" in server and f"--model {FIXTURE}/target" in chat
    result = subprocess.run(
        [sys.executable, *shlex.split(chat)[1:]], cwd=ROOT, input="def f():\nq\n",
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(">> ") and "tokens/s" in result.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = shlex.split(server.split(" && ")[-1].replace("8080", port))[1:]
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", int(port))) == 0:
                    break
            time.sleep(0.5)
        assert process.poll() is None, process.stdout.read()
        client = next(b for b in code_blocks("python") if "from openai import" in b)
        namespace: dict = {}
        exec(compile(client.replace("8080", port), "README.md", "exec"), namespace)
        assert namespace["reply"].usage.completion_tokens > 0
    finally:
        process.terminate()
        process.wait(timeout=30)
