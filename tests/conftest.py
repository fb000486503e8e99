"""Shared fixtures."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "gemma4-tiny"
ROOT = Path(__file__).resolve().parents[1]


def readme_commands(marker: str) -> list[str]:
    """The commands of the README's bash block that mentions ``marker``, but its ``pip`` line."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if marker in b)
    return [line for line in block.strip().splitlines() if not line.startswith("pip ")]


def run_commands(commands: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run README ``python`` commands as written in ``cwd``, with this checkout's scripts and
    package (wherever the environment's editable install points); the last one's result."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for command in commands:
        args = shlex.split(command.replace("python scripts/", f"python {ROOT}/scripts/"))
        result = subprocess.run(
            [sys.executable, *args[1:]],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert result.returncode == 0, (command, result.stderr[-2000:])
    return result


@pytest.fixture(scope="module")
def fixture_pair():
    """The trained tiny target and assistant (``tests/fixtures/gemma4-tiny``), float32."""
    from mlx_gemma_mtp import load

    return load(str(FIXTURE / "target"), str(FIXTURE / "assistant"), dtype="float32")


def plain_greedy(target, prompt: list, max_tokens: int) -> list:
    """The reference tokens: mlx-lm's own greedy loop, fresh cache, whole token list as the
    prompt."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step  # loads transformers: only where it is used

    return [t for t, _ in generate_step(mx.array(prompt), target.model, max_tokens=max_tokens)]


@pytest.fixture(scope="session")
def hf_pair(tmp_path_factory):
    """``hf_pair(kind, target_class="causal", **options)``: a tiny random transformers
    target/assistant pair saved with ``save_pretrained`` (``tests/hf_reference.py``, ``options``
    as ``make_pair`` takes them), built once per session."""
    from hf_reference import make_pair  # torch and transformers load only where needed

    root = tmp_path_factory.mktemp("hf_pairs")
    pairs = {}

    def get(kind: str, target_class: str = "causal", **options):
        key = (kind, target_class, *sorted(options.items()))
        if key not in pairs:
            pairs[key] = make_pair(kind, root, target_class, **options)
        return pairs[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def costs_cache(tmp_path_factory):
    """The ``auto`` schedule's on-disk cost cache, in a folder of the test session's own."""
    import os

    folder = tmp_path_factory.mktemp("mtp_cache")
    previous = os.environ.get("MLX_GEMMA_MTP_CACHE_DIR")
    os.environ["MLX_GEMMA_MTP_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("MLX_GEMMA_MTP_CACHE_DIR", None)
    else:
        os.environ["MLX_GEMMA_MTP_CACHE_DIR"] = previous
