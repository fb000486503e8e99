"""Images in the prompt: reading, preprocessing as transformers' processor does, the image
encoders (loaded on first use) and the prompt's input embeddings for the prefill.

The prompt stays a list of token ids in which each image is ``boi``, ``num_soft_tokens`` image
placeholders and ``eoi`` (what ``Gemma4Processor`` writes); ``MediaPrompt`` holds the embeddings
that replace the placeholders, the per-layer inputs of the E-series and the image blocks that
attend to each other bidirectionally on sliding layers when the config says so.
"""

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import ConfigError, text_config_of
from .engine.prompt_cache import common_prefix_length, trim_to_common_prefix
from .loading import VISION_PREFIXES, has_vision_tower, tower_weights
from .models.gemma4_vision import MultimodalEmbedder, VisionArgs, VisionTower

MAX_IMAGE_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 64_000_000
DEFAULT_MAX_SOFT_TOKENS = 280
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
VISION_TYPES = (1, 2)  # mm_token_type_ids of image and video positions


class MediaError(ValueError):
    """A media file that cannot be used, named with the reason."""


Media = str | Path | bytes


def media_name(item: Media) -> str:
    return f"<{len(item)} bytes>" if isinstance(item, bytes) else str(item)


def read_media_bytes(item: Media, limit: int) -> bytes:
    if isinstance(item, bytes):
        data = item
    else:
        path = Path(item).expanduser()
        try:
            size = path.stat().st_size
            if size > limit:
                raise MediaError(f"{path}: too large ({size} bytes; the limit is {limit})")
            data = path.read_bytes()
        except OSError as e:
            raise MediaError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise MediaError(f"{media_name(item)}: too large ({len(data)} bytes; limit {limit})")
    if not data:
        raise MediaError(f"{media_name(item)}: empty file")
    return data


def pillow():
    try:
        from PIL import Image
    except ImportError:
        raise MediaError("images need Pillow: pip install 'mlx-gemma-mtp[vision]'") from None
    return Image


def open_image(data: bytes, name: str):
    """A decoded RGB image, or a ``MediaError`` naming the file and why it cannot be used."""
    Image = pillow()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise MediaError(
                    f"{name}: image too large ({image.width}x{image.height} pixels; "
                    f"the limit is {MAX_IMAGE_PIXELS})"
                )
            image.load()
            return image.convert("RGB")
    except Image.UnidentifiedImageError:
        raise MediaError(f"{name}: not an image in a format Pillow reads") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        if isinstance(e, MediaError):
            raise
        raise MediaError(f"{name}: damaged or truncated image ({e})") from None


@dataclass
class Towers:
    """The multimodal parts of one target, built on first use."""

    config: dict
    vision: VisionTower | None = None
    embed_vision: MultimodalEmbedder | None = None
    image_processor: object | None = None


def load_towers(target) -> Towers:
    """The target's image encoder (cached on the target); ``MediaError`` without one."""
    if getattr(target, "towers", None) is not None:
        return target.towers
    source = getattr(target, "source", None)
    if source is None:
        raise MediaError("images need a model loaded with mlx_gemma_mtp.load (from its folder)")
    model_path, config = source
    towers = Towers(config)
    vision_config = config.get("vision_config")
    if vision_config:
        towers.vision, towers.embed_vision = build_vision(model_path, config)
        towers.image_processor = make_image_processor(model_path, config)
    target.towers = towers
    return towers


def build_vision(model_path: Path, config: dict) -> tuple[VisionTower, MultimodalEmbedder]:
    if not has_vision_tower(config):
        raise MediaError(
            f"{model_path}: image input is supported for gemma4 checkpoints with a vision tower "
            "(E2B/E4B, 26B, 31B), not for the 12B's encoder-free embedder yet"
        )
    args = VisionArgs.from_dict(config["vision_config"])
    vision = VisionTower(args)
    embed = MultimodalEmbedder(
        args.hidden_size, text_config_of(config)["hidden_size"], args.rms_norm_eps
    )
    weights = tower_weights(model_path, VISION_PREFIXES)
    parts = {"vision_tower.": vision, "embed_vision.": embed}
    for prefix, module in parts.items():
        own = [(k.removeprefix(prefix), v) for k, v in weights.items() if k.startswith(prefix)]
        if not own:
            raise ConfigError(
                f"{model_path}: config.json has a vision_config but no {prefix[:-1]} weights"
            )
        try:
            module.load_weights(own)
        except ValueError as e:
            raise ConfigError(
                f"{model_path}: {prefix[:-1]} weights do not match config.json ({e})"
            ) from None
    return vision, embed


def make_image_processor(model_path: Path, config: dict):
    """transformers' Gemma 4 image processor with the checkpoint's settings."""
    pillow()
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    if any((model_path / name).exists() for name in PROCESSOR_FILES):
        return Gemma4ImageProcessorPil.from_pretrained(model_path)
    vision = config["vision_config"]
    return Gemma4ImageProcessorPil(
        patch_size=vision.get("patch_size", 16),
        pooling_kernel_size=vision.get("pooling_kernel_size", 3),
        max_soft_tokens=DEFAULT_MAX_SOFT_TOKENS,
    )


