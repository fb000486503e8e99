"""Images in the prompt, against transformers 5.23.0 ``Gemma4ForConditionalGeneration`` (float32):
soft-token embeddings, target logits over the whole prompt (one forward and chunked prefills that
must not split an image block) and greedy MTP generation token for token, on a tiny random
E2B-like pair (per-layer inputs, KV-shared layers) with a vision tower, with and without
bidirectional attention inside image blocks, alone and in continuous batches; the converter
keeps the tower; bad media fail with the file named.
"""

import io
import json
import re
import sys
import wave
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURE, readme_commands, run_commands

pytest.importorskip("PIL")
from hf_multimodal import (  # noqa: E402
    AUDIO,
    IMAGE,
    make_multimodal_pair,
    random_clips,
    random_images,
    reference,
    write_tokenizer,
)
from hf_reference import VOCAB  # noqa: E402
from PIL import Image  # noqa: E402
from test_batch import run  # noqa: E402

from mlx_gemma_mtp import load  # noqa: E402
from mlx_gemma_mtp.convert import convert  # noqa: E402
from mlx_gemma_mtp.engine.batch import BatchGenerator  # noqa: E402
from mlx_gemma_mtp.engine.loop import prefill  # noqa: E402
from mlx_gemma_mtp.engine.prompt_cache import trim_to_common_prefix  # noqa: E402
from mlx_gemma_mtp.generation import batch_generate, make_prompt_cache, stream_generate  # noqa: E402
from mlx_gemma_mtp.media import (  # noqa: E402
    MediaError,
    build_media_prompt,
    conversation_suffix,
    embeddings_of,
    prepare_audio,
    prepare_image,
    towers_of,
)

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-4
GENERATED = 16
SIZES = [(40, 56), (64, 48)]  # width, height: two aspect ratios, 63 soft tokens each
SECONDS = [1.3, 0.7]  # 33 and 18 audio soft tokens
# (bidirectional image attention, what the prompt holds)
CASES = [
    pytest.param((True, "images"), id="images-bidirectional"),
    pytest.param((False, "images"), id="images-causal"),
    pytest.param((True, "audio"), id="audio-bidirectional"),
    pytest.param((True, "both"), id="both-bidirectional"),
]


@dataclass
class Case:
    target: Path
    assistant: Path
    images: list
    clips: list
    ids: list
    ref: dict


def prompt_ids(media: str, seed: int = 3) -> list[int]:
    """BOS, text, a media item, text, another item, text."""
    words = np.random.default_rng(seed).integers(3, VOCAB - 8, 12).tolist()
    first, second = {"images": (IMAGE, IMAGE), "audio": (AUDIO, AUDIO), "both": (IMAGE, AUDIO)}[
        media
    ]
    return [2, *words[:3], first, *words[3:6], second, *words[6:]]


def max_diff(ours, expected) -> tuple[float, float]:
    expected = np.asarray(expected)
    error = float(np.abs(np.asarray(ours, dtype=np.float32) - expected).max())
    return error, RTOL * max(1.0, float(np.abs(expected).max()))


