"""Reading Gemma 4 ``config.json`` files the way transformers does, for mlx-lm's ``ModelArgs``."""

import copy
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model folder or its ``config.json`` is not what we expect."""


TARGET_TYPES = ("gemma4", "gemma4_text")
ASSISTANT_TYPE = "gemma4_assistant"


def read_config(model_path: Path) -> dict[str, Any]:
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: missing (every model folder needs a config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{config_file}: no 'model_type' field")
    model_type = config["model_type"]
    if model_type not in TARGET_TYPES + (ASSISTANT_TYPE,):
        raise ConfigError(
            f"{config_file}: model_type {model_type!r} is not supported "
            f"(expected one of {', '.join(TARGET_TYPES + (ASSISTANT_TYPE,))})"
        )
    return config


def normalize_text_config(text_config: dict[str, Any], source: str = "config.json") -> dict:
    """Express transformers 5.x ``per_layer_config`` as the keys mlx-lm reads.

    transformers writes the full-attention head size (and, for ``attention_k_eq_v`` models, the
    full-attention K/V head count) per layer; mlx-lm's ``gemma4_text.ModelArgs`` reads
    ``global_head_dim`` and ``num_global_key_value_heads``.
    """
    config = copy.deepcopy(text_config)
    per_layer = config.pop("per_layer_config", None)
    if not per_layer:
        return config
    layer_types = config.get("layer_types") or []
    full_layers = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    overrides = {}
    for idx, layer_config in per_layer.items():
        idx = int(idx)
        if idx >= len(layer_types) or layer_types[idx] != "full_attention":
            raise ConfigError(
                f"{source}: per_layer_config overrides layer {idx}, which is not a "
                "full_attention layer; only full-attention overrides are supported"
            )
        for key, value in layer_config.items():
            if overrides.setdefault(key, value) != value:
                raise ConfigError(
                    f"{source}: per_layer_config gives full-attention layers different "
                    f"{key} values ({overrides[key]} and {value})"
                )
    missing = [i for i in full_layers if str(i) not in per_layer and i not in per_layer]
    if missing and overrides:
        raise ConfigError(f"{source}: per_layer_config has no entry for full layers {missing}")
    mapping = {"head_dim": "global_head_dim", "num_key_value_heads": "num_global_key_value_heads"}
    # Without overrides transformers uses the sliding head_dim for full layers too.
    overrides.setdefault("head_dim", config.get("head_dim", 256))
    for key, value in overrides.items():
        if key not in mapping:
            raise ConfigError(f"{source}: per_layer_config key {key!r} is not supported")
        mlx_key = mapping[key]
        if config.get(mlx_key) is not None and config[mlx_key] != value:
            raise ConfigError(
                f"{source}: {mlx_key} is {config[mlx_key]} but per_layer_config says {key} {value}"
            )
        config[mlx_key] = value
    return config


def normalize_target_config(config: dict[str, Any], source: str = "config.json") -> dict:
    """A target config (``gemma4`` or ``gemma4_text``) ready for mlx-lm's ``ModelArgs``."""
    config = copy.deepcopy(config)
    if config["model_type"] == "gemma4_text":
        return normalize_text_config(config, source)
    text_config = config.get("text_config")
    if not isinstance(text_config, dict):
        raise ConfigError(f"{source}: model_type 'gemma4' needs a 'text_config' object")
    config["text_config"] = normalize_text_config(text_config, source)
    # mlx-lm's gemma4.ModelArgs copies the top-level vocab_size (default 262144) into text_config.
    config.setdefault("vocab_size", text_config.get("vocab_size", 262144))
    return config


def text_config_of(config: dict[str, Any]) -> dict[str, Any]:
    return config["text_config"] if config["model_type"] != "gemma4_text" else config