@dataclass
class ImageInputs:
    patches: np.ndarray  # [num real patches, 3·p²], pixels in [0, 1]
    positions: np.ndarray  # [num real patches, 2] (x, y)
    num_soft_tokens: int
    digest: str  # of the file's bytes: the prompt cache's key for its soft tokens


def preprocess_image(item: Media, processor) -> ImageInputs:
    data = read_media_bytes(item, MAX_IMAGE_BYTES)
    image = open_image(data, media_name(item))
    features = processor(images=[image], return_tensors="np")
    positions = features["image_position_ids"][0]
    real = (positions != -1).all(axis=-1)
    return ImageInputs(
        patches=features["pixel_values"][0][real],
        positions=positions[real],
        num_soft_tokens=int(features["num_soft_tokens_per_image"][0]),
        digest=hashlib.sha256(data).hexdigest(),
    )


def image_embeddings(towers: Towers, image: ImageInputs) -> mx.array:
    """[num_soft_tokens, text hidden] embeddings of one image."""
    patches, positions = mx.array(image.patches), mx.array(image.positions.astype(np.int32))
    soft = towers.vision(patches, positions)
    return towers.embed_vision(soft)


@dataclass
class MediaPrompt:
    """What the prefill feeds instead of token embeddings: ``embeddings`` [1, P, H] (unscaled,
    as mlx-lm's backbone takes them), ``per_layer_inputs`` [1, P, L, D] or None, and per position
    the image block it belongs to (-1 for text) when image blocks attend bidirectionally."""

    embeddings: mx.array
    per_layer_inputs: mx.array | None
    blocks: np.ndarray | None

    def chunk_end(self, start: int, end: int) -> int:
        """``end`` moved back (or, for a block longer than a chunk, forward) so that a chunk
        never splits a bidirectional image block."""
        if self.blocks is None or end >= self.blocks.size or self.blocks[end] < 0:
            return end
        block = self.blocks[end]
        if self.blocks[end - 1] != block:
            return end
        first = int(np.argmax(self.blocks == block))
        if first > start:
            return first
        return first + int((self.blocks == block).sum())

    def forward(self, backbone, cache: list, start: int, end: int) -> mx.array:
        """The backbone over prompt positions ``start:end`` (relative to the cache's offset
        ``base`` where the prompt begins)."""
        kwargs = {"input_embeddings": self.embeddings[:, start:end]}
        if self.per_layer_inputs is not None:
            kwargs["per_layer_inputs"] = self.per_layer_inputs[:, start:end]
        if self.blocks is None or (self.blocks[start:end] < 0).all():
            return backbone(None, cache=cache, **kwargs)
        base = cache[0].offset - start
        make_masks = backbone._make_masks
        backbone._make_masks = lambda h, c: self._masks(make_masks, backbone, h, c, base)
        try:
            return backbone(None, cache=cache, **kwargs)
        finally:
            del backbone._make_masks

    def _masks(self, make_masks, backbone, h, cache, base: int) -> list:
        """mlx-lm's masks, with sliding layers also seeing the rest of their image block:
        AND(window, OR(causal, same block)) as transformers' ``create_masks_for_vision_model``."""
        masks = make_masks(h, cache)
        n, layers = h.shape[1], backbone.layers
        sliding = [c for layer, c in zip(layers, cache, strict=True) if is_sliding(layer, c)]
        if not sliding:
            return masks
        c = sliding[0]
        causal = c.make_mask(n, window_size=backbone.window_size, return_array=True)
        num_keys = causal.shape[-1]
        query_pos = np.arange(c.offset, c.offset + n)[:, None]
        key_pos = np.arange(c.offset + n - num_keys, c.offset + n)[None]
        blocks = np.concatenate([np.full(max(base, 0), -1), self.blocks])
        query_block, key_block = blocks[query_pos], np.where(key_pos >= 0, blocks[key_pos], -1)
        same = (query_block == key_block) & (query_block >= 0)
        same &= key_pos > query_pos - backbone.window_size
        mask = causal | mx.array(same)
        return [
            mask if layer.layer_type == "sliding_attention" else m
            for layer, m in zip(layers, masks, strict=True)
        ]


def is_sliding(layer, layer_cache) -> bool:
    return layer.layer_type == "sliding_attention" and layer_cache is not None


