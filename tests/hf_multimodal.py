"""transformers 5.23.0 reference for images in the prompt (test-only: imports torch).

A tiny random E2B-like ``Gemma4ForConditionalGeneration`` (per-layer inputs, KV-shared layers)
with vision and audio towers, its media token ids inside the tiny vocabulary, and its assistant;
the reference runs it on the inputs transformers' own image processor and audio feature extractor
make.
"""

import wave
from pathlib import Path

import numpy as np
import torch
from hf_reference import (
    COMMON,
    TARGET_CONFIGS,
    TINY_AUDIO,
    TINY_VISION,
    VOCAB,
    assistant_config,
    load_hf,
    patch_transformers,
    randomize,
)
from PIL import Image
from transformers import (
    Gemma4AssistantForCausalLM,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
)
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

BOI, IMAGE, EOI = VOCAB - 4, VOCAB - 3, VOCAB - 2
BOA, AUDIO, EOA = VOCAB - 7, VOCAB - 6, VOCAB - 5
EMBEDDING_GAIN = 0.1
CLIP = 3.0  # the audio tower's clipped linears clamp at +-CLIP (inputs and outputs)
MAX_SOFT_TOKENS = 70  # the processor's smallest budget: 630 patches of 4x4 pixels
RATE = 16_000
# transformers sizes the projection after the convolutions as (channels[0] // 4) * channels[1],
# which is the flattened (frequency, channel) size only with 128 first channels for 128 mel bins
AUDIO_CONFIG = dict(TINY_AUDIO, subsampling_conv_channels=[128, 4])


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
        boi_token_id=BOI,
        image_token_id=IMAGE,
        eoi_token_id=EOI,
        boa_token_id=BOA,
        audio_token_id=AUDIO,
        eoa_token_index=EOA,
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


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768


def hf_inputs(images: list, clips: list, ids: list[int]) -> dict:
    """What ``Gemma4Processor`` hands the model: each ``IMAGE`` placeholder of ``ids`` expanded to
    ``BOI``, its soft tokens, ``EOI`` (``AUDIO`` to ``BOA``, soft tokens, ``EOA``)."""
    inputs, counts = {}, {IMAGE: iter(()), AUDIO: iter(())}
    if images:
        features = image_processor()(images=images, return_tensors="pt")
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
    target_dir: Path, images: list, clips: list, ids: list[int], max_new_tokens: int
) -> dict:
    """Soft-token embeddings of each image and clip, logits over the whole prompt and greedy
    generation."""
    model = load_hf(target_dir)
    inputs = hf_inputs([Image.open(p).convert("RGB") for p in images], clips, ids)
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
