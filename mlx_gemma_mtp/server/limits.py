"""Bounds on the work one client can make the server do: the request body, the queue, the
tokens per request, connections; and a shutdown that does not wait for generations to end."""

import asyncio
import logging
import resource
import socket
from dataclasses import dataclass, replace

import uvicorn
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

# A new connection that has not sent a whole request head within this many seconds is closed
# (uvicorn's keep-alive timeout covers only the time between requests).
REQUEST_HEAD_TIMEOUT = 30.0
SEND_BUFFER = 64 << 10  # bytes a connection's socket and transport each hold unsent
# Seconds uvicorn waits for responses to end once their jobs are cancelled, then for the
# generation thread to finish its round: a signal stops the server within about 5 s.
SHUTDOWN_GRACE = 2.5
WORKER_GRACE = 1.5


@dataclass
class Limits:
    """Server-wide bounds; ``None`` ceilings are the model's context length."""

    max_queue: int = 64
    max_tokens: int | None = None
    max_prompt_tokens: int | None = None
    max_body_bytes: int = 16 << 20
    max_unread: int = 256
    stall_timeout: float = 30.0
    max_media_per_request: int = 8
    max_media_bytes: int = 16 << 20  # one image or clip, decoded

    def with_context(self, context: int) -> "Limits":
        """These limits, the unset ceilings filled with ``context``."""
        return replace(
            self,
            max_tokens=self.max_tokens or context,
            max_prompt_tokens=self.max_prompt_tokens or context,
        )


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (declared or as received) gets a 413
    before more of it is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        received = int(declared) if declared.isdigit() else 0

        async def limited():
            nonlocal received
            if received > self.max_bytes:
                raise HTTPException(413, f"the request body is over {self.max_bytes} bytes")
            message = await receive()
            if message["type"] == "http.request" and not declared.isdigit():
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"the request body is over {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited, send)


def cache_namespace(body) -> str:
    """Whose conversation caches a request may reuse: those sent with the same ``cache_salt``
    and ``user`` fields (all requests without them share one namespace)."""
    salt, user = getattr(body, "cache_salt", None), getattr(body, "user", None)
    if salt is None and user is None:
        return ""
    return f"{salt or ''}\0{user or ''}"


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that sends no request head in time,
    with bounded send buffers: a stream its client does not read stops being consumed after
    about ``SEND_BUFFER`` bytes (the kernel's own would hold megabytes of tokens), so its job
    pauses (``Job.max_unread``) and is dropped."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        transport.set_write_buffer_limits(high=SEND_BUFFER)
        self.loop.call_later(REQUEST_HEAD_TIMEOUT, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server; on SIGINT or SIGTERM it first cancels every job (``worker.stop``), so
    that running responses end with an error instead of keeping the server up."""

    def __init__(self, config: uvicorn.Config, worker):
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets=None) -> None:
        self.worker.stop()
        await super().shutdown(sockets)
        await asyncio.to_thread(self.worker.join, WORKER_GRACE)


def raise_open_files_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards ``wanted`` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft
