"""Images and audio in the prompt: reading, preprocessing as transformers' processor does, the
encoders (loaded on first use) and the prompt's input embeddings for the prefill.

The prompt stays a list of token ids in which each image is ``boi``, ``num_soft_tokens`` image
placeholders and ``eoi`` (each audio clip ``boa``, audio placeholders, ``eoa``), as
``Gemma4Processor`` writes them; ``MediaPrompt`` holds the embeddings that replace the
placeholders, the per-layer inputs of the E-series and the image blocks that attend to each other
bidirectionally when the config says so (on sliding layers for ``gemma4``, on every layer for the
12B).
"""

import functools
import hashlib
import io
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import ConfigError, normalize_target_config, text_config_of
from .engine.prompt_cache import common_prefix_length, trim_to_common_prefix
from .loading import has_audio_tower, has_unified_vision, has_vision_tower, tower_weights
from .models.gemma4_audio import AudioArgs, AudioTower
from .models.gemma4_unified_vision import UnifiedVisionArgs, VisionEmbedder
from .models.gemma4_vision import MultimodalEmbedder, VisionArgs, VisionTower
from .unified_images import DEFAULT_MAX_SOFT_TOKENS, PROCESSOR_FILES, UnifiedImageProcessor

MAX_IMAGE_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 64_000_000
MAX_AUDIO_BYTES = 64 << 20
MAX_AUDIO_SECONDS = 30  # the feature extractor's max_length: longer clips would be cut
# WAV sample width (bytes) -> numpy type, offset and scale to [-1, 1]
WAV_SCALES = {1: (np.uint8, 128.0, 128.0), 2: ("<i2", 0.0, 32768.0), 4: ("<i4", 0.0, 2.0**31)}
# kind -> config.json keys of its placeholder, begin and end token ids
PLACEHOLDERS = {
    "image": ("image_token_id", "boi_token_id", "eoi_token_id"),
    "audio": ("audio_token_id", "boa_token_id", "eoa_token_index"),
}


class MediaError(ValueError):
    """A media file that cannot be used, named with the reason."""


class NamedBytes(bytes):
    """Encoded media held in memory with the name its errors give (a request's part, say)."""

    def __new__(cls, data: bytes, name: str):
        named = super().__new__(cls, data)
        named.name = name
        return named


Media = str | Path | bytes


def media_name(item: Media) -> str:
    if isinstance(item, bytes):
        return getattr(item, "name", None) or f"<{len(item)} bytes>"
    return str(item)


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
    """The multimodal parts of one target, each built when its first media arrive."""

    model_path: Path
    config: dict
    vision: VisionTower | VisionEmbedder | None = None
    embed_vision: MultimodalEmbedder | None = None
    # an RGB image -> (patches, (x, y) positions, number of soft tokens)
    image_inputs: Callable | None = None
    audio: AudioTower | None = None
    embed_audio: MultimodalEmbedder | None = None
    feature_extractor: object | None = None


def towers_of(target) -> Towers:
    """The target's (cached) ``Towers``; their parts are built by ``vision_of``/``audio_of``."""
    if getattr(target, "towers", None) is None:
        source = getattr(target, "source", None)
        if source is None:
            raise MediaError("media need a model loaded with mlx_gemma_mtp.load (from its folder)")
        target.towers = Towers(*source)
    return target.towers


def missing_tower(config: dict, kind: str) -> str | None:
    """Why a model with this config.json cannot take ``kind`` ("image" or "audio"), or None."""
    if kind == "audio":
        return None if has_audio_tower(config) else "this model has no audio tower"
    if has_vision_tower(config) or has_unified_vision(config):
        return None
    return "this model has no vision tower"


def vision_of(target, item: Media) -> Towers:
    towers = towers_of(target)
    if towers.vision is None:
        config = towers.config
        if has_unified_vision(config):
            vision, embed, image_inputs = unified_vision(towers.model_path, config)
            parts = {"vision_embedder.": vision, "embed_vision.": embed}
        elif has_vision_tower(config):
            args = VisionArgs.from_dict(config["vision_config"])
            vision = VisionTower(args)
            embed = embedder(config, args.hidden_size, args.rms_norm_eps)
            processor = make_image_processor(towers.model_path, config)
            image_inputs = functools.partial(gemma4_image_inputs, processor)
            parts = {"vision_tower.": vision, "embed_vision.": embed}
        else:
            raise MediaError(f"{media_name(item)}: {missing_tower(config, 'image')}")
        load_parts(target, parts)
        towers.vision, towers.embed_vision, towers.image_inputs = vision, embed, image_inputs
    return towers


