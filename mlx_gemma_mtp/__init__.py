"""Gemma 4 multi-token-prediction speculative decoding in MLX."""

from .config import ConfigError
from .engine.prompt_cache import (
    PromptCache,
    load_prompt_cache,
    save_prompt_cache,
    trim_to_common_prefix,
)
from .generation import (
    GenerationResponse,
    batch_generate,
    generate,
    make_prompt_cache,
    stream_generate,
)
from .loading import load

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "GenerationResponse",
    "PromptCache",
    "__version__",
    "batch_generate",
    "generate",
    "load",
    "load_prompt_cache",
    "make_prompt_cache",
    "save_prompt_cache",
    "stream_generate",
    "trim_to_common_prefix",
]
