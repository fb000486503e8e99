"""Gemma 4 multi-token-prediction speculative decoding in MLX."""

from .config import ConfigError
from .generation import generate, stream_generate
from .loading import load

__version__ = "0.1.0"
__all__ = ["ConfigError", "__version__", "generate", "load", "stream_generate"]
