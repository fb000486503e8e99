"""Images for the 12B (``gemma4_unified``), against transformers 5.23.0
``Gemma4UnifiedForConditionalGeneration`` (float32): preprocessing equal to
``Gemma4UnifiedImageProcessor`` pixel for pixel, soft-token embeddings, target logits over the
whole prompt (image blocks bidirectional on every layer, as transformers' unified model masks
them) and greedy MTP generation token for token, on a tiny random 12B-like pair; the converter
keeps the embedder in floating point; settings we cannot honour are clear errors.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from hf_multimodal import (  # noqa: E402
    IMAGE,
    UNIFIED_IMAGE_SETTINGS,
    UnifiedPreprocess,
    make_unified_image_pair,
    random_images,
    reference,
    unified_images,
)
from hf_reference import VOCAB  # noqa: E402
from PIL import Image  # noqa: E402
from test_multimodal import assert_close, max_diff  # noqa: E402

from mlx_gemma_mtp import load  # noqa: E402
from mlx_gemma_mtp.config import ConfigError  # noqa: E402
from mlx_gemma_mtp.convert import convert  # noqa: E402
from mlx_gemma_mtp.engine.loop import prefill  # noqa: E402
from mlx_gemma_mtp.generation import stream_generate  # noqa: E402
from mlx_gemma_mtp.media import (  # noqa: E402
    build_media_prompt,
    embeddings_of,
    prepare_image,
    towers_of,
)
from mlx_gemma_mtp.unified_images import UnifiedImageProcessor, resize_bicubic  # noqa: E402

GENERATED = 16
SIZES = [(40, 56), (64, 48)]  # width, height: 63 soft tokens each, in blocks of 9 x 7 and 9 x 7
# width, height: downscaled, upscaled, one side only, already the right size, 1:40 and 40:1
PROCESSOR_SIZES = [(640, 480), (9, 13), (36, 300), (28, 36), (8, 320), (400, 10)]
# the tiny pair's image settings, and the 12B's (transformers' defaults)
TINY = {k: UNIFIED_IMAGE_SETTINGS[k] for k in ("patch_size", "pooling_kernel_size")}
PROCESSOR_SETTINGS = [
    dict(TINY, max_soft_tokens=70),
    dict(patch_size=16, pooling_kernel_size=3, max_soft_tokens=280),
]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unified")
    target, assistant = make_unified_image_pair(folder)
    images = random_images(folder, SIZES)
    words = np.random.default_rng(3).integers(3, VOCAB - 8, 12).tolist()
    ids = [2, *words[:3], IMAGE, *words[3:6], IMAGE, *words[6:]]
    ref = reference(target, images, [], ids, GENERATED, process_images=unified_images)
    return dict(target=target, assistant=assistant, images=images, ids=ids, ref=ref)


@pytest.fixture(scope="module")
def target(case):
    target, _, _ = load(str(case["target"]), dtype="float32")
    return target


def test_soft_tokens_and_prompt_logits_match_transformers(case, target):
    for path, expected in zip(case["images"], case["ref"]["features"], strict=True):
        assert_close(embeddings_of(target, prepare_image(target, path)), expected, str(path))
    expanded, media, _ = build_media_prompt(target, case["ids"], case["images"])
    assert expanded == case["ref"]["ids"]
    logits = target.logits(media.forward(target.backbone, target.make_cache(), 0, len(expanded)))
    assert_close(logits[0], case["ref"]["logits"], "prompt logits")
    for step in (5, 40):  # 5: chunk ends fall inside each image block and are moved
        hidden = prefill(target, target.make_cache(), mx.array(expanded), step, media=media)
        assert_close(target.logits(hidden)[0, -1], case["ref"]["logits"][-1], f"chunks of {step}")


def test_image_blocks_see_each_other_on_every_layer(case, target):
    """The 12B's masks are Gemma 3's (every layer, past the sliding window), not gemma4's
    (sliding layers, inside the window) nor causal: both would be far off."""
    expanded, media, _ = build_media_prompt(target, case["ids"], case["images"])
    for every_layer, blocks in ((False, media.blocks), (True, None)):
        media.every_layer, media.blocks = every_layer, blocks
        hidden = media.forward(target.backbone, target.make_cache(), 0, len(expanded))
        error, bound = max_diff(target.logits(hidden)[0], case["ref"]["logits"])
        assert error > 100 * bound, (every_layer, blocks is None)


def test_greedy_mtp_generation_equals_transformers(case):
    target, drafter, _ = load(str(case["target"]), str(case["assistant"]), dtype="float32")
    options = dict(images=case["images"], draft_schedule="constant", num_draft_tokens=3)
    responses = list(stream_generate(target, None, case["ids"], GENERATED, drafter, **options))
    assert len(set(case["ref"]["generated"])) > 3  # not one token repeated
    assert [r.token for r in responses] == case["ref"]["generated"]
    assert responses[-1].drafted > 0 and responses[-1].prompt_tokens == len(case["ref"]["ids"])


def test_converted_target_keeps_the_float_embedder(case, tmp_path, capfd):
    out = convert(str(case["target"]), str(tmp_path / "q4"), quantize=True, q_group_size=32)
    assert capfd.readouterr().err.count("not loading embed_audio\n") == 1
    target, _, _ = load(str(out))
    prepare_image(target, case["images"][0])
    towers = towers_of(target)
    assert towers.vision.patch_dense.weight.dtype == mx.float32
    assert "scales" not in towers.embed_vision.embedding_projection
    assert "not loading" not in capfd.readouterr().err
    out = convert(str(case["target"]), str(tmp_path / "f32"), dtype="float32")
    target, drafter, _ = load(str(out), str(case["assistant"]))
    generated = stream_generate(target, None, case["ids"], 6, drafter, images=case["images"])
    assert [r.token for r in generated] == case["ref"]["generated"][:6]


@pytest.mark.parametrize("settings", PROCESSOR_SETTINGS, ids=["tiny", "12b"])
def test_preprocessing_is_transformers_code(tmp_path, settings):
    """Ours against transformers' own ``_preprocess`` (with the torch call torchvision makes
    for the resize): the same pixels, positions and soft-token counts, bit for bit."""
    ours = UnifiedImageProcessor(**settings)
    for path in random_images(tmp_path, PROCESSOR_SIZES, seed=1):
        image = Image.open(path).convert("RGB")
        expected = UnifiedPreprocess()([image], **{**UNIFIED_IMAGE_SETTINGS, **settings})
        assert_same_inputs(ours(image), expected, path)


@pytest.mark.parametrize("settings", PROCESSOR_SETTINGS, ids=["tiny", "12b"])
def test_preprocessing_equals_transformers_processor(tmp_path, settings):
    """Where torchvision installs beside torch, ``Gemma4UnifiedImageProcessor`` itself."""
    pytest.importorskip("torchvision")
    ours = UnifiedImageProcessor(**settings)
    for path in random_images(tmp_path, PROCESSOR_SIZES, seed=2):
        image = Image.open(path).convert("RGB")
        assert_same_inputs(ours(image), unified_images([image], **settings), path)


def assert_same_inputs(ours: tuple, expected, what) -> None:
    patches, positions, count = ours
    assert count == int(expected["num_soft_tokens_per_image"][0]), what
    assert np.array_equal(patches, expected["pixel_values"][0][:count].numpy()), what
    assert np.array_equal(positions, expected["image_position_ids"][0][:count].numpy()), what
    assert (expected["image_position_ids"][0][count:] == -1).all()  # the rest is padding


def test_resize_is_torchs_uint8_bicubic():
    """torchvision's resize of a uint8 image on the CPU is torch's integer antialiased bicubic
    resampler: equal on every pixel, shrinking and enlarging, one axis or both, saturated."""
    rng = np.random.default_rng(0)
    sizes = [(1, 1, 3, 5), (5, 3, 1, 2), (300, 200, 24, 640), (7, 9, 7, 33), (1000, 30, 48, 30)]
    sizes += [tuple(rng.integers(1, 200, 4)) for _ in range(20)]
    for height, width, new_height, new_width in sizes:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels[: height // 2] = pixels[: height // 2] // 128 * 255  # hard edges overshoot
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous(),
            size=[int(new_height), int(new_width)],
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )[0].permute(1, 2, 0)
        resized = resize_bicubic(pixels, int(new_height), int(new_width))
        assert np.array_equal(resized, expected.numpy()), (height, width, new_height, new_width)


def edited_copy(case, tmp_path, file: str, **changes):
    """The tiny target with ``changes`` in one of its JSON files (a nested dict updates)."""
    folder = shutil.copytree(case["target"], tmp_path / "target")
    data = json.loads((folder / file).read_text())
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    (folder / file).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    ("file", "changes", "message"),
    [
        (
            "config.json",
            dict(vision_config=dict(output_proj_dims=3840)),
            "output_proj_dims 3840 differs from mm_embed_dim 16",
        ),
        (
            "config.json",
            dict(vision_config=dict(mm_posemb_size=60)),
            "max_soft_tokens 70 allows patch positions beyond .* mm_posemb_size 60",
        ),
        ("preprocessor_config.json", dict(max_soft_tokens=100), "max_soft_tokens 100 .*70, 140"),
        ("preprocessor_config.json", dict(pooling_kernel_size=3), "takes 4-pixel patches"),
        ("preprocessor_config.json", dict(do_normalize=True), "do_normalize True is not"),
    ],
)
def test_settings_we_cannot_honour_are_clear_errors(case, tmp_path, file, changes, message):
    target, _, _ = load(str(edited_copy(case, tmp_path, file, **changes)))
    with pytest.raises(ConfigError, match=message):
        prepare_image(target, case["images"][0])
