"""transformers 5.23.0 reference for images in the prompt (test-only: imports torch).

A tiny random E2B-like ``Gemma4ForConditionalGeneration`` (per-layer inputs, KV-shared layers)
with vision and audio towers, its media token ids inside the tiny vocabulary, and its assistant;
the reference runs it on the inputs transformers' own image processor and audio feature extractor
make. The same for a tiny 12B-like ``Gemma4UnifiedForConditionalGeneration`` with its
encoder-free image embedder, on what ``Gemma4UnifiedImageProcessor`` makes (``unified_images``).
"""

import ast
import importlib.util
import json
import math
import types
import wave
from pathlib import Path

import numpy as np
import torch
import transformers.models.gemma4_unified as gemma4_unified
from hf_reference import (
    COMMON,
    SLIDING_WINDOW,
    TARGET_CONFIGS,
    TINY_AUDIO,
    TINY_UNIFIED_AUDIO,
    TINY_UNIFIED_VISION,
    TINY_VISION,
    VOCAB,
    assistant_config,
    load_hf,
    patch_transformers,
    randomize,
    text_config,
)
from PIL import Image
from transformers import (
    Gemma4AssistantForCausalLM,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4UnifiedAssistantForCausalLM,
    Gemma4UnifiedAudioConfig,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedVisionConfig,
    Gemma4VisionConfig,
)
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
from transformers.utils import TensorType

BOI, IMAGE, EOI = VOCAB - 4, VOCAB - 3, VOCAB - 2
BOA, AUDIO, EOA = VOCAB - 7, VOCAB - 6, VOCAB - 5
EMBEDDING_GAIN = 0.1
CLIP = 3.0  # the audio tower's clipped linears clamp at +-CLIP (inputs and outputs)
MAX_SOFT_TOKENS = 70  # the processor's smallest budget: 630 patches of 4x4 pixels
RATE = 16_000
# transformers sizes the projection after the convolutions as (channels[0] // 4) * channels[1],
# which is the flattened (frequency, channel) size only with 128 first channels for 128 mel bins
AUDIO_CONFIG = dict(TINY_AUDIO, subsampling_conv_channels=[128, 4])
MEDIA_TOKENS = dict(
    boi_token_id=BOI,
    image_token_id=IMAGE,
    eoi_token_id=EOI,
    boa_token_id=BOA,
    audio_token_id=AUDIO,
    eoa_token_index=EOA,
)
# Gemma4UnifiedImageProcessor's settings for the tiny 12B-like pair, as its preprocessor_config.json
# holds them (the class's defaults but for the patch sizes and the budget)
UNIFIED_IMAGE_SETTINGS = dict(
    image_processor_type="Gemma4UnifiedImageProcessor",
    patch_size=TINY_UNIFIED_VISION["patch_size"],
    pooling_kernel_size=TINY_UNIFIED_VISION["pooling_kernel_size"],
    max_soft_tokens=MAX_SOFT_TOKENS,
    do_convert_rgb=True,
    do_resize=True,
    resample=3,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=False,
    image_mean=[0.0, 0.0, 0.0],
    image_std=[1.0, 1.0, 1.0],
)


def make_multimodal_pair(tmp_path: Path, bidirectional: bool, seed: int = 0) -> tuple[Path, Path]:
    """Save the target (vision and audio towers; ``use_bidirectional_attention="vision"`` if
    ``bidirectional``) and its assistant under ``tmp_path``; returns their folders."""
    patch_transformers()
    generator = torch.Generator().manual_seed(seed)
    text = Gemma4TextConfig(
        **COMMON,
        **TARGET_CONFIGS["e2b"],
        use_bidirectional_attention="vision" if bidirectional else None,
    )
    config = Gemma4Config(
        text_config=text,
        vision_config=Gemma4VisionConfig(**TINY_VISION),
        audio_config=Gemma4AudioConfig(**AUDIO_CONFIG),
        **MEDIA_TOKENS,
    )
    target = Gemma4ForConditionalGeneration(config).float()
    randomize(target, generator)
    with torch.no_grad():
        # a weaker residual token embedding, or the random target repeats the last token
        target.model.language_model.embed_tokens.weight.mul_(EMBEDDING_GAIN)
        for name, buffer in target.model.audio_tower.named_buffers():
            if name.endswith(("_min", "_max")):
                buffer.fill_(-CLIP if name.endswith("_min") else CLIP)
    assistant = Gemma4AssistantForCausalLM(assistant_config("e2b")).float()
    randomize(assistant, generator)
    folder = Path(tmp_path) / ("bidirectional" if bidirectional else "causal")
    target.save_pretrained(folder / "target")
    assistant.save_pretrained(folder / "assistant")
    image_processor().save_pretrained(folder / "target")
    return folder / "target", folder / "assistant"


def image_processor() -> Gemma4ImageProcessorPil:
    vision = TINY_VISION
    return Gemma4ImageProcessorPil(
        patch_size=vision["patch_size"], pooling_kernel_size=3, max_soft_tokens=MAX_SOFT_TOKENS
    )


