"""12B unified checkpoints: what the converter and ``load`` do around the model (parity with
transformers is in ``test_parity.py``, images in ``test_unified_images.py``): the audio embedder is
skipped with one stated line, a converted target is plain mlx-lm, quantized unified pairs generate,
bad configs are clear errors."""

import json

import pytest
from conftest import readme_commands, run_commands
from drafting import ALWAYS_DRAFT
from mlx_lm.utils import load_model

from mlx_gemma_mtp import load
from mlx_gemma_mtp.config import ConfigError, normalize_target_config
from mlx_gemma_mtp.contract import check_greedy_contract, plain_greedy
from mlx_gemma_mtp.convert import convert
from mlx_gemma_mtp.generation import stream_generate

PROMPT = [2, 17, 300, 41, 99, 7, 250, 3, 61, 480, 12, 5]


@pytest.fixture(scope="module")
def wrapper_pair(hf_pair):
    return hf_pair("12b", "conditional", sliding_window=4, ordered=True)


def skip_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "not loading" in line]


def test_audio_embedder_is_skipped_with_one_line_at_load_and_conversion(
    wrapper_pair, tmp_path, capfd
):
    """The image embedder loads when images arrive (and the converter keeps it); the audio
    embedder is not supported: one line says so."""
    load(str(wrapper_pair.target), str(wrapper_pair.assistant))
    lines = skip_lines(capfd.readouterr().err)
    assert len(lines) == 1 and lines[0].endswith(": not loading embed_audio"), lines
    convert(str(wrapper_pair.target), str(tmp_path / "target"))
    assert len(skip_lines(capfd.readouterr().err)) == 1
    load(str(tmp_path / "target"))  # the converted folder has no audio weights left
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
    assert config["use_bidirectional_attention"] == "vision"  # image blocks, media.MediaPrompt


@pytest.mark.slow
def test_readme_tiny_12b_commands_run_as_written(tmp_path):
    """The README's local 12B walkthrough: write a tiny pair, convert both, ask about its picture
    with MTP."""
    commands = readme_commands("tiny-12b")
    assert len(commands) == 4 and commands[-1].startswith("python -m mlx_gemma_mtp.generate")
    assert "--image tiny-12b/picture.png" in commands[-1]
    result = run_commands(commands, tmp_path)
    assert "tokens per target forward" in result.stderr
    assert "not loading" not in result.stderr  # converted: the audio embedder is gone
