"""Images and audio in chat requests, in-process (FastAPI's TestClient): ``image_url`` and
``input_audio`` parts answer what ``stream_generate(images=, audio=)`` gives; a follow-up question
about the same image reuses the conversation's cache; files only inside an allowed directory,
remote URLs only when allowed; every bad part is a 400 naming it, and the server goes on.

The model is the tiny random E2B-like pair with both towers (``tests/hf_multimodal.py``) and a
tokenizer of our own: printable ASCII characters, Gemma 4's turn and media markers at the
config's ids, and a chat template that writes the media entries as Gemma 4's does."""

import base64
import http.server
import re
import threading

import numpy as np
import pytest
from conftest import FIXTURE

pytest.importorskip("fastapi")
pytest.importorskip("PIL")
from fastapi.testclient import TestClient  # noqa: E402
from hf_multimodal import (  # noqa: E402
    make_multimodal_pair,
    random_clips,
    random_images,
    write_tokenizer,
)
from test_multimodal import wav_bytes  # noqa: E402

from mlx_gemma_mtp import load  # noqa: E402
from mlx_gemma_mtp.generation import encode_chat, stream_generate  # noqa: E402
from mlx_gemma_mtp.media import user_content  # noqa: E402
from mlx_gemma_mtp.server import Worker, create_app  # noqa: E402
from mlx_gemma_mtp.server.access import served_name  # noqa: E402
from mlx_gemma_mtp.server.app import parse_args  # noqa: E402
from mlx_gemma_mtp.server.attachments import MediaSources  # noqa: E402
from mlx_gemma_mtp.server.limits import Limits  # noqa: E402

DEFAULTS = {"num_draft_tokens": 3, "max_tokens": 6, "temp": 0.0, "top_p": 1.0, "top_k": 0,
            "min_p": 0.0}  # fmt: skip
GENERATED = 6
MAX_PARTS = 3
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("server_media")
    target, assistant = make_multimodal_pair(root, bidirectional=True)
    write_tokenizer(target)
    allowed = root / "allowed"
    allowed.mkdir()
    (picture,) = random_images(allowed, [(40, 56)])
    (clip,) = random_clips(root, [0.7])
    outside = root / "secret.png"
    outside.write_bytes(picture.read_bytes())
    (allowed / "link.png").symlink_to(outside)
    return dict(target=target, assistant=assistant, allowed=allowed, picture=picture, clip=clip,
                outside=outside)  # fmt: skip


@pytest.fixture(scope="module")
def worker(files):
    def models():
        return load(str(files["target"]), str(files["assistant"]), dtype="float32")

    return Worker(models, 4, 1 << 26, num_draft_tokens=3, draft_schedule="constant")


def app_client(worker, files, media: MediaSources, **limits) -> TestClient:
    limits = Limits(max_media_per_request=MAX_PARTS, **limits)
    app = create_app(worker, served_name(str(files["target"])), DEFAULTS, limits, media=media)
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def client(worker, files):
    """Files from the allowed directory and remote URLs taken."""
    return app_client(worker, files, MediaSources([files["allowed"]], allow_remote=True))


@pytest.fixture(scope="module")
def bare(worker, files):
    """Data URLs only (the default), 20 kB at most per part, prompts of 60 tokens at most."""
    return app_client(worker, files, MediaSources(), max_media_bytes=20_000, max_prompt_tokens=60)


@pytest.fixture(scope="module")
def pair(files):
    return load(str(files["target"]), str(files["assistant"]), dtype="float32")


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def png_url(data: bytes) -> dict:
    return image_url("data:image/png;base64," + base64.b64encode(data).decode())


def audio_part(data: bytes, audio_format: str = "wav") -> dict:
    encoded = base64.b64encode(data).decode()
    return {"type": "input_audio", "input_audio": {"data": encoded, "format": audio_format}}


def ask(client, parts: list, question: str = "What is this?", history=(), **body):
    messages = [*history, {"role": "user", "content": [*parts, {"type": "text", "text": question}]}]
    return client.post("/v1/chat/completions", json={"messages": messages, **body})


def expected(pair, messages: list, **media) -> tuple[str, int]:
    """``stream_generate``'s greedy text for ``messages`` and its prompt's length."""
    target, drafter, tokenizer = pair
    prompt = encode_chat(tokenizer, messages)
    responses = list(stream_generate(target, tokenizer, prompt, GENERATED, drafter, **media))
    return "".join(r.text for r in responses), responses[-1].prompt_tokens


