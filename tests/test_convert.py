"""Converter and loader: round trip, quantization, one-line errors for bad input, and a
converter that never deletes what it did not write."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURE
from mlx.utils import tree_flatten

import mlx_gemma_mtp.convert as converter
from mlx_gemma_mtp import ConfigError, load
from mlx_gemma_mtp.config import read_config
from mlx_gemma_mtp.convert import convert, exchange, main
from mlx_gemma_mtp.loading import load_drafter_model

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


def header_longer_than_the_file(tmp_path):
    folder = copy_model(ASSISTANT, tmp_path / "model")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(len(data).to_bytes(8, "little") + data[8:])
    return folder, "model.safetensors: truncated safetensors file"


def corrupt_header(tmp_path):
    folder = copy_model(ASSISTANT, tmp_path / "model")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:8] + b"[" + data[9:])  # not a JSON object
    return folder, "model.safetensors: not a valid safetensors file"


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
    header_longer_than_the_file,
    corrupt_header,
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


def tree_contents(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def drafter_dtype(folder: Path) -> mx.Dtype:
    """The dtype of a converted assistant's weights, once loaded (so the folder is usable)."""
    return load_drafter_model(folder, read_config(folder)).model.embed_tokens.weight.dtype


def previous_model(tmp_path: Path) -> Path:
    """A converted assistant (float16) to be replaced by a float32 conversion."""
    return convert(str(ASSISTANT), str(tmp_path / "out"), dtype="float16")


def test_force_replaces_a_converted_model_and_only_it(tmp_path):
    split_checkpoint(ASSISTANT, tmp_path / "split", 3)
    out = convert(str(tmp_path / "split"), str(tmp_path / "out"), dtype="float32")
    fresh = convert(str(ASSISTANT), str(tmp_path / "fresh"), dtype="float16")
    names = {p.name for p in fresh.iterdir()}
    assert {p.name for p in out.iterdir()} - names  # shards the new model does not have
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        convert(str(ASSISTANT), str(out), dtype="float16")
    convert(str(ASSISTANT), str(out), dtype="float16", force=True)
    assert drafter_dtype(out) == mx.float16
    assert {p.name for p in out.iterdir()} == names  # replaced, not written over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out", "split"]


@pytest.mark.parametrize("relation", ["source", "parent", "inside"])
def test_destination_overlapping_the_source_is_refused(tmp_path, relation):
    source = copy_model(ASSISTANT, tmp_path / "work" / "source")
    (tmp_path / "work" / "notes.txt").write_text("mine")
    before = tree_contents(tmp_path)
    destination = {"source": source, "parent": source.parent, "inside": source / "mlx"}[relation]
    message = {"source": "is the source", "parent": "contains", "inside": "is inside"}[relation]
    with pytest.raises(ConfigError, match=re.escape(f"--mlx-path {destination}: {message}")):
        convert(str(source), str(destination), force=True)
    assert tree_contents(tmp_path) == before


