"""Convert a Gemma 4 target or assistant checkpoint (Hugging Face safetensors) to MLX.

python -m mlx_gemma_mtp.convert --hf-path SRC --mlx-path DST [-q --q-bits 4 --q-group-size 64]
"""

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import click
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import get_total_parameters, quantize_model
from tqdm import tqdm

from .config import ConfigError, is_assistant, normalize_target_config, read_config
from .loading import (
    AUDIO_PREFIXES,
    DTYPES,
    cast,
    has_audio_tower,
    load_drafter_model,
    load_target_model,
    resolve_path,
    tower_weights,
    vision_prefixes,
    weight_files,
)

EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
# Every file the converter writes: the only files it accepts in, and deletes from, a destination.
OUTPUT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", *EXTRA_FILES)
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
EXPECTED_DESTINATION = "expected a new or empty folder, or a converted model (with --force)"
# Atomic exchange of two paths: Linux renameat2 (glibc 2.28+), macOS renamex_np.
AT_FDCWD, RENAME_EXCHANGE, RENAME_SWAP = -100, 2, 0x2
NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}  # kernel or file system
Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)


def convert(
    hf_path: str,
    mlx_path: str,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Convert one checkpoint (target or assistant, detected from config.json) into ``mlx_path``.

    The output is written to a temporary folder beside ``mlx_path`` and moved into place only
    when complete, so a failure never leaves a half-written folder. ``mlx_path`` must be new or
    empty, or with ``force`` a converted model (replaced; nothing else in it is ever deleted),
    and apart from the source. ``progress`` shows a bar while the weights are written.
    """
    check_options(q_bits, q_group_size, dtype)
    destination = Path(mlx_path).expanduser()
    local_source = Path(hf_path).expanduser()
    if local_source.exists():  # before anything is read; a hub snapshot is checked once fetched
        check_apart(local_source, destination)
    check_destination(destination, force)
    source = resolve_path(hf_path)
    check_apart(source, destination)
    model, config = prepare_model(source, dtype, quantize, q_bits, q_group_size)
    towers = tower_weights_to_keep(source, config)
    staging = make_staging(destination)
    try:
        write_model(staging, model, config, source, progress, towers)
        put_in_place(staging, destination, force)
    except BaseException:
        remove_output(staging)  # the new model, or once exchanged the old one
        raise
    return destination


def check_options(q_bits: int, q_group_size: int, dtype: str | None) -> None:
    if q_bits not in Q_BITS or q_group_size not in Q_GROUP_SIZES:
        raise ConfigError(
            f"quantization {q_bits} bits / group size {q_group_size} is not supported "
            f"(bits {Q_BITS}, group sizes {Q_GROUP_SIZES})"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported (expected one of {', '.join(DTYPES)})")


def check_apart(source: Path, destination: Path) -> None:
    """The output folder may neither be the source folder, nor hold it, nor lie inside it."""
    src, dst = source.resolve(), destination.resolve()
    if dst == src:
        relation = "is the source folder"
    elif dst in src.parents:
        relation = f"contains the source folder {source}"
    elif src in dst.parents:
        relation = f"is inside the source folder {source}"
    else:
        return
    raise ConfigError(f"--mlx-path {destination}: {relation}; expected a folder apart from it")


def check_destination(destination: Path, force: bool) -> bool:
    """Refuse a destination the converter may not fill or replace: a file, a link, a folder
    holding anything the converter does not write, a converted model without ``force``.
    Returns whether it holds a converted model (to replace)."""
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        kind = "a symbolic link" if destination.is_symlink() else "a file"
        raise ConfigError(f"--mlx-path {destination}: {kind}; {EXPECTED_DESTINATION}")
    if not destination.exists():
        return False
    entries = sorted(destination.iterdir())
    foreign = [entry.name for entry in entries if not is_output_file(entry)]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        shown = ", ".join(foreign[:3]) + more
        raise ConfigError(
            f"--mlx-path {destination}: holds {shown}, not written by the converter; "
            f"{EXPECTED_DESTINATION}"
        )
    if entries and not force:
        raise ConfigError(
            f"--mlx-path {destination}: already exists and is not empty "
            "(use --force to replace the converted model in it)"
        )
    return bool(entries)


def is_output_file(entry: Path) -> bool:
    """Whether ``entry`` is a plain file of a name the converter writes."""
    ours = entry.name in OUTPUT_FILES or SHARD_NAME.fullmatch(entry.name) is not None
    return ours and entry.is_file() and not entry.is_symlink()


def prepare_model(
    source: Path, dtype: str | None, quantize: bool, q_bits: int, q_group_size: int
) -> tuple[nn.Module, dict]:
    """The source's model (lazy) cast and quantized as asked, and the config to save with it."""
    model, config = load_for_conversion(source, read_config(source))
    dtype = dtype or config.get("dtype") or config.get("torch_dtype")
    cast(model, dtype)
    config = {**config, "dtype": dtype} if dtype else config
    if quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits)
    return model, config


