"""Load a Gemma 4 target and its assistant drafter from MLX folders, HF folders or hub repo ids."""

import glob
import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_model, load_tokenizer
from safetensors import SafetensorError, safe_open

from .config import (
    ASSISTANT_TYPES,
    ConfigError,
    is_assistant,
    normalize_target_config,
    read_config,
)
from .models import gemma4_assistant
from .models.centroid_head import check_permutation
from .models.target import Target

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DTYPES = ("float16", "bfloat16", "float32")
# How safetensors says a file is shorter (or longer) than its header promises.
TRUNCATION_SIGNS = ("header too small", "invalid header length", "not fully covered")
# Weights of the vision/audio parts of multimodal checkpoints (mlx-lm's gemma4 sanitize drops them).
MULTIMODAL_PREFIXES = (
    "vision_tower",
    "audio_tower",
    "embed_vision",
    "embed_audio",
    "multi_modal_projector",
    "vision_embedder",
)
# Loaded from the target's folder when media arrive (media.py): gemma4's towers and the 12B's
# encoder-free image embedder (its checkpoint's names, which transformers renames when loading).
VISION_PREFIXES = ("vision_tower", "embed_vision")
UNIFIED_VISION_PREFIXES = ("vision_embedder", "embed_vision")
AUDIO_PREFIXES = ("audio_tower", "embed_audio")


def has_vision_tower(config: dict) -> bool:
    """A ``gemma4`` checkpoint with the SigLIP-like image encoder (not the 12B's embedder)."""
    vision = config.get("vision_config")
    return (
        config.get("model_type") == "gemma4"
        and isinstance(vision, dict)
        and vision.get("model_type", "gemma4_vision") == "gemma4_vision"
    )


def has_unified_vision(config: dict) -> bool:
    """A 12B checkpoint (``gemma4_unified``, or ``gemma4`` once converted) with the encoder-free
    image embedder."""
    vision = config.get("vision_config")
    return (
        config.get("model_type") in ("gemma4_unified", "gemma4")
        and isinstance(vision, dict)
        and vision.get("model_type") == "gemma4_unified_vision"
    )


def vision_prefixes(config: dict) -> tuple[str, ...]:
    """The weight prefixes of the target's image encoder, none without one."""
    if has_vision_tower(config):
        return VISION_PREFIXES
    return UNIFIED_VISION_PREFIXES if has_unified_vision(config) else ()


def resolve_path(path_or_repo: str) -> Path:
    """A local folder as is; anything else is a hub repo id fetched with huggingface_hub."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path}: not a folder (expected a model folder with config.json)")
        return path
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~")):
        raise ConfigError(f"{path_or_repo}: no such folder, and not a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    try:
        return Path(snapshot_download(path_or_repo, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo...
        raise ConfigError(
            f"{path_or_repo}: could not fetch it from the Hugging Face hub ({type(e).__name__}). "
            f"Download it where the hub is reachable "
            f"(`hf download {path_or_repo} --local-dir DIR`) and pass DIR instead"
        ) from None


def weight_files(model_path: Path) -> list[Path]:
    files = sorted(Path(f) for f in glob.glob(str(model_path / "model*.safetensors")))
    if not files:
        raise ConfigError(f"{model_path}: no model*.safetensors weight files")
    for file in files:
        check_safetensors(file)
    return files


def weight_names(model_path: Path) -> set[str]:
    """The tensor names of a folder's (checked) safetensors files, read from their headers."""
    return {name for file in weight_files(model_path) for name in check_safetensors(file)}


def check_safetensors(file: Path) -> list[str]:
    """Fail early, naming the file, on a truncated or corrupt safetensors file; returns the
    tensor names."""
    try:
        with safe_open(file, framework="numpy") as f:  # reads and checks the header only
            return list(f.keys())
    except SafetensorError as e:
        detail = str(e).removeprefix("Error while deserializing header: ")
    size = file.stat().st_size
    if any(sign in detail for sign in TRUNCATION_SIGNS):
        raise ConfigError(
            f"{file}: truncated safetensors file ({size} bytes, not what its header promises)"
        )
    raise ConfigError(f"{file}: not a valid safetensors file ({detail})")