def assert_close(ours, expected, what: str) -> None:
    error, bound = max_diff(ours, expected)
    assert error <= bound, f"{what}: max abs difference {error:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """``cases(bidirectional, media)``: a ``Case``; each pair and reference built once."""
    pairs, made = {}, {}

    def get(bidirectional: bool, media: str) -> Case:
        if bidirectional not in pairs:
            folder = tmp_path_factory.mktemp("multimodal")
            pair = make_multimodal_pair(folder, bidirectional)
            pairs[bidirectional] = (
                *pair,
                random_images(folder, SIZES),
                random_clips(folder, SECONDS),
            )
        if (bidirectional, media) not in made:
            target, assistant, images, clips = pairs[bidirectional]
            images = {"images": images, "audio": [], "both": images[:1]}[media]
            clips = {"images": [], "audio": clips, "both": clips[:1]}[media]
            ids = prompt_ids(media)
            ref = reference(target, images, clips, ids, GENERATED)
            made[bidirectional, media] = Case(target, assistant, images, clips, ids, ref)
        return made[bidirectional, media]

    return get


@pytest.fixture(scope="module", params=CASES)
def case(request, cases):
    return cases(*request.param)


@pytest.fixture(scope="module")
def bidirectional_case(cases):
    return cases(True, "images")


def test_soft_tokens_and_prompt_logits_match_transformers(case):
    target, _, _ = load(str(case.target), dtype="float32")
    assert getattr(target, "towers", None) is None  # text-only use never builds the towers
    prepared = [prepare_image(target, p) for p in case.images]
    prepared += [prepare_audio(target, c) for c in case.clips]
    for item, expected in zip(prepared, case.ref["features"], strict=True):
        assert_close(embeddings_of(target, item), expected, f"{item.item} soft tokens")
    expanded, media, _ = build_media_prompt(target, case.ids, case.images, case.clips)
    assert expanded == case.ref["ids"]
    cache = target.make_cache()
    logits = target.logits(media.forward(target.backbone, cache, 0, len(expanded)))[0]
    assert_close(logits, case.ref["logits"], "prompt logits")
    for step in (5, 40):  # 5: a chunk end falls inside each image block and is moved
        cache = target.make_cache()
        hidden = prefill(target, cache, mx.array(expanded), step, media=media)
        assert_close(target.logits(hidden)[0, -1], case.ref["logits"][-1], f"chunks of {step}")


def test_greedy_mtp_generation_equals_transformers(case):
    target, drafter, _ = load(str(case.target), str(case.assistant), dtype="float32")
    responses = list(
        stream_generate(
            target,
            None,
            case.ids,
            GENERATED,
            drafter,
            images=case.images,
            audio=case.clips,
            draft_schedule="constant",
            num_draft_tokens=3,
        )
    )
    assert len(set(case.ref["generated"])) > 3  # not one token repeated
    assert [r.token for r in responses] == case.ref["generated"]
    assert responses[-1].drafted > 0 and responses[-1].prompt_tokens == len(case.ref["ids"])


def test_bidirectional_blocks_change_the_logits(bidirectional_case):
    """The bidirectional variant's parity above is not causal attention passing by chance."""
    case = bidirectional_case
    target, _, _ = load(str(case.target), dtype="float32")
    expanded, media, _ = build_media_prompt(target, case.ids, case.images)
    media.blocks = None
    logits = target.logits(media.forward(target.backbone, target.make_cache(), 0, len(expanded)))
    error, bound = max_diff(logits[0], case.ref["logits"])
    assert error > 100 * bound


def test_converted_target_keeps_the_float_towers(cases, tmp_path):
    case = cases(True, "both")
    out = convert(str(case.target), str(tmp_path / "q4"), quantize=True, q_group_size=32)
    target, _, _ = load(str(out))
    prepare_image(target, case.images[0]), prepare_audio(target, case.clips[0])
    towers = towers_of(target)
    assert towers.vision.patch_embedder.input_proj.weight.dtype == mx.float32
    assert "scales" not in towers.vision.encoder.layers[0].mlp.gate_proj.linear
    assert "scales" not in towers.audio.layers[0].self_attn.q_proj.linear
    out = convert(str(case.target), str(tmp_path / "f32"), dtype="float32")
    target, drafter, _ = load(str(out), str(case.assistant))
    media = dict(images=case.images, audio=case.clips)
    tokens = [r.token for r in stream_generate(target, None, case.ids, 6, drafter, **media)]
    assert tokens == case.ref["generated"][:6]


def test_towers_take_the_dtype_load_gives_the_text_model(bidirectional_case):
    target, _, _ = load(str(bidirectional_case.target), dtype="bfloat16")
    prepare_image(target, bidirectional_case.images[0])
    towers = towers_of(target)
    assert towers.vision.patch_embedder.input_proj.weight.dtype == mx.bfloat16
    assert towers.embed_vision.embedding_projection.weight.dtype == mx.bfloat16


