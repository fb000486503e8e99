"""OpenAI-compatible server: ``python -m mlx_gemma_mtp.server --model T --draft-model D``.

``protocol`` (request bodies, responses, errors), ``tools`` (tool calls), ``attachments``
(images and audio in chat messages: their sources and bounds), ``access`` (API key, Host/Origin
checks), ``worker`` (the generation thread, jobs and the conversation caches),
``limits`` (bounds on bodies, queue, tokens and connections; shutdown), ``app`` (the FastAPI app
and the command line).

FastAPI parses and validates requests (pydantic) and streams server-sent events; uvicorn serves
them. Generation runs on one thread, one request at a time in arrival order; each request starts
from the best cached prefix of its own namespace in a small LRU (bounded in entries and bytes),
so a conversation's next turn only feeds its new tokens.
"""

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # an optional extra
    raise ImportError(
        f"the server needs FastAPI and uvicorn ({e.name} is missing): "
        "pip install 'mlx-gemma-mtp[server]'"
    ) from None

from .app import create_app, main
from .worker import PromptCacheLRU, Worker

__all__ = ["PromptCacheLRU", "Worker", "create_app", "main"]
