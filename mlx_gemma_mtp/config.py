"""Reading Gemma 4 ``config.json`` files the way transformers does, for mlx-lm's ``ModelArgs``."""

import copy
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model folder or its ``config.json`` is not what we expect."""


TARGET_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
ASSISTANT_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")
# The 12B "unified" family runs mlx-lm's Gemma 4 text model unchanged (see normalize_unified_text).
MLX_LM_TYPES = {"gemma4_unified": "gemma4", "gemma4_unified_text": "gemma4_text"}
# transformers' Gemma4UnifiedTextConfig has no per-layer inputs and no MoE (the attributes do not
# exist, so its config.json lacks them), and defaults that differ from mlx-lm's gemma4_text
# ModelArgs; a key missing from a unified config.json means transformers' default.
UNIFIED_TEXT_DEFAULTS = {
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 0,
    "enable_moe_block": False,
    "num_kv_shared_layers": 0,
    "use_double_wide_mlp": False,
    "num_key_value_heads": 4,
    "sliding_window": 1024,
    "final_logit_softcapping": None,
    "max_position_embeddings": 262_144,
    "use_bidirectional_attention": "vision",
}
UNIFIED_SLIDING_WINDOW_PATTERN = 6  # transformers' default layer_types: 5 sliding, then 1 full


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
    if model_type not in TARGET_TYPES + ASSISTANT_TYPES:
        raise ConfigError(
            f"{config_file}: model_type {model_type!r} is not supported "
            f"(expected one of {', '.join(TARGET_TYPES + ASSISTANT_TYPES)})"
        )
    return config


def is_assistant(config: dict[str, Any]) -> bool:
    return config["model_type"] in ASSISTANT_TYPES


def normalize_unified_text(text_config: dict[str, Any], source: str) -> dict[str, Any]:
    """A ``gemma4_unified_text`` config (12B) as mlx-lm's ``gemma4_text`` reads it.

    The unified text model is Gemma 4's text model without per-layer inputs or MoE: same attention
    (q/k/v norms, ``attention_k_eq_v``, proportional RoPE on full layers), same MLP, same
    ``layer_scalar`` after each layer, same scaled embedding and softcapping. Its
    ``use_bidirectional_attention="vision"`` (the default) only changes the mask inside images
    (``media.MediaPrompt``); ``"all"`` (every token bidirectional) is not a causal LM.
    """
    if text_config.get("use_bidirectional_attention") == "all":
        raise ConfigError(
            f"{source}: use_bidirectional_attention 'all' makes every token attend both ways; "
            "only causal text models ('vision' or null) can be decoded"
        )
    config = {**UNIFIED_TEXT_DEFAULTS, **text_config, "model_type": "gemma4_text"}
    for key in ("hidden_size_per_layer_input", "enable_moe_block"):
        if config[key]:
            raise ConfigError(f"{source}: a gemma4_unified_text model has no {key}")
    if config.get("layer_types") is None:
        pattern = UNIFIED_SLIDING_WINDOW_PATTERN
        num_layers = config.get("num_hidden_layers", 30)
        config["layer_types"] = [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(num_layers)
        ]
    return config


def normalize_text_config(text_config: dict[str, Any], source: str = "config.json") -> dict:
    """Express transformers 5.x ``per_layer_config`` as the keys mlx-lm reads.

    transformers writes the full-attention head size (and, for ``attention_k_eq_v`` models, the
    full-attention K/V head count) per layer; mlx-lm's ``gemma4_text.ModelArgs`` reads
    ``global_head_dim`` and ``num_global_key_value_heads``.
    """
    config = copy.deepcopy(text_config)
    if config.get("model_type") == "gemma4_unified_text":
        config = normalize_unified_text(config, source)
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
    """A target config (``gemma4``, ``gemma4_text`` or their ``_unified`` 12B forms) ready for
    mlx-lm's ``ModelArgs``, with the ``model_type`` mlx-lm has a model for."""
    config = copy.deepcopy(config)
    if config["model_type"] in ("gemma4_text", "gemma4_unified_text"):
        return normalize_text_config(config, source)
    text_config = config.get("text_config")
    if not isinstance(text_config, dict):
        raise ConfigError(
            f"{source}: model_type {config['model_type']!r} needs a 'text_config' object"
        )
    if config["model_type"] == "gemma4_unified":
        text_config = {"model_type": "gemma4_unified_text", **text_config}
    config["model_type"] = MLX_LM_TYPES.get(config["model_type"], config["model_type"])
    config["text_config"] = normalize_text_config(text_config, source)
    # mlx-lm's gemma4.ModelArgs copies the top-level vocab_size (default 262144) into text_config.
    config.setdefault("vocab_size", text_config.get("vocab_size", 262144))
    return config


def text_config_of(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)
