"""Converter and loader: round trip, quantization, and one-line errors for bad input."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURE
from mlx.utils import tree_flatten

from mlx_gemma_mtp import ConfigError, load
from mlx_gemma_mtp.convert import convert, main

TARGET, ASSISTANT = FIXTURE / "target", FIXTURE / "assistant"
PROMPT = mx.array([[2, 608, 2103, 204, 608, 5900, 204, 608, 733]])


def first_draft_step(target, drafter):
    cache = target.make_cache()
    out = target(PROMPT, cache)
    pending = mx.argmax(out.logits[:, -1:], axis=-1)
    inputs = mx.concatenate([target.embed(pending), out.hidden[:, -1:]], axis=-1)
    draft = drafter(inputs, target.shared_kv(cache), PROMPT.shape[1])
    return out.logits, drafter.full_vocab_logits(draft), draft.hidden


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    convert(str(TARGET), str(root / "target"), dtype="float32")
    convert(str(ASSISTANT), str(root / "assistant"), dtype="float32")
    return root


def test_converted_folder_matches_in_memory_path(converted):
    from_hf = first_draft_step(*load(str(TARGET), str(ASSISTANT), dtype="float32")[:2])
    from_mlx = first_draft_step(*load(str(converted / "target"), str(converted / "assistant"))[:2])
    for a, b in zip(from_hf, from_mlx, strict=True):
        assert a.dtype == b.dtype == mx.float32
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_converted_folder_keeps_config_tokenizer_and_token_ordering(converted):
    config = json.loads((converted / "target" / "config.json").read_text())
    assert config["global_head_dim"] == 128 and "per_layer_config" not in config
    assert (converted / "assistant" / "tokenizer.json").is_file()
    _, drafter, tokenizer = load(str(converted / "target"), str(converted / "assistant"))
    ordering = drafter.masked_embedding.token_ordering
    assert ordering.dtype == mx.int32
    assert sorted(np.array(ordering).tolist()) == list(range(32768))
    assert tokenizer.encode("import os")[0] == 2
    index = json.loads((converted / "assistant" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] and "lm_head.weight" not in index["weight_map"]


def test_converted_target_loads_with_plain_mlx_lm(converted):
    from mlx_lm import load as mlx_lm_load

    model, _ = mlx_lm_load(str(converted / "target"))
    ours, _, _ = load(str(converted / "target"))
    np.testing.assert_array_equal(np.array(model(PROMPT)), np.array(ours(PROMPT, None).logits))


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (4, 128)])
def test_quantized_conversion_loads_and_runs(tmp_path, bits, group_size):
    for name, src in (("target", TARGET), ("assistant", ASSISTANT)):
        convert(str(src), str(tmp_path / name), quantize=True, q_bits=bits, q_group_size=group_size)
    target, drafter, _ = load(str(tmp_path / "target"), str(tmp_path / "assistant"))
    assert drafter.model.embed_tokens.bits == bits
    assert drafter.model.embed_tokens.group_size == group_size
    _, reference, _ = first_draft_step(*load(str(TARGET), str(ASSISTANT), dtype="float32")[:2])
    target_logits, draft_logits, _ = first_draft_step(target, drafter)
    assert np.isfinite(np.array(target_logits.astype(mx.float32))).all()
    # Quantization perturbs logits but keeps the drafter's pick among the reference's top 5.
    top5 = np.argsort(-np.array(reference[0, -1]))[:5]
    assert int(np.argmax(np.array(draft_logits[0, -1].astype(mx.float32)))) in top5


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def missing_config(tmp_path):
    folder = copy_model(ASSISTANT, tmp_path / "model")
    (folder / "config.json").unlink()
    return folder, "config.json: missing"


def unknown_model_type(tmp_path):
    folder = copy_model(ASSISTANT, tmp_path / "model")
    edit_config(folder, model_type="llama")
    return folder, "model_type 'llama' is not supported"


def truncated_weights(tmp_path):
    folder = copy_model(ASSISTANT, tmp_path / "model")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder, "model.safetensors: truncated safetensors file"


def missing_token_ordering(tmp_path):
    folder = copy_model(ASSISTANT, tmp_path / "model")
    weights = mx.load(str(folder / "model.safetensors"))
    del weights["masked_embedding.token_ordering"]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder, "lack masked_embedding.token_ordering"


def broken_token_ordering(tmp_path):
    folder = copy_model(ASSISTANT, tmp_path / "model")
    weights = mx.load(str(folder / "model.safetensors"))
    weights["masked_embedding.token_ordering"] = mx.zeros((32768,), dtype=mx.int64)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder, "token_ordering is not a permutation of the 32768 vocabulary ids"


BAD_INPUTS = [
    missing_config,
    unknown_model_type,
    truncated_weights,
    missing_token_ordering,
    broken_token_ordering,
]


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_gives_one_line_error_and_no_output(tmp_path, make_bad):
    folder, message = make_bad(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message) as error:
        convert(str(folder), str(out))
    assert "\n" not in str(error.value)
    assert str(folder) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing half-written


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_draft_model_fails_at_load(tmp_path, make_bad):
    folder, message = make_bad(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load(str(TARGET), str(folder))


def test_target_passed_as_draft_model():
    with pytest.raises(ConfigError, match="is a target model, not a Gemma 4 assistant"):
        load(str(TARGET), str(TARGET))


def test_drafter_passed_as_target():
    with pytest.raises(ConfigError, match="is an assistant drafter"):
        load(str(ASSISTANT))


def test_mismatched_pair_names_both_values(tmp_path):
    folder = copy_model(ASSISTANT, tmp_path / "assistant")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["sliding_window"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError, match="sliding_window is 128 in the target but 64 in the drafter"
    ):
        load(str(TARGET), str(folder))


def test_cli_error_is_one_line_with_exit_code(tmp_path):
    result = CliRunner().invoke(
        main, ["--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "no such folder" in result.output
    assert not (tmp_path / "o").exists()


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        convert(str(ASSISTANT), str(out))
    assert (out / "keep.txt").read_text() == "mine"
    convert(str(ASSISTANT), str(out), force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_offline_hub_id_says_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="hf download google/gemma-4-E2B-it-assistant"):
        load(str(TARGET), "google/gemma-4-E2B-it-assistant")


def test_folder_without_tokenizer_loads_with_token_ids(tmp_path):
    folder = copy_model(TARGET, tmp_path / "target")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    target, _, tokenizer = load(str(folder))
    assert tokenizer is None
    assert target(PROMPT, None).logits.shape == (1, PROMPT.shape[1], 32768)


def test_global_head_dim_and_per_layer_config_forms_agree(tmp_path):
    per_layer_only = copy_model(TARGET, tmp_path / "per_layer")
    config = json.loads((per_layer_only / "config.json").read_text())
    del config["global_head_dim"]
    (per_layer_only / "config.json").write_text(json.dumps(config))
    global_only = copy_model(TARGET, tmp_path / "global")
    config = json.loads((global_only / "config.json").read_text())
    del config["per_layer_config"]
    (global_only / "config.json").write_text(json.dumps(config))
    a = load(str(per_layer_only), dtype="float32")[0](PROMPT, None).logits
    b = load(str(global_only), dtype="float32")[0](PROMPT, None).logits
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_conflicting_head_dims_are_an_error(tmp_path):
    folder = copy_model(TARGET, tmp_path / "target")
    edit_config(folder, global_head_dim=256)
    with pytest.raises(
        ConfigError, match="global_head_dim is 256 but per_layer_config says head_dim 128"
    ):
        load(str(folder))


def split_checkpoint(source: Path, folder: Path, parts: int) -> int:
    """``source`` with its weights split into ``parts`` files; returns the largest file's size."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = mx.load(str(source / "model.safetensors"))
    names = sorted(weights)
    for i in range(parts):
        part = {n: weights[n] for n in names[i::parts]}
        mx.save_safetensors(str(folder / f"model-{i + 1:05d}-of-{parts:05d}.safetensors"), part)
    return max(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_output_shards_are_no_larger_than_the_largest_source_file(tmp_path):
    """Each output shard is computed and written alone: memory peaks near one shard (measured
    on a 2.9 GB checkpoint by scripts/convert_memory.py)."""
    largest = split_checkpoint(TARGET, tmp_path / "split", 3)
    out = convert(str(tmp_path / "split"), str(tmp_path / "out"))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3
    assert all(f.stat().st_size <= largest + 4096 for f in shards)  # + the header
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    target, _, _ = load(str(out))
    expected, _, _ = load(str(TARGET))
    a, b = (
        dict(tree_flatten(target.model.parameters())),
        dict(tree_flatten(expected.model.parameters())),
    )
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_progress_only_on_a_terminal_and_the_size_is_printed(tmp_path, capsys):
    result = CliRunner().invoke(
        main, ["--hf-path", str(ASSISTANT), "--mlx-path", str(tmp_path / "a")]
    )
    assert result.exit_code == 0, result.output
    size = sum(f.stat().st_size for f in (tmp_path / "a").iterdir()) / 1e9
    assert result.output == f"Saved MLX model to {tmp_path / 'a'} ({size:.2f} GB)\n"  # no bar
    convert(str(ASSISTANT), str(tmp_path / "b"), progress=True)
    bar = capsys.readouterr().err
    assert "Writing model.safetensors" in bar and "100%" in bar


def test_output_permissions_follow_the_umask_which_is_left_alone(tmp_path):
    import os
    import stat
    from unittest import mock

    previous = os.umask(0o027)
    try:
        with mock.patch("os.umask", side_effect=AssertionError("umask changed")):
            out = convert(str(ASSISTANT), str(tmp_path / "out"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