def make_staging(destination: Path) -> Path:
    """A new folder beside ``destination`` (same file system, so moving it is a rename)."""
    # mkdir, not mkdtemp (mode 0o700): the folder gets the permissions the user's umask gives
    staging = destination.parent / f".{destination.name}-{uuid.uuid4().hex[:12]}"
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as e:
        raise ConfigError(f"--mlx-path {destination}: cannot create it ({e.strerror})") from None
    return staging


def put_in_place(staging: Path, destination: Path, force: bool) -> None:
    """Move the finished ``staging`` to ``destination``. A previous model is exchanged with the
    new one in one atomic step, then its converter files deleted from ``staging``: stopped
    anywhere, ``destination`` holds a whole model, the old or the new one. Where the OS has no
    exchange, the fallback renames the old model aside, the new one into place, then deletes the
    old one's converter files (stopped between the two renames, the old model is left only under
    its aside name)."""
    # Checked again: files may have appeared while converting.
    if not check_destination(destination, force):
        move_into_empty(staging, destination)
        return
    if exchange(staging, destination):
        remove_output(staging)
        return
    aside = destination.parent / f".{destination.name}-old-{uuid.uuid4().hex[:12]}"
    destination.rename(aside)
    try:
        staging.rename(destination)
    except BaseException:
        try:
            aside.rename(destination)
        except OSError as e:
            message = f"the previous model is left in {aside} ({e.strerror} moving it back)"
            print(f"{destination}: {message}", file=sys.stderr)
        raise
    remove_output(aside)


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step: True once swapped, False (nothing
    changed) where the OS has no exchange (no such call in the C library, a kernel or file system
    without it). Any other failure raises OSError."""
    path_a, path_b = os.fsencode(a), os.fsencode(b)
    if sys.platform == "linux":
        name, args = "renameat2", (AT_FDCWD, path_a, AT_FDCWD, path_b, RENAME_EXCHANGE)
    elif sys.platform == "darwin":
        name, args = "renamex_np", (path_a, path_b, RENAME_SWAP)
    else:
        return False
    call = getattr(ctypes.CDLL(None, use_errno=True), name, None)
    if call is None:
        return False
    if call(*args) == 0:
        return True
    code = ctypes.get_errno()
    if code in NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def move_into_empty(staging: Path, destination: Path) -> None:
    # rename(2) replaces an empty folder but fails on one that something filled meanwhile.
    try:
        staging.rename(destination)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise ConfigError(
            f"--mlx-path {destination}: filled by something else during the conversion "
            f"({e.strerror}); nothing was replaced"
        ) from None


def remove_output(folder: Path) -> None:
    """Delete the converter's files in ``folder``, then the folder if that empties it; anything
    else (written there by someone else meanwhile) stays, and the folder with it."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for entry in folder.iterdir():
        if is_output_file(entry):
            entry.unlink()
    try:
        folder.rmdir()
    except OSError:
        print(f"{folder}: kept, it holds files the converter did not write", file=sys.stderr)


