"""transformers 5.23.0 reference for images in the prompt (test-only: imports torch).

A tiny random E2B-like ``Gemma4ForConditionalGeneration`` (per-layer inputs, KV-shared layers)
with a vision tower, its image-token ids inside the tiny vocabulary, and its assistant; the
reference runs it on the inputs transformers' own image processor makes.
"""

from pathlib import Path

import numpy as np
import torch
from hf_reference import (
    COMMON,
    TARGET_CONFIGS,
    TINY_VISION,
    VOCAB,
    assistant_config,
    load_hf,
    patch_transformers,
    randomize,
)
from transformers import (
    Gemma4AssistantForCausalLM,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
)
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

BOI, IMAGE, EOI = VOCAB - 4, VOCAB - 3, VOCAB - 2
EMBEDDING_GAIN = 0.1
MAX_SOFT_TOKENS = 70  # the processor's smallest budget: 630 patches of 4x4 pixels


def make_multimodal_pair(tmp_path: Path, bidirectional: bool, seed: int = 0) -> tuple[Path, Path]:
    """Save the target (``use_bidirectional_attention="vision"`` if ``bidirectional``) and its
    assistant under ``tmp_path``; returns their folders."""
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
        audio_config=None,
        boi_token_id=BOI,
        image_token_id=IMAGE,
        eoi_token_id=EOI,
    )
    target = Gemma4ForConditionalGeneration(config).float()
    randomize(target, generator)
    with torch.no_grad():  # a weaker residual token embedding, or it repeats the last token
        target.model.language_model.embed_tokens.weight.mul_(EMBEDDING_GAIN)
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


def hf_inputs(images: list, ids: list[int]) -> dict:
    """What ``Gemma4Processor`` hands the model: each ``IMAGE`` placeholder of ``ids`` expanded to
    ``BOI``, its soft tokens, ``EOI``."""
    features = image_processor()(images=images, return_tensors="pt")
    counts = iter(features["num_soft_tokens_per_image"])
    expanded = []
    for token in ids:
        expanded += [BOI, *[IMAGE] * int(next(counts)), EOI] if token == IMAGE else [token]
    input_ids = torch.tensor([expanded])
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=features["pixel_values"],
        image_position_ids=features["image_position_ids"],
        mm_token_type_ids=(input_ids == IMAGE).long(),
    )


def reference(target_dir: Path, images: list, ids: list[int], max_new_tokens: int) -> dict:
    """Soft-token embeddings, logits over the whole prompt and greedy generation."""
    model = load_hf(target_dir)
    inputs = hf_inputs(images, ids)
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_position_ids"], return_dict=True
        ).pooler_output
        logits = model(**inputs).logits[0]
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return dict(
        ids=inputs["input_ids"][0].tolist(),
        features=[f.numpy() for f in features],
        logits=logits.numpy(),
        generated=generated[0, inputs["input_ids"].shape[1] :].tolist(),
    )


def random_images(folder: Path, sizes: list, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i, (width, height) in enumerate(sizes):
        path = Path(folder) / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