def unified_vision(model_path: Path, config: dict) -> tuple:
    """The 12B's image embedder, its projection and its image preprocessing (unloaded)."""
    args = UnifiedVisionArgs.from_dict(config["vision_config"])
    if args.output_proj_dims != args.mm_embed_dim:
        raise ConfigError(
            f"{model_path / 'config.json'}: vision_config output_proj_dims "
            f"{args.output_proj_dims} differs from mm_embed_dim {args.mm_embed_dim} (the "
            "projection reads the embedder's output: transformers could not run it either)"
        )
    processor = UnifiedImageProcessor.from_folder(model_path, args)
    embed = embedder(config, args.output_proj_dims, args.rms_norm_eps)
    return VisionEmbedder(args), embed, processor


def audio_of(target, item: Media) -> Towers:
    towers = towers_of(target)
    if towers.audio is None:
        config = towers.config
        if reason := missing_tower(config, "audio"):
            raise MediaError(f"{media_name(item)}: {reason}")
        args = AudioArgs.from_dict(config["audio_config"])
        audio = AudioTower(args)
        embed = embedder(config, args.output_proj_dims, args.rms_norm_eps)
        load_parts(target, {"audio_tower.": audio, "embed_audio.": embed})
        towers.feature_extractor = make_feature_extractor(towers.model_path)
        towers.audio, towers.embed_audio = audio, embed
    return towers


def embedder(config: dict, in_dims: int, eps: float) -> MultimodalEmbedder:
    return MultimodalEmbedder(in_dims, text_config_of(config)["hidden_size"], eps)


def load_parts(target, parts: dict) -> None:
    """Each module's weights (``prefix`` + its names) from the target's folder, in the text
    model's floating-point dtype (``load``'s ``dtype``, or the checkpoint's)."""
    model_path = towers_of(target).model_path
    weights = tower_weights(model_path, tuple(p[:-1] for p in parts))
    for prefix, module in parts.items():
        own = [(k.removeprefix(prefix), v) for k, v in weights.items() if k.startswith(prefix)]
        if not own:
            raise ConfigError(
                f"{model_path}: config.json promises {prefix[:-1]}, no weights have it"
            )
        try:
            module.load_weights(sanitize_convolutions(own))
        except ValueError as e:
            raise ConfigError(
                f"{model_path}: {prefix[:-1]} weights do not match config.json ({e})"
            ) from None
        module.set_dtype(target.backbone.norm.weight.dtype)


def sanitize_convolutions(weights: list) -> list:
    """PyTorch convolution kernels ([out, in, *kernel]) in MLX's layout ([out, *kernel, in]).
    Model folders, converted ones too (``convert`` copies the towers as they are), hold them in
    PyTorch's layout."""
    out = []
    for name, value in weights:
        if name.endswith(("conv.weight", "conv1d.weight")):
            value = value.transpose(0, *range(2, value.ndim), 1)
        out.append((name, value))
    return out


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


def gemma4_image_inputs(processor, image) -> tuple[np.ndarray, np.ndarray, int]:
    """``Towers.image_inputs`` of transformers' Gemma 4 processor (padding patches dropped)."""
    features = processor(images=[image], return_tensors="np")
    positions = features["image_position_ids"][0]
    real = (positions != -1).all(axis=-1)
    count = int(features["num_soft_tokens_per_image"][0])
    return features["pixel_values"][0][real], positions[real], count


def make_feature_extractor(model_path: Path):
    """transformers' Gemma 4 audio feature extractor with the checkpoint's settings."""
    from transformers.models.gemma4.feature_extraction_gemma4 import (
        Gemma4AudioFeatureExtractor,
    )

    if any((model_path / name).exists() for name in PROCESSOR_FILES):
        return Gemma4AudioFeatureExtractor.from_pretrained(model_path)
    return Gemma4AudioFeatureExtractor()


@dataclass
class Prepared:
    """One image or audio clip, preprocessed: ``inputs`` for its encoder."""

    kind: str  # "image" or "audio"
    item: Media
    inputs: dict
    num_soft_tokens: int
    digest: str  # of the file's bytes: the prompt cache's key for its soft tokens


def prepare_image(target, item: Media) -> Prepared:
    towers = vision_of(target, item)
    data = read_media_bytes(item, MAX_IMAGE_BYTES)
    image = open_image(data, media_name(item))
    try:
        patches, positions, count = towers.image_inputs(image)
    except ValueError as e:  # the processor's own checks
        raise MediaError(f"{media_name(item)}: cannot be processed ({e})") from None
    inputs = dict(patches=patches, positions=positions)
    return Prepared("image", item, inputs, count, hashlib.sha256(data).hexdigest())