def assert_refused(response, *phrases: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    for phrase in phrases:
        assert phrase in error["message"], error
    return error


def test_image_and_audio_parts_answer_as_stream_generate(client, pair, files):
    picture, clip = files["picture"], files["clip"]
    part = png_url(picture.read_bytes())
    part["image_url"]["detail"] = "low"  # accepted, ignored
    reply = ask(client, [part]).json()
    question = [{"role": "user", "content": user_content("What is this?", num_images=1)}]
    text, prompt_tokens = expected(pair, question, images=[picture])
    assert reply["choices"][0]["message"]["content"] == text
    assert reply["usage"]["prompt_tokens"] == prompt_tokens  # the soft tokens counted
    reply = ask(client, [audio_part(clip.read_bytes())], "Who speaks?").json()
    question = [{"role": "user", "content": user_content("Who speaks?", num_audio=1)}]
    assert reply["choices"][0]["message"]["content"] == expected(pair, question, audio=[clip])[0]


def test_a_follow_up_about_the_same_image_reuses_the_cache(client, pair, files):
    picture = files["picture"]
    first = ask(client, [png_url(picture.read_bytes())], user="follow-up").json()
    answer = first["choices"][0]["message"]["content"]
    question = [png_url(picture.read_bytes()), {"type": "text", "text": "What is this?"}]
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    reply = ask(client, [], "And the colours?", history, user="follow-up").json()
    assert (
        reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
    )
    messages = [
        {"role": "user", "content": user_content("What is this?", num_images=1)},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And the colours?"},
    ]
    text, prompt_tokens = expected(pair, messages, images=[picture])
    assert reply["choices"][0]["message"]["content"] == text
    assert reply["usage"]["prompt_tokens"] == prompt_tokens


def test_local_files_only_inside_the_allowed_directory(client, bare, files):
    allowed, picture = files["allowed"], files["picture"]
    text = ask(client, [png_url(picture.read_bytes())]).json()["choices"][0]["message"]["content"]
    for url in (str(picture), picture.as_uri()):
        assert_refused(ask(bare, [image_url(url)]), "--allowed-media-dir")
        reply = ask(client, [image_url(url)])
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == text
    for url in (str(files["outside"]), f"{allowed}/../secret.png", str(allowed / "link.png")):
        error = assert_refused(ask(client, [image_url(url)]), "outside the directories")
        assert error["param"] == "messages.0.content.0.image_url.url"
    assert_refused(ask(client, [image_url(str(allowed / "none.png"))]), "no such file")
    assert_refused(ask(client, [image_url("picture.png")]), "not an absolute path")


@pytest.fixture(scope="module")
def web(files):
    """A loopback web server with the picture at /picture.png (404 elsewhere)."""
    data = files["picture"].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/picture.png":
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_urls_only_when_allowed(client, bare, files, web):
    url = f"{web}/picture.png"
    assert_refused(ask(bare, [image_url(url)]), "--allow-remote-media")
    text = ask(client, [png_url(files["picture"].read_bytes())]).json()
    reply = ask(client, [image_url(url)])
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"] == text["choices"][0]["message"]
    assert_refused(ask(client, [image_url(f"{web}/missing.png")]), "HTTP 404")
    assert_refused(ask(client, [image_url("ftp://example.com/a.png")]), "ftp: URLs")


# name: (the parts from the picture's and the clip's bytes, what the error says, the field named
# after messages.0.content.0 or None)
BAD = {
    "base64": (lambda png, clip: [image_url("data:image/png;base64,!!notbase64")],
               "not valid base64", "image_url.url"),
    "truncated png": (lambda png, clip: [png_url(png[: len(png) // 2])],
                      "messages.0.content.0: damaged or truncated", None),
    "not an image": (lambda png, clip: [png_url(b"GIF89a, or not")], "not an image", None),
    "audio in image_url": (lambda png, clip: [image_url("data:audio/wav;base64,AAAA")],
                           "holds audio/wav, not an image", "image_url.url"),
    "mp3": (lambda png, clip: [audio_part(clip, "mp3")], "'mp3' audio is not supported",
            "input_audio.format"),
    "8 kHz": (lambda png, clip: [audio_part(wav_bytes(np.zeros(8000), 8000))],
              "sampled at 8000 Hz", None),
    "truncated wav": (lambda png, clip: [audio_part(clip[:100])], "truncated WAV", None),
    "too many": (lambda png, clip: [png_url(png)] * (MAX_PARTS + 1),
                 f"limit of {MAX_PARTS} per request", None),
    "unknown field": (lambda png, clip: [{"type": "image_url", "image_url": {"url": "x", "n": 1}}],
                      "does not support", "image_url.n"),
}  # fmt: skip
STREAMED = ("base64", "truncated png")  # refused by the app, by the generation thread
CASES = [(name, False) for name in BAD] + [(name, True) for name in STREAMED]


@pytest.mark.parametrize("name, stream", CASES)
def test_bad_media_is_a_400_naming_it_and_the_server_goes_on(client, files, name, stream, caplog):
    """A streamed request too: refused before its stream starts. Logged, unless the request's
    shape is wrong (pydantic's validation)."""
    parts, phrase, field = BAD[name]
    png, clip = files["picture"].read_bytes(), files["clip"].read_bytes()
    error = assert_refused(ask(client, parts(png, clip), stream=stream), phrase)
    if name not in ("mp3", "unknown field"):
        assert phrase in caplog.text
    if field is not None:
        assert error["param"] == f"messages.0.content.0.{field}"
    assert ask(client, [], "def main():", max_tokens=1).status_code == 200


def test_parts_the_template_cannot_write_are_refused(client, bare, files):
    png = files["picture"].read_bytes()
    system = {"role": "system", "content": [png_url(png)]}
    assert_refused(ask(client, [], history=[system]), "messages.0.content.0: image_url parts",
                   "user and assistant messages only")  # fmt: skip
    assert_refused(ask(client, [png_url(png)], "What is <|image|>?"), "2 image placeholders")
    assert_refused(ask(bare, [png_url(png + b"\0" * 20_000)]), "over this server's limit")
    # the text fits --max-prompt-tokens, not with the image's soft tokens (counted later)
    assert_refused(ask(bare, [png_url(png)]), "tokens, over this server's limit of 60")


def test_a_text_only_model_refuses_media_and_keeps_serving(files):
    def models():
        return load(str(FIXTURE / "target"), str(FIXTURE / "assistant"), dtype="float32")

    worker = Worker(models, 2, 1 << 24, num_draft_tokens=3, draft_schedule="constant")
    app = create_app(worker, "target", DEFAULTS, Limits())
    text_only = TestClient(app, base_url="http://127.0.0.1")
    png = files["picture"].read_bytes()
    error = assert_refused(ask(text_only, [png_url(png)]), "has no vision tower")
    assert error["param"] == "messages.0.content.0"
    assert_refused(ask(text_only, [audio_part(files["clip"].read_bytes())]), "no audio tower")
    assert ask(text_only, [], "def main():").status_code == 200
    worker.stop()


def test_media_flags(files, tmp_path):
    base = ["--model", "m"]
    args = parse_args([*base, "--allowed-media-dir", str(files["allowed"]), "--allow-remote-media",
                       "--max-media-per-request", "2", "--max-media-bytes", "1000"])  # fmt: skip
    assert (args.allowed_media_dir, args.allow_remote_media) == ([files["allowed"]], True)
    assert (args.max_media_per_request, args.max_media_bytes) == (2, 1000)
    assert MediaSources(args.allowed_media_dir).allowed_dirs == (files["allowed"].resolve(),)
    assert parse_args(base).allowed_media_dir == []
    for wrong in (["--allowed-media-dir", str(tmp_path / "nowhere")],
                  ["--max-media-bytes", str(1 << 30)]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args([*base, *wrong])


def test_readme_example_runs_as_written(client, files):
    """The README's ``openai`` example (an image, a voice note, then a follow-up question)."""
    openai = pytest.importorskip("openai")
    readme = (FIXTURE.parents[2] / "README.md").read_text()
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "input_audio" in b]
    example = example.replace("photo.png", str(files["picture"])).replace(
        "note.wav", str(files["clip"])
    )
    example = example.replace("gemma-4-E2B-it-4bit", served_name(str(files["target"])))
    sdk = openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=client)
    namespace = {"OpenAI": lambda **_: sdk}
    exec(
        compile(example.replace("from openai import OpenAI\n", ""), "README.md", "exec"), namespace
    )
    assert namespace["again"].usage.prompt_tokens_details.cached_tokens > 0
