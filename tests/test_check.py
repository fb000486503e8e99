"""``python -m mlx_gemma_mtp.check``: the self-check a user runs after installing."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from click.testing import CliRunner
from conftest import FIXTURE

from mlx_gemma_mtp import check
from mlx_gemma_mtp.models import centroid_head as ch

CHECKS = [
    "versions",
    "pair",
    "metal kernels",
    "greedy MTP = plain",
    "sampling (temp 1, top-p 0.95)",
    "cost table",
]


def test_check_passes_on_the_fixture_pair(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_gemma_mtp.check", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["platform"]["mlx"] == mx.__version__
    names = [c["name"] for c in report["checks"]]
    if mx.metal.is_available():  # one check per kernel and their speed instead
        names = [n for n in names if not n.startswith("metal kernel")]
        CHECKS.remove("metal kernels")
    assert names == CHECKS
    assert all(c["ok"] and c["detail"] for c in report["checks"])
    assert "fixture" in report["checks"][1]["detail"]


def test_a_planted_mismatch_fails_the_check(tmp_path, monkeypatch):
    generate_tokens = check.generate_tokens

    def planted(target, drafter, prompt, max_tokens, **sampling):
        tokens, rows, response = generate_tokens(target, drafter, prompt, max_tokens, **sampling)
        if drafter is not None and not sampling:
            tokens[-1] = (tokens[-1] + 1) % drafter.vocab_size  # MTP no longer equals plain
        return tokens, rows, response

    monkeypatch.setattr(check, "generate_tokens", planted)
    monkeypatch.setattr(check, "FIXTURE", tmp_path / "absent")  # the tiny random pair: quicker
    out = tmp_path / "check.json"
    result = CliRunner().invoke(check.main, ["--json", str(out)])
    assert result.exit_code == 1, result.output
    assert "FAIL greedy MTP = plain: first difference at token 47 of 48" in result.output
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert checks["greedy MTP = plain"]["ok"] is False and checks["pair"]["ok"] is True


def test_without_the_source_tree_a_random_pair_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "FIXTURE", tmp_path / "absent")
    checks = {c.name: c for c in check.run_checks()}
    assert "tiny random pair" in checks["pair"].detail
    assert all(c.ok for c in checks.values()), checks


@pytest.mark.skipif(
    mx.metal.is_available(), reason="kernels that fail need a machine without Metal"
)
def test_kernels_forced_on_without_metal_fail_the_kernel_checks(monkeypatch):
    monkeypatch.setenv(ch.METAL_SETTING, "1")
    target, drafter = check.random_pair()
    checks = check.kernel_checks(drafter)
    assert [c.name for c in checks] == [f"metal kernel {k}" for k in ch.metal.SPECS]
    assert not any(c.ok for c in checks)
    assert "No Metal back-end" in checks[0].detail


def test_model_needs_a_draft_model():
    result = CliRunner().invoke(check.main, ["--model", "somewhere"])
    assert result.exit_code == 2 and "--draft-model" in result.output


def test_the_cost_table_is_reported_once_measured(tmp_path, monkeypatch):
    from mlx_gemma_mtp import load
    from mlx_gemma_mtp.engine.loop import SpeculativeGenerator

    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE_DIR", str(tmp_path))
    target, drafter, _ = load(str(FIXTURE / "target"), str(FIXTURE / "assistant"))
    assert "none cached yet" in check.cost_table(target, drafter).detail
    list(SpeculativeGenerator(target, drafter).generate(mx.array(list(range(2, 40))), 4))
    table = check.cost_table(target, drafter)
    assert table.ok and f"cached in {tmp_path}" in table.detail and "auto picks" in table.detail