def prepare_audio(target, item: Media) -> Prepared:
    towers = audio_of(target, item)
    extractor = towers.feature_extractor
    data = read_media_bytes(item, MAX_AUDIO_BYTES)
    waveform = read_wav(data, media_name(item), extractor.sampling_rate)
    features = extractor([waveform], sampling_rate=extractor.sampling_rate, return_tensors="np")
    mask = features["input_features_mask"][0]
    inputs = dict(features=features["input_features"][0], mask=mask)
    count = int(subsampled(mask).sum())
    if count == 0:
        raise MediaError(f"{media_name(item)}: too short to give any audio token")
    return Prepared("audio", item, inputs, count, hashlib.sha256(data).hexdigest())


def subsampled(mask: np.ndarray) -> np.ndarray:
    """The frame mask after the audio tower's two stride-2 convolutions (the processor's count)."""
    for _ in range(2):
        mask = mask[::2][: (len(mask) - 1) // 2 + 1]
    return mask


def read_wav(data: bytes, name: str, rate: int) -> np.ndarray:
    """A mono float waveform from PCM WAV data at ``rate`` Hz."""
    try:
        with wave.open(io.BytesIO(data)) as wav:
            channels, width, frames = wav.getnchannels(), wav.getsampwidth(), wav.getnframes()
            file_rate, raw = wav.getframerate(), wav.readframes(frames)
    except (wave.Error, EOFError) as e:
        raise MediaError(
            f"{name}: not a PCM WAV file ({e}); audio is read from WAV only (ffmpeg -i IN "
            f"-ar {rate} -ac 1 OUT.wav converts one)"
        ) from None
    if width not in WAV_SCALES:
        raise MediaError(f"{name}: {8 * width}-bit WAV samples (expected 8, 16 or 32)")
    if len(raw) < frames * channels * width:
        raise MediaError(
            f"{name}: truncated WAV file ({len(raw)} of {frames * channels * width} bytes)"
        )
    if file_rate != rate:
        raise MediaError(f"{name}: sampled at {file_rate} Hz; the model takes {rate} Hz audio")
    if frames > MAX_AUDIO_SECONDS * rate:
        raise MediaError(
            f"{name}: too long ({frames / rate:.1f} s; the model takes at most "
            f"{MAX_AUDIO_SECONDS} s)"
        )
    dtype, offset, scale = WAV_SCALES[width]
    samples = (np.frombuffer(raw, dtype).astype(np.float32) - offset) / scale
    return samples.reshape(-1, channels).mean(axis=1)


def embeddings_of(target, prepared: Prepared) -> mx.array:
    """[num_soft_tokens, text hidden] embeddings of one image or clip."""
    towers = towers_of(target)
    if prepared.kind == "image":
        positions = mx.array(prepared.inputs["positions"].astype(np.int32))
        soft = towers.vision(mx.array(prepared.inputs["patches"]), positions)
        return towers.embed_vision(soft)
    features = mx.array(prepared.inputs["features"])[None]
    soft, _ = towers.audio(features, mx.array(prepared.inputs["mask"])[None])
    real = mx.array(np.flatnonzero(subsampled(prepared.inputs["mask"])))
    return towers.embed_audio(soft[0][real])


@dataclass
class MediaPrompt:
    """What the prefill feeds instead of token embeddings: ``embeddings`` [1, P, H] (unscaled,
    as mlx-lm's backbone takes them), ``per_layer_inputs`` [1, P, L, D] or None, per position
    the image block it belongs to (-1 for text) when image blocks attend bidirectionally: on
    sliding layers within the window (``gemma4``), or with ``every_layer`` on every layer and past
    the window (the 12B), and ``keys``: the prompt cache's tokens for the P positions
    (``cache_keys``)."""

    embeddings: mx.array
    per_layer_inputs: mx.array | None
    blocks: np.ndarray | None
    keys: list[int] | None = None
    every_layer: bool = False

    @property
    def size(self) -> int:
        """Prompt positions it covers."""
        return self.embeddings.shape[1]

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
        """The backbone over prompt positions ``start:end`` (the cache holds what comes before
        the prompt and its first ``start`` positions)."""
        kwargs = {"input_embeddings": self.embeddings[:, start:end]}
        if self.per_layer_inputs is not None:
            kwargs["per_layer_inputs"] = self.per_layer_inputs[:, start:end]
        if self.blocks is None or (self.blocks[start:end] < 0).all():
            return backbone(None, cache=cache, **kwargs)
        base = cache[0].offset - start  # the prompt's first position in the cache
        # mlx-lm's backbone builds its masks in ``_make_masks``: replacing it for this call gives
        # the sliding layers the image blocks without a copy of its forward.
        make_masks = backbone._make_masks
        backbone._make_masks = lambda h, c: self._masks(make_masks, backbone, h, c, base)
        try:
            return backbone(None, cache=cache, **kwargs)
        finally:
            del backbone._make_masks

    def _masks(self, make_masks, backbone, h, cache, base: int) -> list:
        """mlx-lm's masks, with the tokens of an image block also seeing the rest of their block.
        ``gemma4`` (transformers' ``create_masks_for_vision_model``): sliding layers only,
        AND(window, OR(causal, same block)). The 12B (``Gemma4UnifiedModel`` builds Gemma 3's
        masks): every layer, OR(its mask, same block), so past the sliding window too."""
        masks = make_masks(h, cache)
        kinds = {"sliding_attention"} | ({"full_attention"} if self.every_layer else set())
        blocks = np.concatenate([np.full(max(base, 0), -1), self.blocks])
        changed = {}
        for layer, layer_cache in zip(backbone.layers, cache, strict=True):
            kind = layer.layer_type
            if kind in kinds and kind not in changed and layer_cache is not None:
                window = backbone.window_size if kind == "sliding_attention" else None
                changed[kind] = self._block_mask(layer_cache, h.shape[1], window, blocks)
        layers = zip(backbone.layers, masks, strict=True)
        return [changed.get(layer.layer_type, mask) for layer, mask in layers]

    def _block_mask(self, layer_cache, n: int, window: int | None, blocks: np.ndarray):
        causal = layer_cache.make_mask(n, window_size=window, return_array=True)
        offset, num_keys = layer_cache.offset, causal.shape[-1]
        query_pos = np.arange(offset, offset + n)[:, None]
        key_pos = np.arange(offset + n - num_keys, offset + n)[None]
        query_block, key_block = blocks[query_pos], blocks[key_pos]
        same = (query_block == key_block) & (query_block >= 0)
        if window is not None and not self.every_layer:
            same &= key_pos > query_pos - window
        return causal | mx.array(same)


def user_content(text: str, num_images: int = 0, num_audio: int = 0) -> str | list:
    """A user message's content: the text, after one entry per image and audio clip (the chat
    template writes each as its placeholder)."""
    if not num_images and not num_audio:
        return text
    media = [{"type": "image"}] * num_images + [{"type": "audio"}] * num_audio
    return [*media, {"type": "text", "text": text}]


def placeholder_ids(config: dict, kind: str) -> tuple[int, int, int]:
    """(placeholder, begin, end) token ids of ``kind``, from the model's config.json."""
    names = PLACEHOLDERS[kind]
    try:
        return tuple(config[name] for name in names)
    except KeyError as e:
        raise ConfigError(f"config.json has no {e.args[0]} ({kind} placeholders)") from None


def expand_placeholders(
    ids: list[int], prepared: list[Prepared], config: dict
) -> tuple[list, list]:
    """``(expanded ids, start of each item's soft tokens)``: each placeholder becomes begin, the
    item's soft tokens, end, as the processor writes them. A kind without placeholders in the
    prompt gets one per item in front (after BOS), images first."""
    ids = list(ids)
    at = 1 if ids and ids[0] == text_config_of(config).get("bos_token_id", 2) else 0
    queues = {}
    for kind in PLACEHOLDERS:
        items = [p for p in prepared if p.kind == kind]
        if not items:
            continue
        token = placeholder_ids(config, kind)[0]
        found = ids.count(token)
        if found == 0:
            ids[at:at] = [token] * len(items)
            at += len(items)
        elif found != len(items):
            raise MediaError(
                f"the prompt has {found} {kind} placeholders but {len(items)} {kind} items "
                "were given"
            )
        queues[token] = (kind, iter(items))
    out, starts = [], {}
    for token in ids:
        if token not in queues:
            out.append(token)
            continue
        kind, items = queues[token]
        item = next(items)
        _, begin, end = placeholder_ids(config, kind)
        starts[id(item)] = len(out) + 1
        out += [begin, *[token] * item.num_soft_tokens, end]
    return out, [starts[id(p)] for p in prepared]


def prepare_media(target, images: Sequence[Media], audio: Sequence[Media]) -> list[Prepared]:
    """Each image, then each clip, preprocessed (an item given as ``Prepared`` is kept: a caller
    that needs the items before ``conversation_suffix`` prepares them once)."""

    def each(prepare, items: Sequence) -> list[Prepared]:
        return [i if isinstance(i, Prepared) else prepare(target, i) for i in items]

    return each(prepare_image, images) + each(prepare_audio, audio)


def cache_keys(ids: list[int], prepared: list[Prepared], starts: list[int]) -> list[int]:
    """``ids`` with each item's soft tokens replaced by a key of its content (negative: never a
    token id), so that a prompt cache reuses them only for the same file."""
    keys = list(ids)
    for item, start in zip(prepared, starts, strict=True):
        keys[start : start + item.num_soft_tokens] = [-1 - int(item.digest[:8], 16)] * (
            item.num_soft_tokens
        )
    return keys


def build_media_prompt(
    target, ids: list[int], images: Sequence[Media] = (), audio: Sequence[Media] = ()
) -> tuple[list, MediaPrompt, list]:
    """``(expanded ids, MediaPrompt, cache keys)`` for a prompt with ``images`` and ``audio``."""
    prepared = prepare_media(target, images, audio)
    config = towers_of(target).config
    ids, starts = expand_placeholders(ids, prepared, config)
    index = np.full(len(ids), -1)
    offset, blocks = 0, np.full(len(ids), -1)
    for number, (item, start) in enumerate(zip(prepared, starts, strict=True)):
        index[start : start + item.num_soft_tokens] = np.arange(
            offset, offset + item.num_soft_tokens
        )
        offset += item.num_soft_tokens
        if item.kind == "image":
            blocks[start : start + item.num_soft_tokens] = number
    is_media = index >= 0
    pad = text_config_of(config).get("pad_token_id", 0)
    text_ids = mx.array(np.where(is_media, pad, np.array(ids)).astype(np.int32))[None]
    backbone = target.backbone
    embeddings = backbone.embed_tokens(text_ids)
    features = mx.concatenate([embeddings_of(target, item) for item in prepared])
    features = (features / backbone.embed_scale).astype(embeddings.dtype)
    rows = mx.array(np.maximum(index, 0))
    embeddings = mx.where(mx.array(is_media)[None, :, None], features[rows][None], embeddings)
    per_layer = None
    if backbone.hidden_size_per_layer_input:
        per_layer = backbone._get_per_layer_inputs(text_ids)
    text_config = text_config_of(normalize_target_config(config))
    bidirectional = text_config.get("use_bidirectional_attention") == "vision"
    keys = cache_keys(ids, prepared, starts)
    every_layer = has_unified_vision(config)
    blocks = blocks if bidirectional else None
    media = MediaPrompt(embeddings, per_layer, blocks, keys, every_layer)
    return ids, media, keys


def conversation_suffix(
    target, prompt_cache, ids: list[int], images: Sequence[Media] = (), audio: Sequence[Media] = ()
) -> tuple[list[int], list, list]:
    """For a whole conversation (``ids`` with its placeholders, all its ``images`` and
    ``audio``): roll ``prompt_cache`` back to what it shares with the conversation (media compared
    by content, never cut between an item's begin and end tokens) and return the ``(ids, images,
    audio)`` to feed (the items as given)."""
    if not images and not audio:
        return trim_to_common_prefix(prompt_cache, ids), [], []
    prepared = prepare_media(target, images, audio)
    config = towers_of(target).config
    expanded, starts = expand_placeholders(ids, prepared, config)
    keys = cache_keys(expanded, prepared, starts)
    keep = min(common_prefix_length(prompt_cache.tokens, keys), len(keys) - 1)
    for item, start in zip(prepared, starts, strict=True):
        if start - 1 < keep <= start + item.num_soft_tokens:  # inside begin .. end
            keep = start - 1
    first = len(keys) - len(trim_to_common_prefix(prompt_cache, keys, keep_at_most=keep))
    new_ids, new_media, position = [], {"image": [], "audio": []}, first
    given = [*images, *audio]  # in the order of ``prepared``
    by_start = sorted(zip(prepared, given, starts, strict=True), key=lambda p: p[2])
    for item, original, start in by_start:
        if start - 1 >= first:
            token = placeholder_ids(config, item.kind)[0]
            new_ids += expanded[position : start - 1] + [token]
            new_media[item.kind].append(original)
            position = start + item.num_soft_tokens + 1
    return new_ids + expanded[position:], new_media["image"], new_media["audio"]