def vision_blocks(ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """transformers' ``get_block_sequence_ids_for_mask``: each run of image positions numbered."""
    is_image = ids == image_token_id
    starts = is_image & ~np.concatenate([[False], is_image[:-1]])
    return np.where(is_image, np.cumsum(starts) - 1, -1)


def expand_placeholders(ids: list[int], counts: list[int], config: dict) -> list[int]:
    """Each image placeholder becomes ``boi``, its soft tokens and ``eoi``, as the processor
    writes them. A prompt without placeholders gets them in front (after BOS)."""
    image_id = config["image_token_id"]
    found = ids.count(image_id)
    if found == 0:
        at = 1 if ids and ids[0] == text_config_of(config).get("bos_token_id", 2) else 0
        ids = ids[:at] + [image_id] * len(counts) + ids[at:]
    elif found != len(counts):
        raise MediaError(
            f"the prompt has {found} image placeholders but {len(counts)} images were given"
        )
    out, images = [], iter(counts)
    for token in ids:
        if token == image_id:
            out += [config["boi_token_id"], *[image_id] * next(images), config["eoi_token_id"]]
        else:
            out.append(token)
    return out


def prepare_images(target, images: Sequence[Media]) -> tuple[Towers, list[ImageInputs]]:
    towers = load_towers(target)
    if towers.vision is None:
        raise MediaError(
            f"{media_name(images[0])}: this model has no vision tower (config.json has no "
            "vision_config)"
        )
    return towers, [preprocess_with_name(item, towers.image_processor) for item in images]


def image_starts(ids: list[int], inputs: list[ImageInputs], image_id: int) -> list[int]:
    """The position of each image's first soft token in expanded ``ids``."""
    starts, position = [], 0
    for image in inputs:
        position = ids.index(image_id, position)
        starts.append(position)
        position += image.num_soft_tokens
    return starts


def cache_keys(ids: list[int], inputs: list[ImageInputs], starts: list[int]) -> list[int]:
    """``ids`` with each image's soft tokens replaced by a key of its content (negative: never a
    token id), so that a prompt cache reuses them only for the same image."""
    keys = list(ids)
    for image, start in zip(inputs, starts, strict=True):
        key = -1 - int(image.digest[:8], 16)
        keys[start : start + image.num_soft_tokens] = [key] * image.num_soft_tokens
    return keys


def build_media_prompt(
    target, ids: list[int], images: Sequence[Media]
) -> tuple[list, MediaPrompt, list]:
    """``(expanded ids, MediaPrompt, cache keys)`` for a prompt with ``images``."""
    towers, inputs = prepare_images(target, images)
    config = towers.config
    ids = expand_placeholders(list(ids), [i.num_soft_tokens for i in inputs], config)
    ids_np = np.array(ids)
    image_id = config["image_token_id"]
    is_image = ids_np == image_id
    pad = text_config_of(config).get("pad_token_id", 0)
    text_ids = mx.array(np.where(is_image, pad, ids_np).astype(np.int32))[None]
    backbone = target.backbone
    embeddings = backbone.embed_tokens(text_ids)
    features = mx.concatenate([image_embeddings(towers, i) for i in inputs])
    features = (features / backbone.embed_scale).astype(embeddings.dtype)
    index = mx.array(np.cumsum(is_image) - 1)
    embeddings = mx.where(mx.array(is_image)[None, :, None], features[index][None], embeddings)
    per_layer = None
    if backbone.hidden_size_per_layer_input:
        per_layer = backbone._get_per_layer_inputs(text_ids)
    bidirectional = text_config_of(config).get("use_bidirectional_attention") == "vision"
    blocks = vision_blocks(ids_np, image_id) if bidirectional else None
    keys = cache_keys(ids, inputs, image_starts(ids, inputs, image_id))
    return ids, MediaPrompt(embeddings, per_layer, blocks), keys


def conversation_suffix(
    target, prompt_cache, ids: list[int], images: Sequence[Media]
) -> tuple[list[int], list]:
    """For a whole conversation (``ids`` with its placeholders, all its ``images``): roll
    ``prompt_cache`` back to what it shares with the conversation (images compared by content,
    never cut inside an image's ``boi`` .. ``eoi``) and return the ``(ids, images)`` to feed."""
    if not images:
        return trim_to_common_prefix(prompt_cache, ids), []
    towers, inputs = prepare_images(target, images)
    config = towers.config
    expanded = expand_placeholders(list(ids), [i.num_soft_tokens for i in inputs], config)
    starts = image_starts(expanded, inputs, config["image_token_id"])
    keys = cache_keys(expanded, inputs, starts)
    keep = min(common_prefix_length(prompt_cache.tokens, keys), len(keys) - 1)
    for image, start in zip(inputs, starts, strict=True):
        if start - 1 < keep <= start + image.num_soft_tokens:  # inside boi .. eoi
            keep = start - 1
    fed = len(trim_to_common_prefix(prompt_cache, keys, keep_at_most=keep))
    first = len(keys) - fed
    new_ids, new_images, position = [], [], first
    for item, image, start in zip(images, inputs, starts, strict=True):
        if start - 1 >= first:
            new_ids += expanded[position : start - 1] + [config["image_token_id"]]
            new_images.append(item)
            position = start + image.num_soft_tokens + 1
    return new_ids + expanded[position:], new_images


def preprocess_with_name(item: Media, processor) -> ImageInputs:
    try:
        return preprocess_image(item, processor)
    except MediaError:
        raise
    except ValueError as e:  # the processor's own checks (an image too small to patch, say)
        raise MediaError(f"{media_name(item)}: cannot be processed ({e})") from None