def cast(model: nn.Module, dtype: str | None) -> None:
    if dtype is None:
        return
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported (expected one of {', '.join(DTYPES)})")
    model.set_dtype(getattr(mx, dtype))


def load_target_model(model_path: Path, config: dict, lazy: bool = False) -> nn.Module:
    if is_assistant(config):
        raise ConfigError(
            f"{model_path / 'config.json'}: model_type {config['model_type']!r} is an assistant "
            "drafter; pass it as the draft model, and a Gemma 4 target as the model"
        )
    report_skipped_towers(model_path, weight_names(model_path), config)
    normalized = normalize_target_config(config, str(model_path / "config.json"))
    try:
        model, _ = load_model(model_path, lazy=lazy, model_config=normalized)
    except ValueError as e:
        raise ConfigError(
            f"{model_path}: weights do not match config.json ({one_line(e)})"
        ) from None
    return model


def tower_weights(model_path: Path, prefixes: tuple[str, ...]) -> dict:
    """The named tower's weights, from an HF folder (``model.`` names) or a converted one."""
    weights = {}
    for file in weight_files(model_path):
        for name, value in mx.load(str(file)).items():
            short = name.removeprefix("model.")
            if short.startswith(prefixes):
                weights[short] = value
    return weights


def has_audio_tower(config: dict) -> bool:
    """A ``gemma4`` checkpoint with the conformer audio encoder (E2B/E4B)."""
    audio = config.get("audio_config")
    return (
        config.get("model_type") == "gemma4"
        and isinstance(audio, dict)
        and audio.get("model_type", "gemma4_audio") == "gemma4_audio"
    )


def report_skipped_towers(model_path: Path, names: set[str], config: dict) -> None:
    """Say (one line) which multimodal parts of a checkpoint are never used: the image encoders
    and gemma4's audio tower load when media arrive, anything else (the 12B's audio embedder) is
    text only."""
    present = {
        p for n in names for p in MULTIMODAL_PREFIXES if n.removeprefix("model.").startswith(p)
    }
    used = set(vision_prefixes(config))
    used |= set(AUDIO_PREFIXES) if has_audio_tower(config) else set()
    skipped = sorted(present - used)
    if skipped:
        what = "not loading" if used else "text generation only, not loading"
        print(f"{model_path}: {what} {', '.join(skipped)}", file=sys.stderr)


def drafter_classes(config: dict) -> tuple[type, type]:
    return gemma4_assistant.Model, gemma4_assistant.ModelArgs


def load_drafter_model(model_path: Path, config: dict, lazy: bool = False) -> nn.Module:
    """mlx-lm's ``load_model`` with our drafter class: quantized drafters load as mlx-lm loads
    quantized models (per-path overrides, bits and group size inferred per layer)."""
    source = model_path / "config.json"
    if not is_assistant(config):
        raise ConfigError(
            f"{source}: model_type {config['model_type']!r} is a target model, not a Gemma 4 "
            f"assistant drafter (model_type one of {', '.join(ASSISTANT_TYPES)})"
        )
    if not isinstance(config.get("text_config"), dict):
        raise ConfigError(f"{source}: an assistant config needs a 'text_config' object")
    ordered = config.get("use_ordered_embeddings")
    if "masked_embedding.token_ordering" not in weight_names(model_path) and ordered:
        raise ConfigError(
            f"{model_path}: weights lack masked_embedding.token_ordering, required because "
            "use_ordered_embeddings is true"
        )
    try:
        model, _ = load_model(
            model_path, lazy=True, model_config=config, get_model_classes=drafter_classes
        )
    except ValueError as e:
        raise ConfigError(
            f"{model_path}: weights do not match config.json ({one_line(e)})"
        ) from None
    if ordered:
        check_token_ordering(model_path, model.masked_embedding.token_ordering, model.vocab_size)
    if not lazy:
        mx.eval(model.parameters())
    return model


