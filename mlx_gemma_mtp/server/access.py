"""Who may call the server: a bearer API key, the names the Host header and a browser's Origin
may carry (against DNS rebinding), ``/docs`` only when asked, and model ids that are no paths."""

import ipaddress
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from .protocol import error_response

logger = logging.getLogger(__name__)
API_KEY_VARIABLE = "MLX_GEMMA_MTP_API_KEY"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def host_name(host: str) -> str:
    """``host`` (a Host header, a URL's netloc or an address) without its port, lower case,
    an IPv6 address in brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    if host.count(":") > 1:  # a bare IPv6 address
        return f"[{host}]"
    return host.partition(":")[0]


@dataclass(frozen=True)
class Access:
    """Who may call the server: a bearer ``api_key`` (None: anyone), the names the Host header
    and a browser's Origin may carry (``*``: any; the rest of the world reaching a loopback
    server through DNS rebinding is refused), and whether ``/docs`` is served."""

    api_key: str | None = None
    hosts: tuple[str, ...] = LOOPBACK_HOSTS
    docs: bool = False

    @classmethod
    def for_bind(cls, bound: str, allowed: Sequence[str] = (), **kwargs) -> "Access":
        hosts = tuple(dict.fromkeys([*LOOPBACK_HOSTS, host_name(bound), *map(host_name, allowed)]))
        return cls(hosts=hosts, **kwargs)

    def refusal(self, headers: Headers):
        """The error response for a request with these headers, or None to serve it."""
        anywhere = "*" in self.hosts
        host = host_name(headers.get("host", ""))
        if not anywhere and host not in self.hosts:
            return error_response(
                400,
                f"Host {host!r} is not allowed: start the server with --allowed-hosts {host} "
                "to serve it under that name",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        origin_host = None if origin is None else host_name(urlsplit(origin).netloc)
        if origin_host is not None and not anywhere and origin_host not in self.hosts:
            message = f"Origin {origin!r} is not allowed"
            return error_response(403, message, code="origin_not_allowed")
        if self.api_key is not None and not secrets.compare_digest(
            headers.get("authorization", "").encode(), f"Bearer {self.api_key}".encode()
        ):
            response = error_response(
                401, "a valid API key is needed (Authorization: Bearer KEY)", code="invalid_api_key"
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return None


class Guard:
    """ASGI middleware: ``Access`` checked on every HTTP request, before any endpoint."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.access.refusal(Headers(scope=scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    name = host_name(host).strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and api_key is None:
        logger.warning(
            "serving on %s, beyond loopback, without an API key: anyone who can reach it can "
            "use it (pass --api-key or set %s)",
            host,
            API_KEY_VARIABLE,
        )


def served_name(model: str) -> str:
    """The model's id in the API: a local folder's name (never its path), else the hub id."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model
