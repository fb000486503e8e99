"""Convert a Gemma 4 target or assistant checkpoint (Hugging Face safetensors) to MLX.

python -m mlx_gemma_mtp.convert --hf-path SRC --mlx-path DST [-q --q-bits 4 --q-group-size 64]
"""

import json
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
    DTYPES,
    cast,
    load_drafter_model,
    load_target_model,
    resolve_path,
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
)
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
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
    when complete, so a failure never leaves a half-written folder. ``progress`` shows a bar
    while the weights are written.
    """
    if q_bits not in Q_BITS or q_group_size not in Q_GROUP_SIZES:
        raise ConfigError(
            f"quantization {q_bits} bits / group size {q_group_size} is not supported "
            f"(bits {Q_BITS}, group sizes {Q_GROUP_SIZES})"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported (expected one of {', '.join(DTYPES)})")
    destination = Path(mlx_path).expanduser()
    is_empty_dir = destination.is_dir() and not any(destination.iterdir())
    if destination.exists() and not is_empty_dir and not force:
        raise ConfigError(f"{destination}: already exists and is not empty (use --force)")
    source = resolve_path(hf_path)
    config = read_config(source)
    model, config = load_for_conversion(source, config)
    dtype = dtype or config.get("dtype") or config.get("torch_dtype")
    cast(model, dtype)
    config = {**config, "dtype": dtype} if dtype else config
    if quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp (mode 0o700): the folder gets the permissions the user's umask gives
    staging = destination.parent / f".{destination.name}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        write_model(staging, model, config, source, progress)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def load_for_conversion(source: Path, config: dict) -> tuple[nn.Module, dict]:
    if is_assistant(config):
        return load_drafter_model(source, config, lazy=True), config
    model = load_target_model(source, config, lazy=True)
    # Saved in the form mlx-lm reads, so the converted target also loads with plain mlx_lm.load.
    return model, normalize_target_config(config, str(source / "config.json"))


def write_model(
    folder: Path, model: nn.Module, config: dict, source: Path, progress: bool = False
) -> None:
    shard_bytes = min(MAX_SHARD_BYTES, max(f.stat().st_size for f in weight_files(source)))
    save_weights(folder, model, shard_bytes, progress)
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in EXTRA_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def save_weights(folder: Path, model: nn.Module, shard_bytes: int, progress: bool) -> None:
    """mlx-lm's ``save_model`` with ``donate_model=True``, in shards of at most ``shard_bytes``
    (as large as the largest source file, so memory peaks near one shard, not at mlx-lm's 5 GB)
    and a progress bar. The model's weights are lazy (loaded, cast, quantized on demand): each
    tensor is computed alone, a shard is written and freed before the next one is computed."""
    weights = dict(tree_flatten(model.parameters()))
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
@click.option("--mlx-path", required=True, help="Output folder (must not exist or be empty).")
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
@click.option("--force", is_flag=True, help="Replace a non-empty --mlx-path.")
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
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(f"Saved MLX model to {out} ({folder_size(out) / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