def check_token_ordering(model_path: Path, token_ordering: mx.array, vocab_size: int) -> None:
    try:
        check_permutation(token_ordering, vocab_size)
    except ValueError:
        raise ConfigError(
            f"{model_path}: masked_embedding.token_ordering is not a permutation of the "
            f"{vocab_size} vocabulary ids"
        ) from None


def load_tokenizer_if_any(model_path: Path, config: dict) -> Any:
    if not any((model_path / name).exists() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(model_path, eos_token_ids=eos_ids(model_path, config))


def eos_ids(model_path: Path, config: dict) -> list[int] | None:
    """All EOS ids: config.json's and generation_config.json's."""
    ids = []
    for source in (config, read_json(model_path / "generation_config.json")):
        eos = source.get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted(set(ids)) or None


def read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def validate_pair(target: Target, drafter: nn.Module) -> None:
    """The drafter must read the target's K/V and hidden state as they are."""
    t, d = target.args, drafter.args.text_args
    checks = [
        (
            "hidden size (drafter backbone_hidden_size)",
            t.hidden_size,
            drafter.args.backbone_hidden_size,
        ),
        ("vocab size", t.vocab_size, d.vocab_size),
        ("sliding_window", t.sliding_window, d.sliding_window),
        ("sliding head_dim", t.head_dim, d.head_dim),
        ("full-attention head_dim", t.global_head_dim, d.global_head_dim),
        ("sliding K/V heads", t.num_key_value_heads, d.num_key_value_heads),
        ("full-attention K/V heads", full_kv_heads(t), full_kv_heads(d)),
    ]
    for name, target_value, drafter_value in checks:
        if target_value != drafter_value:
            raise ConfigError(
                f"target and drafter do not match: {name} is {target_value} in the target "
                f"but {drafter_value} in the drafter"
            )
    missing = set(d.layer_types) - set(target.shared_kv_layers)
    if missing:
        raise ConfigError(f"target has no K/V-computing layer of type(s) {sorted(missing)}")


def full_kv_heads(args) -> int:
    if args.attention_k_eq_v and args.num_global_key_value_heads is not None:
        return args.num_global_key_value_heads
    return args.num_key_value_heads


def all_arrays(module: nn.Module) -> dict:
    """Every array of ``module``, private ones too (mlx-lm's RoPE keeps its frequencies in
    ``_freqs``): one left lazy belongs to the loading thread's stream, and MLX then refuses to
    evaluate it on any other thread ("There is no Stream(cpu, 0) in current thread")."""
    return module.filter_and_map(lambda _, __, value: isinstance(value, (dict, list, mx.array)))


def load(
    model: str, draft_model: str | None = None, dtype: str | None = None, lazy: bool = False
) -> tuple[Target, nn.Module | None, Any]:
    """Load ``(target, drafter, tokenizer)``; ``draft_model=None`` gives no drafter.

    Each path may be a converted MLX folder, an unconverted Hugging Face folder, or a hub repo id.
    ``dtype`` casts floating-point weights (e.g. ``"float32"`` for exact comparisons).
    """
    target_path = resolve_path(model)
    target_config = read_config(target_path)
    target = Target(load_target_model(target_path, target_config, lazy))
    target.source = (target_path, target_config)  # where media.py finds the image encoder
    cast(target.model, dtype)
    drafter = None
    if draft_model is not None:
        draft_path = resolve_path(draft_model)
        drafter = load_drafter_model(draft_path, read_config(draft_path), lazy)
        cast(drafter, dtype)
        drafter.order_lm_head()
        validate_pair(target, drafter)
    if not lazy:  # casting and reordering are lazy; a compiled draft step would redo them
        mx.eval(all_arrays(target.model), all_arrays(drafter) if drafter is not None else [])
    tokenizer = load_tokenizer_if_any(target_path, target_config)
    return target, drafter, tokenizer