def load_for_conversion(source: Path, config: dict) -> tuple[nn.Module, dict]:
    if is_assistant(config):
        return load_drafter_model(source, config, lazy=True), config
    model = load_target_model(source, config, lazy=True)
    # Saved in the form mlx-lm reads, so the converted target also loads with plain mlx_lm.load.
    return model, normalize_target_config(config, str(source / "config.json"))


def tower_weights_to_keep(source: Path, config: dict) -> dict:
    """The image encoder (gemma4's tower or the 12B's embedder) and gemma4's audio tower, kept in
    floating point (never quantized: they are small and their error would reach every media
    token) in the converted model's dtype, under their names without ``model.`` and in their own
    (PyTorch) layout."""
    prefixes = vision_prefixes(config)
    prefixes += AUDIO_PREFIXES if has_audio_tower(config) else ()
    if not prefixes:
        return {}
    dtype = config.get("dtype")
    weights = tower_weights(source, prefixes)
    if dtype in DTYPES:
        cast_to = getattr(mx, dtype)
        weights = {
            k: v.astype(cast_to) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    return weights


def write_model(
    folder: Path,
    model: nn.Module,
    config: dict,
    source: Path,
    progress: bool = False,
    towers: dict | None = None,
) -> None:
    shard_bytes = min(MAX_SHARD_BYTES, max(f.stat().st_size for f in weight_files(source)))
    save_weights(folder, model, shard_bytes, progress, towers or {})
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in EXTRA_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def save_weights(
    folder: Path, model: nn.Module, shard_bytes: int, progress: bool, towers: dict
) -> None:
    """mlx-lm's ``save_model`` with ``donate_model=True``, in shards of at most ``shard_bytes``
    (as large as the largest source file, so memory peaks near one shard, not at mlx-lm's 5 GB)
    and a progress bar. The model's weights are lazy (loaded, cast, quantized on demand): each
    tensor is computed alone, a shard is written and freed before the next one is computed."""
    weights = dict(tree_flatten(model.parameters())) | towers
    shards = split_shards(weights, shard_bytes)
    total = sum(w.nbytes for w in weights.values())
    index = {
        "metadata": {"total_size": total, "total_parameters": get_total_parameters(model)},
        "weight_map": {},
    }
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))  # only shards hold them
    weights.clear()
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
        for i, name in enumerate(names):
            shard, shards[i] = shards[i], None
            bar.set_description(f"Writing {name}")
            for weight in shard.values():
                mx.eval(weight)
                bar.update(weight.nbytes)
            mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
            index["weight_map"].update(dict.fromkeys(shard, name))
            del shard
            mx.clear_cache()
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def split_shards(weights: dict, shard_bytes: int) -> list[dict]:
    """Consecutive groups of ``weights`` of at most ``shard_bytes`` (a larger tensor alone)."""
    shards, size = [], 0
    for name, weight in weights.items():
        if not shards or size + weight.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weight
        size += weight.nbytes
    return shards


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--hf-path", required=True, help="Local HF folder or hub repo id (target or assistant)."
)
@click.option(
    "--mlx-path",
    required=True,
    help="Output folder: new or empty, or a converted model to replace with --force.",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights (affine).")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option(
    "--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True
)
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="Floating-point type of the saved weights (default: the checkpoint's).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace the converted model in --mlx-path (a folder holding anything else is refused).",
)
def main(hf_path, mlx_path, quantize, q_bits, q_group_size, dtype, force) -> None:
    """Convert a Gemma 4 target or Gemma 4 assistant checkpoint to MLX."""
    try:
        out = convert(
            hf_path,
            mlx_path,
            quantize,
            int(q_bits),
            int(q_group_size),
            dtype,
            force,
            progress=sys.stderr.isatty(),  # a bar on a terminal, nothing in logs and pipes
        )
    except ConfigError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    click.echo(f"Saved MLX model to {out} ({folder_size(out) / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