def make_unified_image_pair(
    tmp_path: Path,
    seed: int = 0,
    sliding_window: int = SLIDING_WINDOW,
    ordered: bool | None = None,
) -> tuple[Path, Path]:
    """Save a tiny random 12B-like target (``Gemma4UnifiedForConditionalGeneration``: image
    embedder, ``use_bidirectional_attention="vision"``, transformers' default) with its
    ``preprocessor_config.json``, and its assistant (``ordered``: centroid-masked head, as
    ``assistant_config``), under ``tmp_path``; returns their folders."""
    patch_transformers()
    generator = torch.Generator().manual_seed(seed)
    fields = dict(COMMON, sliding_window=sliding_window, **TARGET_CONFIGS["12b"])
    config = Gemma4UnifiedConfig(
        text_config=text_config("12b", **fields),
        vision_config=Gemma4UnifiedVisionConfig(**TINY_UNIFIED_VISION),
        audio_config=Gemma4UnifiedAudioConfig(**TINY_UNIFIED_AUDIO),
        **MEDIA_TOKENS,
    )
    target = Gemma4UnifiedForConditionalGeneration(config).float()
    randomize(target, generator)
    with torch.no_grad():
        target.model.language_model.embed_tokens.weight.mul_(EMBEDDING_GAIN)
    assistant = Gemma4UnifiedAssistantForCausalLM(assistant_config("12b", sliding_window, ordered))
    randomize(assistant.float(), generator)
    folder = Path(tmp_path) / f"unified-w{sliding_window}"
    target.save_pretrained(folder / "target")
    assistant.save_pretrained(folder / "assistant")
    settings = json.dumps(UNIFIED_IMAGE_SETTINGS, indent=2)
    (folder / "target" / "preprocessor_config.json").write_text(settings)
    return folder / "target", folder / "assistant"


def unified_images(images: list, **settings) -> BatchFeature:
    """What transformers' ``Gemma4UnifiedImageProcessor`` gives for RGB PIL ``images``: the
    processor itself where torchvision imports, else ``UnifiedPreprocess``."""
    settings = {**UNIFIED_IMAGE_SETTINGS, **settings}
    settings.pop("image_processor_type")
    if importlib.util.find_spec("torchvision") is not None:
        from transformers.models.gemma4_unified.image_processing_gemma4_unified import (
            Gemma4UnifiedImageProcessor,
        )

        return Gemma4UnifiedImageProcessor(**settings)(images=images, return_tensors="pt")
    return UnifiedPreprocess()(images, **settings)


def torchvision_resize(image, size, interpolation, antialias):
    """torchvision 0.28's ``resize`` (``resize_image``) of a uint8 CPU image with the bicubic
    filter: torch's own uint8 resampler, no cast (``_do_native_uint8_resize_on_cpu``)."""
    assert image.dtype == torch.uint8 and interpolation == "bicubic" and antialias
    resized = torch.nn.functional.interpolate(
        image[None], size=size, mode="bicubic", align_corners=False, antialias=True
    )
    return resized[0]


class UnifiedPreprocess:
    """``Gemma4UnifiedImageProcessor`` without torchvision, which does not install beside the CPU
    build of torch 2.13 (PyPI's wheel needs the CUDA one): transformers' own code, the module-level
    functions and the ``_preprocess`` and ``aspect_ratio_preserving_resize`` methods compiled from
    the installed ``image_processing_gemma4_unified.py`` (all but its torchvision import), with
    ``TorchvisionBackend``'s input conversion and rescaling; the one call into torchvision,
    ``tvF.resize``, is the torch call torchvision makes (``torchvision_resize``)."""

    source = Path(gemma4_unified.__file__).parent / "image_processing_gemma4_unified.py"
    methods = ("_preprocess", "aspect_ratio_preserving_resize")
    process_image = TorchvisionBackend.process_image
    rescale_and_normalize = TorchvisionBackend.rescale_and_normalize
    _fuse_mean_std_and_rescale_factor = TorchvisionBackend._fuse_mean_std_and_rescale_factor
    rescale = TorchvisionBackend.rescale

    def __init__(self):
        tree = ast.parse(self.source.read_text())
        processor = next(
            n for n in tree.body if getattr(n, "name", "") == "Gemma4UnifiedImageProcessor"
        )
        nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.Assign)]
        nodes += [n for n in processor.body if getattr(n, "name", "") in self.methods]
        namespace = dict(math=math, torch=torch, BatchFeature=BatchFeature, TensorType=TensorType)
        # InterpolationMode appears in annotations only
        namespace["tvF"] = types.SimpleNamespace(resize=torchvision_resize, InterpolationMode=str)
        exec(compile(ast.Module(nodes, []), str(self.source), "exec"), namespace)
        for name in self.methods:
            setattr(self, name, types.MethodType(namespace[name], self))

    def __call__(self, images: list, **settings) -> BatchFeature:
        tensors = [self.process_image(image, do_convert_rgb=True) for image in images]
        return self._preprocess(
            tensors,
            do_resize=settings["do_resize"],
            resample="bicubic",  # torchvision's InterpolationMode.BICUBIC.value
            do_rescale=settings["do_rescale"],
            rescale_factor=settings["rescale_factor"],
            do_normalize=settings["do_normalize"],
            image_mean=tuple(settings["image_mean"]),
            image_std=tuple(settings["image_std"]),
            return_tensors="pt",
            patch_size=settings["patch_size"],
            max_soft_tokens=settings["max_soft_tokens"],
            pooling_kernel_size=settings["pooling_kernel_size"],
        )


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768


