"""Images and audio in chat messages: the parts found (in user and assistant messages, at most
``max_media_per_request``), checked against the model's config.json, and read into bytes from
their sources: base64 data (``input_audio``, ``data:`` URLs) always; local files only inside
the directories the server allows (resolved, symlinks too); http(s) URLs only when it allows
remote media, fetched within a timeout and the byte limit. Every refusal is a 400 naming the part,
and logged."""

import base64
import binascii
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..media import MediaError, NamedBytes, missing_tower, placeholder_ids, read_media_bytes
from .protocol import MEDIA_KINDS, AudioPart, BadRequest, ChatRequest, ImagePart

logger = logging.getLogger(__name__)

FETCH_TIMEOUT = 10.0  # seconds a remote image may take, connection to last byte
FETCH_CHUNK = 64 << 10
# Gemma 4's chat template writes an image or audio entry where it stands in these roles' content;
# system (and developer) content it writes as one string, a tool's as its text parts only.
MEDIA_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class MediaSources:
    """Where an ``image_url`` may point besides a ``data:`` URL: a file inside one of
    ``allowed_dirs``, an http(s) URL if ``allow_remote``."""

    allowed_dirs: Sequence[str | Path] = ()
    allow_remote: bool = False
    fetch_timeout: float = FETCH_TIMEOUT

    def __post_init__(self):
        # Resolved once, symlinks too: a file is inside when its resolved path is.
        dirs = tuple(Path(folder).expanduser().resolve() for folder in self.allowed_dirs)
        object.__setattr__(self, "allowed_dirs", dirs)


@dataclass
class Attachment:
    """One image or audio part of a request: ``name`` is where it is (messages.I.content.J)."""

    kind: str  # "image" or "audio"
    name: str
    part: ImagePart | AudioPart


def refused(message: str, param: str | None) -> BadRequest:
    logger.warning("media refused: %s", message)
    return BadRequest(message, param)


def attachments(body: ChatRequest, max_count: int) -> list[Attachment]:
    """The request's image and audio parts in order (a 400 for one the template cannot write, or
    more than ``max_count``)."""
    found = []
    for i, message in enumerate(body.messages):
        for j, part in message.media_parts():
            name = f"messages.{i}.content.{j}"
            if message.role not in MEDIA_ROLES:
                raise refused(
                    f"{name}: {part.type} parts are taken in user and assistant messages only "
                    f"(the chat template writes a {message.role} message as text)",
                    name,
                )
            found.append(Attachment(MEDIA_KINDS[part.type], name, part))
    if len(found) > max_count:
        raise refused(
            f"messages: {len(found)} image and audio parts, over this server's limit of "
            f"{max_count} per request",
            "messages",
        )
    return found


def check_model(target, found: list[Attachment], tokens: list[int]) -> None:
    """A 400 unless the model has the tower for each kind sent and the rendered prompt has one
    placeholder per part (the template wrote them; the text holds none of its own). A target
    without its folder (not from ``load``) is left to the generation thread to refuse."""
    source = getattr(target, "source", None)
    if source is None:
        return
    config = source[1]
    for kind in ("image", "audio"):
        parts = [a for a in found if a.kind == kind]
        if not parts:
            continue
        if reason := missing_tower(config, kind):
            raise refused(f"{parts[0].name}: {reason}", parts[0].name)
        written = tokens.count(placeholder_ids(config, kind)[0])
        if written != len(parts):
            raise refused(
                f"messages: the prompt has {written} {kind} placeholders for {len(parts)} {kind} "
                "parts (the chat template writes one per part; the text must not hold any)",
                "messages",
            )


def read_attachments(
    found: list[Attachment], sources: MediaSources, limit: int
) -> tuple[list[NamedBytes], list[NamedBytes]]:
    """(images, audio): each part's bytes, named for the errors the model's preprocessing gives.
    Blocking (files, remote URLs): run it off the event loop."""
    media = {"image": [], "audio": []}
    for attachment in found:
        data = read_part(attachment, sources, limit)
        media[attachment.kind].append(NamedBytes(data, attachment.name))
    return media["image"], media["audio"]