def test_prompt_cache_is_keyed_on_image_content(bidirectional_case, tmp_path):
    target_dir, images, ids = (
        bidirectional_case.target,
        bidirectional_case.images,
        bidirectional_case.ids,
    )
    target, _, _ = load(str(target_dir), dtype="float32")
    cache = make_prompt_cache(target)
    list(stream_generate(target, None, ids, 2, images=images, prompt_cache=cache))
    first = list(cache.tokens)
    flipped = tmp_path / "flipped.png"
    Image.open(images[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    _, _, keys = build_media_prompt(target, ids, [flipped, images[1]])
    _, _, same = build_media_prompt(target, ids, images)
    assert same == first[: len(same)]
    start = keys.index(next(k for k in keys if k < 0))
    assert keys[:start] == first[:start] and keys[start] != first[start]


@pytest.fixture(scope="module")
def vision_target(bidirectional_case):
    target, _, _ = load(str(bidirectional_case.target), dtype="float32")
    return target


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_bad_images_name_the_file_and_the_reason(
    vision_target, bidirectional_case, tmp_path, monkeypatch
):
    ids = [2, 5, IMAGE, 6]
    png = bidirectional_case.images[0].read_bytes()
    bad = {
        tmp_path / "missing.png": "cannot read it",
        write(tmp_path / "cut.png", png[: len(png) // 2]): "damaged or truncated",
        write(tmp_path / "notes.txt", b"not an image at all"): "not an image",
        write(tmp_path / "empty.png", b""): "empty file",
    }
    for path, reason in bad.items():
        with pytest.raises(MediaError, match=f"{path.name}.*{reason}"):
            build_media_prompt(vision_target, ids, [path])
    with pytest.raises(MediaError, match="1 image placeholders but 2 image items"):
        build_media_prompt(vision_target, ids, bidirectional_case.images)
    monkeypatch.setattr("mlx_gemma_mtp.media.MAX_IMAGE_PIXELS", 100)
    with pytest.raises(MediaError, match="image0.png: image too large"):
        build_media_prompt(vision_target, ids, [bidirectional_case.images[0]])


def test_model_without_vision_tower_says_so(bidirectional_case):
    target, _, _ = load(str(FIXTURE / "target"))
    with pytest.raises(MediaError, match="image0.png: this model has no vision tower"):
        list(stream_generate(target, None, [2, 5, 6], 2, images=[bidirectional_case.images[0]]))


def test_cli_image_flag_generates_as_the_api_and_names_a_bad_file(bidirectional_case, tmp_path):
    from click.testing import CliRunner

    from mlx_gemma_mtp.generate import main

    case = bidirectional_case
    target_dir, assistant_dir, images, ids = case.target, case.assistant, case.images, case.ids
    base = ["--model", str(target_dir), "--draft-model", str(assistant_dir)]
    base += ["--prompt-tokens", " ".join(map(str, ids)), "--max-tokens", "4"]
    stats = tmp_path / "stats.json"
    image_args = [arg for path in images for arg in ("--image", str(path))]
    result = CliRunner().invoke(main, [*base, *image_args, "--stats-json", str(stats)])
    assert result.exit_code == 0, result.output
    target, drafter, _ = load(str(target_dir), str(assistant_dir))
    api = [r.token for r in stream_generate(target, None, ids, 4, drafter, images=images)]
    assert json.loads(stats.read_text())["tokens"] == api
    result = CliRunner().invoke(main, [*base, "--image", str(tmp_path / "nope.png")])
    assert result.exit_code == 1 and "nope.png: cannot read it" in result.output


def test_a_conversation_reuses_the_cache_of_its_images(bidirectional_case, tmp_path):
    """A follow-up question about the same images feeds only the new text; another image
    (same size, other content) is fed again from its ``boi``."""
    target_dir, images, ids = (
        bidirectional_case.target,
        bidirectional_case.images,
        bidirectional_case.ids,
    )
    target, _, _ = load(str(target_dir), dtype="float32")
    cache = make_prompt_cache(target)
    new, new_images, _ = conversation_suffix(target, cache, ids, images)
    assert (new, new_images) == (ids, images)
    replies = [
        r.token
        for r in stream_generate(target, None, new, 3, images=new_images, prompt_cache=cache)
    ]
    follow_up = ids + replies + [7, 8, 9]
    new, new_images, _ = conversation_suffix(target, cache, follow_up, images)
    assert (new, new_images) == ([7, 8, 9], [])
    flipped = tmp_path / "flipped.png"
    Image.open(images[1]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    new, new_images, _ = conversation_suffix(target, cache, follow_up, [images[0], flipped])
    second = ids.index(IMAGE, ids.index(IMAGE) + 1)
    assert new == follow_up[second:] and new_images == [flipped]
    fresh = make_prompt_cache(target)
    expected = list(
        stream_generate(target, None, follow_up, 3, images=[images[0], flipped], prompt_cache=fresh)
    )
    ours = list(stream_generate(target, None, new, 3, images=new_images, prompt_cache=cache))
    assert [r.token for r in ours] == [r.token for r in expected]
    assert cache.tokens == fresh.tokens


@pytest.mark.slow
def test_readme_tiny_e2b_image_commands_run_as_written(tmp_path):
    """The README's local walkthrough: write a tiny pair with both towers, convert both (the
    target quantized), generate about the picture and the clip with MTP."""
    commands = readme_commands("tiny-e2b")
    assert len(commands) == 4 and "--image tiny-e2b/picture.png --audio" in commands[-1]
    assert "tokens per target forward" in run_commands(commands, tmp_path).stderr


def wav_bytes(samples: np.ndarray, rate: int = 16_000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.astype("<i2").tobytes())
    return out.getvalue()


def test_bad_audio_names_the_file_and_the_reason(vision_target, bidirectional_case, tmp_path):
    ids = [2, 5, AUDIO, 6]
    clip = wav_bytes(np.zeros(16_000))
    bad = {
        write(tmp_path / "voice.m4a", b"\x00\x00\x00\x20ftypM4A "): "not a PCM WAV file",
        write(tmp_path / "cut.wav", clip[: len(clip) // 2]): "truncated WAV file",
        write(tmp_path / "phone.wav", wav_bytes(np.zeros(8_000), 8_000)): "sampled at 8000 Hz",
        write(tmp_path / "long.wav", wav_bytes(np.zeros(16_000 * 31))): r"too long \(31.0 s",
        write(tmp_path / "blip.wav", wav_bytes(np.zeros(100))): "too short",
    }
    for path, reason in bad.items():
        with pytest.raises(MediaError, match=f"{path.name}.*{reason}"):
            build_media_prompt(vision_target, ids, audio=[path])
    target, _, _ = load(str(FIXTURE / "target"))
    with pytest.raises(MediaError, match="ok.wav: this model has no audio tower"):
        build_media_prompt(target, ids, audio=[write(tmp_path / "ok.wav", clip)])


def test_cli_audio_flag_generates_as_transformers(cases, tmp_path):
    from click.testing import CliRunner

    from mlx_gemma_mtp.generate import main

    case, stats = cases(True, "both"), tmp_path / "stats.json"
    args = ["--model", str(case.target), "--prompt-tokens", " ".join(map(str, case.ids))]
    args += ["--image", str(case.images[0]), "--audio", str(case.clips[0]), "--max-tokens", "4"]
    result = CliRunner().invoke(main, [*args, "--stats-json", str(stats)])
    assert result.exit_code == 0, result.output
    assert json.loads(stats.read_text())["tokens"] == case.ref["generated"][:4]


def test_a_prefill_interrupted_between_images_settles_the_cache(bidirectional_case):
    """Cancelled during the prefill, the prompt cache still stands for the whole prompt: the rest
    is fed with its image embeddings, so the next turn sees what a full prefill gives."""
    case = bidirectional_case
    target, _, _ = load(str(case.target), dtype="float32")

    def stop_after_a_chunk(done: int, total: int) -> None:
        if 0 < done < total:
            raise KeyboardInterrupt

    cache = make_prompt_cache(target)
    options = dict(prefill_step_size=40, prompt_progress_callback=stop_after_a_chunk)
    with pytest.raises(KeyboardInterrupt):
        list(stream_generate(target, None, case.ids, 4, images=case.images, prompt_cache=cache,
                             **options))  # fmt: skip
    assert cache[0].offset == len(case.ref["ids"]) == len(cache.tokens)
    fresh = make_prompt_cache(target)
    list(stream_generate(target, None, case.ids, 1, images=case.images, prompt_cache=fresh))
    assert trim_to_common_prefix(fresh, [*cache.tokens, 7]) == [7]  # back to the prompt alone
    after = [r.token for r in stream_generate(target, None, [7], 4, prompt_cache=cache)]
    assert after == [r.token for r in stream_generate(target, None, [7], 4, prompt_cache=fresh)]


def test_bench_multimodal_runs(bidirectional_case, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_multimodal

    pair, out = bidirectional_case.target.parent, tmp_path / "rows.json"
    args = ["--pair", str(pair), "--image", str(bidirectional_case.images[0]), "--out", str(out)]
    rows = bench_multimodal.main([*args, "--max-tokens", "4", "--repeats", "1", "--k", "2"])
    assert [(r["kind"], r["arm"]) for r in rows] == [
        (kind, arm) for kind in bench_multimodal.KINDS for arm in bench_multimodal.ARMS
    ]
    text, image = rows[0]["prompt_tokens"], rows[2]["prompt_tokens"]
    assert text == image and json.loads(out.read_text()) == rows


def test_chat_image_on_a_model_without_vision_tower_is_one_error_and_the_chat_goes_on(
    bidirectional_case, monkeypatch, capsys
):
    from mlx_gemma_mtp import chat

    picture = bidirectional_case.images[0]
    stdin = f"/image {picture}\nwhat is this?\nhello\nq\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    chat.main(["--model", str(FIXTURE / "target"), "--max-tokens", "4", "--dtype", "float32"])
    result = capsys.readouterr()
    assert "[INFO] 1 image(s) for the next message" in result.err
    assert f"[ERROR] {picture}: this model has no vision tower" in result.err
    assert len([line for line in result.err.splitlines() if "tokens/s" in line]) == 1  # "hello"


@pytest.fixture(scope="module")
def batch_pair(cases):
    """The bidirectional pair (float32) and its cases with images, audio and both."""
    media_cases = [cases(True, kind) for kind in ("images", "audio", "both")]
    target, drafter, _ = load(str(media_cases[0].target), str(media_cases[0].assistant),
                              dtype="float32")  # fmt: skip
    return target, drafter, media_cases


CONSTANT = dict(num_draft_tokens=3, draft_schedule="constant")


def batch_engine(target, drafter, **options) -> BatchGenerator:
    options = dict(CONSTANT, prefill_step_size=16) | options
    return BatchGenerator(target, drafter, **options)


TEXT = prompt_ids("images", seed=5)[:4] + prompt_ids("images", seed=5)[5:9]  # no placeholder


def test_batch_rows_with_images_audio_or_text_equal_transformers(batch_pair):
    """Rows with images (bidirectional blocks longer than a prefill chunk), audio, both (joining
    while the others decode) and none, decoded together with MTP: each row's tokens are
    transformers' greedy output (the text row's: stream_generate's)."""
    target, drafter, (images, audio, both) = batch_pair
    engine = batch_engine(target, drafter, max_rows=3)

    def row(case):
        ids, media, _ = build_media_prompt(target, case.ids, case.images, case.clips)
        return ids, dict(max_tokens=GENERATED, media=media)

    for ids, options in (row(images), (TEXT, dict(max_tokens=GENERATED)), row(audio)):
        engine.insert(ids, **options)
    got = list(run(engine, {3: [row(both)]}).values())
    text = [r.token for r in stream_generate(target, None, TEXT, GENERATED, drafter, **CONSTANT)]
    expected = [images.ref["generated"], text, audio.ref["generated"], both.ref["generated"]]
    assert got == expected
    with pytest.raises(ValueError, match="media covers .* positions, the prompt has 3"):
        engine.insert([2, 5, 6], max_tokens=2, media=row(images)[1]["media"])


def test_removed_media_rows_leave_caches_that_continue_the_conversation(batch_pair):
    """A row removed while decoding and one removed mid-prefill: each cache stands for what it
    fed (media keyed on content), and the next turn from it is the turn from a fresh cache over
    the whole conversation."""
    target, drafter, (_, _, case) = batch_pair
    engine = batch_engine(target, drafter)
    ids, media, keys = build_media_prompt(target, case.ids, case.images, case.clips)
    decoding, filling = make_prompt_cache(target), make_prompt_cache(target)
    uid = engine.insert(ids, max_tokens=100, cache=decoding, media=media)
    late = engine.insert(ids, max_tokens=100, cache=filling, media=media)
    emitted = []
    while len(emitted) < 6:
        emitted += [t for out in engine.step() if out.uid == uid for t in out.tokens]
    assert [row.uid for row in engine.filling] == [late]
    partial = engine.remove(late)
    settled = engine.remove(uid, num_emitted=4)
    assert settled is decoding and settled.tokens == keys + emitted[:4]
    assert 0 < len(partial.tokens) < len(keys) and partial.tokens == keys[: len(partial.tokens)]
    for cache in (settled, partial):
        assert cache[0].offset == len(cache.tokens)
    conversation = case.ids + emitted[:4] + [7, 8, 9]
    media = dict(images=case.images, audio=case.clips)
    assert conversation_suffix(target, settled, conversation, **media)[0] == [7, 8, 9]
    fresh = make_prompt_cache(target)
    reply = stream_generate(target, None, conversation, 6, drafter, prompt_cache=fresh, **media,
                            **CONSTANT)  # fmt: skip
    expected = [r.token for r in reply]
    for cache in (settled, partial):
        new, images, clips = conversation_suffix(target, cache, conversation, **media)
        turn = stream_generate(target, None, new, 6, drafter, prompt_cache=cache, images=images,
                               audio=clips, **CONSTANT)  # fmt: skip
        assert [r.token for r in turn] == expected
        assert cache.tokens == fresh.tokens


def test_batch_generate_takes_images_and_audio_per_prompt(batch_pair):
    target, drafter, media_cases = batch_pair
    prompts = [case.ids for case in media_cases] + [TEXT]
    images = [case.images for case in media_cases] + [None]  # [] for the audio case
    audio = [case.clips or None for case in media_cases] + [[]]
    options = dict(max_tokens=GENERATED, draft_model=drafter, completion_batch_size=2, **CONSTANT)
    response = batch_generate(target, None, prompts, images=images, audio=audio,
                              return_token_ids=True, **options)  # fmt: skip
    text = [r.token for r in stream_generate(target, None, TEXT, GENERATED, drafter, **CONSTANT)]
    assert response.token_ids == [case.ref["generated"] for case in media_cases] + [text]
    with pytest.raises(ValueError, match="images must have one entry per prompt.*got 3 entries "
                                         "for 4 prompts"):  # fmt: skip
        batch_generate(target, None, prompts, images=images[:3], **options)
    with pytest.raises(ValueError, match=r"audio\[1\] must be a list of prompt 1's audio"):
        batch_generate(target, None, prompts, audio=[None, media_cases[1].clips[0], None, None])


def test_chat_audio_on_a_model_without_audio_tower_is_one_error_and_the_chat_goes_on(
    tmp_path, monkeypatch, capsys
):
    from mlx_gemma_mtp import chat

    clip = write(tmp_path / "voice.wav", wav_bytes(np.zeros(16_000)))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/audio {clip}\nwhat is this?\nhello\nq\n"))
    chat.main(["--model", str(FIXTURE / "target"), "--max-tokens", "4", "--dtype", "float32"])
    result = capsys.readouterr()
    assert "[INFO] 1 audio clip(s) for the next message" in result.err
    assert f"[ERROR] {clip}: this model has no audio tower" in result.err
    assert len([line for line in result.err.splitlines() if "tokens/s" in line]) == 1  # "hello"


def test_a_chat_about_an_image_resumes_from_its_saved_cache(tmp_path, monkeypatch, capsys):
    """``--save-cache`` keeps the conversation's image paths with its messages, so a follow-up
    in a new session (``--load-cache``) reuses the cache and answers as one session does."""
    from mlx_gemma_mtp import chat

    target, assistant = make_multimodal_pair(tmp_path, bidirectional=True)
    write_tokenizer(target)
    (picture,) = random_images(tmp_path, [(40, 56)])
    saved = str(tmp_path / "conversation.safetensors")
    args = ["--model", str(target), "--draft-model", str(assistant), "--dtype", "float32",
            "--max-tokens", "4"]  # fmt: skip

    def session(lines: str, *extra: str) -> tuple[str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(lines + "q\n"))
        chat.main([*args, *extra])
        result = capsys.readouterr()
        assert "[ERROR]" not in result.err, result.err
        return result.out, result.err

    both, both_err = session(f"/image {picture}\nwhat is this?\nand now?\n")
    first, _ = session(f"/image {picture}\nwhat is this?\n", "--save-cache", saved)
    second, err = session("and now?\n", "--load-cache", saved)

    def replies(out: str) -> str:
        return out.replace(">> ", "")

    assert replies(first) + replies(second) == replies(both)
    # the follow-up feeds what it feeds in one session: the image came from the saved cache
    prompts = re.findall(r"prompt: \d+ new of \d+", both_err)
    assert re.findall(r"prompt: \d+ new of \d+", err) == prompts[1:]
