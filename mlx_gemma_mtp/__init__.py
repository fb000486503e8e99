"""Gemma 4 multi-token-prediction speculative decoding in MLX."""

from .config import ConfigError
from .loading import load

__version__ = "0.1.0"
__all__ = ["ConfigError", "load", "__version__"]
