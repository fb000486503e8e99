"""A seed fixes the output: the same seeded request in fresh processes, each with its own empty
cost cache (so each measures its own costs, and ``auto`` may choose other draft lengths), gives
the same tokens, on MLX's default BLAS and with OpenBLAS preloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURE

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
PROMPT_TOKENS = "2 608 540 204 608 733 204 204 630 1498"


def seeded_run(tmp_path: Path, name: str, environment: dict) -> dict:
    """One fresh process of the CLI (default ``auto``, temp 0.8, top-p 0.95, seed 7)."""
    stats, cache = tmp_path / f"{name}.json", tmp_path / f"{name}-cache"
    command = [sys.executable, "-m", "mlx_gemma_mtp.generate"]
    command += ["--model", str(FIXTURE / "target"), "--draft-model", str(FIXTURE / "assistant")]
    command += ["--prompt-tokens", PROMPT_TOKENS, "--max-tokens", "48", "--temp", "0.8"]
    command += ["--top-p", "0.95", "--seed", "7", "--stats-json", str(stats)]
    env = {**os.environ, **environment, "MLX_GEMMA_MTP_CACHE_DIR": str(cache)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(stats.read_text())


def assert_same_tokens(runs: list[dict]) -> None:
    assert all(run["acceptance_rule"] == "coupled" for run in runs)
    assert all(run["tokens"] == runs[0]["tokens"] for run in runs), [r["tokens"] for r in runs]
    assert len(runs[0]["tokens"]) > 8


def test_a_seed_fixes_the_output_in_fresh_processes(tmp_path):
    assert_same_tokens([seeded_run(tmp_path, f"run{i}", {}) for i in range(2)])


@pytest.mark.slow
@pytest.mark.skipif(not OPENBLAS.exists(), reason="needs Debian's libopenblas0-pthread")
def test_a_seed_fixes_the_output_in_fresh_processes_with_openblas(tmp_path):
    environment = {"LD_PRELOAD": str(OPENBLAS), "OPENBLAS_NUM_THREADS": "1"}
    assert_same_tokens([seeded_run(tmp_path, f"openblas{i}", environment) for i in range(3)])