def test_cli_refuses_the_parent_of_the_source_in_one_line(tmp_path):
    source = copy_model(ASSISTANT, tmp_path / "source")
    before = tree_contents(tmp_path)
    result = CliRunner().invoke(
        main, ["--hf-path", str(source), "--mlx-path", str(tmp_path), "--force"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output == f"Error: --mlx-path {tmp_path}: contains the source folder " + (
        f"{source}; expected a folder apart from it\n"
    )
    assert tree_contents(tmp_path) == before


@pytest.mark.parametrize("force", [False, True])
def test_destination_with_a_foreign_file_is_refused(tmp_path, force):
    out = previous_model(tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "shards").mkdir()
    before = tree_contents(tmp_path)
    with pytest.raises(ConfigError, match="holds notes.txt, shards, not written by the converter"):
        convert(str(ASSISTANT), str(out), dtype="float32", force=force)
    assert tree_contents(tmp_path) == before and drafter_dtype(out) == mx.float16


@pytest.mark.parametrize("force", [False, True])
def test_plain_file_as_destination_is_a_one_line_error(tmp_path, force):
    (tmp_path / "out").write_text("mine")
    args = ["--hf-path", str(ASSISTANT), "--mlx-path", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args + ["--force"] * force)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # no traceback
    assert result.output == (
        f"Error: --mlx-path {tmp_path / 'out'}: a file; expected a new or empty folder, "
        "or a converted model (with --force)\n"
    )
    assert (tmp_path / "out").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def write_then_drop_a_file(monkeypatch, folder: Path, after: str) -> None:
    """Someone else writes ``folder/notes.txt`` once the converter has called ``after`` (for
    ``check_destination``: its second call, the check just before the move)."""
    real, calls = getattr(converter, after), []

    def then_drop(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(args)
        if after == "write_model" or len(calls) == 2:
            folder.mkdir(exist_ok=True)
            (folder / "notes.txt").write_text("mine")
        return result

    monkeypatch.setattr(converter, after, then_drop)


@pytest.mark.parametrize("force", [False, True])
def test_file_written_during_conversion_is_kept_and_nothing_replaced(tmp_path, monkeypatch, force):
    out = previous_model(tmp_path) if force else tmp_path / "out"
    write_then_drop_a_file(monkeypatch, out, after="write_model")
    with pytest.raises(ConfigError, match="holds notes.txt, not written by the converter"):
        convert(str(ASSISTANT), str(out), dtype="float32", force=force)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the new model removed
    if force:
        assert drafter_dtype(out) == mx.float16


def test_file_written_into_an_empty_destination_just_before_the_move_is_kept(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    write_then_drop_a_file(monkeypatch, out, after="check_destination")
    with pytest.raises(ConfigError, match="filled by something else during the conversion"):
        convert(str(ASSISTANT), str(out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_file_written_into_the_old_model_just_before_the_move_is_kept(
    tmp_path, monkeypatch, capsys
):
    out = previous_model(tmp_path)
    write_then_drop_a_file(monkeypatch, out, after="check_destination")
    convert(str(ASSISTANT), str(out), dtype="float32", force=True)
    assert drafter_dtype(out) == mx.float32
    [aside] = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert [p.name for p in aside.iterdir()] == ["notes.txt"]  # the old model's files deleted
    assert (aside / "notes.txt").read_text() == "mine"
    assert f"{aside}: kept, it holds files the converter did not write" in capsys.readouterr().err


def fail_on_call(real, call: int):
    """``real``, raising instead on its ``call``-th call (a conversion stopped there)."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise OSError("stopped here")
        return real(*args, **kwargs)

    return failing


STOPS = {  # where a conversion stops, what it patches, at which call, the model the folder holds
    "writing a shard": (mx, "save_safetensors", 1, mx.float16),
    "copying the tokenizer": (shutil, "copy", 2, mx.float16),
    "exchanging the two folders": (converter, "exchange", 1, mx.float16),
    "deleting the old model": (Path, "unlink", 3, mx.float32),
}
FALLBACK_STOPS = {  # the same where the OS has no exchange (two renames)
    "moving the old model aside": (Path, "rename", 1, mx.float16),
    "moving the new model into place": (Path, "rename", 2, mx.float16),
    "deleting the old model": (Path, "unlink", 3, mx.float32),
}


def no_exchange(a: Path, b: Path) -> bool:
    return False


@pytest.mark.parametrize(
    "stop, fallback",
    [(stop, False) for stop in STOPS] + [(stop, True) for stop in FALLBACK_STOPS],
)
def test_conversion_stopped_anywhere_leaves_a_usable_model(tmp_path, monkeypatch, stop, fallback):
    out = previous_model(tmp_path)
    owner, name, call, held = (FALLBACK_STOPS if fallback else STOPS)[stop]
    if fallback:
        monkeypatch.setattr(converter, "exchange", no_exchange)
    monkeypatch.setattr(owner, name, fail_on_call(getattr(owner, name), call))
    with pytest.raises(OSError, match="stopped here"):
        convert(str(ASSISTANT), str(out), dtype="float32", force=True)
    monkeypatch.undo()
    assert drafter_dtype(out) == held
    if held == mx.float16:  # nothing left beside it
        assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture
def atomic_exchange(tmp_path):
    """Skips the test where this OS or file system has no atomic exchange (tried on two
    folders, removed again)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    swapped = exchange(a, b)
    a.rmdir()
    b.rmdir()
    if not swapped:
        pytest.skip("no atomic exchange of folders here")


def test_exchange_swaps_two_folders(tmp_path, atomic_exchange):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "inner").mkdir(parents=True)
    (a / "inner" / "x").write_text("from a")
    b.mkdir()
    (b / "y").write_text("from b")
    assert exchange(a, b)
    assert [p.name for p in a.iterdir()] == ["y"] and (a / "y").read_text() == "from b"
    assert [p.name for p in b.iterdir()] == ["inner"] and (
        b / "inner" / "x"
    ).read_text() == "from a"
    with pytest.raises(FileNotFoundError):  # a real failure raises, it is no fallback
        exchange(a, tmp_path / "missing")
    assert (a / "y").exists()


def test_force_replaces_the_model_in_one_exchange_without_renames(
    tmp_path, monkeypatch, atomic_exchange
):
    out = previous_model(tmp_path)
    swaps = []

    def recorded(a: Path, b: Path) -> bool:
        swaps.append((a, b))
        return exchange(a, b)

    def no_rename(*args, **kwargs):
        raise AssertionError(f"renamed {args}")

    monkeypatch.setattr(converter, "exchange", recorded)
    monkeypatch.setattr(os, "rename", no_rename)  # what Path.rename calls
    convert(str(ASSISTANT), str(out), dtype="float32", force=True)
    monkeypatch.undo()
    [(staging, destination)] = swaps
    assert destination == out and staging.parent == tmp_path and not staging.exists()
    assert drafter_dtype(out) == mx.float32
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old model deleted


def test_force_without_an_exchange_renames_twice(tmp_path, monkeypatch):
    out = previous_model(tmp_path)
    real, renames = os.rename, []

    def recorded(a, b):
        renames.append((Path(a), Path(b)))
        real(a, b)

    monkeypatch.setattr(converter, "exchange", no_exchange)
    monkeypatch.setattr(os, "rename", recorded)
    convert(str(ASSISTANT), str(out), dtype="float32", force=True)
    monkeypatch.undo()
    [(old, aside), (staging, new)] = renames
    assert old == new == out and aside.name.startswith(".out-old-") and staging != aside
    assert drafter_dtype(out) == mx.float32
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_fallback_names_the_aside_folder_when_the_old_model_cannot_move_back(
    tmp_path, monkeypatch, capsys
):
    out = previous_model(tmp_path)
    real, renames = os.rename, []

    def failing_after_the_first(a, b):
        renames.append(a)
        if len(renames) > 1:
            raise OSError(errno.EIO, "stopped here")
        real(a, b)

    monkeypatch.setattr(converter, "exchange", no_exchange)
    monkeypatch.setattr(os, "rename", failing_after_the_first)
    with pytest.raises(OSError, match="stopped here"):
        convert(str(ASSISTANT), str(out), dtype="float32", force=True)
    monkeypatch.undo()
    [aside] = tmp_path.iterdir()  # the new model removed, the old one only aside
    assert aside.name.startswith(".out-old-") and drafter_dtype(aside) == mx.float16
    message = f"{out}: the previous model is left in {aside} (stopped here moving it back)\n"
    assert capsys.readouterr().err == message


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
