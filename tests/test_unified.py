"""12B unified checkpoints: what the converter and ``load`` do around the model (parity with
transformers is in ``test_parity.py``): the vision/audio parts are skipped with one stated line, a
converted target is plain mlx-lm, quantized unified pairs generate, bad configs are clear errors."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from drafting import ALWAYS_DRAFT
from mlx_lm.utils import load_model

from mlx_gemma_mtp import load
from mlx_gemma_mtp.config import ConfigError, normalize_target_config
from mlx_gemma_mtp.contract import check_greedy_contract, plain_greedy
from mlx_gemma_mtp.convert import convert
from mlx_gemma_mtp.generation import stream_generate

PROMPT = [2, 17, 300, 41, 99, 7, 250, 3, 61, 480, 12, 5]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wrapper_pair(hf_pair):
    return hf_pair("12b", "conditional", sliding_window=4, ordered=True)


def skip_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "text generation only" in line]


def test_towers_are_skipped_with_one_line_at_load_and_conversion(wrapper_pair, tmp_path, capfd):
    load(str(wrapper_pair.target), str(wrapper_pair.assistant))
    lines = skip_lines(capfd.readouterr().err)
    assert len(lines) == 1 and "embed_vision" in lines[0] and "embed_audio" in lines[0], lines
    convert(str(wrapper_pair.target), str(tmp_path / "target"))
    assert len(skip_lines(capfd.readouterr().err)) == 1
    load(str(tmp_path / "target"))  # the converted folder has no tower weights left
    assert skip_lines(capfd.readouterr().err) == []


def test_text_only_checkpoint_says_nothing(hf_pair, capfd):
    pair = hf_pair("12b", "causal", sliding_window=4, ordered=False)
    load(str(pair.target), str(pair.assistant))
    assert skip_lines(capfd.readouterr().err) == []


def test_converted_unified_target_is_plain_mlx_lm(wrapper_pair, tmp_path):
    convert(str(wrapper_pair.target), str(tmp_path / "target"), dtype="float32")
    config = json.loads((tmp_path / "target" / "config.json").read_text())
    assert config["model_type"] == "gemma4"
    assert config["text_config"]["hidden_size_per_layer_input"] == 0
    model, _ = load_model(tmp_path / "target")  # mlx-lm's own loader, no tokenizer here
    target, _, _ = load(str(tmp_path / "target"))
    steps = plain_greedy(model, PROMPT, 8)
    assert [t for t, _ in steps] == [t for t, _ in plain_greedy(target.model, PROMPT, 8)]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_unified_pair(wrapper_pair, tmp_path, bits):
    for role in ("target", "assistant"):
        convert(str(getattr(wrapper_pair, role)), str(tmp_path / role), True, bits, 32)
    target, drafter, _ = load(str(tmp_path / "target"), str(tmp_path / "assistant"))
    tokens = [
        r.token for r in stream_generate(target, None, PROMPT, 24, drafter, costs=ALWAYS_DRAFT)
    ]
    assert check_greedy_contract(tokens, plain_greedy(target.model, PROMPT, 24)).holds


def test_mlx_community_style_unified_folder_loads(wrapper_pair, tmp_path):
    """mlx-lm 0.32.2 cannot convert a gemma4_unified checkpoint itself (it expects per-layer
    input weights), but 4-bit 12B folders made by other mlx-lm versions keep model_type
    gemma4_unified and transformers' text_config (no per-layer-input or MoE keys) next to
    mlx-lm weight names and a quantization block; such a folder loads as our target."""
    out = tmp_path / "target"
    convert(str(wrapper_pair.target), str(out), True, 4, 64)
    config = json.loads((out / "config.json").read_text())
    original = json.loads((wrapper_pair.target / "config.json").read_text())
    config.update(model_type="gemma4_unified", text_config=original["text_config"])
    (out / "config.json").write_text(json.dumps(config))
    target, drafter, _ = load(str(out), str(wrapper_pair.assistant))
    assert target.args.hidden_size_per_layer_input == 0
    tokens = [
        r.token for r in stream_generate(target, None, PROMPT, 16, drafter, costs=ALWAYS_DRAFT)
    ]
    assert check_greedy_contract(tokens, plain_greedy(target.model, PROMPT, 16)).holds


def test_bidirectional_text_is_refused():
    config = {
        "model_type": "gemma4_unified",
        "text_config": {"model_type": "gemma4_unified_text", "use_bidirectional_attention": "all"},
    }
    with pytest.raises(ConfigError, match="use_bidirectional_attention 'all'"):
        normalize_target_config(config, "x/config.json")


def test_missing_unified_fields_take_transformers_defaults():
    config = normalize_target_config(
        {"model_type": "gemma4_unified_text", "num_hidden_layers": 12}, "x/config.json"
    )
    assert config["model_type"] == "gemma4_text"
    assert config["hidden_size_per_layer_input"] == 0 and config["num_kv_shared_layers"] == 0
    assert config["sliding_window"] == 1024 and config["final_logit_softcapping"] is None
    assert config["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]


def test_readme_tiny_12b_commands_run_as_written(tmp_path):
    """The README's local 12B walkthrough: write a tiny pair, convert both, generate with MTP."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "tiny-12b" in b)
    commands = [line for line in block.strip().splitlines() if not line.startswith("pip ")]
    assert len(commands) == 4 and commands[-1].startswith("python -m mlx_gemma_mtp.generate")
    for command in commands:
        args = shlex.split(command.replace("python scripts/", f"python {ROOT}/scripts/"))
        result = subprocess.run(
            [sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (command, result.stderr[-2000:])
    assert "tokens per target forward" in result.stderr
    assert "text generation only" not in result.stderr  # converted: the towers are gone