def read_part(attachment: Attachment, sources: MediaSources, limit: int) -> bytes:
    if attachment.kind == "audio":
        param = f"{attachment.name}.input_audio.data"
        return decode_base64(attachment.part.input_audio.data, param, limit)
    url, param = attachment.part.image_url.url, f"{attachment.name}.image_url.url"
    scheme = urlsplit(url).scheme.lower()
    if scheme == "data":
        return data_url(url, param, limit)
    if scheme in ("http", "https"):
        return fetch(url, param, sources, limit)
    if scheme in ("file", ""):
        return local_file(url, param, sources, limit)
    raise refused(f"{param}: {scheme}: URLs are not supported (send a data: URL)", param)


def data_url(url: str, param: str, limit: int) -> bytes:
    header, comma, payload = url.partition(",")
    fields = header[len("data:") :].split(";")
    if not comma or "base64" not in fields[1:]:
        raise refused(f"{param}: expected a base64 data URL (data:image/png;base64,...)", param)
    if fields[0] and not fields[0].lower().startswith("image/"):
        raise refused(f"{param}: the data URL holds {fields[0]}, not an image (image/...)", param)
    return decode_base64(payload, param, limit)


def decode_base64(text: str, param: str, limit: int) -> bytes:
    text = "".join(text.split())  # line breaks of MIME-style base64
    if len(text) // 4 * 3 > limit + 2:
        raise refused(f"{param}: over this server's limit of {limit} bytes", param)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise refused(f"{param}: not valid base64 ({e})", param) from None
    if not data:
        raise refused(f"{param}: empty", param)
    if len(data) > limit:
        raise refused(f"{param}: {len(data)} bytes, over this server's limit of {limit}", param)
    return data


def local_file(url: str, param: str, sources: MediaSources, limit: int) -> bytes:
    if not sources.allowed_dirs:
        raise refused(
            f"{param}: local files are refused (the server takes them only from a directory it "
            "is started with: --allowed-media-dir DIR); send a data: URL",
            param,
        )
    path = url
    if urlsplit(url).scheme:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise refused(f"{param}: a file URL on another host ({parts.netloc})", param)
        path = unquote(parts.path)
    try:
        if not os.path.isabs(path):
            raise refused(f"{param}: {path}: not an absolute path", param)
        real = Path(path).resolve()
        inside = any(real.is_relative_to(folder) for folder in sources.allowed_dirs)
        if not inside:  # said before whether it exists: nothing is told about other folders
            raise refused(f"{param}: {path}: outside the directories this server allows", param)
        if not real.is_file():
            raise refused(f"{param}: {path}: no such file", param)
        return read_media_bytes(real, limit)
    except (MediaError, OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise refused(f"{param}: {e}", param) from None


def http_opener() -> urllib.request.OpenerDirector:
    """urllib's opener for http(s) only (redirects included; no file:, ftp: or data:)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def fetch(url: str, param: str, sources: MediaSources, limit: int) -> bytes:
    if not sources.allow_remote:
        raise refused(
            f"{param}: remote URLs are refused (the server fetches them only when started with "
            "--allow-remote-media); send a data: URL",
            param,
        )
    timeout = sources.fetch_timeout
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-gemma-mtp"})
    chunks, size = [], 0
    try:
        with http_opener().open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                message = f"{param}: {declared} bytes, over this server's limit of {limit}"
                raise refused(message, param)
            while chunk := response.read(FETCH_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise refused(f"{param}: over this server's limit of {limit} bytes", param)
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
    except urllib.error.HTTPError as e:
        raise refused(f"{param}: fetching it got HTTP {e.code} {e.reason}", param) from None
    except TimeoutError:
        raise refused(f"{param}: fetching it took over {timeout:g} s", param) from None
    except urllib.error.URLError as e:
        raise refused(f"{param}: cannot fetch it ({e.reason})", param) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise refused(f"{param}: cannot fetch it ({e})", param) from None
    if not size:
        raise refused(f"{param}: the server sent no bytes", param)
    return b"".join(chunks)