def gemma4_images(images: list) -> BatchFeature:
    return image_processor()(images=images, return_tensors="pt")


def hf_inputs(images: list, clips: list, ids: list[int], process_images=gemma4_images) -> dict:
    """What ``Gemma4Processor`` (``Gemma4UnifiedProcessor`` with ``unified_images``) hands the
    model: each ``IMAGE`` placeholder of ``ids`` expanded to ``BOI``, its soft tokens, ``EOI``
    (``AUDIO`` to ``BOA``, soft tokens, ``EOA``)."""
    inputs, counts = {}, {IMAGE: iter(()), AUDIO: iter(())}
    if images:
        features = process_images(images)
        inputs.update(
            pixel_values=features["pixel_values"], image_position_ids=features["image_position_ids"]
        )
        counts[IMAGE] = iter(features["num_soft_tokens_per_image"])
    if clips:
        features = Gemma4AudioFeatureExtractor()(
            [read_wav(c) for c in clips], sampling_rate=RATE, return_tensors="pt"
        )
        mask = features["input_features_mask"]
        inputs.update(input_features=features["input_features"], input_features_mask=mask)
        counts[AUDIO] = iter(int(m[::2][::2].sum()) for m in mask)
    expanded = []
    for token in ids:
        if token in (IMAGE, AUDIO):
            begin, end = (BOI, EOI) if token == IMAGE else (BOA, EOA)
            expanded += [begin, *[token] * int(next(counts[token])), end]
        else:
            expanded.append(token)
    input_ids = torch.tensor([expanded])
    mm_types = (input_ids == IMAGE).long() + 3 * (input_ids == AUDIO).long()
    return dict(
        inputs,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=mm_types,
    )


def reference(
    target_dir: Path,
    images: list,
    clips: list,
    ids: list[int],
    max_new_tokens: int,
    process_images=gemma4_images,
) -> dict:
    """Soft-token embeddings of each image and clip, logits over the whole prompt and greedy
    generation."""
    model = load_hf(target_dir)
    pictures = [Image.open(p).convert("RGB") for p in images]
    inputs = hf_inputs(pictures, clips, ids, process_images)
    features = []
    with torch.no_grad():
        if images:
            features += model.model.get_image_features(
                inputs["pixel_values"], inputs["image_position_ids"], return_dict=True
            ).pooler_output
        if clips:
            audio = model.model.get_audio_features(
                inputs["input_features"], inputs["input_features_mask"], return_dict=True
            )
            features += [
                f[m] for f, m in zip(audio.pooler_output, audio.attention_mask, strict=True)
            ]
        logits = model(**inputs).logits[0]
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return dict(
        ids=inputs["input_ids"][0].tolist(),
        features=[f.numpy() for f in features],
        logits=logits.numpy(),
        generated=generated[0, inputs["input_ids"].shape[1] :].tolist(),
    )


def random_images(folder: Path, sizes: list, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, (width, height) in enumerate(sizes):
        path = Path(folder) / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def random_clips(folder: Path, seconds: list, seed: int = 0) -> list[Path]:
    """16 kHz mono 16-bit WAV files of noise and tones."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, length in enumerate(seconds):
        t = np.arange(int(length * RATE)) / RATE
        signal = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.1 * rng.normal(
            size=t.size
        )
        path = Path(folder) / f"clip{i}.wav"
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(RATE)
            f.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())
        paths.append(path)
    return paths


# A tokenizer for the tiny pairs: printable ASCII characters, Gemma 4's turn and media markers at
# the config's ids, and a chat template that writes the media entries as Gemma 4's does.
TEMPLATE = """{{ bos_token }}{% for message in messages %}\
<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}{% else %}\
{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}\
{% elif item['type'] == 'image' %}<|image|>{% elif item['type'] == 'audio' %}<|audio|>\
{% endif %}{% endfor %}{% endif %}<turn|>
{% endfor %}{% if add_generation_prompt %}<|turn>model
{% endif %}"""


def write_tokenizer(folder) -> None:
    """Every id of the vocabulary is one token, so a reply's text encodes back to its ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<|turn>", 5: "<turn|>",
                BOA: "<boa>", AUDIO: "<|audio|>", EOA: "<eoa>", BOI: "<boi>", IMAGE: "<|image|>",
                EOI: "<eoi>"}  # fmt: skip
    # GPT-2's byte-level characters of newline, space and the printable ASCII characters
    characters = ["\u010a", "\u0120", *map(chr, range(0x21, 0x7F))]
    vocab = {c: 6 + i for i, c in enumerate(characters)}
    for i in range(6 + len(characters), VOCAB):
        specials.setdefault(i, f"<unused{i}>")
    vocab.update({token: i for i, token in specials.items()})
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in specials.values()])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
              "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
