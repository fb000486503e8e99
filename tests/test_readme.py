"""The README's commands and Python example work as written (on the vendored fixture pair)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
FIXTURE = "tests/fixtures/gemma4-tiny"


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


def run_python_example(example: str) -> dict:
    example = example.replace("google/gemma-4-E2B-it-assistant", f"{ROOT / FIXTURE}/assistant")
    example = example.replace("google/gemma-4-E2B-it", f"{ROOT / FIXTURE}/target")
    example = example.replace("max_tokens=256", "max_tokens=24").replace(
        "max_tokens=100", "max_tokens=24"
    )
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    return namespace


def test_python_api_examples_run_on_the_fixture_pair():
    api, conversation = code_blocks("python")[-2:]
    namespace = run_python_example(api)
    assert namespace["r"].finish_reason in ("length", "stop")
    assert namespace["text"]
    namespace = run_python_example(conversation)
    cache, r = namespace["cache"], namespace["r"]
    assert r.finish_reason in ("length", "stop")
    assert len(cache.tokens) == cache[0].offset > r.prompt_tokens + r.generation_tokens
